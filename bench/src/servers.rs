//! Starting and stopping the servers under test. Every server is pinned to core 0 with `taskset`
//! (the client runs on core 1), killed when its handle drops, and killed by the kernel if the
//! harness itself dies (PR_SET_PDEATHSIG), so a run never leaves a server behind.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::pusher::App;

pub struct Server {
    #[allow(dead_code)] // kept for debugging output
    pub name: String,
    pub pid: u32,
    pub addr: SocketAddr,
    /// From spawn to the server's own "listening" line (or first accepted TCP connection).
    pub ready_after: Duration,
    pub app: Option<App>,
    child: Child,
}

pub struct Pinning {
    pub server_core: Option<usize>,
}

impl Pinning {
    fn command(&self, program: &Path) -> Command {
        match self.server_core {
            Some(core) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(core.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(47_123)
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log")))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// Spawns a server that prints `... listening on http://ADDR` on stdout when ready.
fn spawn_announcing(name: &str, mut cmd: Command, logs: &Path, timeout: Duration) -> Result<Server, String> {
    cmd.stdout(Stdio::piped()).stderr(log_file(logs, name)).stdin(Stdio::null());
    die_with_parent(&mut cmd);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{name}: cannot start: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining so the server never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find("listening on http://") {
                let _ = tx.send((Instant::now(), line[at + 20..].trim().to_string()));
            }
        }
    });
    match rx.recv_timeout(timeout) {
        Ok((when, addr)) => {
            let addr: SocketAddr = addr.parse().map_err(|e| format!("{name}: bad address {addr}: {e}"))?;
            Ok(Server { name: name.into(), pid: child.id(), addr, ready_after: when - t0, app: None, child })
        }
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            let tail: String = std::fs::read_to_string(logs.join(format!("{name}.log")))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / ");
            Err(format!("{name}: no \"listening\" line within {timeout:?} ({status}; log: {tail})"))
        }
    }
}

/// Spawns a server on a known port and waits until it accepts TCP connections.
fn spawn_on_port(name: &str, mut cmd: Command, addr: SocketAddr, logs: &Path) -> Result<Server, String> {
    cmd.stdout(log_file(logs, &format!("{name}.out"))).stderr(log_file(logs, name)).stdin(Stdio::null());
    die_with_parent(&mut cmd);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{name}: cannot start: {e}"))?;
    while t0.elapsed() < Duration::from_secs(30) {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(Server { name: name.into(), pid: child.id(), addr, ready_after: t0.elapsed(), app: None, child });
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name}: exited with {status} (see {}/{name}.log)", logs.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("{name}: no listener on {addr} within 30 s"))
}

pub struct Bins {
    pub weir: PathBuf,
    pub bench: PathBuf,
    pub sockudo: Option<PathBuf>,
    pub soketi: Option<PathBuf>,
    pub node: PathBuf,
}

pub const PEER_APP_ID: &str = "bench";
pub const PEER_APP_KEY: &str = "bench-key";
pub const PEER_APP_SECRET: &str = "bench-secret";

fn peer_app() -> App {
    App { id: PEER_APP_ID.into(), key: PEER_APP_KEY.into(), secret: PEER_APP_SECRET.into() }
}

/// weir with its defaults but for `env` (configuration variables).
pub fn start_weir(bins: &Bins, pin: &Pinning, data_dir: &Path, admin_key: &str, logs: &Path, env: &[(&str, &str)]) -> Result<Server, String> {
    let mut cmd = pin.command(&bins.weir);
    cmd.arg("serve").arg("--listen").arg("127.0.0.1:0").arg("--data-dir").arg(data_dir);
    cmd.env("WEIR_ADMIN_KEY", admin_key);
    cmd.env("RUST_LOG", "warn");
    cmd.envs(env.iter().copied());
    spawn_announcing("weir", cmd, logs, Duration::from_secs(30))
}

pub fn start_hello(bins: &Bins, pin: &Pinning, logs: &Path) -> Result<Server, String> {
    let mut cmd = pin.command(&bins.bench);
    cmd.arg("hello").arg("--listen").arg("127.0.0.1:0");
    spawn_announcing("hello", cmd, logs, Duration::from_secs(10))
}

pub fn start_sockudo(bins: &Bins, pin: &Pinning, logs: &Path, max_conns: usize) -> Option<Result<Server, String>> {
    let bin = bins.sockudo.as_ref()?;
    let port = free_port();
    let mut cmd = pin.command(bin);
    let dir = logs.join("sockudo-cwd");
    let _ = std::fs::create_dir_all(&dir);
    cmd.current_dir(&dir);
    for (k, v) in [
        ("HOST", "127.0.0.1".to_string()),
        ("PORT", port.to_string()),
        ("DEBUG", "false".into()),
        ("ENVIRONMENT", "production".into()),
        ("SOCKUDO_DEFAULT_APP_ID", PEER_APP_ID.into()),
        ("SOCKUDO_DEFAULT_APP_KEY", PEER_APP_KEY.into()),
        ("SOCKUDO_DEFAULT_APP_SECRET", PEER_APP_SECRET.into()),
        ("SOCKUDO_DEFAULT_APP_ENABLED", "true".into()),
        ("SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS", (max_conns * 2).to_string()),
        ("SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND", "100000000".into()),
        ("SOCKUDO_DEFAULT_APP_MAX_READ_REQUESTS_PER_SECOND", "100000000".into()),
        ("SOCKUDO_MAX_CONNECTIONS", (max_conns * 2).to_string()),
        ("RATE_LIMITER_ENABLED", "false".into()),
        ("RATE_LIMITER_DRIVER", "memory".into()),
        ("ADAPTER_DRIVER", "local".into()),
        ("APP_MANAGER_DRIVER", "memory".into()),
        ("CACHE_DRIVER", "memory".into()),
        ("QUEUE_DRIVER", "none".into()),
        ("METRICS_ENABLED", "false".into()),
        ("METRICS_PORT", free_port().to_string()),
        ("METRICS_HOST", "127.0.0.1".into()),
    ] {
        cmd.env(k, v);
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    Some(spawn_on_port("sockudo", cmd, addr, logs).map(|mut s| {
        s.app = Some(peer_app());
        s
    }))
}

pub fn start_soketi(bins: &Bins, pin: &Pinning, logs: &Path) -> Option<Result<Server, String>> {
    let script = bins.soketi.as_ref()?;
    let port = free_port();
    let mut cmd = pin.command(&bins.node);
    cmd.arg(script).arg("start");
    for (k, v) in [
        ("SOKETI_HOST", "127.0.0.1".to_string()),
        ("SOKETI_PORT", port.to_string()),
        ("SOKETI_METRICS_HOST", "127.0.0.1".into()),
        ("SOKETI_METRICS_SERVER_PORT", free_port().to_string()),
        ("SOKETI_METRICS_ENABLED", "false".into()),
        ("SOKETI_DEFAULT_APP_ID", PEER_APP_ID.into()),
        ("SOKETI_DEFAULT_APP_KEY", PEER_APP_KEY.into()),
        ("SOKETI_DEFAULT_APP_SECRET", PEER_APP_SECRET.into()),
        ("SOKETI_DEFAULT_APP_MAX_CONNECTIONS", "-1".into()),
        ("SOKETI_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SEC", "-1".into()),
        ("SOKETI_DEFAULT_APP_MAX_CLIENT_EVENTS_PER_SEC", "-1".into()),
        ("SOKETI_DEFAULT_APP_MAX_READ_REQ_PER_SEC", "-1".into()),
        ("SOKETI_RATE_LIMITER_DRIVER", "local".into()),
        ("SOKETI_DEBUG", "0".into()),
    ] {
        cmd.env(k, v);
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    Some(spawn_on_port("soketi", cmd, addr, logs).map(|mut s| {
        s.app = Some(peer_app());
        s
    }))
}

impl Server {
    pub fn rss(&self) -> Option<u64> {
        crate::sys::rss_bytes(self.pid)
    }

    /// SIGTERM without waiting: several servers then shut down side by side (`stop` after).
    pub fn terminate(&self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) {
        self.stop_inner(grace);
    }

    fn stop_inner(&mut self, grace: Duration) {
        // bench/profile runs servers under valgrind, which needs longer to shut down and dump.
        let grace = std::env::var("WEIR_BENCH_STOP_GRACE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(grace)
            .max(grace);
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner(Duration::from_secs(3));
    }
}

/// `redis-server` on an ephemeral loopback port, pinned like the servers (it serves them), with
/// nothing persisted: the cluster scenario's bus.
pub fn start_redis(pin: &Pinning, logs: &Path, dir: &Path) -> Result<Server, String> {
    let port = free_port();
    let mut cmd = pin.command(Path::new("redis-server"));
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"]);
    cmd.arg("--dir").arg(dir);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    spawn_on_port("redis", cmd, addr, logs)
}

/// Whether `redis-server` is on the PATH.
pub fn have_redis() -> bool {
    Command::new("redis-server").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}
