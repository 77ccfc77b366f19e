//! A real `redis-server` (Debian package `redis-server`, which `scripts/test` installs) on an
//! ephemeral loopback port, for the cluster tests; include with
//! `#[path = "support/redis.rs"] mod redis;`.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` of its own, killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Child,
    tls: bool,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> Redis {
        Self::spawn(port, &["--port", &port.to_string()], false)
    }

    /// A Redis that speaks only TLS (`rediss://`), with `cert`/`key` (PEM files).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let args = ["--port", "0", "--tls-port", &port.to_string(), "--tls-cert-file", cert, "--tls-key-file", key, "--tls-auth-clients", "no"];
        Self::spawn(port, &args, true)
    }

    fn spawn(port: u16, listen: &[&str], tls: bool) -> Redis {
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}): `scripts/test` installs it (apt-get install redis-server)"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { port, child, tls }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "rediss" } else { "redis" }, self.port)
    }

    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

