//! Test harness: `TestApp` runs the real `weir::Server` in-process on an ephemeral port with a
//! temp data dir and hands out admin and visitor clients; `Binary` runs the real `weir`
//! executable (for signals, `kill -9` and the CLI).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use weir::clock::{Clock, ManualClock};
use weir::config::Config;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub data_dir: tempfile::TempDir,
    pub clock: Option<ManualClock>,
    task: Option<tokio::task::JoinHandle<Result<(), weir::RunError>>>,
}

pub struct TestAppBuilder {
    config: Config,
    clock: Option<ManualClock>,
    data_dir: Option<tempfile::TempDir>,
}

impl TestApp {
    pub fn builder() -> TestAppBuilder {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_key: Some(ADMIN_KEY.into()),
            shutdown_grace_seconds: 2,
            ..Config::default()
        };
        TestAppBuilder { config, clock: None, data_dir: None }
    }

    pub async fn start() -> TestApp {
        Self::builder().start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(&format!("/api/v1{path}"))).bearer_auth(ADMIN_KEY)
    }

    pub async fn create_room(&self, body: Value) -> Value {
        let r = self.admin(reqwest::Method::POST, "/rooms").json(&body).send().await.unwrap();
        assert_eq!(r.status(), 201, "creating room {body}");
        r.json().await.unwrap()
    }

    pub async fn room(&self, id: &str) -> Value {
        self.admin(reqwest::Method::GET, &format!("/rooms/{id}")).send().await.unwrap().json().await.unwrap()
    }

    pub fn visitor(&self) -> Visitor {
        Visitor { base: self.base.clone(), cookies: Vec::new(), http: no_redirect_client() }
    }

    /// Waits until `/readyz` answers 200 (a cluster node: once it receives the other nodes).
    pub async fn ready(&self) {
        eventually(Duration::from_secs(10), || async {
            let r = self.http.get(self.url("/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }

    /// Stops the server (graceful) and waits for it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestAppBuilder {
    pub fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }
    pub fn manual_clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }
    pub fn data_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.data_dir = Some(dir);
        self
    }
    pub async fn start(self) -> TestApp {
        let data_dir = self.data_dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let mut config = self.config;
        config.data_dir = data_dir.path().to_path_buf();
        let clock: Arc<dyn Clock> = match &self.clock {
            Some(c) => Arc::new(c.clone()),
            None => weir::clock::system(),
        };
        let shutdown = CancellationToken::new();
        let server = weir::Server::start(config, clock, shutdown.clone()).await.unwrap();
        let addr = server.local_addr();
        let task = tokio::spawn(server.run());
        TestApp {
            addr,
            base: format!("http://{addr}"),
            http: no_redirect_client(),
            shutdown,
            data_dir,
            clock: self.clock,
            task: Some(task),
        }
    }
}

pub fn no_redirect_client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// A browser-like visitor: keeps its cookies, never follows redirects by itself.
#[derive(Clone)]
pub struct Visitor {
    pub base: String,
    pub cookies: Vec<(String, String)>,
    pub http: reqwest::Client,
}

impl Visitor {
    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    fn remember(&mut self, response: &reqwest::Response) {
        for v in response.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let pair = v.split(';').next().unwrap();
            let (k, val) = pair.split_once('=').unwrap();
            self.cookies.retain(|(name, _)| name != k);
            self.cookies.push((k.to_string(), val.to_string()));
        }
    }

    pub fn cookie(&self, name: &str) -> Option<String> {
        self.cookies.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    pub async fn get(&mut self, path: &str, json: bool) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base)).header("cookie", self.cookie_header());
        if json {
            req = req.header("accept", "application/json");
        }
        let r = req.send().await.unwrap();
        self.remember(&r);
        r
    }

    /// `GET /r/{room}` as a JSON client; returns the status body.
    pub async fn enter(&mut self, room: &str) -> Value {
        let r = self.get(&format!("/r/{room}"), true).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub async fn status(&mut self, room: &str) -> Value {
        let r = self.get(&format!("/r/{room}/status"), true).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Polls status until admitted or the deadline passes.
    pub async fn wait_admitted(&mut self, room: &str, deadline: Duration) -> Value {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let s = self.status(room).await;
            if s["admitted"] == json!(true) {
                return s;
            }
            assert!(tokio::time::Instant::now() < until, "not admitted within {deadline:?}: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < until, "condition not met within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn token_from_redirect(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    u.query_pairs().find(|(k, _)| k == "weir_token").map(|(_, v)| v.into_owned()).expect("weir_token in redirect")
}

/// The real `weir` executable.
pub struct Binary {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub base: String,
}

pub fn weir_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weir"))
}

impl Binary {
    /// Starts `weir serve` on an ephemeral port and waits for its "listening" line.
    pub fn serve(data_dir: &Path, extra_env: &[(&str, &str)]) -> Binary {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(weir_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("WEIR_ADMIN_KEY", ADMIN_KEY)
            .env("WEIR_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines.next().expect("weir exited before listening").unwrap();
            if let Some(rest) = line.strip_prefix("weir: listening on http://") {
                break rest.parse().unwrap();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Binary { child, addr, base: format!("http://{addr}") }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
