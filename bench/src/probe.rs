//! A latency probe: a light, steady trickle of requests on connections of its own, sent from a
//! thread of its own at raised priority while a load runs against the same server.
//!
//! Why: the load generator shares one core with everything it does. Driving half a server's
//! capacity keeps it ~85 % busy, and at that occupancy an answer that has arrived waits its turn
//! behind the generator's own work: the bare hyper baseline then measured a p99 of 20 ms at half
//! load. That is the client's queue, not the server's. The probe's thread sleeps between its few
//! requests and preempts the generator when an answer arrives (real-time priority), so what it
//! records is the server's latency under that load. The load's own figures are still reported beside it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Conn;
use crate::load::{count, LoadResult, Tally};

/// The probe's share of the load: this many requests a second, spread over [`CONNS`] connections.
pub const RATE: f64 = 400.0;
/// Enough connections that a probe still samples while some wait out a `Retry-After`.
pub const CONNS: usize = 64;
/// The probe's thread runs under the real-time FIFO policy at this (lowest) priority, so a
/// wake-up preempts the generator at once instead of waiting out its time slice (up to ~3 ms
/// under the fair scheduler whatever the nice values). It needs the privilege (root here); without
/// it the thread runs at the client's priority, which the result says. The probe sleeps between
/// its few requests, so it takes no time from the generator beyond its own small share.
const FIFO_PRIORITY: i32 = 1;
/// When the probe's `settled` figures begin. Why: the load starts all at once, the line fills
/// within its first 200 ms, and the connections refused then come back together a second later
/// (and again, less together, a second after that): the onset of a flood. Reported apart, so
/// that a figure is read for the flood's onset and for its course.
pub const SETTLED_AFTER: Duration = Duration::from_secs(3);

/// Runs `load` with a [`Probe`] of `addr` alongside; the probe's result goes with the load's.
pub async fn probed(addr: SocketAddr, reqs: Vec<Vec<u8>>, load: impl std::future::Future<Output = LoadResult>) -> LoadResult {
    let probe = Probe::start(addr, reqs);
    let mut r = load.await;
    r.probe = Some(probe.finish());
    r
}

/// A probe running on its own thread until [`Probe::finish`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<ProbeResult>,
}

pub struct ProbeResult {
    pub tally: Tally,
    /// The answers to requests sent [`SETTLED_AFTER`] or more after the probe began: the load
    /// past its onset, when the first refusals come back together.
    pub settled: Tally,
    /// Whether the thread got its raised priority.
    pub raised: bool,
    /// Refusals slower than [`SLOW_REFUSAL`]: (seconds into the probe, ms, whether the
    /// connection's previous answer was a refusal too), the first [`SLOW_KEPT`].
    pub slow_refusals: Vec<[f64; 3]>,
}

/// A refusal slower than this is listed with when it came (`ProbeResult::slow_refusals`): the
/// goal's bound.
const SLOW_REFUSAL: Duration = Duration::from_millis(1);
/// How many slow refusals are listed.
const SLOW_KEPT: usize = 64;

impl Probe {
    /// Starts probing `addr` with `reqs` (taken in turn), at [`RATE`] over [`CONNS`]
    /// connections, each opened before its first request.
    pub fn start(addr: SocketAddr, reqs: Vec<Vec<u8>>) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let raised = raise_priority();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("probe runtime");
            let local = tokio::task::LocalSet::new();
            let (tally, settled, slow_refusals) = local.block_on(&rt, run(addr, Arc::new(reqs), flag));
            ProbeResult { tally, settled, raised, slow_refusals }
        });
        Probe { stop, thread }
    }

    /// Stops sending (requests in flight are answered first) and returns what was measured.
    pub fn finish(self) -> ProbeResult {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| ProbeResult { tally: Tally::default(), settled: Tally::default(), raised: false, slow_refusals: Vec::new() })
    }
}

/// Moves the calling thread to [`FIFO_PRIORITY`] under `SCHED_FIFO`; whether it could.
fn raise_priority() -> bool {
    let param = libc::sched_param { sched_priority: FIFO_PRIORITY };
    // SAFETY: pid 0 is the calling thread; the call reads `param` and nothing else.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// Probes until `stop`: every answer, and those to requests scheduled [`SETTLED_AFTER`] or more
/// after the start.
async fn run(addr: SocketAddr, reqs: Arc<Vec<Vec<u8>>>, stop: Arc<AtomicBool>) -> (Tally, Tally, Vec<[f64; 3]>) {
    let t0 = Instant::now() + Duration::from_millis(20);
    let interval = Duration::from_secs_f64(CONNS as f64 / RATE);
    let mut tasks = Vec::new();
    for c in 0..CONNS {
        let (reqs, stop) = (reqs.clone(), stop.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let (mut tally, mut settled, mut slow) = (Tally::default(), Tally::default(), Vec::new());
            let mut after_refusal = false;
            let mut conn = Conn::new(addr);
            let _ = conn.connect().await;
            // Connection `c` sends at `t0 + c/RATE + k·interval`: evenly spread over the probe.
            let first = t0 + Duration::from_secs_f64(c as f64 / RATE);
            let mut retry_at: Option<Instant> = None;
            for k in 0u32.. {
                let scheduled = first + interval * k;
                if retry_at.is_some_and(|at| scheduled < at) {
                    tally.deferred += 1;
                    continue;
                }
                // Behind (the last answer came after this slot): the wait counts from the slot.
                let behind = Instant::now() >= scheduled;
                tokio::time::sleep_until(scheduled.into()).await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = &reqs[(c + k as usize) % reqs.len()];
                let sent = Instant::now();
                let res = conn.send_timeout(req, false, Duration::from_secs(10)).await;
                let done = Instant::now();
                match res {
                    Ok(r) => {
                        let refused = r.status == 503 || r.status == 429;
                        retry_at = r.retry_after.filter(|_| refused).map(|secs| done + Duration::from_secs(secs));
                        let from_send = (done - sent).as_nanos() as u64;
                        let nanos = if behind { (done - scheduled).as_nanos() as u64 } else { from_send };
                        count(&mut tally, r.status, r.retry_after, nanos, from_send);
                        if refused && nanos > SLOW_REFUSAL.as_nanos() as u64 && slow.len() < SLOW_KEPT {
                            slow.push([(scheduled - t0).as_secs_f64(), nanos as f64 / 1e6, f64::from(u8::from(after_refusal))]);
                        }
                        after_refusal = refused;
                        if scheduled >= t0 + SETTLED_AFTER {
                            count(&mut settled, r.status, r.retry_after, nanos, from_send);
                        }
                    }
                    Err(_) => tally.errors += 1,
                }
            }
            (tally, settled, slow)
        }));
    }
    let (mut all, mut all_settled, mut all_slow) = (Tally::default(), Tally::default(), Vec::new());
    for t in tasks {
        if let Ok((t, settled, slow)) = t.await {
            all.merge(&t);
            all_settled.merge(&settled);
            all_slow.extend(slow);
        }
    }
    all_slow.sort_by(|a, b| a[0].total_cmp(&b[0]));
    all_slow.truncate(SLOW_KEPT);
    (all, all_settled, all_slow)
}

impl ProbeResult {
    pub fn merge(&mut self, other: &ProbeResult) {
        self.tally.merge(&other.tally);
        self.settled.merge(&other.settled);
        self.raised &= other.raised;
        self.slow_refusals.extend_from_slice(&other.slow_refusals);
        self.slow_refusals.truncate(SLOW_KEPT);
    }

    pub fn to_json(&self) -> Value {
        let t = &self.tally;
        json!({
            "rate_per_sec": RATE,
            "connections": CONNS,
            "priority_raised": self.raised,
            "ok": t.ok,
            "latency": t.ok_hist.summary_ms(),
            "refused": t.refused,
            "refused_with_retry_after": t.refused_with_retry_after,
            "refused_latency": t.refused_hist.summary_ms(),
            "errors": t.errors,
            "deferred": t.deferred,
            "slow_refusals": self.slow_refusals.iter().map(|[at, ms, again]| json!({"at_s": at, "ms": ms, "after_a_refusal": *again > 0.0})).collect::<Vec<_>>(),
            "settled": {
                "after_s": SETTLED_AFTER.as_secs_f64(),
                "ok": self.settled.ok,
                "latency": self.settled.ok_hist.summary_ms(),
                "refused": self.settled.refused,
                "refused_latency": self.settled.refused_hist.summary_ms(),
            },
        })
    }
}
