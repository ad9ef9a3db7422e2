//! TLS for the WSS listener (goim's `tlsOpen`): a rustls acceptor from PEM
//! files. The files are looked at again (at most every
//! `comet.websocket.tls.reload_interval`, on the next handshake) and a
//! changed certificate is served from then on, so cert-manager renewals and
//! Secret rotations need no restart.

use std::sync::{Arc, RwLock};

use pushcluster_api::config::WssConfig;
use pushcluster_api::file_watch::FileWatch;
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
    cert_file: String,
    key_file: String,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    files: FileWatch,
}

impl ReloadingCertificate {
    fn new(config: &WssConfig, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let certified = load(&config.cert_file, &config.key_file, &provider)?;
        Ok(ReloadingCertificate {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            provider,
            current: RwLock::new(Arc::new(certified)),
            files: FileWatch::new(
                vec![config.cert_file.clone(), config.key_file.clone()],
                config.reload_interval,
            ),
        })
    }

    fn refresh(&self) {
        let Some(seen) = self.files.changed() else {
            return;
        };
        match load(&self.cert_file, &self.key_file, &self.provider) {
            Ok(certified) => {
                self.files.loaded(seen);
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(certified);
                }
                tracing::info!(cert_file = %self.cert_file, "WSS certificate reloaded");
            }
            // Mid-rotation the pair may not match yet: keep serving the old
            // one and look again later.
            Err(error) => tracing::warn!(%error, "WSS certificate not reloaded; the old one stays"),
        }
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        self.current.read().ok().map(|current| Arc::clone(&current))
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
