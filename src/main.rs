//! `pushcluster`: the one binary. This file parses flags and wires the
//! components together; the behaviour lives in the crates.
// Unsafe code only in `scheduler` (two system calls without a safe wrapper).
#![deny(unsafe_code)]

mod admin;
mod fleet;
mod grpc_tls;
mod operator_cmd;
mod process;
mod scheduler;
mod standalone;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pushcluster_api::config::{Config, LogFormat, Role, RuntimeConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "pushcluster",
    version,
    about = "A goim v2-compatible push server"
)]
struct Cli {
    #[command(flatten)]
    logging: Logging,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Logging {
    /// Log format (default: the config's `log.format`, else text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Log filter such as `info` or `debug,hyper=info` (default: `log.level`;
    /// the RUST_LOG environment variable wins over both).
    #[arg(long, global = true)]
    log_level: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run comet, logic and job in one process over an in-memory backplane.
    Standalone {
        /// YAML configuration file (every key optional; see docs/configuration.md).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a comet: client connections (TCP, WebSocket) and the
    /// goim.comet.Comet service; asks logic through gRPC (distributed mode).
    Comet {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run logic: the HTTP push API and the goim.logic.Logic service, on
    /// NATS JetStream and KV (distributed mode).
    Logic {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a job: consumes the NATS push stream and delivers to comets over
    /// gRPC (distributed mode).
    Job {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the Kubernetes operator: reconciles PushCluster objects into fleets.
    Operator(operator_cmd::OperatorArgs),
    /// Print the PushCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print the effective configuration (defaults plus the file) as YAML.
    Config {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    Config::from_yaml(&text).with_context(|| format!("invalid config file {}", path.display()))
}

fn init_logging(logging: &Logging, config: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let level = logging.log_level.as_deref().unwrap_or(&config.log.level);
        EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let format = match logging.log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => config.log.format,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Loads the config, sets up logging, refuses an exposure the role may not
/// run with, and runs `command` on a runtime.
fn run<F, Fut>(logging: &Logging, role: Role, path: Option<&Path>, command: F) -> anyhow::Result<()>
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = load_config(path)?;
    init_logging(logging, &config);
    let warnings = config.check_exposure(role).with_context(|| match path {
        Some(path) => format!("config file {}", path.display()),
        None => "no config file (see docs/security.md)".to_string(),
    })?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let runtime = config.runtime_for(role);
    // Before the runtime starts its threads: they inherit the slice.
    set_scheduler_slice(&runtime);
    block_on(&runtime, command(config))
}

/// Asks for `runtime.scheduler_slice`; a kernel or sandbox that refuses it
/// leaves the kernel's own, which only costs latency.
fn set_scheduler_slice(runtime: &RuntimeConfig) {
    let Some(slice) = runtime.scheduler_slice() else {
        return;
    };
    match scheduler::set(slice) {
        Ok(Some(taken)) => tracing::info!(?taken, "scheduler slice set (runtime.scheduler_slice)"),
        Ok(None) => tracing::warn!(
            "runtime.scheduler_slice: this kernel has no per-thread slice (Linux 6.12 or later has); its own applies"
        ),
        Err(error) => tracing::warn!(
            %error,
            "runtime.scheduler_slice: the kernel refused the slice; its own applies"
        ),
    }
}

fn block_on<Fut: std::future::Future<Output = anyhow::Result<()>>>(
    runtime: &RuntimeConfig,
    future: Fut,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .event_interval(runtime.event_interval)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

fn main() -> ExitCode {
    let Cli { logging, command } = Cli::parse();
    let result = match command {
        Command::Config { config } => load_config(config.as_deref())
            .and_then(|config| Ok(config.to_yaml()?))
            .map(|yaml| print!("{yaml}")),
        Command::Standalone { config } => run(
            &logging,
            Role::Standalone,
            config.as_deref(),
            standalone::run,
        ),
        Command::Comet { config } => {
            run(&logging, Role::Comet, config.as_deref(), fleet::run_comet)
        }
        Command::Logic { config } => {
            run(&logging, Role::Logic, config.as_deref(), fleet::run_logic)
        }
        Command::Job { config } => run(&logging, Role::Job, config.as_deref(), fleet::run_job),
        Command::Operator(args) => {
            init_logging(&logging, &Config::default());
            block_on(&RuntimeConfig::default(), operator_cmd::run(args))
        }
        Command::Crd => pushcluster_operator::crd_yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pushcluster: {error:#}");
            ExitCode::FAILURE
        }
    }
}
