//! Feeds arbitrary bytes to a comet's WebSocket path as a hostile client
//! would send them on a fresh connection: the HTTP upgrade request, then
//! WebSocket frames carrying goim frames, authenticated by a real logic
//! (in-memory backplane, goim's open auth). The comet may refuse or close;
//! it may not panic or hang.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pushcluster_api::config::{CometConfig, LogicConfig};
use pushcluster_backplane::bus::MemoryBus;
use pushcluster_backplane::registry::MemoryRegistry;
use pushcluster_comet::Comet;
use pushcluster_comet::metrics::CometMetrics;
use pushcluster_logic::Logic;
use pushcluster_logic::metrics::LogicMetrics;
use tokio::io::AsyncWriteExt;

fn setup() -> &'static (tokio::runtime::Runtime, Arc<Comet>) {
    static SETUP: OnceLock<(tokio::runtime::Runtime, Arc<Comet>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let registry = prometheus::Registry::new();
        let logic = Logic::new(
            LogicConfig::default(),
            Arc::new(MemoryRegistry::new(
                Duration::from_secs(60),
                Duration::from_secs(60),
            )),
            Arc::new(MemoryBus::default()),
            LogicMetrics::new(&registry).expect("metrics"),
        )
        .expect("logic");
        let comet = runtime.block_on(async {
            Comet::new(
                "fuzz".into(),
                CometConfig::default(),
                Arc::new(logic),
                CometMetrics::new(&registry).expect("metrics"),
            )
        });
        (runtime, comet)
    })
}

fuzz_target!(|data: &[u8]| {
    let (runtime, comet) = setup();
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let serve = pushcluster_comet::serve_websocket(
            comet.clone(),
            server,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        );
        // The client's input ends at EOF, so the connection ends by itself;
        // the bound turns a hang into a finding.
        tokio::time::timeout(Duration::from_secs(10), serve)
            .await
            .expect("the comet ended the connection after the client's EOF");
        drop(client);
    });
});
