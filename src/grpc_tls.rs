//! `grpc_tls`: the files of the fleet's mutual TLS, read once at start and
//! turned into tonic's server and client settings (in the binary: the
//! `api` crate does no I/O). Every process presents
//! the same kind of certificate both ways, signed by the fleet's CA.

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use pushcluster_api::config::GrpcTlsConfig;

/// The loaded PEM files.
#[derive(Clone, Debug)]
pub struct GrpcTls {
    identity: Identity,
    ca: Certificate,
    server_name: String,
}

fn read(path: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("grpc_tls: cannot read {path}"))
}

impl GrpcTls {
    pub fn load(config: &GrpcTlsConfig) -> anyhow::Result<GrpcTls> {
        Ok(GrpcTls {
            identity: Identity::from_pem(read(&config.cert_file)?, read(&config.key_file)?),
            ca: Certificate::from_pem(read(&config.ca_file)?),
            server_name: config.server_name.clone(),
        })
    }

    /// Loads `grpc_tls` if configured.
    pub fn from_config(config: Option<&GrpcTlsConfig>) -> anyhow::Result<Option<GrpcTls>> {
        config.map(GrpcTls::load).transpose()
    }

    /// Servers require a client certificate signed by the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// Clients present their certificate and verify the server's against
    /// the CA and `server_name`.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(self.identity.clone())
            .ca_certificate(self.ca.clone())
            .domain_name(self.server_name.clone())
    }
}
