//! The scenarios of issue 5, each returning raw JSON. A server that is not installed or fails is
//! recorded as `{"not_measured": reason}`; nothing is ever filled in.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{request, Conn};
use crate::load::{client_spins, closed_loop, open_loop, LoadResult};
use crate::probe::probed;
use crate::pusher::{self, App};
use crate::servers::{self, Bins, Pinning, Server};

pub const ALL: &[&str] = &["entry", "status", "verify", "fanout", "cluster", "connections", "queue-scale", "overload", "startup"];

pub struct Params {
    pub conns: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub fanout_subs: Vec<usize>,
    pub fanout_window: usize,
    /// Passes of fan-out turns over the servers (`fanout`).
    pub fanout_passes: usize,
    pub idle_conns: usize,
    pub queue_visitors: u64,
    pub overload_conns: usize,
    /// How long the refusal probe runs (`overload`).
    pub refusal_probe: Duration,
    pub startup_runs: usize,
    pub idle_cpu_window: Duration,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        if quick {
            Params {
                conns: 16,
                warmup: Duration::from_millis(200),
                duration: Duration::from_millis(1000),
                fanout_subs: vec![50],
                fanout_window: 4,
                fanout_passes: 1,
                idle_conns: 200,
                queue_visitors: 2_000,
                overload_conns: 128,
                refusal_probe: Duration::from_millis(500),
                startup_runs: 1,
                idle_cpu_window: Duration::from_secs(1),
            }
        } else {
            Params {
                // For experiments: the closed loops' connection count (BENCHMARKS.md).
                conns: env_or("WEIR_BENCH_CONNS", 64),
                warmup: Duration::from_secs(2),
                duration: Duration::from_secs(10),
                fanout_subs: env_list("WEIR_BENCH_FANOUT_SUBS").unwrap_or_else(|| vec![1_000, 5_000]),
                fanout_window: 8,
                fanout_passes: 2,
                idle_conns: 19_000,
                queue_visitors: 1_000_000,
                overload_conns: 2_048,
                // The probe's refusals are ~1 in 20 of its requests, and a p99 wants a few
                // hundred of them: twice the other loads' time.
                refusal_probe: Duration::from_secs(20),
                startup_runs: 3,
                idle_cpu_window: Duration::from_secs(3),
            }
        }
    }
}

pub struct Ctx {
    pub bins: Bins,
    pub pin: Pinning,
    pub work: PathBuf,
    pub params: Params,
    pub admin_key: String,
    pub peers: Vec<&'static str>,
    hello: Option<Server>,
    weir: Option<Server>,
    data_dirs: usize,
    pub step: usize,
    pub steps: usize,
    pub t0: Instant,
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

pub fn not_measured(why: impl Into<String>) -> Value {
    json!({ "not_measured": why.into() })
}

impl Ctx {
    pub fn new(bins: Bins, pin: Pinning, work: PathBuf, params: Params, peers: Vec<&'static str>) -> Self {
        Ctx {
            bins,
            pin,
            work,
            params,
            admin_key: format!("weir-bench-admin-key-{:08}", std::process::id()),
            peers,
            hello: None,
            weir: None,
            data_dirs: 0,
            step: 0,
            steps: 0,
            t0: Instant::now(),
        }
    }

    pub fn progress(&mut self, what: &str) {
        self.step += 1;
        let total = self.steps.max(self.step);
        let width = 24;
        let filled = width * self.step.min(total) / total.max(1);
        eprintln!(
            "[{}{}] {:>2}/{} {:>5.1}s  {what}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.step,
            total,
            self.t0.elapsed().as_secs_f64()
        );
    }

    fn fresh_dir(&mut self, name: &str) -> PathBuf {
        self.data_dirs += 1;
        let d = self.work.join(format!("{name}-{}", self.data_dirs));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    fn start_weir_fresh(&mut self, name: &str) -> Result<(Server, PathBuf), String> {
        self.start_weir_configured(name, &[])
    }

    /// A weir of its own, configured by `env` beyond the defaults.
    pub fn start_weir_configured(&mut self, name: &str, env: &[(&str, &str)]) -> Result<(Server, PathBuf), String> {
        let dir = self.fresh_dir(name);
        let s = servers::start_weir(&self.bins, &self.pin, &dir, &self.admin_key, &self.work, env)?;
        Ok((s, dir))
    }

    fn shared_weir(&mut self) -> Result<&Server, String> {
        if self.weir.is_none() {
            let (s, _) = self.start_weir_fresh("weir-http")?;
            self.weir = Some(s);
        }
        Ok(self.weir.as_ref().expect("set"))
    }

    fn shared_hello(&mut self) -> Result<&Server, String> {
        if self.hello.is_none() {
            self.hello = Some(servers::start_hello(&self.bins, &self.pin, &self.work)?);
        }
        Ok(self.hello.as_ref().expect("set"))
    }

    pub fn stop_all(&mut self) {
        if let Some(s) = self.weir.take() {
            s.stop(Duration::from_secs(5));
        }
        if let Some(s) = self.hello.take() {
            s.stop(Duration::from_secs(2));
        }
    }
}

// ---------- weir API helpers ----------

pub async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[String], body: &[u8]) -> Result<crate::client::Resp, String> {
    let mut c = Conn::new(addr);
    let req = request(method, path, &addr.to_string(), headers, body);
    c.send_timeout(&req, true, Duration::from_secs(10)).await.map_err(|e| format!("{method} {path}: {e}"))
}

/// The sum over every series of each counter in `names`, from weir's `/metrics` (null if it
/// cannot be read): how the server itself counted what the client saw.
async fn weir_counters(addr: SocketAddr, names: &[&str]) -> Value {
    let Ok(r) = call(addr, "GET", "/metrics", &[], b"").await else { return Value::Null };
    let text = String::from_utf8_lossy(&r.body);
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    names.iter().map(|n| (n.to_string(), json!(sum(n)))).collect::<serde_json::Map<_, _>>().into()
}

pub async fn admin(addr: SocketAddr, key: &str, method: &str, path: &str, body: Value) -> Result<Value, String> {
    let b = body.to_string();
    let r = call(
        addr,
        method,
        path,
        &[format!("Authorization: Bearer {key}"), "Content-Type: application/json".into(), "Accept: application/json".into()],
        if method == "GET" { b"" } else { b.as_bytes() },
    )
    .await?;
    if !(200..300).contains(&r.status) {
        return Err(format!("{method} {path}: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body)));
    }
    Ok(serde_json::from_slice(&r.body).unwrap_or(Value::Null))
}

async fn create_room(s: &Server, key: &str, id: &str, rate: u64) -> Result<(), String> {
    admin(
        s.addr,
        key,
        "POST",
        "/api/v1/rooms",
        json!({"id": id, "name": format!("Bench {id}"), "origin": "http://127.0.0.1:9/", "rate_per_minute": rate}),
    )
    .await
    .map(|_| ())
}

pub async fn create_app(s: &Server, key: &str) -> Result<App, String> {
    let v = admin(s.addr, key, "POST", "/api/v1/apps", json!({})).await?;
    let get = |k: &str| match &v[k] {
        Value::String(x) => Some(x.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    Ok(App {
        id: get("id").ok_or("apps API: no id")?,
        key: get("key").ok_or("apps API: no key")?,
        secret: get("secret").ok_or("apps API: no secret")?,
    })
}

/// A new visitor's request as a browser sends it: browsers always offer compression, and a
/// page compressed on every request costs more than the rest of an entry.
fn entry_request(addr: SocketAddr, room: &str) -> Vec<u8> {
    request("GET", &format!("/r/{room}"), &addr.to_string(), &["Accept: text/html".into(), "Accept-Encoding: gzip, deflate, br".into()], b"")
}

/// Enters `room` as a new visitor; returns the `Cookie:` header value.
async fn enter(addr: SocketAddr, room: &str) -> Result<String, String> {
    let mut c = Conn::new(addr);
    let r = c
        .send_timeout(&entry_request(addr, room), false, Duration::from_secs(10))
        .await
        .map_err(|e| format!("GET /r/{room}: {e}"))?;
    if r.status >= 400 {
        return Err(format!("GET /r/{room}: HTTP {}", r.status));
    }
    let cookies: Vec<&str> = r.set_cookies.iter().filter_map(|c| c.split(';').next()).collect();
    if cookies.is_empty() {
        return Err(format!("GET /r/{room}: no visitor cookie"));
    }
    Ok(cookies.join("; "))
}

fn status_request(addr: SocketAddr, room: &str, cookie: &str) -> Vec<u8> {
    request(
        "GET",
        &format!("/r/{room}/status"),
        &addr.to_string(),
        &[format!("Cookie: {cookie}"), "Accept: application/json".into()],
        b"",
    )
}

/// Waits until the visitor is admitted; returns the admission token.
async fn admission_token(addr: SocketAddr, room: &str, cookie: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut c = Conn::new(addr);
    loop {
        let r = c
            .send_timeout(&status_request(addr, room, cookie), true, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if v["admitted"] == Value::Bool(true) {
            let url = v["redirect_url"].as_str().ok_or("admitted without redirect_url")?;
            let at = url.find("weir_token=").ok_or("redirect_url without weir_token")? + 11;
            let tok = &url[at..];
            return Ok(tok[..tok.find('&').unwrap_or(tok.len())].to_string());
        }
        if Instant::now() > deadline {
            return Err(format!("not admitted within 15 s: HTTP {} {}", r.status, v));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn load_json(r: &crate::load::LoadResult) -> Value {
    r.to_json()
}

// ---------- HTTP scenarios ----------

pub async fn hello_baseline(ctx: &mut Ctx) -> Value {
    ctx.progress("hello baseline (bare hyper), closed loop");
    let p = (ctx.params.conns, ctx.params.warmup, ctx.params.duration);
    let s = match ctx.shared_hello() {
        Ok(s) => s,
        Err(e) => return not_measured(e),
    };
    let reqs = hello_requests(s.addr);
    let r = closed_loop(s.addr, p.0, reqs, p.1, p.2, None, Some(s.pid), client_spins()).await;
    let mut v = load_json(&r);
    v["connections"] = json!(p.0);
    v
}

/// A weir route against bare hyper, closed loops taking turns (hello, weir, weir, hello, …) in
/// [`turns_in`] slices of the measured time: the machine's speed drifts over minutes here (shared
/// cores), and a ratio of two windows half a minute apart measured that drift as much as weir.
/// Each slice after the first warms up for a quarter of the warm-up (the other server just had
/// the core). Returns weir's result with the interleaved hello's under `hello` and each round's
/// ratio under `round_ratios`. `spin`: the client polls without sleeping (`closed_loop`).
async fn weir_http(ctx: &mut Ctx, what: &str, prepare: impl AsyncPrep, spin: bool) -> Value {
    ctx.progress(&format!("{what} on weir and hello in turns, closed loops"));
    let key = ctx.admin_key.clone();
    let (conns, warmup, duration) = (ctx.params.conns, ctx.params.warmup, ctx.params.duration);
    let rounds = turns_in(duration);
    let hello = match ctx.shared_hello() {
        Ok(s) => (s.addr, s.pid),
        Err(e) => return not_measured(e),
    };
    let hello_reqs = hello_requests(hello.0);
    let s = match ctx.shared_weir() {
        Ok(s) => s,
        Err(e) => return not_measured(e),
    };
    let reqs = match prepare.prep(s, &key).await {
        Ok(r) => Rc::new(r),
        Err(e) => return not_measured(format!("weir: {e}")),
    };
    let weir = (s.addr, s.pid);
    let slice = duration / rounds as u32;
    let (w, h, ratios) = in_turns(
        rounds,
        |turn| closed_loop(weir.0, conns, reqs.clone(), if turn == 0 { warmup } else { warmup / 4 }, slice, None, Some(weir.1), spin),
        |turn| closed_loop(hello.0, conns, hello_reqs.clone(), if turn == 0 { warmup } else { warmup / 4 }, slice, None, Some(hello.1), spin),
    )
    .await;
    let mut v = load_json(&w);
    v["connections"] = json!(conns);
    let mut hv = load_json(&h);
    hv["connections"] = json!(conns);
    v["hello"] = hv;
    v["round_ratios"] = json!(ratios);
    v
}

/// Runs `weir(turn)` and `hello(turn)` `rounds` times in alternating order (hello, weir, weir,
/// hello, …: a drift of the machine's speed over the whole weighs on both alike) and returns
/// each side's merged result and weir's req/s over hello's in every turn.
async fn in_turns<W, H>(rounds: usize, mut weir: impl FnMut(usize) -> W, mut hello: impl FnMut(usize) -> H) -> (LoadResult, LoadResult, Vec<f64>)
where
    W: std::future::Future<Output = LoadResult>,
    H: std::future::Future<Output = LoadResult>,
{
    let (mut w_all, mut h_all): (Option<LoadResult>, Option<LoadResult>) = (None, None);
    let mut ratios = Vec::new();
    for turn in 0..rounds.max(1) {
        let (w, h) = if turn % 2 == 0 {
            let h = hello(turn).await;
            (weir(turn).await, h)
        } else {
            let w = weir(turn).await;
            (w, hello(turn).await)
        };
        ratios.push(round(w.rps() / h.rps().max(1e-9), 3));
        for (all, r) in [(&mut w_all, w), (&mut h_all, h)] {
            match all {
                Some(a) => a.merge(&r),
                None => *all = Some(r),
            }
        }
    }
    (w_all.expect("one turn at least"), h_all.expect("one turn at least"), ratios)
}

/// Turns each of weir and hello takes in a measured `duration` (one in `--quick`'s second).
fn turns_in(duration: Duration) -> usize {
    if duration < Duration::from_secs(2) { 1 } else { 6 }
}

/// What the hello baseline is asked, every time.
fn hello_requests(addr: SocketAddr) -> Rc<Vec<Vec<u8>>> {
    Rc::new(vec![request("GET", "/", &addr.to_string(), &["Accept: text/html".into()], b"")])
}

trait AsyncPrep {
    async fn prep(self, s: &Server, key: &str) -> Result<Vec<Vec<u8>>, String>;
}

struct EntryPrep(&'static str);
impl AsyncPrep for EntryPrep {
    async fn prep(self, s: &Server, key: &str) -> Result<Vec<Vec<u8>>, String> {
        create_room(s, key, self.0, 1).await?;
        enter(s.addr, self.0).await?;
        Ok(vec![entry_request(s.addr, self.0)])
    }
}

struct StatusPrep(usize);
impl AsyncPrep for StatusPrep {
    async fn prep(self, s: &Server, key: &str) -> Result<Vec<Vec<u8>>, String> {
        let room = "bench-status";
        create_room(s, key, room, 1).await?;
        let mut reqs = Vec::new();
        for _ in 0..self.0 {
            let cookie = enter(s.addr, room).await?;
            reqs.push(status_request(s.addr, room, &cookie));
        }
        // Check one answer is the JSON status.
        let r = call(s.addr, "GET", &format!("/r/{room}/status"), &[], b"").await;
        let _ = r;
        Ok(reqs)
    }
}

struct VerifyPrep(usize);
impl AsyncPrep for VerifyPrep {
    async fn prep(self, s: &Server, key: &str) -> Result<Vec<Vec<u8>>, String> {
        let room = "bench-verify";
        create_room(s, key, room, 600_000).await?;
        let mut reqs = Vec::new();
        for _ in 0..self.0 {
            let cookie = enter(s.addr, room).await?;
            let token = admission_token(s.addr, room, &cookie).await?;
            let req = request("GET", &format!("/auth/{room}"), &s.addr.to_string(), &[format!("Authorization: Bearer {token}")], b"");
            let mut c = Conn::new(s.addr);
            let r = c.send_timeout(&req, false, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
            if !(200..300).contains(&r.status) {
                return Err(format!("GET /auth/{room} with a fresh token: HTTP {}", r.status));
            }
            reqs.push(req);
        }
        Ok(reqs)
    }
}

pub async fn entry(ctx: &mut Ctx) -> Value {
    let mut v = weir_http(ctx, "entry (new visitors GET /r/{room})", EntryPrep("bench-entry"), client_spins()).await;
    // A diagnostic beside the goal's figure, in the same run: the same turns with a client that
    // never sleeps, whose wake-ups on loopback run on the server's core (BENCHMARKS.md,
    // twenty-first round). Not judged: the goal is read with the client above.
    if !client_spins() && v["ok_per_sec"].as_f64().is_some_and(|r| r > 0.0) {
        v["polling_client"] = weir_http(ctx, "entry with a polling client (diagnostic)", EntryPrep("bench-entry-polling"), true).await;
    }
    v
}

pub async fn status(ctx: &mut Ctx) -> Value {
    let n = if ctx.params.conns < 64 { 64 } else { 1_000 };
    weir_http(ctx, "status (returning visitors GET /r/{room}/status)", StatusPrep(n), client_spins()).await
}

pub async fn verify(ctx: &mut Ctx) -> Value {
    let mut v = weir_http(ctx, "verify (GET /auth/{room} with a token)", VerifyPrep(16), client_spins()).await;
    let cap = v["ok_per_sec"].as_f64().unwrap_or(0.0);
    if cap <= 0.0 {
        return v;
    }
    ctx.progress("verify and hello at half load in turns, open loops");
    let key = ctx.admin_key.clone();
    let (conns, duration) = (ctx.params.conns, ctx.params.duration);
    let s = match ctx.shared_weir() {
        Ok(s) => s,
        Err(e) => return not_measured(e),
    };
    let reqs = match (VerifyPrep(4)).prep_existing(s, &key).await {
        Ok(r) => Rc::new(r),
        Err(e) => {
            v["half_load"] = not_measured(e);
            return v;
        }
    };
    // Bare hyper driven by the same open loop at the same rate, in turns with weir: what this
    // client, this machine and the kernel's loopback add to the latency by themselves.
    let weir = (s.addr, s.pid);
    let hello = match ctx.shared_hello() {
        Ok(s) => (s.addr, s.pid),
        Err(e) => {
            v["half_load"] = not_measured(e);
            return v;
        }
    };
    let hello_reqs = hello_requests(hello.0);
    let rounds = turns_in(duration);
    let slice = duration / rounds as u32;
    let (w, h, _) = in_turns(
        rounds,
        |_| probed(weir.0, reqs.to_vec(), open_loop(weir.0, conns, cap / 2.0, reqs.clone(), Duration::ZERO, slice, Some(weir.1))),
        |_| probed(hello.0, hello_reqs.to_vec(), open_loop(hello.0, conns, cap / 2.0, hello_reqs.clone(), Duration::ZERO, slice, Some(hello.1))),
    )
    .await;
    for (key, r) in [("half_load", w), ("half_load_hello", h)] {
        let mut j = load_json(&r);
        j["offered_per_sec"] = json!(round(cap / 2.0, 1));
        v[key] = j;
    }
    v
}

impl VerifyPrep {
    async fn prep_existing(self, s: &Server, _key: &str) -> Result<Vec<Vec<u8>>, String> {
        let room = "bench-verify";
        let mut reqs = Vec::new();
        for _ in 0..self.0 {
            let cookie = enter(s.addr, room).await?;
            let token = admission_token(s.addr, room, &cookie).await?;
            reqs.push(request("GET", &format!("/auth/{room}"), &s.addr.to_string(), &[format!("Authorization: Bearer {token}")], b""));
        }
        Ok(reqs)
    }
}

/// A comma-separated list of numbers from the environment, if set and every item parses.
fn env_list(name: &str) -> Option<Vec<usize>> {
    let v = std::env::var(name).ok()?;
    v.split(',').map(|x| x.trim().parse().ok()).collect::<Option<Vec<_>>>().filter(|l| !l.is_empty())
}

/// `name` from the environment if set and parseable, else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub async fn overload(ctx: &mut Ctx, capacity: Option<f64>) -> Value {
    let key = ctx.admin_key.clone();
    let (conns, warm, dur) = (ctx.params.conns, ctx.params.warmup, ctx.params.duration);
    // For experiments (BENCHMARKS.md): other connection counts and offered multiples.
    let oconns = env_or("WEIR_BENCH_OVERLOAD_CONNS", ctx.params.overload_conns);
    let factor = env_or("WEIR_BENCH_OVERLOAD_FACTOR", 3.0f64);
    // Peak = the better of closed loops at `entry`'s 64 connections and at 256, each measured
    // right before and right after the overload (their mean: the machine's speed drifts over the
    // minute in between). Group commit made entry throughput grow with concurrency once; 256
    // stays within the default in-flight bound (256), so nothing is shed while the peak is measured.
    // For experiments: with a peak given, only the refusal probe runs, offered `factor` × it.
    if let Some(peak) = std::env::var("WEIR_BENCH_OVERLOAD_PROBE_ONLY_PEAK").ok().and_then(|v| v.parse::<f64>().ok()) {
        return json!({ "refusal_probe": refusal_probe(ctx, oconns, peak * factor, peak, ctx.params.refusal_probe).await });
    }
    let peak_conns: &[usize] = if conns < 64 { &[64] } else { &[64, 256] };
    // The peak and the overload in rounds, each overload between two peaks (P O P O … P), every
    // window a quarter of the others' (after a warm-up of half theirs): the machine's speed here
    // drifts by a fifth within a minute, and one overload window read against peaks half a
    // minute away from it measured that drift as much as weir (0.45–1.0× from run to run).
    let rounds = turns_in(dur).min(GOODPUT_ROUNDS);
    let (slice_warm, slice) = if rounds > 1 { (warm / 2, dur / 4) } else { (warm, dur) };
    let cap_reqs = match shared_entry_requests(ctx, &key, "bench-capacity").await {
        Ok(r) => r,
        Err(e) => return not_measured(e),
    };
    let peak_label = |round: usize| format!("overload: peak entry goodput at {peak_conns:?} connections ({round} of {})", rounds + 1);
    ctx.progress(&peak_label(1));
    let mut peaks = match closed_loops(ctx, peak_conns, &cap_reqs, slice_warm, slice).await {
        Ok(p) => vec![p],
        Err(e) => return not_measured(e),
    };
    let cap = peaks[0].iter().copied().fold(0.0, f64::max);
    if cap <= 0.0 {
        return not_measured("entry capacity is 0");
    }
    let reqs = match shared_entry_requests(ctx, &key, "bench-overload").await {
        Ok(r) => r,
        Err(e) => return not_measured(e),
    };
    let mut overload: Option<LoadResult> = None;
    let (mut round_ratios, mut turn_waits_per_ok) = (Vec::new(), Vec::new());
    for window in 1..=rounds {
        ctx.progress(&format!("overload: entry offered at {factor} x {cap:.0} req/s over {oconns} connections ({window} of {rounds})"));
        let s = match ctx.shared_weir() {
            Ok(s) => s,
            Err(e) => return not_measured(e),
        };
        let (addr, waits_before) = (s.addr, turn_waits(s.addr).await);
        let r = probed(addr, reqs.to_vec(), open_loop(addr, oconns, cap * factor, reqs.clone(), slice_warm, slice, Some(s.pid))).await;
        // Turns taken after a wait in line, per accepted request (warm-up included in both).
        let answered_all = r.tally.ok as f64 * (slice_warm + slice).as_secs_f64() / slice.as_secs_f64();
        turn_waits_per_ok.push(round((turn_waits(addr).await - waits_before) / answered_all.max(1.0), 4));
        ctx.progress(&peak_label(window + 1));
        let after = match closed_loops(ctx, peak_conns, &cap_reqs, slice_warm, slice).await {
            Ok(p) => p,
            Err(e) => return not_measured(e),
        };
        let around = peaks[window - 1].iter().zip(&after).map(|(b, a)| (b + a) / 2.0).fold(0.0, f64::max);
        round_ratios.push(round(r.rps() / around.max(1e-9), 3));
        peaks.push(after);
        match &mut overload {
            Some(all) => all.merge(&r),
            None => overload = Some(r),
        }
    }
    let r = overload.expect("one round at least");
    // The goodput curve: the same connections offered less, so the figure at `factor` reads
    // against what this many connections yield below and around capacity (each its own room).
    let mut curve = Vec::new();
    for (low, room) in CURVE {
        ctx.progress(&format!("overload: goodput curve, {low} x {cap:.0} req/s over {oconns} connections"));
        let reqs = match shared_entry_requests(ctx, &key, room).await {
            Ok(r) => r,
            Err(e) => return not_measured(e),
        };
        let s = match ctx.shared_weir() {
            Ok(s) => s,
            Err(e) => return not_measured(e),
        };
        let r = open_loop(s.addr, oconns, cap * low, reqs, Duration::ZERO, dur / 2, Some(s.pid)).await;
        curve.push(curve_point(low, &r));
    }
    ctx.progress(&format!("overload: bare hyper's closed loops at {peak_conns:?} and at {oconns} connections"));
    let hello_by_conns = hello_by_conns(ctx, peak_conns, oconns, warm, dur / 2).await;
    // The peak: the better connection count's mean over all the peak windows.
    let mean_at = |i: usize| peaks.iter().map(|p| p[i]).sum::<f64>() / peaks.len() as f64;
    let peak = (0..peak_conns.len()).map(mean_at).fold(0.0, f64::max);
    let mut v = load_json(&r);
    let answered: u64 = r.tally.by_status.values().sum();
    v["capacity_per_sec"] = json!(round(peak, 1));
    v["capacity_entry_scenario_per_sec"] = json!(capacity.map(|c| round(c, 1)));
    v["peaks"] = json!(peak_conns
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"connections": c, "mean_per_sec": round(mean_at(i), 1), "per_sec": peaks.iter().map(|p| round(p[i], 1)).collect::<Vec<_>>()}))
        .collect::<Vec<_>>());
    v["rounds"] = json!(rounds);
    v["round_ratios"] = json!(round_ratios);
    v["turn_waits_per_ok"] = json!(turn_waits_per_ok);
    v["offered_per_sec"] = json!(round(cap * factor, 1));
    v["offered_factor"] = json!(factor);
    v["answered_per_sec"] = json!(round(answered as f64 / r.elapsed.as_secs_f64(), 1));
    v["goodput_ratio"] = json!(round(r.rps() / peak, 3));
    v["connections"] = json!(oconns);
    curve.push(curve_point(factor, &r));
    // The curve's points are read against the peak measured around the overload's rounds.
    for point in &mut curve {
        let ok = point["ok_per_sec"].as_f64().unwrap_or(0.0);
        point["goodput_ratio"] = json!(round(ok / peak, 3));
    }
    v["curve"] = json!(curve);
    v["hello_by_connections"] = hello_by_conns;
    v["refusal_probe"] = refusal_probe(ctx, oconns, cap * factor, peak, ctx.params.refusal_probe).await;
    v
}

/// The line bound of the weir [`refusal_probe`] starts: short enough that the overload's
/// connections fill its line (64 turns of 5 ms keep 50 ms for 640 waiting).
const PROBE_LINE_WAIT_MS: &str = "50";

/// Refusals: with the defaults the overload's connections fit in weir's line and nothing is
/// refused, so the same load is offered to a weir whose line they overfill.
async fn refusal_probe(ctx: &mut Ctx, conns: usize, rate: f64, peak: f64, dur: Duration) -> Value {
    ctx.progress(&format!("overload: refusals, the same load on a weir with limits.line_wait_ms = {PROBE_LINE_WAIT_MS}"));
    let key = ctx.admin_key.clone();
    let (s, _) = match ctx.start_weir_configured("weir-probe", &[("WEIR_LIMITS_LINE_WAIT_MS", PROBE_LINE_WAIT_MS)]) {
        Ok(s) => s,
        Err(e) => return not_measured(e),
    };
    let v = match EntryPrep("bench-probe").prep(&s, &key).await {
        Ok(reqs) => {
            let r = probed(s.addr, reqs.clone(), open_loop(s.addr, conns, rate, Rc::new(reqs), Duration::ZERO, dur, Some(s.pid))).await;
            let mut v = load_json(&r);
            v["line_wait_ms"] = json!(PROBE_LINE_WAIT_MS.parse::<u64>().unwrap_or(0));
            // Refused at the line (read at once) against all refusals of the visitor routes
            // (the rest: over the in-flight bound, after a wait in line).
            v["server_counted"] = weir_counters(s.addr, &["weir_connection_turns_refused_total", "weir_shed_total", "weir_timeouts_total", "weir_door_refused_total", "weir_door_returned_total", "weir_door_watched_total", "weir_connection_turns_waited_total"]).await;
            v["goodput_ratio"] = json!(round(r.rps() / peak, 3));
            v
        }
        Err(e) => not_measured(format!("weir: {e}")),
    };
    s.stop(Duration::from_secs(5));
    v
}

/// Bare hyper's closed loops at each of `peak_conns` and at the overload's `conns`: what the
/// connection count alone costs a server on this machine (the kernel's share, the same for
/// any server), against which weir's goodput over `conns` connections reads.
async fn hello_by_conns(ctx: &mut Ctx, peak_conns: &[usize], conns: usize, warm: Duration, dur: Duration) -> Value {
    let (addr, pid) = match ctx.shared_hello() {
        Ok(s) => (s.addr, s.pid),
        Err(e) => return not_measured(e),
    };
    let reqs = hello_requests(addr);
    let mut points = Vec::new();
    for &n in peak_conns.iter().chain([conns].iter()) {
        let r = closed_loop(addr, n, reqs.clone(), warm, dur, None, Some(pid), client_spins()).await;
        points.push(json!({"connections": n, "ok_per_sec": round(r.rps(), 1), "server_cpu_share": r.server_cpu.map(|c| round(c, 3))}));
    }
    let best_peak = points[..peak_conns.len()].iter().filter_map(|p| p["ok_per_sec"].as_f64()).fold(0.0, f64::max);
    let at_conns = points.last().and_then(|p| p["ok_per_sec"].as_f64()).unwrap_or(0.0);
    json!({
        "points": points,
        "ratio": (best_peak > 0.0).then(|| round(at_conns / best_peak, 3)),
    })
}

/// Closed loops of entries at each of `conns` connections in turn: their req/s.
async fn closed_loops(ctx: &mut Ctx, conns: &[usize], reqs: &Rc<Vec<Vec<u8>>>, warm: Duration, dur: Duration) -> Result<Vec<f64>, String> {
    let s = ctx.shared_weir()?;
    let mut out = Vec::new();
    for &n in conns {
        out.push(closed_loop(s.addr, n, reqs.clone(), warm, dur, None, Some(s.pid), client_spins()).await.rps());
    }
    Ok(out)
}

/// New visitors' entry requests for `room`, created on the shared weir.
async fn shared_entry_requests(ctx: &mut Ctx, key: &str, room: &'static str) -> Result<Rc<Vec<Vec<u8>>>, String> {
    let s = ctx.shared_weir()?;
    EntryPrep(room).prep(s, key).await.map(Rc::new).map_err(|e| format!("weir: {e}"))
}

/// How many times a connection has waited in line for a turn on the weir at `addr`.
async fn turn_waits(addr: SocketAddr) -> f64 {
    weir_counters(addr, &["weir_connection_turns_waited_total"]).await["weir_connection_turns_waited_total"].as_f64().unwrap_or(0.0)
}

/// How many overload windows the goodput is measured in, between peak windows.
const GOODPUT_ROUNDS: usize = 4;

/// Offered multiples of capacity for the goodput curve, below the overload run's own.
pub const CURVE: [(f64, &str); 3] = [(0.5, "bench-curve-a"), (1.0, "bench-curve-b"), (2.0, "bench-curve-c")];

/// One point of the goodput curve; its `goodput_ratio` is set once the peak is known.
fn curve_point(factor: f64, r: &crate::load::LoadResult) -> Value {
    json!({
        "offered_factor": factor,
        "ok_per_sec": round(r.rps(), 1),
        "refused": r.tally.refused,
        "server_cpu_share": r.server_cpu.map(|c| round(c, 3)),
        // Whether the client kept up: below capacity, goodput short of the offered load with the
        // server not busy is the client's (or the turns') doing, not the server's work.
        "client_cpu_share": round(r.client_cpu, 3),
        "pacer_lateness_p99_ms": r.pacer_late.as_ref().map(|h| h.summary_ms()["p99_ms"].clone()),
        "latency_from_send_p99_ms": r.tally.ok_from_send_hist.summary_ms()["p99_ms"].clone(),
    })
}

// ---------- realtime scenarios ----------

pub fn start_rt(ctx: &mut Ctx, name: &str, max_conns: usize) -> Option<Result<Server, String>> {
    match name {
        "weir" => Some(ctx.start_weir_fresh("weir-rt").map(|(s, _)| s)),
        "sockudo" => servers::start_sockudo(&ctx.bins, &ctx.pin, &ctx.work, max_conns),
        "soketi" => servers::start_soketi(&ctx.bins, &ctx.pin, &ctx.work),
        _ => None,
    }
}

pub async fn app_for(ctx: &Ctx, s: &Server) -> Result<App, String> {
    match &s.app {
        Some(a) => Ok(a.clone()),
        None => create_app(s, &ctx.admin_key).await,
    }
}

pub async fn connections(ctx: &mut Ctx) -> Value {
    let mut out = serde_json::Map::new();
    let n = ctx.params.idle_conns;
    let servers_list: Vec<&'static str> = std::iter::once("weir").chain(ctx.peers.iter().copied()).collect();
    for name in ["weir", "sockudo", "soketi"] {
        if !servers_list.contains(&name) {
            out.insert(name.into(), not_measured("not installed (run bench/setup)"));
            continue;
        }
        ctx.progress(&format!("connections on {name}: {n} idle WebSockets"));
        let server = match start_rt(ctx, name, n + 100) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                out.insert(name.into(), not_measured(e));
                continue;
            }
            None => {
                out.insert(name.into(), not_measured("not installed"));
                continue;
            }
        };
        let v = match app_for(ctx, &server).await {
            Ok(app) => connections_one(ctx, &server, &app, n).await,
            Err(e) => not_measured(e),
        };
        out.insert(name.into(), v);
        server.stop(Duration::from_secs(3));
    }
    Value::Object(out)
}

async fn connections_one(ctx: &Ctx, server: &Server, app: &App, n: usize) -> Value {
    // Warm the server with one connection so lazily built state is in the baseline.
    if let Ok(ws) = pusher::connect(server.addr, None, &app.key).await {
        drop(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss().unwrap_or(0);
    // Several holder processes, each from its own loopback source address: a process's open
    // files are capped at 20,000 here, and one source address has ~28k ephemeral ports.
    let per_proc = 6_000usize;
    let procs = n.div_ceil(per_proc);
    let t0 = Instant::now();
    let mut children = Vec::new();
    for p in 0..procs {
        let count = per_proc.min(n - p * per_proc);
        let mut cmd = Command::new(&ctx.bins.bench);
        cmd.args(["ws-hold", "--addr", &server.addr.to_string(), "--key", &app.key, "--count", &count.to_string()])
            .args(["--src", &format!("127.0.0.{}", 2 + p), "--hold-secs", "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => return not_measured(format!("cannot start ws-hold: {e}")),
        }
    }
    let mut ok = 0usize;
    let mut failed = 0usize;
    let mut errs = Vec::new();
    for c in children.iter_mut() {
        let out = c.stdout.take().expect("piped");
        let line = tokio::task::spawn_blocking(move || {
            let mut l = String::new();
            let _ = BufReader::new(out).read_line(&mut l);
            l
        });
        let line = tokio::time::timeout(Duration::from_secs(240), line).await.ok().and_then(|r| r.ok()).unwrap_or_default();
        let mut parts = line.trim().splitn(4, ' ');
        if parts.next() == Some("ready") {
            ok += parts.next().and_then(|x| x.parse::<usize>().ok()).unwrap_or(0);
            failed += parts.next().and_then(|x| x.parse::<usize>().ok()).unwrap_or(0);
            if let Some(e) = parts.next().filter(|e| !e.is_empty()) {
                errs.push(e.to_string());
            }
        } else {
            errs.push(format!("holder said {line:?}"));
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let quick = ctx.params.idle_conns < 1_000;
    tokio::time::sleep(Duration::from_millis(if quick { 300 } else { 1_000 })).await;
    let rss1 = server.rss().unwrap_or(0);
    let cpu0 = crate::sys::proc_cpu_precise(server.pid);
    let idle_window = Duration::from_millis(if quick { 500 } else { 2_000 });
    tokio::time::sleep(idle_window).await;
    let idle_cpu = cpu0.and_then(|c0| crate::sys::proc_cpu_precise(server.pid).map(|c1| (c1 - c0).as_secs_f64() / idle_window.as_secs_f64()));
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    let per_conn = if ok > 0 { (rss1.saturating_sub(rss0)) as f64 / ok as f64 } else { 0.0 };
    let mut v = json!({
        "target": n,
        "connected": ok,
        "failed": failed,
        "connect_seconds": round(connect_secs, 3),
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "bytes_per_connection": round(per_conn, 1),
        "idle_cpu_share": idle_cpu.map(|c| round(c, 4)),
        "holder_processes": procs,
        "errors": errs,
    });
    if ok == 0 {
        v = not_measured(format!("no connection succeeded: {errs:?}"));
    }
    v
}

// ---------- queue scale and startup ----------

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

async fn wait_ready(addr: SocketAddr, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let req = request("GET", "/readyz", &addr.to_string(), &[], b"");
    let mut c = Conn::new(addr);
    while t0.elapsed() < limit {
        if let Ok(r) = c.send_timeout(&req, false, Duration::from_secs(1)).await {
            if r.status == 200 {
                return Some(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

pub async fn queue_scale(ctx: &mut Ctx) -> Value {
    let n = ctx.params.queue_visitors;
    ctx.progress(&format!("queue-scale: entering {n} visitors into one room"));
    let (server, dir) = match ctx.start_weir_fresh("weir-queue") {
        Ok(x) => x,
        Err(e) => return not_measured(e),
    };
    let room = "bench-queue";
    if let Err(e) = create_room(&server, &ctx.admin_key, room, 1).await {
        return not_measured(e);
    }
    let _ = enter(server.addr, room).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = server.rss().unwrap_or(0);
    let disk0 = dir_size(&dir);
    let cap = if n >= 100_000 { Duration::from_secs(420) } else { Duration::from_secs(20) };
    let reqs = Rc::new(vec![entry_request(server.addr, room)]);
    let r = closed_loop(server.addr, ctx.params.conns, reqs, Duration::ZERO, cap, Some(n), Some(server.pid), client_spins()).await;
    let entered = r.tally.ok;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = server.rss().unwrap_or(0);
    let disk1 = dir_size(&dir);
    ctx.progress("queue-scale: restart to ready");
    let addr_before = server.addr;
    server.stop(Duration::from_secs(10));
    let restarted = servers::start_weir(&ctx.bins, &ctx.pin, &dir, &ctx.admin_key, &ctx.work, &[]);
    let (restart_listen, restart_ready, rss_restart) = match &restarted {
        Ok(s) => {
            let ready = wait_ready(s.addr, Duration::from_secs(30)).await;
            (Some(s.ready_after), ready.map(|d| s.ready_after + d), s.rss())
        }
        Err(_) => (None, None, None),
    };
    drop(restarted);
    let _ = addr_before;
    json!({
        "target": n,
        "entered": entered,
        "entries_per_sec": round(r.rps(), 1),
        "seconds": round(r.elapsed.as_secs_f64(), 2),
        "statuses": r.to_json()["statuses"].clone(),
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "rss_bytes_per_visitor": if entered > 0 { round(rss1.saturating_sub(rss0) as f64 / entered as f64, 1) } else { 0.0 },
        "disk_bytes_per_visitor": if entered > 0 { round(disk1.saturating_sub(disk0) as f64 / entered as f64, 1) } else { 0.0 },
        "restart_listening_ms": restart_listen.map(|d| round(d.as_secs_f64() * 1e3, 1)),
        "restart_ready_ms": restart_ready.map(|d| round(d.as_secs_f64() * 1e3, 1)),
        "rss_after_restart_bytes": rss_restart,
        "client_cpu_share": round(r.client_cpu, 3),
        "server_cpu_share": r.server_cpu.map(|c| round(c, 3)),
    })
}

pub async fn startup(ctx: &mut Ctx) -> Value {
    let mut runs = Vec::new();
    for i in 0..ctx.params.startup_runs {
        ctx.progress(&format!("startup: zero-config weir serve, run {}", i + 1));
        let (server, _) = match ctx.start_weir_fresh("weir-startup") {
            Ok(x) => x,
            Err(e) => return not_measured(e),
        };
        let ready = wait_ready(server.addr, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = server.rss();
        let c0 = crate::sys::proc_cpu_precise(server.pid);
        let w = ctx.params.idle_cpu_window;
        tokio::time::sleep(w).await;
        let idle = c0.and_then(|c0| crate::sys::proc_cpu_precise(server.pid).map(|c1| (c1 - c0).as_secs_f64() / w.as_secs_f64()));
        runs.push(json!({
            "listening_ms": round(server.ready_after.as_secs_f64() * 1e3, 2),
            "ready_ms": ready.map(|d| round((server.ready_after + d).as_secs_f64() * 1e3, 2)),
            "idle_rss_bytes": rss,
            "idle_cpu_share": idle.map(|c| round(c, 4)),
        }));
        server.stop(Duration::from_secs(5));
    }
    // Median by ready time.
    let mut sorted = runs.clone();
    sorted.sort_by(|a, b| {
        let k = |v: &Value| v["ready_ms"].as_f64().unwrap_or(f64::MAX);
        k(a).partial_cmp(&k(b)).unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut v = sorted[sorted.len() / 2].clone();
    v["runs"] = Value::Array(runs);
    v
}

pub fn flush() {
    let _ = std::io::stderr().flush();
}
