//! The fan-out scenario: `n` subscribers on one channel of each Pusher server, events published
//! through its HTTP API, end-to-end latency from a timestamp in each event's payload.
//!
//! Each turn has two phases: publishers as fast as a window of outstanding events allows
//! (throughput, and p99 at each server's own maximum), then a fixed 20,000 deliveries a second
//! (p99 at equal work). The servers take turns in two passes (one with `--quick`), the second in reverse order
//! (weir, sockudo, soketi, soketi, sockudo, weir): the machine's speed drifts over the minutes a
//! pass takes, and the fixed-rate p99 over 5,000 subscribers rests on a few tens of events, so
//! one pass would compare servers measured minutes apart. Each server's figures merge both of its
//! turns; each turn's own are kept under `turns`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Conn;
use crate::hist::Hist;
use crate::pusher::{self, App, FanoutState};
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
                        fanout_one(s, a, n, ctx.params.fanout_window, ctx.params.duration).await
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
        let mut by_server = serde_json::Map::new();
        for name in SERVERS {
            let v = match turns.remove(&(n, name)) {
                None => not_measured("not installed (run bench/setup)"),
                Some(runs) => match runs.into_iter().collect::<Result<Vec<_>, _>>() {
                    Ok(runs) => merged_json(&runs),
                    Err(e) => not_measured(e),
                },
            };
            by_server.insert(name.into(), v);
        }
        out.insert(n.to_string(), Value::Object(by_server));
    }
    Value::Object(out)
}

/// What one turn measured, in sums that merge: seconds and CPU-seconds rather than shares.
struct FanoutRun {
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
    paced: Paced,
}

/// The fixed-rate phase of a turn.
struct Paced {
    events_per_sec: f64,
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
/// with each turn's headline figures under `turns`.
fn merged_json(runs: &[FanoutRun]) -> Value {
    let sum = |f: fn(&FanoutRun) -> u64| runs.iter().map(f).sum::<u64>();
    let sum_f = |f: fn(&FanoutRun) -> f64| runs.iter().map(f).sum::<f64>();
    let sum_opt = |f: fn(&FanoutRun) -> Option<f64>| runs.iter().map(f).sum::<Option<f64>>();
    let mean_opt = |f: fn(&FanoutRun) -> Option<u64>| runs.iter().map(f).sum::<Option<u64>>().map(|t| t / runs.len().max(1) as u64);
    let mut hist = Hist::new();
    let mut paced_hist = Hist::new();
    let mut spread = Hist::new();
    for r in runs {
        hist.merge(&r.hist);
        paced_hist.merge(&r.paced.hist);
        spread.merge(&r.paced.spread);
    }
    let (secs, delivered, published) = (sum_f(|r| r.secs), sum(|r| r.delivered), sum(|r| r.published));
    let paced_published = sum(|r| r.paced.published);
    // CPU per fixed-rate event: whose work sets a burst's latency, the server writing n frames
    // or the client reading them (one read each at this rate).
    let per_event_ms = |cpu_secs: f64| ms_per_event(cpu_secs, paced_published);
    let mut errors: Vec<String> = runs.iter().flat_map(|r| r.publish_errors.iter().cloned()).collect();
    errors.truncate(3);
    json!({
        "paced": {
            "target_msg_per_sec": 20_000,
            "events_per_sec": round(runs.first().map_or(0.0, |r| r.paced.events_per_sec), 2),
            "published": paced_published,
            "publish_errors": sum(|r| r.paced.errors),
            "delivered": sum(|r| r.paced.delivered),
            "loss": sum(|r| r.paced.loss),
            "latency": paced_hist.summary_ms(),
            "event_reaches_all": spread.summary_ms(),
            "client_cpu_ms_per_event": per_event_ms(sum_f(|r| r.paced.client_cpu_secs)),
            "server_cpu_ms_per_event": sum_opt(|r| r.paced.server_cpu_secs).map(per_event_ms),
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
            "paced_p99_ms": round(r.paced.hist.quantile(0.99) as f64 / 1e6, 3),
            "paced_slowest_event_ms": round(r.paced.spread.quantile(1.0) as f64 / 1e6, 3),
            "paced_server_cpu_ms_per_event": r.paced.server_cpu_secs.map(|c| ms_per_event(c, r.paced.published)),
        })).collect::<Vec<_>>(),
    })
}

/// CPU milliseconds per event, from CPU-seconds over `events` events.
fn ms_per_event(cpu_secs: f64, events: u64) -> f64 {
    round(cpu_secs * 1000.0 / events.max(1) as f64, 2)
}

/// One turn: `n` subscribers on one channel of `server`, both phases.
async fn fanout_one(server: &Server, app: &App, n: usize, window: usize, duration: Duration) -> Result<FanoutRun, String> {
    let channel = "bench-fanout";
    let base = Instant::now();
    let state = Rc::new(RefCell::new(FanoutState {
        base,
        hist: Hist::new(),
        delivered: 0,
        per_event: vec![0; 2_000_000],
        last_arrival_us: vec![0; 2_000_000],
        complete_events: 0,
        subscribers: n as u32,
        closed: 0,
        pongs: 0,
    }));
    let stop = Rc::new(tokio::sync::Notify::new());
    // Connect and subscribe, 100 handshakes at a time.
    let t_conn = Instant::now();
    let sem = Rc::new(tokio::sync::Semaphore::new(100));
    let mut joins = Vec::new();
    for _ in 0..n {
        let sem = sem.clone();
        let key = app.key.clone();
        let addr = server.addr;
        joins.push(tokio::task::spawn_local(async move {
            let _p = sem.acquire().await.expect("open");
            let ws = pusher::connect(addr, None, &key).await?;
            pusher::subscribe(ws, channel).await
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
    let connected = receivers.len();
    let connect_secs = t_conn.elapsed().as_secs_f64();
    if connected < n {
        stop.notify_waiters();
        return Err(format!("only {connected} of {n} subscribed: {}", first_err.unwrap_or_default()));
    }
    let rss_subscribed = server.rss();
    // Publishers: `window` events outstanding; each waits for its event to reach everyone (or 2 s).
    let next = Rc::new(RefCell::new(0usize));
    let published = Rc::new(RefCell::new(0u64));
    let publish_errors = Rc::new(RefCell::new(Vec::<String>::new()));
    let meter = CpuMeter::start(Some(server.pid));
    let t0 = Instant::now();
    let end = t0 + duration;
    let pad = "x".repeat(64);
    let mut pubs = Vec::new();
    for _ in 0..window {
        let (next, published, errs, state, app) = (next.clone(), published.clone(), publish_errors.clone(), state.clone(), app.clone());
        let addr = server.addr;
        let pad = pad.clone();
        pubs.push(tokio::task::spawn_local(async move {
            let mut conn = Conn::new(addr);
            while Instant::now() < end {
                let i = {
                    let mut n = next.borrow_mut();
                    *n += 1;
                    *n - 1
                };
                if i >= 2_000_000 {
                    break;
                }
                let ts = (Instant::now() - base).as_nanos() as u64;
                let data = format!("t={ts} i={i} {pad}");
                let req = pusher::publish_request(&app, &addr.to_string(), channel, &data);
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
    let drain_until = Instant::now() + Duration::from_secs(3);
    while state.borrow().delivered < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t0.elapsed();
    let (client_cpu, server_cpu) = meter.stop();
    let rss_after = server.rss();

    // Phase 2: the same fixed load for every server (20,000 deliveries/s), so p99 compares
    // servers at equal work rather than each at its own maximum.
    let paced = {
        let (max_hist, max_delivered) = {
            let mut st = state.borrow_mut();
            (std::mem::take(&mut st.hist), std::mem::replace(&mut st.delivered, 0))
        };
        let events_per_sec = (20_000.0 / n as f64).max(1.0);
        let interval = Duration::from_secs_f64(1.0 / events_per_sec);
        let first = *next.borrow();
        let mut conn = Conn::new(server.addr);
        let meter = CpuMeter::start(Some(server.pid));
        let p0 = Instant::now();
        let mut sent = 0u64;
        let mut errors = 0u64;
        let mut k = 0u32;
        let mut accepted = Vec::new();
        while p0.elapsed() < duration && first + (k as usize) < 2_000_000 {
            tokio::time::sleep_until((p0 + interval * k).into()).await;
            let i = first + k as usize;
            k += 1;
            let ts = (Instant::now() - base).as_nanos() as u64;
            let req = pusher::publish_request(app, &server.addr.to_string(), channel, &format!("t={ts} i={i} {pad}"));
            match conn.send_timeout(&req, false, Duration::from_secs(5)).await {
                Ok(r) if (200..300).contains(&r.status) => {
                    sent += 1;
                    accepted.push(i);
                }
                _ => errors += 1,
            }
        }
        let want = sent * n as u64;
        let until = Instant::now() + Duration::from_secs(3);
        while state.borrow().delivered < want && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = p0.elapsed().as_secs_f64();
        let (client_cpu, server_cpu) = meter.stop();
        let mut st = state.borrow_mut();
        let mut spread = Hist::new();
        for &i in &accepted {
            spread.record(u64::from(st.last_arrival_us[i]) * 1000);
        }
        let hist = std::mem::replace(&mut st.hist, max_hist);
        let delivered = std::mem::replace(&mut st.delivered, max_delivered);
        Paced {
            events_per_sec,
            published: sent,
            errors,
            delivered,
            loss: want.saturating_sub(delivered),
            hist,
            spread,
            client_cpu_secs: client_cpu * secs,
            server_cpu_secs: server_cpu.map(|c| c * secs),
        }
    };

    stop.notify_waiters();
    for r in receivers {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    let s = state.borrow();
    let secs = elapsed.as_secs_f64();
    let publish_errors = publish_errors.borrow().clone();
    Ok(FanoutRun {
        subscribers: n,
        connect_secs,
        published,
        delivered: s.delivered,
        loss: expected.saturating_sub(s.delivered),
        disconnected: s.closed,
        secs,
        hist: s.hist.clone(),
        publish_errors,
        client_cpu_secs: client_cpu * secs,
        server_cpu_secs: server_cpu.map(|c| c * secs),
        rss_subscribed,
        rss_after,
        paced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A turn whose every delivery took `ms` milliseconds.
    fn turn(delivered: u64, secs: f64, ms: u64, server_cpu_secs: f64) -> FanoutRun {
        let mut hist = Hist::new();
        let mut paced_hist = Hist::new();
        for _ in 0..100 {
            hist.record(ms * 1_000_000);
            paced_hist.record(ms * 1_000_000);
        }
        let mut spread = Hist::new();
        spread.record(ms * 1_000_000);
        FanoutRun {
            subscribers: 100,
            connect_secs: 0.5,
            published: delivered / 100,
            delivered,
            loss: 1,
            disconnected: 0,
            secs,
            hist,
            publish_errors: vec![],
            client_cpu_secs: secs / 2.0,
            server_cpu_secs: Some(server_cpu_secs),
            rss_subscribed: Some(1_000),
            rss_after: Some(3_000),
            paced: Paced {
                events_per_sec: 200.0,
                published: 10,
                errors: 0,
                delivered: 1_000,
                loss: 0,
                hist: paced_hist,
                spread,
                client_cpu_secs: 0.01,
                server_cpu_secs: Some(0.02),
            },
        }
    }

    /// Two turns merge as one longer run: rates over the summed time, counts summed, latency
    /// from the merged histograms, CPU per event over all events; each turn kept.
    #[test]
    fn turns_merge_as_one_run() {
        let v = merged_json(&[turn(1_000_000, 10.0, 10, 9.0), turn(3_000_000, 10.0, 30, 10.0)]);
        assert_eq!(v["msg_per_sec"], 200_000.0);
        assert_eq!(v["delivered"], 4_000_000);
        assert_eq!(v["loss"], 2);
        assert_eq!(v["server_cpu_share"], 0.95);
        assert_eq!(v["client_cpu_share"], 0.5);
        assert_eq!(v["rss_after_bytes"], 3_000);
        // Half the deliveries took 10 ms and half 30: the p99 is the slower half's.
        let p99 = v["latency"]["p99_ms"].as_f64().unwrap();
        assert!((29.0..=31.0).contains(&p99), "p99 {p99}");
        assert_eq!(v["paced"]["published"], 20);
        assert_eq!(v["paced"]["server_cpu_ms_per_event"], 2.0);
        let slowest = v["paced"]["event_reaches_all"]["max_ms"].as_f64().unwrap();
        assert!((29.0..=31.0).contains(&slowest), "slowest event {slowest}");
        let turns = v["turns"].as_array().unwrap();
        assert_eq!(turns.len(), 2);
        assert_eq!(turns[0]["msg_per_sec"], 100_000.0);
        assert_eq!(turns[1]["paced_server_cpu_ms_per_event"], 2.0);
    }
}
