//! The fan-out scenario: `n` subscribers on one channel of each Pusher server, events published
//! through its HTTP API, end-to-end latency from a timestamp in each event's payload.
//!
//! Two parts. First, throughput: publishers as fast as a window of outstanding events allows (and
//! p99 at each server's own maximum). The servers take turns in two passes (one with `--quick`), the
//! second in reverse order (weir, sockudo, soketi, soketi, sockudo, weir), since the machine's speed
//! drifts over the minutes a pass takes; each server's figures merge both of its turns, and each
//! turn's own are kept under `turns`.
//!
//! Then latency at equal work, a fixed 20,000 deliveries a second, with every server up at once
//! and `n` subscribers on each: the publisher moves from one server to the next every slice of
//! a quarter second (round robin, reversed every other round), and waits for a slice's events to
//! reach everyone before the next server's slice. On this shared virtual machine the host takes
//! the cores away in waves of seconds (the `steal` of `/proc/stat`; events published under one
//! took twice as long to reach everyone at p99, for weir alone): turns of ten seconds put one
//! server in a wave and the next out of it. Slices of a second still let a wave of one or two
//! seconds fall on one server's slices and spare the others' (one run: six of weir's 80 events
//! at 5,000 subscribers, one of soketi's): with slices of a quarter second, a wave covers every
//! server's. The steal each server's slices saw is reported beside its figures.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Conn;
use crate::hist::Hist;
use crate::pusher::{self, App, FanoutState, Shared};
use crate::scenarios::{app_for, not_measured, round, start_rt, Ctx};
use crate::servers::Server;
use crate::sys::CpuMeter;

/// Every Pusher server the harness knows, in the first pass's order.
pub const SERVERS: [&str; 3] = ["weir", "sockudo", "soketi"];
pub async fn fanout(ctx: &mut Ctx) -> Value {
    let subs_list = ctx.params.fanout_subs.clone();
    let max = *subs_list.iter().max().unwrap_or(&1000);
    let installed: Vec<&'static str> = SERVERS.into_iter().filter(|s| *s == "weir" || ctx.peers.contains(s)).collect();
    let passes = ctx.params.fanout_passes;
    let mut turns: BTreeMap<(usize, &'static str), Vec<Result<FanoutRun, String>>> = BTreeMap::new();
    for pass in 0..passes {
        let order: Vec<&'static str> = if pass % 2 == 0 { installed.clone() } else { installed.iter().rev().copied().collect() };
        for name in order {
            ctx.progress(&format!("fanout on {name} (pass {} of {passes}): starting", pass + 1));
            let server = start_rt(ctx, name, max + 100).unwrap_or_else(|| Err("not installed".to_string()));
            let app = match &server {
                Ok(s) => app_for(ctx, s).await,
                Err(e) => Err(e.clone()),
            };
            for &n in &subs_list {
                let run = match (&server, &app) {
                    (Ok(s), Ok(a)) => {
                        ctx.progress(&format!("fanout on {name} (pass {} of {passes}): {n} subscribers", pass + 1));
                        fanout_one(&Target::single(s), a, n, ctx.params.fanout_window, ctx.params.duration).await
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e.clone()),
                };
                turns.entry((n, name)).or_default().push(run.map_err(|e| format!("pass {}: {e}", pass + 1)));
            }
            if let Ok(s) = server {
                s.stop(Duration::from_secs(3));
            }
        }
    }
    let mut out = serde_json::Map::new();
    for &n in &subs_list {
        ctx.progress(&format!("fanout at a fixed rate: {n} subscribers on every server, in slices"));
        let mut paced = paced_interleaved(ctx, &installed, n).await;
        let mut by_server = serde_json::Map::new();
        for name in SERVERS {
            let v = match turns.remove(&(n, name)) {
                None => not_measured("not installed (run bench/setup)"),
                Some(runs) => match runs.into_iter().collect::<Result<Vec<_>, _>>() {
                    Ok(runs) => merged_json(&runs, paced.remove(name).unwrap_or_else(|| Err("not measured".into()))),
                    Err(e) => not_measured(e),
                },
            };
            by_server.insert(name.into(), v);
        }
        out.insert(n.to_string(), Value::Object(by_server));
    }
    Value::Object(out)
}

/// Where a throughput turn sends its clients: the server events are published to, the servers
/// the subscribers connect to (in turn), and the processes whose CPU and memory count as the
/// server's (every node of a cluster, and its Redis).
pub struct Target {
    pub publish: SocketAddr,
    pub subscribe: Vec<SocketAddr>,
    pub pids: Vec<u32>,
}

impl Target {
    pub fn single(server: &Server) -> Self {
        Target { publish: server.addr, subscribe: vec![server.addr], pids: vec![server.pid] }
    }

    /// Resident memory of all its processes (`None` if one cannot be read).
    fn rss(&self) -> Option<u64> {
        self.pids.iter().map(|p| crate::sys::rss_bytes(*p)).sum()
    }

    /// CPU time of all its processes so far.
    fn cpu(&self) -> Option<Duration> {
        self.pids.iter().map(|p| crate::sys::proc_cpu(*p)).sum()
    }
}

/// What one turn measured, in sums that merge: seconds and CPU-seconds rather than shares.
pub struct FanoutRun {
    subscribers: usize,
    connect_secs: f64,
    published: u64,
    delivered: u64,
    loss: u64,
    disconnected: u64,
    secs: f64,
    hist: Hist,
    publish_errors: Vec<String>,
    client_cpu_secs: f64,
    server_cpu_secs: Option<f64>,
    rss_subscribed: Option<u64>,
    rss_after: Option<u64>,
}

/// One server's part of the fixed-rate phase, over all its slices.
pub struct Paced {
    events_per_sec: f64,
    slices: u32,
    events_per_slice: u32,
    /// Seconds of its slices, and of them the host took from the server's core and the client's.
    secs: f64,
    stolen_server_secs: f64,
    stolen_client_secs: f64,
    published: u64,
    errors: u64,
    delivered: u64,
    loss: u64,
    hist: Hist,
    /// Per event, the latency of its last delivery: how long it took to reach every subscriber.
    spread: Hist,
    client_cpu_secs: f64,
    server_cpu_secs: Option<f64>,
}

/// One server's turns merged (sums; latency histograms merged; shares over the summed time),
/// with each turn's headline figures under `turns`, and its part of the fixed-rate phase.
pub fn merged_json(runs: &[FanoutRun], paced: Result<Paced, String>) -> Value {
    let sum = |f: fn(&FanoutRun) -> u64| runs.iter().map(f).sum::<u64>();
    let sum_f = |f: fn(&FanoutRun) -> f64| runs.iter().map(f).sum::<f64>();
    let sum_opt = |f: fn(&FanoutRun) -> Option<f64>| runs.iter().map(f).sum::<Option<f64>>();
    let mean_opt = |f: fn(&FanoutRun) -> Option<u64>| runs.iter().map(f).sum::<Option<u64>>().map(|t| t / runs.len().max(1) as u64);
    let mut hist = Hist::new();
    for r in runs {
        hist.merge(&r.hist);
    }
    let (secs, delivered, published) = (sum_f(|r| r.secs), sum(|r| r.delivered), sum(|r| r.published));
    let mut errors: Vec<String> = runs.iter().flat_map(|r| r.publish_errors.iter().cloned()).collect();
    errors.truncate(3);
    json!({
        "paced": match paced {
            Ok(p) => paced_json(&p),
            Err(e) => not_measured(e),
        },
        "subscribers": runs.first().map_or(0, |r| r.subscribers),
        "connect_seconds": round(sum_f(|r| r.connect_secs) / runs.len().max(1) as f64, 3),
        "published": published,
        "delivered": delivered,
        "loss": sum(|r| r.loss),
        "disconnected": sum(|r| r.disconnected),
        "msg_per_sec": round(delivered as f64 / secs.max(1e-9), 1),
        "events_per_sec": round(published as f64 / secs.max(1e-9), 1),
        "seconds": round(secs, 3),
        "latency": hist.summary_ms(),
        "publish_errors": errors,
        "client_cpu_share": round(sum_f(|r| r.client_cpu_secs) / secs.max(1e-9), 3),
        "server_cpu_share": sum_opt(|r| r.server_cpu_secs).map(|c| round(c / secs.max(1e-9), 3)),
        "rss_subscribed_bytes": mean_opt(|r| r.rss_subscribed),
        "rss_after_bytes": mean_opt(|r| r.rss_after),
        "turns": runs.iter().map(|r| json!({
            "msg_per_sec": round(r.delivered as f64 / r.secs.max(1e-9), 1),
            "p99_ms": round(r.hist.quantile(0.99) as f64 / 1e6, 3),
        })).collect::<Vec<_>>(),
    })
}

fn paced_json(p: &Paced) -> Value {
    // CPU per fixed-rate event: whose work sets a burst's latency, the server writing n frames
    // or the client reading them (one read each at this rate).
    let per_event_ms = |cpu_secs: f64| ms_per_event(cpu_secs, p.published);
    let pct = |stolen: f64| round(100.0 * stolen / p.secs.max(1e-9), 2);
    json!({
        "target_msg_per_sec": 20_000,
        "events_per_sec": round(p.events_per_sec, 2),
        "slices": p.slices,
        "events_per_slice": p.events_per_slice,
        "seconds": round(p.secs, 3),
        "steal_server_core_pct": pct(p.stolen_server_secs),
        "steal_client_core_pct": pct(p.stolen_client_secs),
        "published": p.published,
        "publish_errors": p.errors,
        "delivered": p.delivered,
        "loss": p.loss,
        "latency": p.hist.summary_ms(),
        "event_reaches_all": p.spread.summary_ms(),
        "client_cpu_ms_per_event": per_event_ms(p.client_cpu_secs),
        "server_cpu_ms_per_event": p.server_cpu_secs.map(per_event_ms),
    })
}

/// CPU milliseconds per event, from CPU-seconds over `events` events.
fn ms_per_event(cpu_secs: f64, events: u64) -> f64 {
    round(cpu_secs * 1000.0 / events.max(1) as f64, 2)
}

/// Subscribers that record into one state until `stop` fires.
struct Subscribers {
    state: Shared,
    stop: Rc<tokio::sync::Notify>,
    receivers: Vec<tokio::task::JoinHandle<()>>,
}

impl Subscribers {
    /// Connects and subscribes `n` clients to `CHANNEL`, spread over `servers` in turn, 100
    /// handshakes at a time.
    async fn connect(servers: &[SocketAddr], app: &App, n: usize) -> Result<(Self, f64), String> {
        let state = Rc::new(RefCell::new(FanoutState {
            base: Instant::now(),
            hist: Hist::new(),
            delivered: 0,
            per_event: vec![0; MAX_EVENTS],
            last_arrival_us: vec![0; MAX_EVENTS],
            complete_events: 0,
            subscribers: n as u32,
            closed: 0,
            pongs: 0,
        }));
        let stop = Rc::new(tokio::sync::Notify::new());
        let t_conn = Instant::now();
        let sem = Rc::new(tokio::sync::Semaphore::new(100));
        let mut joins = Vec::new();
        for i in 0..n {
            let sem = sem.clone();
            let key = app.key.clone();
            let addr = servers[i % servers.len()];
            joins.push(tokio::task::spawn_local(async move {
                let _p = sem.acquire().await.expect("open");
                let ws = pusher::connect(addr, None, &key).await?;
                pusher::subscribe(ws, CHANNEL).await
            }));
        }
        let mut receivers = Vec::new();
        let mut first_err = None;
        for j in joins {
            match j.await {
                Ok(Ok(ws)) => receivers.push(tokio::task::spawn_local(pusher::receive(ws, state.clone(), stop.clone()))),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(e.to_string());
                }
            }
        }
        let subs = Subscribers { state, stop, receivers };
        let connected = subs.receivers.len();
        if connected < n {
            subs.close().await;
            return Err(format!("only {connected} of {n} subscribed: {}", first_err.unwrap_or_default()));
        }
        Ok((subs, t_conn.elapsed().as_secs_f64()))
    }

    async fn close(self) {
        self.stop.notify_waiters();
        for r in self.receivers {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
    }

    /// Waits until `want` deliveries have arrived, or `limit` has passed.
    async fn wait_delivered(&self, want: u64, limit: Duration) {
        let until = Instant::now() + limit;
        while self.state.borrow().delivered < want && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Event numbers index the subscribers' per-event counters.
const MAX_EVENTS: usize = 2_000_000;
const CHANNEL: &str = "bench-fanout";
/// Padding that brings an event's data to a realistic size.
const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// Event `i`'s publish request to the server at `host`, stamped with the time it is sent.
fn event_request(host: &str, app: &App, state: &Shared, i: usize) -> Vec<u8> {
    let ts = state.borrow().base.elapsed().as_nanos() as u64;
    pusher::publish_request(app, host, CHANNEL, &format!("t={ts} i={i} {PAD}"))
}

/// One turn's throughput part: `n` subscribers on one channel of `target`, publishers as fast as
/// `window` outstanding events allow, for `duration`.
pub async fn fanout_one(target: &Target, app: &App, n: usize, window: usize, duration: Duration) -> Result<FanoutRun, String> {
    let (subs, connect_secs) = Subscribers::connect(&target.subscribe, app, n).await?;
    let state = subs.state.clone();
    let rss_subscribed = target.rss();
    // Publishers: `window` events outstanding; each waits for its event to reach everyone (or 2 s).
    let next = Rc::new(RefCell::new(0usize));
    let published = Rc::new(RefCell::new(0u64));
    let publish_errors = Rc::new(RefCell::new(Vec::<String>::new()));
    let meter = CpuMeter::start(None);
    let server_cpu0 = target.cpu();
    let t0 = Instant::now();
    let end = t0 + duration;
    let mut pubs = Vec::new();
    for _ in 0..window {
        let (next, published, errs, state, app) = (next.clone(), published.clone(), publish_errors.clone(), state.clone(), app.clone());
        let addr = target.publish;
        pubs.push(tokio::task::spawn_local(async move {
            let mut conn = Conn::new(addr);
            while Instant::now() < end {
                let i = {
                    let mut n = next.borrow_mut();
                    *n += 1;
                    *n - 1
                };
                if i >= MAX_EVENTS {
                    break;
                }
                let req = event_request(&addr.to_string(), &app, &state, i);
                match conn.send_timeout(&req, true, Duration::from_secs(5)).await {
                    Ok(r) if (200..300).contains(&r.status) => *published.borrow_mut() += 1,
                    Ok(r) => {
                        {
                            let mut e = errs.borrow_mut();
                            if e.len() < 3 {
                                e.push(format!("HTTP {} {}", r.status, String::from_utf8_lossy(&r.body)));
                            }
                        }
                        state.borrow_mut().per_event[i] = u32::MAX / 2; // never counted complete
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(e) => {
                        errs.borrow_mut().push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                let wait_until = Instant::now() + Duration::from_secs(2);
                while state.borrow().per_event[i] < n as u32 && Instant::now() < wait_until {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        }));
    }
    for p in pubs {
        let _ = p.await;
    }
    let published = *published.borrow();
    let expected = published * n as u64;
    subs.wait_delivered(expected, Duration::from_secs(3)).await;
    let elapsed = t0.elapsed();
    let (client_cpu, _) = meter.stop();
    let server_cpu_secs = server_cpu0.zip(target.cpu()).map(|(a, b)| b.saturating_sub(a).as_secs_f64());
    let rss_after = target.rss();
    let (delivered, closed, hist) = {
        let s = state.borrow();
        (s.delivered, s.closed, s.hist.clone())
    };
    subs.close().await;
    let secs = elapsed.as_secs_f64();
    let publish_errors = publish_errors.borrow().clone();
    Ok(FanoutRun {
        subscribers: n,
        connect_secs,
        published,
        delivered,
        loss: expected.saturating_sub(delivered),
        disconnected: closed,
        secs,
        hist,
        publish_errors,
        client_cpu_secs: client_cpu * secs,
        server_cpu_secs,
        rss_subscribed,
        rss_after,
    })
}

/// How long one server's slice of the fixed-rate phase lasts (at least one event, and until its
/// events have reached everyone): 1 event at 5,000 subscribers, 5 at 1,000.
const SLICE: Duration = Duration::from_millis(250);

/// One server in the fixed-rate phase.
struct Lane {
    name: &'static str,
    server: Server,
    app: App,
    subs: Subscribers,
    conn: Conn,
    accepted: Vec<usize>,
    errors: u64,
    slices: u32,
    secs: f64,
    client_cpu_secs: f64,
    server_cpu_secs: Option<f64>,
    stolen_server_secs: f64,
    stolen_client_secs: f64,
}

/// The fixed-rate phase (20,000 deliveries a second: `20,000 / n` events a second) with every
/// server in `names` up at once and `n` subscribers on each, published in slices, round robin
/// (see the module's doc). Each server gets `duration` × passes of events in all.
async fn paced_interleaved(ctx: &mut Ctx, names: &[&'static str], n: usize) -> BTreeMap<&'static str, Result<Paced, String>> {
    let mut out = BTreeMap::new();
    let mut lanes = Vec::new();
    for &name in names {
        let server = match start_rt(ctx, name, n + 100) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                out.insert(name, Err(e));
                continue;
            }
            None => continue,
        };
        let ready = match app_for(ctx, &server).await {
            Ok(app) => Subscribers::connect(&[server.addr], &app, n).await.map(|(subs, _)| (app, subs)),
            Err(e) => Err(e),
        };
        match ready {
            Ok((app, subs)) => lanes.push(Lane {
                name,
                conn: Conn::new(server.addr),
                server,
                app,
                subs,
                accepted: Vec::new(),
                errors: 0,
                slices: 0,
                secs: 0.0,
                client_cpu_secs: 0.0,
                server_cpu_secs: Some(0.0),
                stolen_server_secs: 0.0,
                stolen_client_secs: 0.0,
            }),
            Err(e) => {
                out.insert(name, Err(e));
                server.stop(Duration::from_secs(3));
            }
        }
    }
    let events_per_sec = (20_000.0 / n as f64).max(1.0);
    let interval = Duration::from_secs_f64(1.0 / events_per_sec);
    let per_slice = ((SLICE.as_secs_f64() * events_per_sec).round() as u32).max(1);
    let total = (ctx.params.duration.as_secs_f64() * ctx.params.fanout_passes as f64 * events_per_sec).round() as u32;
    let rounds = total.div_ceil(per_slice).max(1);
    for round_no in 0..rounds {
        // Reversed every other round, so no server always follows the same one.
        let order: Vec<usize> = if round_no % 2 == 0 { (0..lanes.len()).collect() } else { (0..lanes.len()).rev().collect() };
        for li in order {
            let lane = &mut lanes[li];
            let meter = CpuMeter::start(Some(lane.server.pid));
            let p0 = Instant::now();
            for k in 0..per_slice {
                tokio::time::sleep_until((p0 + interval * k).into()).await;
                let i = lane.accepted.len() + lane.errors as usize;
                if i >= MAX_EVENTS {
                    break;
                }
                let req = event_request(&lane.server.addr.to_string(), &lane.app, &lane.subs.state, i);
                match lane.conn.send_timeout(&req, false, Duration::from_secs(5)).await {
                    Ok(r) if (200..300).contains(&r.status) => lane.accepted.push(i),
                    _ => {
                        lane.errors += 1;
                        lane.subs.state.borrow_mut().per_event[i] = u32::MAX / 2;
                    }
                }
            }
            // The slice ends when its events have reached everyone, so the next server's slice
            // starts on a quiet machine, and not before its time is up, so the publisher keeps to
            // the fixed rate.
            let want = lane.accepted.len() as u64 * n as u64;
            lane.subs.wait_delivered(want, Duration::from_secs(3)).await;
            tokio::time::sleep_until((p0 + interval * per_slice).into()).await;
            let secs = p0.elapsed().as_secs_f64();
            let (client_cpu, server_cpu) = meter.stop();
            let (stolen_server, stolen_client) = meter.stolen();
            lane.slices += 1;
            lane.secs += secs;
            lane.client_cpu_secs += client_cpu * secs;
            lane.server_cpu_secs = lane.server_cpu_secs.zip(server_cpu).map(|(a, c)| a + c * secs);
            lane.stolen_server_secs += stolen_server * secs;
            lane.stolen_client_secs += stolen_client * secs;
        }
    }
    let mut stopping = Vec::new();
    for lane in lanes {
        let paced = {
            let st = lane.subs.state.borrow();
            let mut spread = Hist::new();
            for &i in &lane.accepted {
                spread.record(u64::from(st.last_arrival_us[i]) * 1000);
            }
            let published = lane.accepted.len() as u64;
            Paced {
                events_per_sec,
                slices: lane.slices,
                events_per_slice: per_slice,
                secs: lane.secs,
                stolen_server_secs: lane.stolen_server_secs,
                stolen_client_secs: lane.stolen_client_secs,
                published,
                errors: lane.errors,
                delivered: st.delivered,
                loss: (published * n as u64).saturating_sub(st.delivered),
                hist: st.hist.clone(),
                spread,
                client_cpu_secs: lane.client_cpu_secs,
                server_cpu_secs: lane.server_cpu_secs,
            }
        };
        lane.subs.close().await;
        lane.server.terminate();
        stopping.push(lane.server);
        out.insert(lane.name, Ok(paced));
    }
    for server in stopping {
        server.stop(Duration::from_secs(3));
    }
    out
}
