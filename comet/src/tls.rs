//! TLS for the WSS listener (goim's `tlsOpen`): a rustls acceptor from PEM
//! files.

use std::sync::Arc;

use pushcluster_api::config::WssConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {message}")]
    Certificates { path: String, message: String },
    #[error("no certificate in {0}")]
    NoCertificate(String),
    #[error("cannot read the private key from {path}: {message}")]
    Key { path: String, message: String },
    #[error("certificate and key do not form a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds the acceptor for `comet.websocket.tls`.
pub fn acceptor(config: &WssConfig) -> Result<TlsAcceptor, TlsError> {
    let certificates: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&config.cert_file)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| TlsError::Certificates {
                path: config.cert_file.clone(),
                message: e.to_string(),
            })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(config.cert_file.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| TlsError::Key {
        path: config.key_file.clone(),
        message: e.to_string(),
    })?;
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certificates, key)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
