//! TLS for the WSS listener (goim's `tlsOpen`): a rustls acceptor from PEM
//! files. The files are looked at again in the background (every
//! `comet.websocket.tls.reload_interval`) and a changed certificate is
//! served from then on, so cert-manager renewals and Secret rotations need
//! no restart; a handshake never reads a file.

use std::sync::Arc;

use pushcluster_api::config::WssConfig;
use pushcluster_files::Reloading;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// Builds the acceptor for `comet.websocket.tls`; fails if the files do
/// not hold a matching certificate and key now.
pub fn acceptor(config: &WssConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(ReloadingCertificate::new(config, provider.clone())?);
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The certificate served, replaced when its files change.
#[derive(Debug)]
struct ReloadingCertificate {
    current: Arc<Reloading<CertifiedKey>>,
}

impl ReloadingCertificate {
    fn new(config: &WssConfig, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let (cert_file, key_file) = (config.cert_file.clone(), config.key_file.clone());
        // Mid-rotation the pair may not match yet: the old one stays served
        // until a load succeeds.
        let current = Reloading::start(
            "WSS certificate",
            vec![config.cert_file.clone(), config.key_file.clone()],
            config.reload_interval,
            move || load(&cert_file, &key_file, &provider),
        )?;
        Ok(ReloadingCertificate { current })
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.current())
    }
}

fn load(
    cert_file: &str,
    key_file: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificates {
            path: cert_file.to_string(),
            message: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(cert_file.to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key {
        path: key_file.to_string(),
        message: e.to_string(),
    })?;
    Ok(CertifiedKey::from_der(certificates, key, provider)?)
}
