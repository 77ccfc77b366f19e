//! Prometheus metrics at `/metrics`, recorded through the `metrics` facade.
//!
//! The recorder is process-global (the facade allows one), so it is installed once and shared
//! by every server a process runs (tests run several). Latency histograms use fixed buckets
//! from 100 µs to 10 s so they aggregate across nodes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::http::Method;
use parking_lot::RwLock;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower::{Layer, Service};

use crate::http::AppState;

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

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
            // Histograms keep raw samples until upkeep folds them into buckets: folding every
            // second keeps each pass short and the sample buffers small (at 100,000 requests/s,
            // 100,000 samples rather than half a million).
            std::thread::Builder::new()
                .name("weir-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
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

/// Counts requests and records latency per matched route (never the raw path: bounded labels).
///
/// A tower layer rather than `from_fn` middleware: axum applies it to each route separately,
/// so every instance serves one route and keeps that route's metric handles, resolved on its
/// first request. The request path then costs a short scan, not a label lookup.
#[derive(Clone, Default)]
pub struct TrackLayer {
    /// For a service outside the router, where there is no `MatchedPath`.
    route: Option<&'static str>,
}

impl TrackLayer {
    /// Tracks a service that always serves `route` (a route template, as the router names it).
    pub fn named(route: &'static str) -> Self {
        Self { route: Some(route) }
    }
}

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Track { inner, route: self.route, handles: Arc::default() }
    }
}

#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    route: Option<&'static str>,
    handles: Arc<RouteHandles>,
}

impl<S> Track<S> {
    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Tracks `request` as handed to the inner service by `call` (a call other than
    /// `Service::call`, e.g. one that takes more than the request).
    pub fn call_with<F>(&mut self, request: Request, call: impl FnOnce(&mut S, Request) -> F) -> TrackFuture<F> {
        let route = match self.route {
            Some(name) => Route::Named(name),
            None => request.extensions().get::<MatchedPath>().cloned().map_or(Route::Unmatched, Route::Matched),
        };
        let method = method_label(request.method());
        TrackFuture { work: call(&mut self.inner, request), route, method, handles: self.handles.clone(), started: tokio::time::Instant::now() }
    }
}

/// Metric handles of one route, by method and status (both bounded).
#[derive(Default)]
pub struct RouteHandles {
    counters: RwLock<Vec<(Method, u16, metrics::Counter)>>,
    histograms: RwLock<Vec<(Method, metrics::Histogram)>>,
}

impl RouteHandles {
    fn record(&self, route: &str, method: &Method, status: u16, seconds: f64) {
        // Known (method, status) pairs are counted under the read lock, without cloning handles.
        let counted = self.counters.read().iter().find(|(m, s, _)| m == method && *s == status).map(|(_, _, c)| c.increment(1));
        if counted.is_none() {
            let c = metrics::counter!("weir_http_requests_total", "route" => route.to_owned(), "method" => method.to_string(), "status" => status.to_string());
            c.increment(1);
            self.counters.write().push((method.clone(), status, c));
        }
        let timed = self.histograms.read().iter().find(|(m, _)| m == method).map(|(_, h)| h.record(seconds));
        if timed.is_none() {
            let h = metrics::histogram!("weir_http_request_duration_seconds", "route" => route.to_owned(), "method" => method.to_string());
            h.record(seconds);
            self.histograms.write().push((method.clone(), h));
        }
    }
}

/// Label-safe method: the standard ones, anything else as `OTHER` (bounded label values).
fn method_label(method: &Method) -> Method {
    match *method {
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::HEAD | Method::OPTIONS => method.clone(),
        _ => Method::from_bytes(b"OTHER").unwrap_or(Method::GET),
    }
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = TrackFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.call_with(request, S::call)
    }
}

/// The label a request is counted under.
pub enum Route {
    Named(&'static str),
    Matched(MatchedPath),
    Unmatched,
}

pin_project_lite::pin_project! {
    pub struct TrackFuture<F> {
        #[pin]
        work: F,
        route: Route,
        method: Method,
        handles: Arc<RouteHandles>,
        started: tokio::time::Instant,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for TrackFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Poll::Ready(Ok(response)) = this.work.poll(cx) else { return Poll::Pending };
        let route = match this.route {
            Route::Named(name) => name,
            Route::Matched(path) => path.as_str(),
            Route::Unmatched => "unmatched",
        };
        this.handles.record(route, this.method, response.status().as_u16(), this.started.elapsed().as_secs_f64());
        Poll::Ready(Ok(response))
    }
}
