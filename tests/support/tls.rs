//! A throwaway certificate authority and a certificate it signs for 127.0.0.1 ([`TestCa`]), and
//! an HTTPS server on loopback using them that records what it is asked ([`TlsServer`]): the far
//! end of weir's outbound TLS (proxied origins, probes, webhooks; Redis over TLS uses the files).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// One request the server answered: method, path and query, body.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub host: String,
    pub body: String,
}

/// PEM files in a temp dir: `ca.pem` (the authority), `cert.pem` and `key.pem` (127.0.0.1).
pub struct TestCa {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let (ca_file, cert_file, key_file) = (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, leaf.pem()).unwrap();
        std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
        TestCa { ca_file, cert_file, key_file, cert_der: leaf.der().to_vec(), key_der: leaf_key.serialize_der(), _dir: dir }
    }
}

pub struct TlsServer {
    pub addr: SocketAddr,
    /// The PEM of the CA that signed the server's certificate (for `tls_ca_file`).
    pub ca_file: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _ca: TestCa,
}

impl TlsServer {
    /// Serves `https://127.0.0.1:{port}`, answering every request 200 with `{"uri": ...}`.
    pub async fn start() -> TlsServer {
        let ca = TestCa::new();

        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(ca.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.key_der.clone())),
            )
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, record) = (acceptor.clone(), record.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends the handshake: nothing to serve.
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let host = parts.headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                            let uri = parts.uri.to_string();
                            record.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                uri: uri.clone(),
                                host,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                            let reply = serde_json::json!({ "uri": uri, "tls": true }).to_string();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(reply))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        TlsServer { addr, ca_file: ca.ca_file.clone(), seen, _ca: ca }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}
