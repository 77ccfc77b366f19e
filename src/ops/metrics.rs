//! Prometheus metrics at `/metrics`, recorded through the `metrics` facade.
//!
//! The recorder is process-global (the facade allows one), so it is installed once and shared
//! by every server a process runs (tests run several). Latency histograms use fixed buckets
//! from 100 µs to 10 s so they aggregate across nodes.

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::http::Method;
use parking_lot::RwLock;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::http::AppState;

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Installs the global recorder on first use and returns its render handle.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding program); then
            // this handle renders only what was recorded before, which is acceptable.
            let _ = metrics::set_global_recorder(recorder);
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("weir-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .expect("spawning the metrics upkeep thread");
            handle
        })
        .clone()
}

/// `GET /metrics`
pub async fn render(State(state): State<AppState>) -> Response {
    state.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Metric handles of one route, resolved once: the request path then costs a map lookup by
/// `&str` and a short scan instead of building label strings for every request.
#[derive(Default)]
struct RouteHandles {
    /// (method, status) → request counter.
    counters: Vec<(Method, u16, metrics::Counter)>,
    /// method → latency histogram.
    histograms: Vec<(Method, metrics::Histogram)>,
}

fn route_handles() -> &'static RwLock<HashMap<String, RouteHandles>> {
    static HANDLES: OnceLock<RwLock<HashMap<String, RouteHandles>>> = OnceLock::new();
    HANDLES.get_or_init(Default::default)
}

/// Label-safe method: the standard ones, anything else as `OTHER` (bounded label values).
fn method_label(method: &Method) -> Method {
    match *method {
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::HEAD | Method::OPTIONS => method.clone(),
        _ => Method::from_bytes(b"OTHER").unwrap_or(Method::GET),
    }
}

fn record(route: &str, method: &Method, status: u16, seconds: f64) {
    {
        let handles = route_handles().read();
        if let Some(h) = handles.get(route) {
            let counter = h.counters.iter().find(|(m, s, _)| m == method && *s == status).map(|(_, _, c)| c);
            let histogram = h.histograms.iter().find(|(m, _)| m == method).map(|(_, hist)| hist);
            if let (Some(c), Some(hist)) = (counter, histogram) {
                c.increment(1);
                hist.record(seconds);
                return;
            }
        }
    }
    // First request of this kind: resolve the handles (routes, methods and statuses are bounded).
    let mut handles = route_handles().write();
    let h = handles.entry(route.to_owned()).or_default();
    if !h.counters.iter().any(|(m, s, _)| m == method && *s == status) {
        let c = metrics::counter!("weir_http_requests_total", "route" => route.to_owned(), "method" => method.to_string(), "status" => status.to_string());
        h.counters.push((method.clone(), status, c));
    }
    if !h.histograms.iter().any(|(m, _)| m == method) {
        let hist = metrics::histogram!("weir_http_request_duration_seconds", "route" => route.to_owned(), "method" => method.to_string());
        h.histograms.push((method.clone(), hist));
    }
    drop(handles);
    record(route, method, status, seconds);
}

/// Counts requests and records latency per matched route (never the raw path: bounded labels).
pub async fn track(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = method_label(request.method());
    let started = tokio::time::Instant::now();
    let response = next.run(request).await;
    let route = route.as_ref().map(MatchedPath::as_str).unwrap_or("unmatched");
    record(route, &method, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}
