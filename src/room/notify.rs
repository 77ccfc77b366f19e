//! Room webhooks: an operator's endpoints are told when a room starts or stops queueing and when
//! its state changes, so a flood reaches someone's phone and not only a dashboard.
//!
//! Events (`name`, `room`, `time_ms`, and):
//! - `queueing_started` (`queue_length`, `rate_per_minute`): for [`QUEUEING_AFTER_MS`] without
//!   a break, the last visitor in line has had at least [`WAIT_MS`] to wait (the line's length
//!   over the admission rate; any line while nobody is admitted). A room that keeps up, whose
//!   visitors are let in within a step or two, stays quiet however busy it is.
//! - `queueing_ended` (`queue_length`, `rate_per_minute`): after `queueing_started`, the line
//!   has been shorter than that for [`CALM_AFTER_MS`]. The two delays keep a line that empties
//!   and refills from flapping.
//! - `state_changed` (`from`, `to`): the state in force changed (an admin's change, or a
//!   scheduled room opening at its start).
//!
//! The admission driver observes every room each tick on the node that admits (a cluster's
//! lease holder), so each event is sent once. A room seen for the first time (a restart, a new
//! lease holder) is taken as it is, without a `state_changed`; if visitors are waiting it is
//! announced as queueing again once they have waited [`QUEUEING_AFTER_MS`] from then.
//!
//! Delivery is the realtime webhooks' (`realtime::webhook`): per endpoint a bounded queue, POSTs
//! of `{"time_ms", "events": [...]}` batched over 100 ms, retries with backoff, headers
//! `X-Weir-Room: {id}` and `X-Weir-Signature:` hex HMAC-SHA256 of the body with the
//! endpoint's `secret`; metrics `weir_room_webhook_{queue_depth,delivered_total,dropped_total}`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::model::RoomState;
use crate::error::ApiError;
use crate::realtime::webhook::{Deliverer, Endpoint, Meters, Signing, WebhookTargets};

/// A line whose last visitor has this long to wait is a queue (5 s).
pub const WAIT_MS: f64 = 5_000.0;
/// A queue without a break this long makes a room `queueing` (5 s).
pub const QUEUEING_AFTER_MS: i64 = 5_000;
/// No queue this long ends it (30 s).
pub const CALM_AFTER_MS: i64 = 30_000;
pub const EVENT_TYPES: [&str; 3] = ["queueing_started", "queueing_ended", "state_changed"];
/// Endpoints per room.
pub const MAX_WEBHOOKS: usize = 5;
const SECRET_LEN: std::ops::RangeInclusive<usize> = 16..=256;

/// An endpoint in a room's `webhooks`. `event_types` empty means all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomWebhook {
    pub url: String,
    /// Signs each request (`X-Weir-Signature`); the receiver checks it with the same secret.
    pub secret: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
}

pub fn validate(hooks: &[RoomWebhook]) -> Result<(), ApiError> {
    if hooks.len() > MAX_WEBHOOKS {
        return Err(ApiError::invalid_field("webhooks", format!("at most {MAX_WEBHOOKS}")));
    }
    for (i, w) in hooks.iter().enumerate() {
        if !crate::realtime::webhook::is_endpoint_url(&w.url) {
            return Err(ApiError::invalid_field(&format!("webhooks[{i}].url"), "must be an absolute http(s) URL"));
        }
        if !SECRET_LEN.contains(&w.secret.len()) || w.secret.chars().any(char::is_control) {
            return Err(ApiError::invalid_field(&format!("webhooks[{i}].secret"), "must be 16-256 characters, none of them control characters"));
        }
        if let Some(bad) = w.event_types.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
            return Err(ApiError::invalid_field(&format!("webhooks[{i}].event_types"), format!("unknown type {bad:?} (known: {})", EVENT_TYPES.join(", "))));
        }
    }
    Ok(())
}

/// What the driver remembers of one room between observations.
#[derive(Debug, Default)]
pub struct Watch {
    state: Option<RoomState>,
    /// Since when visitors have been waiting without a break, or nobody has.
    waiting_since: Option<i64>,
    calm_since: Option<i64>,
    queueing: bool,
}

impl Watch {
    /// The events the room's `state`, `queue_length` and admission rate at `now_ms` make, in
    /// order.
    pub fn observe(&mut self, room: &str, state: RoomState, queue_length: u64, rate_per_minute: f64, now_ms: i64) -> Vec<Value> {
        let mut events = Vec::new();
        match self.state.replace(state) {
            Some(before) if before != state => events.push(json!({
                "name": "state_changed", "room": room, "from": before.as_str(), "to": state.as_str(), "time_ms": now_ms,
            })),
            _ => {}
        }
        let admitting = state == RoomState::Open && rate_per_minute > 0.0;
        let last_waits_ms = if admitting { queue_length as f64 * 60_000.0 / rate_per_minute } else { f64::INFINITY };
        let event = |name: &str| json!({"name": name, "room": room, "queue_length": queue_length, "rate_per_minute": rate_per_minute, "time_ms": now_ms});
        if queue_length > 0 && last_waits_ms >= WAIT_MS {
            self.calm_since = None;
            let since = *self.waiting_since.get_or_insert(now_ms);
            if !self.queueing && now_ms - since >= QUEUEING_AFTER_MS {
                self.queueing = true;
                events.push(event("queueing_started"));
            }
        } else {
            self.waiting_since = None;
            let since = *self.calm_since.get_or_insert(now_ms);
            if self.queueing && now_ms - since >= CALM_AFTER_MS {
                self.queueing = false;
                events.push(event("queueing_ended"));
            }
        }
        events
    }
}

/// Every room's watch and endpoints, kept by the admission driver.
pub struct Notifier {
    deliverer: Deliverer,
    rooms: HashMap<String, Watched>,
}

struct Watched {
    watch: Watch,
    hooks: Vec<RoomWebhook>,
    targets: WebhookTargets,
}

impl Notifier {
    pub fn new(deliverer: Deliverer) -> Self {
        Self { deliverer, rooms: HashMap::new() }
    }

    /// Observes one room and queues its events for its endpoints (started afresh when the
    /// room's `webhooks` changed).
    pub fn observe(&mut self, room: &str, hooks: &[RoomWebhook], state: RoomState, queue_length: u64, rate_per_minute: f64, now_ms: i64) {
        let watched = match self.rooms.get_mut(room) {
            Some(w) if w.hooks == hooks => w,
            _ => {
                let watch = self.rooms.remove(room).map(|w| w.watch).unwrap_or_default();
                let targets = self.targets(room, hooks);
                self.rooms.entry(room.to_string()).or_insert(Watched { watch, hooks: hooks.to_vec(), targets })
            }
        };
        for event in watched.watch.observe(room, state, queue_length, rate_per_minute, now_ms) {
            watched.targets.enqueue(event);
        }
    }

    /// Forgets rooms that no longer exist (their workers finish their queues and stop).
    pub fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        self.rooms.retain(|id, _| exists(id));
    }

    /// Forgets every room: this node stopped admitting, and the next to observe them starts
    /// from what it sees.
    pub fn clear(&mut self) {
        self.rooms.clear();
    }

    fn targets(&self, room: &str, hooks: &[RoomWebhook]) -> WebhookTargets {
        let meters = Meters {
            depth: metrics::gauge!("weir_room_webhook_queue_depth", "room" => room.to_string()),
            delivered: metrics::counter!("weir_room_webhook_delivered_total", "room" => room.to_string()),
            dropped_failed: metrics::counter!("weir_room_webhook_dropped_total", "room" => room.to_string(), "reason" => "failed"),
            dropped_full: metrics::counter!("weir_room_webhook_dropped_total", "room" => room.to_string(), "reason" => "queue_full"),
        };
        let endpoints = hooks.iter().map(|h| Endpoint {
            url: &h.url,
            types: h.event_types.clone(),
            signing: Signing { key_header: "X-Weir-Room", key: room.to_string(), signature_header: "X-Weir-Signature", secret: h.secret.clone() },
        });
        self.deliverer.targets(endpoints, meters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(events: &[Value]) -> Vec<&str> {
        events.iter().map(|e| e["name"].as_str().unwrap()).collect()
    }

    #[test]
    fn queueing_starts_after_a_wait_without_a_break_and_ends_after_a_calm() {
        let mut w = Watch::default();
        let (open, rate) = (RoomState::Open, 60.0); // one a second: the 5th in line waits 5 s
        assert!(w.observe("r", open, 0, rate, 0).is_empty(), "first sight: no state change");
        // A line that breaks never counts.
        for t in (100..20_000).step_by(200) {
            assert!(w.observe("r", open, 8, rate, t).is_empty());
            assert!(w.observe("r", open, 0, rate, t + 100).is_empty());
        }
        assert!(w.observe("r", open, 5, rate, 20_000).is_empty());
        assert!(w.observe("r", open, 9, rate, 24_900).is_empty());
        let started = w.observe("r", open, 12, rate, 25_000);
        assert_eq!(names(&started), ["queueing_started"]);
        assert_eq!((started[0]["queue_length"].as_u64(), started[0]["rate_per_minute"].as_f64()), (Some(12), Some(60.0)));
        assert!(w.observe("r", open, 40, rate, 26_000).is_empty(), "told once");
        // The line shortens for less than the calm, then grows: still queueing, nothing sent.
        assert!(w.observe("r", open, 4, rate, 30_000).is_empty(), "4 s to wait is no queue");
        assert!(w.observe("r", open, 0, rate, 59_900).is_empty());
        assert!(w.observe("r", open, 20, rate, 60_000).is_empty());
        assert!(w.observe("r", open, 0, rate, 61_000).is_empty());
        let ended = w.observe("r", open, 0, rate, 91_000);
        assert_eq!(names(&ended), ["queueing_ended"]);
        assert!(w.observe("r", open, 0, rate, 200_000).is_empty());
    }

    #[test]
    fn a_busy_room_that_keeps_up_stays_quiet_and_a_stopped_one_queues() {
        let mut w = Watch::default();
        // 100 visitors in line at 12,000 a minute: the last is in within half a second.
        for t in (0..60_000).step_by(500) {
            assert!(w.observe("r", RoomState::Open, 100, 12_000.0, t).is_empty());
        }
        // Paused (or a rate of 0): any line is a queue.
        assert!(w.observe("r", RoomState::Paused, 1, 12_000.0, 60_000).iter().all(|e| e["name"] == "state_changed"));
        assert_eq!(names(&w.observe("r", RoomState::Paused, 1, 12_000.0, 65_000)), ["queueing_started"]);
        let mut stopped = Watch::default();
        stopped.observe("s", RoomState::Open, 1, 0.0, 0);
        assert_eq!(names(&stopped.observe("s", RoomState::Open, 1, 0.0, 5_000)), ["queueing_started"]);
    }

    #[test]
    fn a_state_change_is_told_with_both_states() {
        let mut w = Watch::default();
        assert!(w.observe("r", RoomState::Scheduled, 0, 60.0, 0).is_empty());
        let e = w.observe("r", RoomState::Open, 0, 60.0, 10);
        assert_eq!(names(&e), ["state_changed"]);
        assert_eq!((e[0]["from"].as_str(), e[0]["to"].as_str(), e[0]["room"].as_str()), (Some("scheduled"), Some("open"), Some("r")));
        assert!(w.observe("r", RoomState::Open, 0, 60.0, 20).is_empty());
    }

    #[test]
    fn webhooks_are_validated_field_by_field() {
        let ok = RoomWebhook { url: "https://ops.example/hook".into(), secret: "s".repeat(16), event_types: vec![] };
        assert!(validate(std::slice::from_ref(&ok)).is_ok());
        let field = |hooks: &[RoomWebhook]| validate(hooks).unwrap_err().message;
        assert!(field(&[RoomWebhook { url: "/relative".into(), ..ok.clone() }]).starts_with("webhooks[0].url"));
        assert!(field(&[RoomWebhook { url: "ftp://x/y".into(), ..ok.clone() }]).starts_with("webhooks[0].url"));
        assert!(field(&[ok.clone(), RoomWebhook { secret: "short".into(), ..ok.clone() }]).starts_with("webhooks[1].secret"));
        assert!(field(&[RoomWebhook { secret: "x".repeat(257), ..ok.clone() }]).starts_with("webhooks[0].secret"));
        assert!(field(&[RoomWebhook { event_types: vec!["queueing_started".into(), "nope".into()], ..ok.clone() }]).starts_with("webhooks[0].event_types"));
        assert!(field(&vec![ok; MAX_WEBHOOKS + 1]).starts_with("webhooks"));
    }
}
