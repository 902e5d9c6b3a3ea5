//! TLS with rustls (ring provider, the one kube-rs already brings), both ways:
//!
//! - **Client listener** (`--tls-cert-file`, `--tls-key-file`): [`ReloadingCert`] holds
//!   the current server configuration; when either file changes it is re-read and a
//!   new configuration swapped in atomically, so new handshakes get the new certificate
//!   and open connections are not touched. The new configuration has a fresh session
//!   cache: clients cannot resume a session made under the old certificate. A bad pair
//!   (unreadable, mismatched key) is logged and counted, and the old certificate keeps
//!   serving. ALPN offers `h2` and `http/1.1`.
//! - **Workers** (`https://` worker URLs): one client configuration for proxying,
//!   health probes, metric scrapes and PD: the system roots plus `--worker-ca-file`,
//!   and a client certificate for mTLS with `--worker-client-cert-file`/
//!   `--worker-client-key-file`.

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The crypto provider every TLS configuration here uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Read a PEM certificate chain (leaf first). Errors name the file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM certificate in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

/// Read a PEM private key (PKCS#8, PKCS#1 or SEC1). Errors name the file, never the key.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

/// Load a certificate chain and its key into a signing [`CertifiedKey`], checking that
/// the key belongs to the leaf certificate.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("unusable private key in {}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "the key in {} does not belong to the certificate in {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(ck)
}

/// The listener's certificate and TLS configuration, swapped on reload.
#[derive(Debug)]
pub struct ReloadingCert {
    config: ArcSwap<rustls::ServerConfig>,
    cert: PathBuf,
    key: PathBuf,
}

/// Serves one certificate (the one a configuration was built with).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The rustls server configuration of the client listener (TLS 1.2 and 1.3, ALPN h2 and
/// http/1.1, no client certificates), serving `ck`.
fn server_config(ck: CertifiedKey) -> Result<rustls::ServerConfig, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(ck))));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

impl ReloadingCert {
    /// Load `cert` + `key` now. Errors: as [`load_certified_key`].
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, String> {
        let cfg = server_config(load_certified_key(cert, key)?)?;
        Ok(Arc::new(ReloadingCert {
            config: ArcSwap::from_pointee(cfg),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    /// Re-read both files; on success new handshakes use them, on error the previous
    /// certificate stays (the error is returned for the log and the metric).
    pub fn reload(&self) -> Result<(), String> {
        let cfg = server_config(load_certified_key(&self.cert, &self.key)?)?;
        self.config.store(Arc::new(cfg));
        Ok(())
    }

    /// The two files, for the file watcher.
    pub fn files(&self) -> [PathBuf; 2] {
        [self.cert.clone(), self.key.clone()]
    }

    /// An acceptor with the current configuration (one per connection: an `Arc` clone).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }
}

/// How the router talks TLS to `https://` workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerTls {
    /// `--worker-ca-file`: extra trusted CA certificates (PEM), added to the system roots.
    pub ca_file: Option<PathBuf>,
    /// `--worker-client-cert-file`: client certificate chain for mTLS (PEM).
    pub client_cert: Option<PathBuf>,
    /// `--worker-client-key-file`: its private key (PEM).
    pub client_key: Option<PathBuf>,
}

/// The worker client configuration, with the options it was built from.
static WORKER_TLS: OnceLock<(WorkerTls, Arc<rustls::ClientConfig>)> = OnceLock::new();

/// Build the worker client configuration and make it the one every worker client
/// uses. Call before any worker client is built; calling again with the same options is
/// a no-op. Errors: unreadable or invalid files, a certificate without its key, or
/// options different from those already in use (a client built earlier with other
/// options would silently ignore the new ones).
pub fn set_worker_tls(opts: &WorkerTls) -> Result<(), String> {
    if let Some((current, _)) = WORKER_TLS.get() {
        return if current == opts {
            Ok(())
        } else {
            Err("worker TLS was already configured with other options (set it before building any worker client)".into())
        };
    }
    let cfg = worker_client_config(opts)?;
    match WORKER_TLS.set((opts.clone(), cfg)) {
        Ok(()) => Ok(()),
        // Set concurrently: same rule.
        Err(_) => set_worker_tls(opts),
    }
}

/// The worker TLS configuration: the one set at startup, else system roots only.
pub fn worker_client_tls() -> Arc<rustls::ClientConfig> {
    WORKER_TLS
        .get_or_init(|| {
            let opts = WorkerTls::default();
            // Reads no file, so it cannot fail (unreadable system roots are skipped).
            let cfg = worker_client_config(&opts).expect("default worker TLS configuration");
            (opts, cfg)
        })
        .1
        .clone()
}

fn worker_client_config(opts: &WorkerTls) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(ca) = &opts.ca_file {
        for c in read_certs(ca)? {
            roots
                .add(c)
                .map_err(|e| format!("bad CA certificate in {}: {e}", ca.display()))?;
        }
    }
    tracing::debug!(
        system_roots = added,
        extra_ca = ?opts.ca_file,
        "worker TLS roots loaded"
    );
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots);
    let cfg = match (&opts.client_cert, &opts.client_key) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(read_certs(c)?, read_key(k)?)
            .map_err(|e| format!("worker client certificate {}: {e}", c.display()))?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(
                "--worker-client-cert-file and --worker-client-key-file go together".into(),
            );
        }
    };
    Ok(Arc::new(cfg))
}

/// An HTTP connector that speaks plain HTTP to `http://` workers and TLS (the
/// configuration above) to `https://` ones. `http` is the TCP connector with its
/// timeouts; it must not enforce the `http` scheme.
pub fn worker_connector(
    mut http: hyper_util::client::legacy::connect::HttpConnector,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*worker_client_tls()).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_tls_is_set_once_and_a_different_second_setting_is_refused() {
        // Whatever ran first in this process, the configuration in use is now fixed.
        let _ = worker_client_tls();
        let current = WORKER_TLS.get().unwrap().0.clone();
        assert_eq!(set_worker_tls(&current), Ok(()), "same options: a no-op");
        let other = WorkerTls {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..current.clone()
        };
        let err = set_worker_tls(&other).unwrap_err();
        assert!(err.contains("already configured"), "{err}");
    }
}
