//! HTTP load: a closed loop (N keep-alive connections, each sending its next request as soon as
//! the last is answered) and an open loop (a fixed offered rate, latency measured from the
//! intended send time so a stalled server cannot hide its queueing: no coordinated omission).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Conn;
use crate::hist::Hist;
use crate::pace::Slots;
use crate::probe::ProbeResult;
use crate::sys::CpuMeter;

#[derive(Default)]
pub struct Tally {
    pub ok: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub errors: u64,
    pub ok_hist: Hist,
    /// Accepted requests from their actual send: how long the server (and the kernel's socket
    /// buffers on its side) held them, without the open loop's own backlog of unsent slots.
    pub ok_from_send_hist: Hist,
    pub refused: u64,
    pub refused_with_retry_after: u64,
    pub refused_hist: Hist,
    /// Refusals of requests sent on a connection whose previous answer was not a refusal: the
    /// server read them at once, where a request sent right after a refusal waits out the hold.
    pub refused_fresh: u64,
    pub refused_fresh_hist: Hist,
    /// Open loop: scheduled requests never sent because the connection was still busy at the end.
    pub missed: u64,
    /// Open loop: scheduled requests not sent because the server had asked the connection to
    /// retry later (`Retry-After`), as a client that honours it does.
    pub deferred: u64,
}

pub struct LoadResult {
    pub tally: Tally,
    pub elapsed: Duration,
    pub client_cpu: f64,
    pub server_cpu: Option<f64>,
    /// Open loop: how late the pacer released each send slot.
    pub pacer_late: Option<Hist>,
    /// The latency probe run alongside, if any (`probe::probed`).
    pub probe: Option<ProbeResult>,
    /// Shares of the window the host took from the server's core and from the client's.
    pub stolen: (f64, f64),
    /// Times the client went to sleep waiting in the window (`sys::self_sleeps`).
    pub client_sleeps: u64,
    /// Whether the client polled without sleeping ([`client_spins`]).
    pub client_spun: bool,
}

/// Diagnostic (`WEIR_BENCH_CLIENT_SPIN=1`, BENCHMARKS.md): every closed loop's client polls for
/// answers without ever sleeping (see `closed_loop`'s `spin`). Never the goals' figures: it also
/// hides how busy the client is.
pub fn client_spins() -> bool {
    std::env::var_os("WEIR_BENCH_CLIENT_SPIN").is_some_and(|v| v == "1")
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        for (status, n) in &other.by_status {
            *self.by_status.entry(*status).or_default() += n;
        }
        self.errors += other.errors;
        self.ok_hist.merge(&other.ok_hist);
        self.ok_from_send_hist.merge(&other.ok_from_send_hist);
        self.refused += other.refused;
        self.refused_with_retry_after += other.refused_with_retry_after;
        self.refused_hist.merge(&other.refused_hist);
        self.refused_fresh += other.refused_fresh;
        self.refused_fresh_hist.merge(&other.refused_fresh_hist);
        self.missed += other.missed;
        self.deferred += other.deferred;
    }
}

impl LoadResult {
    /// One result for several measured windows: counts and histograms added, rates and CPU
    /// shares over their combined time.
    pub fn merge(&mut self, other: &LoadResult) {
        let (a, b) = (self.elapsed.as_secs_f64(), other.elapsed.as_secs_f64());
        let weighted = |x: f64, y: f64| if a + b > 0.0 { (x * a + y * b) / (a + b) } else { 0.0 };
        self.tally.merge(&other.tally);
        self.client_cpu = weighted(self.client_cpu, other.client_cpu);
        self.server_cpu = match (self.server_cpu, other.server_cpu) {
            (Some(x), Some(y)) => Some(weighted(x, y)),
            _ => None,
        };
        self.stolen = (weighted(self.stolen.0, other.stolen.0), weighted(self.stolen.1, other.stolen.1));
        self.client_sleeps += other.client_sleeps;
        self.client_spun |= other.client_spun;
        self.elapsed += other.elapsed;
        if let (Some(mine), Some(theirs)) = (&mut self.pacer_late, &other.pacer_late) {
            mine.merge(theirs);
        }
        if let (Some(mine), Some(theirs)) = (&mut self.probe, &other.probe) {
            mine.merge(theirs);
        }
    }

    pub fn rps(&self) -> f64 {
        self.tally.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn to_json(&self) -> Value {
        let statuses: BTreeMap<String, u64> =
            self.tally.by_status.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        json!({
            "ok": self.tally.ok,
            "ok_per_sec": (self.rps() * 10.0).round() / 10.0,
            "statuses": statuses,
            "errors": self.tally.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "latency": self.tally.ok_hist.summary_ms(),
            "latency_from_send": self.tally.ok_from_send_hist.summary_ms(),
            "refused": self.tally.refused,
            "refused_with_retry_after": self.tally.refused_with_retry_after,
            "refused_latency": self.tally.refused_hist.summary_ms(),
            "refused_fresh": self.tally.refused_fresh,
            "refused_fresh_latency": self.tally.refused_fresh_hist.summary_ms(),
            "missed": self.tally.missed,
            "deferred": self.tally.deferred,
            "ok_per_server_cpu_sec": self.server_cpu.filter(|c| *c > 0.0).map(|c| (self.rps() / c).round()),
            "client_cpu_share": (self.client_cpu * 1000.0).round() / 1000.0,
            "server_cpu_share": self.server_cpu.map(|c| (c * 1000.0).round() / 1000.0),
            "steal_server_core_pct": (self.stolen.0 * 10_000.0).round() / 100.0,
            "steal_client_core_pct": (self.stolen.1 * 10_000.0).round() / 100.0,
            "client_spun": self.client_spun,
            "client_sleeps_per_response": (self.tally.ok > 0).then(|| (self.client_sleeps as f64 / self.tally.ok as f64 * 1000.0).round() / 1000.0),
            "pacer_lateness": self.pacer_late.as_ref().map(|h| h.summary_ms()),
            "probe": self.probe.as_ref().map(|p| p.to_json()),
        })
    }
}

/// Counts one answer: `nanos` is its latency as the scenario defines it, `from_send` the time
/// since the request actually left.
pub fn count(t: &mut Tally, status: u16, retry_after: Option<u64>, nanos: u64, from_send: u64) {
    *t.by_status.entry(status).or_default() += 1;
    if (200..400).contains(&status) {
        t.ok += 1;
        t.ok_hist.record(nanos);
        t.ok_from_send_hist.record(from_send);
    } else if status == 503 || status == 429 {
        t.refused += 1;
        if retry_after.is_some() {
            t.refused_with_retry_after += 1;
        }
        t.refused_hist.record(nanos);
    }
}

/// Closed loop: `conns` connections for `warmup` + `duration`; connection `c` sends
/// `reqs[(c + k·conns) % len]` for its k-th request. Only the measured window is counted.
/// Stops early once `max_ok` successful requests were counted (if given). With `spin` the client
/// polls for answers without ever sleeping: on loopback a sleeping client is woken by the
/// server's send, on the server's core, so this takes that cost off whichever server is measured.
#[allow(clippy::too_many_arguments)]
pub async fn closed_loop(
    addr: SocketAddr,
    conns: usize,
    reqs: Rc<Vec<Vec<u8>>>,
    warmup: Duration,
    duration: Duration,
    max_ok: Option<u64>,
    server_pid: Option<u32>,
    spin: bool,
) -> LoadResult {
    let tally = Rc::new(RefCell::new(Tally::default()));
    let t0 = Instant::now();
    let measure_from = t0 + warmup;
    let end = measure_from + duration;
    let meter = Rc::new(RefCell::new(None::<CpuMeter>));
    // A task always ready to run: the runtime then polls its sockets with a zero timeout
    // between tasks and never blocks in `epoll_wait`.
    let spinner = spin.then(|| {
        tokio::task::spawn_local(async move {
            while Instant::now() < end {
                tokio::task::yield_now().await;
            }
        })
    });
    let mut tasks = Vec::new();
    for c in 0..conns {
        let reqs = reqs.clone();
        let tally = tally.clone();
        let meter = meter.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut conn = Conn::new(addr);
            let mut i = c;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= measure_from && meter.borrow().is_none() {
                    *meter.borrow_mut() = Some(CpuMeter::start(server_pid));
                }
                let req = &reqs[i % reqs.len()];
                i += conns;
                let sent = Instant::now();
                let res = conn.send_timeout(req, false, Duration::from_secs(10)).await;
                let done = Instant::now();
                if sent < measure_from || done > end {
                    continue;
                }
                let Ok(r) = res else {
                    tally.borrow_mut().errors += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let mut t = tally.borrow_mut();
                let nanos = (done - sent).as_nanos() as u64;
                count(&mut t, r.status, r.retry_after, nanos, nanos);
                if max_ok.is_some_and(|m| t.ok >= m) {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    if let Some(spinner) = spinner {
        spinner.abort();
    }
    let finished = Instant::now().min(end);
    let (client_cpu, server_cpu, stolen, client_sleeps) = meter
        .borrow()
        .as_ref()
        .map(|m| {
            let (client, server) = m.stop();
            (client, server, m.stolen(), m.client_sleeps())
        })
        .unwrap_or((0.0, None, (0.0, 0.0), 0));
    let tally = Rc::try_unwrap(tally).ok().expect("tasks done").into_inner();
    LoadResult {
        tally,
        elapsed: finished.saturating_duration_since(measure_from),
        client_cpu,
        server_cpu,
        pacer_late: None,
        probe: None,
        stolen,
        client_sleeps,
        client_spun: spin,
    }
}

/// Open loop: offers `rate` requests/s spread evenly over `conns` connections for `warmup`, not
/// counted, then for the measured `duration`.
/// Latency runs from each request's scheduled time; a connection that falls behind sends at once.
/// A connection refused with `Retry-After` skips its slots until then, as a well-behaved client
/// (or a browser showing the refusal) does. Slots are released by [`Slots`], to the microsecond, not at tokio's millisecond ticks.
pub async fn open_loop(
    addr: SocketAddr,
    conns: usize,
    rate: f64,
    reqs: Rc<Vec<Vec<u8>>>,
    warmup: Duration,
    duration: Duration,
    server_pid: Option<u32>,
) -> LoadResult {
    let tally = Rc::new(RefCell::new(Tally::default()));
    let t0 = Instant::now() + Duration::from_millis(50);
    let measure_from = t0 + warmup;
    let end = measure_from + duration;
    let rate = rate.max(1.0);
    let per_conn_interval = Duration::from_secs_f64(conns as f64 / rate);
    let slots = Rc::new(Slots::new(t0, rate, conns));
    let meter = Rc::new(RefCell::new(None::<CpuMeter>));
    let metering = {
        let meter = meter.clone();
        tokio::task::spawn_local(async move {
            if !warmup.is_zero() {
                tokio::time::sleep_until(measure_from.into()).await;
            }
            *meter.borrow_mut() = Some(CpuMeter::start(server_pid));
        })
    };
    let pacer = {
        let slots = slots.clone();
        tokio::task::spawn_local(async move { slots.run(end).await })
    };
    let mut tasks = Vec::new();
    for c in 0..conns {
        let reqs = reqs.clone();
        let tally = tally.clone();
        let slots = slots.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut conn = Conn::new(addr);
            // Connected before its first slot: latency from send is the request's, not the
            // handshake's (a failure shows at the first send, which reconnects).
            let _ = conn.connect().await;
            let mut k: u64 = 0;
            let mut after_refusal = false;
            // Until when the server asked this connection to wait (`Retry-After`).
            let mut retry_at: Option<Instant> = None;
            loop {
                let scheduled = slots.due(c, k);
                k += 1;
                if scheduled >= end {
                    break;
                }
                if retry_at.is_some_and(|at| scheduled < at) {
                    if scheduled >= measure_from {
                        tally.borrow_mut().deferred += 1;
                    }
                    continue;
                }
                if Instant::now() >= end {
                    // Slots this connection could not even send in time count as missed, not as
                    // late sends after the window (which would overstate the answered rate).
                    // (Those of the warm-up count nowhere.)
                    let left = (end - scheduled.max(measure_from)).as_secs_f64() / per_conn_interval.as_secs_f64();
                    tally.borrow_mut().missed += u64::from(scheduled >= measure_from) + left as u64;
                    break;
                }
                // Behind schedule (the connection was busy past this slot): the wait is the
                // server's doing and counts, and we send at once. Ahead of it, we wait for the
                // pacer, whose lateness (µs) is the client's, so latency runs from the actual send.
                let behind = Instant::now() >= scheduled;
                if !behind {
                    slots.wait(c, k - 1).await;
                }
                let req = &reqs[(c + k as usize) % reqs.len()];
                let sent = Instant::now();
                let res = conn.send_timeout(req, false, Duration::from_secs(10)).await;
                let done = Instant::now();
                // Answers to requests sent in the warm-up steer the connection but count nowhere.
                let counted = sent >= measure_from;
                match res {
                    Ok(r) => {
                        let refused = r.status == 503 || r.status == 429;
                        // Refusals are timed from the actual send (how fast is "no"?); accepted
                        // requests from the schedule (what a user waiting on that slot saw).
                        let from = if refused || !behind { sent } else { scheduled };
                        let nanos = (done - from).as_nanos() as u64;
                        if counted {
                            let mut t = tally.borrow_mut();
                            if refused && !after_refusal {
                                t.refused_fresh += 1;
                                t.refused_fresh_hist.record(nanos);
                            }
                            count(&mut t, r.status, r.retry_after, nanos, (done - sent).as_nanos() as u64);
                        }
                        after_refusal = refused;
                        retry_at = r.retry_after.filter(|_| refused).map(|secs| done + Duration::from_secs(secs));
                    }
                    Err(_) => {
                        after_refusal = false;
                        if counted {
                            tally.borrow_mut().errors += 1;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = pacer.await;
    let _ = metering.await;
    let meter = meter.borrow_mut().take().unwrap_or_else(|| CpuMeter::start(server_pid));
    let (client_cpu, server_cpu) = meter.stop();
    let (stolen, client_sleeps) = (meter.stolen(), meter.client_sleeps());
    // Responses still arriving after the window stretch it: rates use the real span.
    let elapsed = measure_from.elapsed().max(duration);
    let tally = Rc::try_unwrap(tally).ok().expect("tasks done").into_inner();
    let pacer_late = Some(slots.late.take());
    LoadResult { tally, elapsed, client_cpu, server_cpu, pacer_late, probe: None, stolen, client_sleeps, client_spun: false }
}
