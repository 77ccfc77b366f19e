//! The live dashboard: `GET /dashboard` (a static page and its script) and the JSON it polls,
//! `GET /api/v1/stats` (behind the admin key): every room's and app's numbers now, the last
//! five minutes of them sampled once a second (or, with `?since=`, only the samples the caller
//! lacks), and the top talkers.
//!
//! A sampler task reads the rooms and the realtime server once a second into a ring of
//! [`HISTORY_LEN`] samples, so the charts have a history as soon as the page opens and polling
//! costs one copy of the ring, not a scan of the queues. Every node samples what it sees: on a
//! cluster, queue lengths are the cluster's (shared through Redis), connections, messages and
//! talkers the node's own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::talkers::{Talkers, BUCKET_SECONDS};
use crate::error::{ApiError, ApiQuery};
use crate::http::AppState;
use crate::realtime::Realtime;
use crate::room::Rooms;

/// Samples kept: five minutes at one a second.
pub const HISTORY_LEN: usize = 300;
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Rooms with a series of their own in the history (the first by id); the totals count all.
pub const MAX_ROOM_SERIES: usize = 50;
/// Rows of each top-talkers list.
const TOP_N: usize = 10;

const PAGE: &str = include_str!("../web/static/dashboard.html");
const SCRIPT: &str = include_str!("../web/static/dashboard.js");
/// The page runs only its own script and talks only to this server.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One room's values in one sample.
#[derive(Clone, Copy)]
struct RoomPoint {
    queue_length: u64,
    admitted_per_minute: u64,
    origin_latency_ms: Option<f64>,
}

struct Sample {
    t_ms: i64,
    queue_length: u64,
    admitted_per_minute: u64,
    origin_latency_ms: Option<f64>,
    connections: usize,
    messages_per_second: f64,
    rooms: Vec<(Arc<str>, RoomPoint)>,
}

/// The sampled history and what the next sample needs from the last one.
pub struct Dashboard {
    samples: Mutex<VecDeque<Sample>>,
    /// Messages delivered so far, per app and in all, at the last sample.
    delivered: Mutex<Option<(Instant, HashMap<String, u64>)>>,
    /// Messages per second per app, as of the last sample.
    app_rates: Mutex<HashMap<String, f64>>,
    pub talkers: Arc<Talkers>,
}

impl Dashboard {
    pub fn new(talkers: Arc<Talkers>) -> Self {
        Self {
            samples: Mutex::new(VecDeque::with_capacity(HISTORY_LEN)),
            delivered: Mutex::new(None),
            app_rates: Mutex::new(HashMap::new()),
            talkers,
        }
    }

    /// Takes one sample of `rooms` and `realtime` at `now_ms` (the rooms' clock).
    pub fn sample(&self, rooms: &Rooms, realtime: &Realtime, now_ms: i64) {
        let mut sample = Sample {
            t_ms: now_ms,
            queue_length: 0,
            admitted_per_minute: 0,
            origin_latency_ms: None,
            connections: realtime.connection_count(),
            messages_per_second: 0.0,
            rooms: Vec::new(),
        };
        for (i, room) in rooms.all().into_iter().enumerate() {
            let stats = room.stats(now_ms);
            let point = RoomPoint {
                queue_length: stats.queue_length,
                admitted_per_minute: stats.admitted_last_minute,
                origin_latency_ms: stats.probe_latency_ms,
            };
            sample.queue_length += point.queue_length;
            sample.admitted_per_minute += point.admitted_per_minute;
            sample.origin_latency_ms = match (sample.origin_latency_ms, point.origin_latency_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if i < MAX_ROOM_SERIES {
                sample.rooms.push((room.id.as_str().into(), point));
            }
        }
        let totals: HashMap<String, u64> = realtime.all_tenants().iter().map(|t| (t.spec().id.clone(), t.delivered())).collect();
        let now = Instant::now();
        let mut last = self.delivered.lock();
        if let Some((at, before)) = last.as_ref() {
            let seconds = now.duration_since(*at).as_secs_f64().max(1e-3);
            // An app new since the last sample delivered all it has in between.
            let rates: HashMap<String, f64> = totals
                .iter()
                .map(|(id, total)| (id.clone(), total.saturating_sub(before.get(id).copied().unwrap_or(0)) as f64 / seconds))
                .collect();
            sample.messages_per_second = rates.values().sum();
            *self.app_rates.lock() = rates;
        }
        *last = Some((now, totals));
        drop(last);
        let mut samples = self.samples.lock();
        if samples.len() == HISTORY_LEN {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The `history` object of `GET /api/v1/stats`: one array per series, aligned with `t`.
    /// With `since` (the newest `t` the caller holds), only the samples after it, marked
    /// `"full": false`, if the ring still holds every sample after it; otherwise (no `since`, a
    /// sample the caller missed has left the ring, or `since` is ahead of the newest sample:
    /// another process, or a clock set back) the whole ring, marked `"full": true`.
    fn history(&self, since: Option<i64>) -> Value {
        let samples = self.samples.lock();
        let (oldest, newest) = (samples.front().map(|s| s.t_ms), samples.back().map(|s| s.t_ms));
        let start = match (since, oldest, newest) {
            (Some(since), Some(oldest), Some(newest)) if (oldest..=newest).contains(&since) => {
                Some(samples.partition_point(|s| s.t_ms <= since))
            }
            _ => None,
        };
        let full = start.is_none();
        let samples = samples.range(start.unwrap_or(0)..);
        let mut room_ids: Vec<Arc<str>> = Vec::new();
        for s in samples.clone() {
            for (id, _) in &s.rooms {
                if !room_ids.contains(id) {
                    room_ids.push(id.clone());
                }
            }
        }
        let series = |f: &dyn Fn(&Sample) -> Value| -> Value { samples.clone().map(f).collect() };
        let rooms: serde_json::Map<String, Value> = room_ids
            .iter()
            .map(|id| {
                let point = |s: &Sample| s.rooms.iter().find(|(r, _)| r == id).map(|(_, p)| *p);
                let of = |f: fn(RoomPoint) -> Value| series(&|s| point(s).map_or(Value::Null, f));
                let value = json!({
                    "queue_length": of(|p| p.queue_length.into()),
                    "admitted_per_minute": of(|p| p.admitted_per_minute.into()),
                    "origin_latency_ms": of(|p| json!(p.origin_latency_ms)),
                });
                (id.to_string(), value)
            })
            .collect();
        json!({
            "full": full,
            "t": series(&|s| s.t_ms.into()),
            "queue_length": series(&|s| s.queue_length.into()),
            "admitted_per_minute": series(&|s| s.admitted_per_minute.into()),
            "origin_latency_ms": series(&|s| json!(s.origin_latency_ms)),
            "connections": series(&|s| s.connections.into()),
            "messages_per_second": series(&|s| json!(round2(s.messages_per_second))),
            "rooms": rooms,
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Samples every second until shutdown, and turns the talkers' window every ten.
pub fn spawn(state: AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let per_bucket = BUCKET_SECONDS / SAMPLE_EVERY.as_secs().max(1);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = state.shutdown.cancelled() => return,
            }
            state.dashboard.sample(&state.rooms, &state.realtime, state.clock.now_ms());
            ticks += 1;
            if ticks % per_bucket == 0 {
                state.dashboard.talkers.rotate();
            }
        }
    });
}

/// `GET /dashboard` and its script. The page holds no data and no secret: it asks for the
/// admin key and polls `/api/v1/stats` with it.
pub fn page_routes() -> Router<AppState> {
    Router::new().route("/dashboard", get(page)).route("/_weir/static/dashboard.js", get(script))
}

/// `GET /api/v1/stats`, mounted behind the admin key. An answer without `?since=` carries the
/// whole history (up to ~300 KB with 50 rooms' series), which gzip shrinks several-fold; the
/// dashboard asks for it once, then only for the samples after the newest it holds.
pub fn admin_routes() -> Router<AppState> {
    Router::new().route("/stats", get(stats)).layer(tower_http::compression::CompressionLayer::new())
}

async fn page() -> Response {
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

async fn script() -> Response {
    let mut response = ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[derive(Serialize)]
struct RoomNow {
    id: String,
    name: String,
    state: crate::room::model::RoomState,
    queue_length: u64,
    live_waiters: u64,
    admitted_last_minute: u64,
    target_per_minute: f64,
    entries_last_minute: u64,
    active_users: u64,
    probe_latency_ms: Option<f64>,
    eta_last_ticket_seconds: Option<u64>,
}

/// `GET /api/v1/stats?since=T`: `T` is the newest history time (`history.t`) the caller holds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    since: Option<i64>,
}

async fn stats(State(state): State<AppState>, ApiQuery(query): ApiQuery<StatsQuery>) -> Result<Json<Value>, ApiError> {
    if query.since.is_some_and(|t| t < 0) {
        return Err(ApiError::invalid_field("since", "must be a history time in ms since the Unix epoch (history.t)"));
    }
    let now_ms = state.clock.now_ms();
    let rooms: Vec<RoomNow> = state
        .rooms
        .all()
        .iter()
        .map(|room| {
            let s = room.stats(now_ms);
            RoomNow {
                id: room.id.clone(),
                name: room.spec().name.clone(),
                state: room.effective_state(now_ms),
                queue_length: s.queue_length,
                live_waiters: s.live_waiters,
                admitted_last_minute: s.admitted_last_minute,
                target_per_minute: s.target_per_minute,
                entries_last_minute: s.entries_last_minute,
                active_users: s.active_users,
                probe_latency_ms: s.probe_latency_ms,
                eta_last_ticket_seconds: s.eta_last_ticket_seconds,
            }
        })
        .collect();
    let dashboard = &state.dashboard;
    let rates = dashboard.app_rates.lock().clone();
    let mut apps: Vec<Value> = state
        .realtime
        .all_tenants()
        .iter()
        .map(|t| {
            let id = t.spec().id.clone();
            let rate = rates.get(&id).copied().unwrap_or(0.0);
            json!({"id": id, "internal": t.internal, "connections": t.connection_count(), "messages_per_second": round2(rate)})
        })
        .collect();
    apps.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(Json(json!({
        "node": state.realtime.cluster().map(|c| c.node().to_string()),
        "now_ms": now_ms,
        "interval_ms": SAMPLE_EVERY.as_millis() as u64,
        "history_len": HISTORY_LEN,
        "rooms": rooms,
        "realtime": {
            "connections": state.realtime.connection_count(),
            "messages_per_second": round2(rates.values().sum()),
            "apps": apps,
        },
        "history": dashboard.history(query.since),
        "top": dashboard.talkers.top(TOP_N),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboard_with(samples: impl IntoIterator<Item = (i64, Option<u64>)>) -> Dashboard {
        let d = Dashboard::new(Arc::default());
        for (t_ms, room_queue) in samples {
            let mut ring = d.samples.lock();
            if ring.len() == HISTORY_LEN {
                ring.pop_front();
            }
            let point = |q| RoomPoint { queue_length: q, admitted_per_minute: 0, origin_latency_ms: None };
            ring.push_back(Sample {
                t_ms,
                queue_length: room_queue.unwrap_or(0),
                admitted_per_minute: 0,
                origin_latency_ms: None,
                connections: 0,
                messages_per_second: 0.0,
                rooms: room_queue.map(|q| (Arc::from("a"), point(q))).into_iter().collect(),
            });
        }
        d
    }

    #[test]
    fn since_answers_only_the_samples_the_caller_lacks_while_the_ring_holds_them_all() {
        let d = dashboard_with([(1000, None), (2000, None), (3000, Some(5))]);
        let whole = d.history(None);
        assert_eq!(whole["full"], true);
        assert_eq!(whole["t"], json!([1000, 2000, 3000]));
        assert_eq!(whole["rooms"]["a"]["queue_length"], json!([null, null, 5]));

        let after = d.history(Some(2000));
        assert_eq!(after["full"], false);
        assert_eq!(after["t"], json!([3000]));
        assert_eq!(after["queue_length"], json!([5]));
        assert_eq!(after["rooms"]["a"]["queue_length"], json!([5]));
        assert_eq!(d.history(Some(1000))["t"], json!([2000, 3000]));

        let nothing_new = d.history(Some(3000));
        assert_eq!(nothing_new["full"], false);
        assert_eq!(nothing_new["t"], json!([]));
        assert_eq!(nothing_new["rooms"], json!({}), "no room has a sample after it");

        // Older than the ring, or ahead of it: the whole ring, for the caller to start over.
        for since in [999, 4000] {
            let h = d.history(Some(since));
            assert_eq!((&h["full"], &h["t"]), (&json!(true), &json!([1000, 2000, 3000])), "since {since}");
        }
        assert_eq!(dashboard_with([]).history(Some(1))["full"], true);
    }

    #[test]
    fn a_sample_that_left_the_ring_makes_the_answer_whole() {
        let d = dashboard_with((0..HISTORY_LEN as i64 + 2).map(|i| (i * 1000, None)));
        // The samples at 0 s and 1 s are gone: a caller holding only up to 0 s missed one.
        let h = d.history(Some(0));
        assert_eq!(h["full"], true);
        assert_eq!(h["t"].as_array().unwrap().len(), HISTORY_LEN);
        let h = d.history(Some(2000));
        assert_eq!(h["full"], false);
        assert_eq!(h["t"].as_array().unwrap().len(), HISTORY_LEN - 1);
    }
}
