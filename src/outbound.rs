//! Outbound HTTP and HTTPS: the connector every client of weir's shares (the reverse proxy to a
//! room's origin, the adaptive rate's probes, webhooks, the CLI's admin calls). `https://` goes
//! through rustls (on the `ring` weir links anyway) and trusts Mozilla's root certificates,
//! built into the binary so that a container without a CA bundle still works, plus the
//! certificate authorities in `tls_ca_file` (a private CA in front of an internal origin).
//!
//! A cluster's Redis URL may be `rediss://` ([`redis_client`]): Redis over TLS trusts the
//! system's CA store and Mozilla's roots, or, with `tls_ca_file`, the authorities in that file.
//!
//! The trust settings are process-wide, set once at startup ([`configure`]) before any client
//! is made: the proxy's client lives for the process.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// A connector for `http://` and `https://` URLs.
pub type Connector = HttpsConnector<HttpConnector>;

/// The trust settings, made once per process.
struct Settings {
    ca_file: Option<PathBuf>,
    tls: Arc<ClientConfig>,
    /// The PEM text of `ca_file`, for Redis (its client takes roots as PEM).
    ca_pem: Option<Vec<u8>>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

impl Settings {
    fn new(ca_file: Option<&Path>) -> Result<Settings, String> {
        let (tls, ca_pem) = client_config(ca_file)?;
        Ok(Settings { ca_file: ca_file.map(Path::to_path_buf), tls, ca_pem })
    }
}

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(|| Settings::new(None).expect("the built-in roots make a valid TLS setup"))
}

/// Trusts the certificate authorities of the PEM file `ca_file` besides the built-in roots.
/// The first call decides for the process; a later one naming another file is refused.
pub fn configure(ca_file: Option<&Path>) -> Result<(), String> {
    if SETTINGS.get().is_none() {
        let new = Settings::new(ca_file)?;
        let _ = SETTINGS.set(new);
    }
    match (&settings().ca_file, ca_file) {
        (_, None) => Ok(()),
        (Some(set), Some(asked)) if set == asked => Ok(()),
        _ => Err("tls_ca_file: outbound TLS was already set up differently in this process".into()),
    }
}

/// Whether `ca_file` is a readable PEM file of certificates (checked with the configuration).
pub fn check_ca_file(ca_file: &Path) -> Result<(), String> {
    client_config(Some(ca_file)).map(drop)
}

/// The TLS settings, and the PEM text of `ca_file` (read once) for Redis.
fn client_config(ca_file: Option<&Path>) -> Result<(Arc<ClientConfig>, Option<Vec<u8>>), String> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let mut ca_pem = None;
    if let Some(path) = ca_file {
        let unreadable = |e: &dyn std::fmt::Display| format!("tls_ca_file: cannot read certificates from {}: {e}", path.display());
        let pem = std::fs::read(path).map_err(|e| unreadable(&e))?;
        let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| unreadable(&e))?;
        if certs.is_empty() {
            return Err(format!("tls_ca_file: {} holds no PEM certificate", path.display()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("tls_ca_file: {}: {e}", path.display()))?;
        }
        ca_pem = Some(pem);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((Arc::new(config), ca_pem))
}

/// A Redis client for `redis://` or `rediss://` `url`.
pub fn redis_client(url: &str) -> redis::RedisResult<redis::Client> {
    match settings().ca_pem.clone() {
        Some(root_cert) if url.starts_with("rediss://") => {
            redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) })
        }
        _ => redis::Client::open(url),
    }
}

/// A connector for both schemes, with `connect_timeout` on the TCP connection.
pub fn connector(connect_timeout: Option<Duration>) -> Connector {
    let tls = &settings().tls;
    let mut http = HttpConnector::new();
    // The TLS layer takes `https://`; this one only ever sees the TCP connection.
    http.enforce_http(false);
    http.set_connect_timeout(connect_timeout);
    http.set_nodelay(true);
    HttpsConnectorBuilder::new().with_tls_config((**tls).clone()).https_or_http().enable_http1().wrap_connector(http)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(client_config(Some(&empty)).unwrap_err().contains("holds no PEM certificate"));
        assert!(client_config(Some(&dir.path().join("missing.pem"))).unwrap_err().contains("cannot read"));
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, cert.cert.pem()).unwrap();
        assert!(client_config(Some(&good)).is_ok());
        assert!(client_config(None).is_ok());
    }
}
