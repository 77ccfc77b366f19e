//! Webhooks: `channel_occupied`, `channel_vacated`, `member_added`, `member_removed`,
//! `client_event`, `cache_miss` and `subscription_count`, batched per app and endpoint, signed as Pusher signs them
//! (`X-Pusher-Key`, `X-Pusher-Signature` = hex HMAC-SHA256 of the body with the app secret).
//! The waiting rooms' webhooks (`room::notify`) travel the same way, signed with weir's own
//! headers.
//!
//! Each endpoint has its own bounded queue and worker, so a slow or dead endpoint delays only
//! its own webhooks: publishers `try_send` and a full queue drops the event (counted). A batch
//! is retried with exponential backoff and jitter, each attempt under a timeout, and dropped
//! (counted) after [`MAX_ATTEMPTS`] or [`MAX_AGE`]. Endpoints may be `http://` or `https://`
//! (`outbound`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::app::AppSpec;
use super::signature;
use crate::clock::Clock;

/// Events waiting per endpoint; beyond this new events are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 10_000;
/// Events per POST (Pusher batches several events in one request).
pub const MAX_BATCH: usize = 100;
/// How long the first event of a batch waits for company.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// One delivery attempt's deadline.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_ATTEMPTS: u32 = 6;
/// A batch older than this is dropped rather than retried.
pub const MAX_AGE: Duration = Duration::from_secs(5 * 60);
/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`], times a random 0.5-1.0.
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

type HttpClient = Client<crate::outbound::Connector, Full<Bytes>>;

/// Whether `url` can be a webhook endpoint: an absolute `http(s)` URL with a host, which the
/// client can also send to (an endpoint it could not would be dropped without a word).
pub fn is_endpoint_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) && url.parse::<hyper::Uri>().is_ok()
}

/// Spawns endpoint workers; shared by every app.
#[derive(Clone)]
pub struct Deliverer {
    client: HttpClient,
    shutdown: CancellationToken,
}

impl Deliverer {
    pub fn new(shutdown: CancellationToken) -> Self {
        let client = Client::builder(TokioExecutor::new()).build(crate::outbound::connector(Some(ATTEMPT_TIMEOUT)));
        Self { client, shutdown }
    }

    /// Starts one worker per configured endpoint. Workers stop when the returned targets are
    /// dropped (settings replaced, app deleted) and their queue is drained, or at shutdown.
    pub fn targets_for(&self, spec: &AppSpec) -> WebhookTargets {
        let app = spec.id.clone();
        let meters = Meters {
            depth: metrics::gauge!("weir_realtime_webhook_queue_depth", "app" => app.clone()),
            delivered: metrics::counter!("weir_realtime_webhook_delivered_total", "app" => app.clone()),
            dropped_failed: metrics::counter!("weir_realtime_webhook_dropped_total", "app" => app.clone(), "reason" => "failed"),
            dropped_full: metrics::counter!("weir_realtime_webhook_dropped_total", "app" => app, "reason" => "queue_full"),
        };
        let endpoints = spec.webhooks.iter().map(|w| Endpoint {
            url: &w.url,
            types: w.event_types.clone(),
            signing: Signing { key_header: "X-Pusher-Key", key: spec.key.clone(), signature_header: "X-Pusher-Signature", secret: spec.secret.clone() },
        });
        self.targets(endpoints, meters)
    }

    /// Workers for `endpoints`, counted by `meters`.
    pub fn targets<'a>(&self, endpoints: impl IntoIterator<Item = Endpoint<'a>>, meters: Meters) -> WebhookTargets {
        let targets = endpoints
            .into_iter()
            .filter_map(|e| {
                let uri: hyper::Uri = e.url.parse().ok()?;
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                let worker = Worker {
                    client: self.client.clone(),
                    uri,
                    signing: e.signing,
                    depth: meters.depth.clone(),
                    delivered: meters.delivered.clone(),
                    dropped_failed: meters.dropped_failed.clone(),
                    shutdown: self.shutdown.clone(),
                };
                tokio::spawn(worker.run(rx));
                Some(Target { types: e.types, tx })
            })
            .collect();
        WebhookTargets { targets, depth: meters.depth, dropped_full: meters.dropped_full }
    }
}

/// One endpoint: where, which event types (empty: all), and how its requests are signed.
pub struct Endpoint<'a> {
    pub url: &'a str,
    pub types: Vec<String>,
    pub signing: Signing,
}

/// The headers an endpoint's requests carry: `key_header: key`, and `signature_header:` the hex
/// HMAC-SHA256 of the body with `secret`.
pub struct Signing {
    pub key_header: &'static str,
    pub key: String,
    pub signature_header: &'static str,
    pub secret: String,
}

/// The metrics of one owner's endpoints: events queued, delivered, and dropped (given up after
/// retries, or refused by a full queue).
pub struct Meters {
    pub depth: metrics::Gauge,
    pub delivered: metrics::Counter,
    pub dropped_failed: metrics::Counter,
    pub dropped_full: metrics::Counter,
}

struct Target {
    types: Vec<String>,
    tx: mpsc::Sender<Value>,
}

/// An app's endpoints. Dropping it lets the workers finish and stop.
pub struct WebhookTargets {
    targets: Vec<Target>,
    depth: metrics::Gauge,
    dropped_full: metrics::Counter,
}

impl WebhookTargets {
    /// Queues `event` for every endpoint that wants its type; never waits.
    pub fn enqueue(&self, event: Value) {
        let name = event.get("name").and_then(Value::as_str).unwrap_or_default();
        for t in &self.targets {
            if !t.types.is_empty() && !t.types.iter().any(|ty| ty == name) {
                continue;
            }
            match t.tx.try_send(event.clone()) {
                Ok(()) => self.depth.increment(1.0),
                Err(_) => self.dropped_full.increment(1),
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

struct Worker {
    client: HttpClient,
    uri: hyper::Uri,
    signing: Signing,
    depth: metrics::Gauge,
    delivered: metrics::Counter,
    dropped_failed: metrics::Counter,
    shutdown: CancellationToken,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Value>) {
        loop {
            let first = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = self.shutdown.cancelled() => return,
            };
            let mut batch = vec![first];
            let window = Instant::now() + BATCH_WINDOW;
            while batch.len() < MAX_BATCH {
                tokio::select! {
                    e = rx.recv() => match e { Some(e) => batch.push(e), None => break },
                    _ = tokio::time::sleep_until(window) => break,
                }
            }
            self.depth.decrement(batch.len() as f64);
            let n = batch.len() as u64;
            if self.deliver(batch).await {
                self.delivered.increment(n);
            } else {
                self.dropped_failed.increment(n);
            }
        }
    }

    /// Delivers one batch with retries; false when it was given up.
    async fn deliver(&self, events: Vec<Value>) -> bool {
        let started = Instant::now();
        let body = serde_json::json!({ "time_ms": crate::clock::SystemClock.now_ms(), "events": events }).to_string();
        let signature = signature::hmac_hex(&self.signing.secret, &body);
        let body = Bytes::from(body);
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                let exp = BASE_BACKOFF.saturating_mul(1 << (attempt - 1).min(16)).min(MAX_BACKOFF);
                let delay = exp.mul_f64(rand::rng().random_range(0.5..=1.0));
                if started.elapsed() + delay > MAX_AGE {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.shutdown.cancelled() => return false,
                }
            }
            let request = hyper::Request::post(self.uri.clone())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(self.signing.key_header, &self.signing.key)
                .header(self.signing.signature_header, &signature)
                .body(Full::new(body.clone()));
            let Ok(request) = request else { return false };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.client.request(request)).await {
                Ok(Ok(resp)) if resp.status().is_success() => return true,
                Ok(Ok(resp)) => tracing::debug!(uri = %self.uri, status = %resp.status(), attempt, "webhook refused"),
                Ok(Err(e)) => tracing::debug!(uri = %self.uri, error = %e, attempt, "webhook failed"),
                Err(_) => tracing::debug!(uri = %self.uri, attempt, "webhook timed out"),
            }
        }
        tracing::warn!(uri = %self.uri, "webhook batch dropped after retries");
        false
    }
}

/// Shared handle type the registry passes around.
pub type SharedDeliverer = Arc<Deliverer>;
