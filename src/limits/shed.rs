//! Load shedding: each route group gets its own in-flight bound; a request over the bound is
//! refused at once with 503 and `Retry-After` instead of queueing, so goodput holds under
//! overload. A request that outlives the timeout is answered 503 as well, unless its body was
//! still arriving: then it is the client's delay, answered 408 (`limits::body`).
//!
//! One hand-written layer instead of tower's timeout → load-shed → concurrency-limit stack:
//! axum clones a route's service for every request, and that stack costs a semaphore, three
//! nested futures and an error conversion each time. Here a clone is one `Arc`, the bound is
//! one atomic, and a refusal is a pre-serialized body — refusing must stay much cheaper than
//! serving, or the refusals themselves eat the capacity they protect.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use tower::{Layer, Service};

use super::backoff::{Backoff, Peer};
use crate::error::ApiError;

/// The shortest wait a refusal asks of the client.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Refusals ask for [`RETRY_AFTER`], then one second more, then the shortest again, and so on
/// through this many different waits.
///
/// Why: a flood's connections are refused together (the line fills within its first few
/// hundred ms), and told to wait the same second they came back together, a second later and
/// again a second after that, each wave a burst of refusals that a request only to be refused
/// waited behind (the overload probe's refusals of 1–3.5 ms all came in those waves; the
/// thirtieth round in `BENCHMARKS.md`). Told 1 s and 2 s in turn, they come back in waves half
/// the size that soon lose step.
pub(crate) const RETRY_AFTER_SPREAD: u64 = 2;

/// The wait the next refusal asks for, in whole seconds (the `Retry-After` value).
pub(crate) fn retry_after_secs() -> u64 {
    static REFUSALS: AtomicU64 = AtomicU64::new(0);
    RETRY_AFTER.as_secs() + REFUSALS.fetch_add(1, Ordering::Relaxed) % RETRY_AFTER_SPREAD
}

/// The longest a refused connection is held (`backoff`): a little less than [`RETRY_AFTER`], so
/// a client that waits as told finds its connection read again when it asks. (Held for the
/// whole `Retry-After`, such a client's next request arrived within the last moments of the
/// hold, and waited them out: refusals of a few ms instead of a fraction of one.)
pub(crate) const LONGEST_HOLD: Duration = Duration::from_millis(900);

/// Wraps every route of `router` in one shared in-flight bound and a timeout.
pub fn bounded<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    group: &'static str,
    max_in_flight: usize,
    timeout: Duration,
) -> Router<S> {
    router.layer(BoundLayer::new(group, max_in_flight, timeout))
}

/// The state one route group shares across its routes and every clone of their services.
struct Bound {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    timeout: Duration,
    shed: metrics::Counter,
    timeouts: metrics::Counter,
}

#[derive(Clone)]
pub struct BoundLayer {
    bound: Arc<Bound>,
}

impl BoundLayer {
    pub fn new(group: &'static str, max_in_flight: usize, timeout: Duration) -> Self {
        let bound = Bound {
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            timeout,
            shed: metrics::counter!("weir_shed_total", "group" => group),
            timeouts: metrics::counter!("weir_timeouts_total", "group" => group),
        };
        metrics::gauge!("weir_in_flight_limit", "group" => group).set(max_in_flight as f64);
        Self { bound: Arc::new(bound) }
    }
}

impl<S> Layer<S> for BoundLayer {
    type Service = BoundService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BoundService { inner, bound: self.bound.clone(), timed: true }
    }
}

#[derive(Clone)]
pub struct BoundService<S> {
    inner: S,
    bound: Arc<Bound>,
    /// Off for a service that answers within its call (nothing to time out).
    timed: bool,
}

impl<S> BoundService<S> {
    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// For a service whose future is ready when `call` returns: no timer is armed.
    pub fn untimed(self) -> Self {
        Self { timed: false, ..self }
    }
}

impl<S: Service<Request, Response = Response, Error = Infallible>> BoundService<S> {
    /// [`Service::call`], holding the connection through `hold` (else the request's [`Peer`]
    /// extension) when the request is refused: over the bound, or come past a line too long to
    /// join (`limits::turns`).
    pub fn call_held(&mut self, request: Request, hold: Option<&Backoff>) -> BoundFuture<S::Future> {
        let bound = &self.bound;
        let held = hold.or_else(|| request.extensions().get::<Peer>().map(|p| &p.backoff));
        let past_line = held.is_some_and(Backoff::take_past_line);
        if past_line || bound.in_flight.fetch_add(1, Ordering::AcqRel) >= bound.max_in_flight {
            if !past_line {
                bound.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            bound.shed.increment(1);
            // The answer says "retry in a second"; a connection that keeps asking is held up to that.
            if let Some(backoff) = held {
                backoff.hold_after_refusal(LONGEST_HOLD);
            }
            return BoundFuture::Refused { response: Some(at_capacity()) };
        }
        let slot = Slot(bound.clone());
        if !self.timed {
            return BoundFuture::Immediate { work: self.inner.call(request), slot };
        }
        let (request, body) = super::body::watch(request);
        let work = tokio::time::timeout(bound.timeout, self.inner.call(request));
        BoundFuture::Admitted { work, slot, body }
    }
}

/// Releases one in-flight slot when the request finishes, however it finishes.
pub struct Slot(Arc<Bound>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> Service<Request> for BoundService<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoundFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.call_held(request, None)
    }
}

pin_project_lite::pin_project! {
    /// The request's work under its timeout, holding its in-flight slot until done.
    #[project = BoundProj]
    pub enum BoundFuture<F> {
        Refused { response: Option<Response> },
        Admitted { #[pin] work: tokio::time::Timeout<F>, slot: Slot, body: Option<super::body::Received> },
        Immediate { #[pin] work: F, slot: Slot },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for BoundFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BoundProj::Refused { response } => Poll::Ready(Ok(response.take().unwrap_or_else(at_capacity))),
            BoundProj::Admitted { work, slot, body } => match work.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(response)) => Poll::Ready(response),
                Poll::Ready(Err(_elapsed)) => {
                    slot.0.timeouts.increment(1);
                    if body.as_ref().is_some_and(|b| !b.is_complete()) {
                        // The client did not send the body it announced: its fault, and the
                        // connection cannot be reused (the rest of the body may still come).
                        let mut response = ApiError::request_timeout("the request body did not arrive in time").into_response();
                        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                        return Poll::Ready(Ok(response));
                    }
                    Poll::Ready(Ok(ApiError::unavailable("request timed out", 1).into_response()))
                }
            },
            BoundProj::Immediate { work, slot: _ } => work.poll(cx),
        }
    }
}

/// The refusal's body: the API's JSON error shape, serialized once.
pub(crate) fn at_capacity_body() -> &'static Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| {
        let error = ApiError::unavailable("server is at capacity; retry shortly", 1);
        serde_json::to_vec(&serde_json::json!({"error": {"code": error.code, "message": error.message}}))
            .map(Bytes::from)
            .unwrap_or_default()
    })
}

/// The refusal: 503, `Retry-After` and the JSON error body.
pub fn at_capacity() -> Response {
    let mut response = Response::new(Body::from(at_capacity_body().clone()));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_secs(60)).await;
        "late"
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_over_the_bound_and_times_out() {
        let app: Router = bounded(Router::new().route("/slow", get(slow)), "test", 1, Duration::from_secs(5));
        let first = tokio::spawn(app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()));
        tokio::task::yield_now().await;
        let refused = app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(["1", "2"].contains(&refused.headers()[header::RETRY_AFTER].to_str().unwrap()));
        let body = axum::body::to_bytes(refused.into_body(), 1024).await.unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "unavailable");
        let timed_out = first.await.unwrap().unwrap();
        assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE, "the timeout answers 503");
        let again = tokio::spawn(app.oneshot(Request::get("/slow").body(Body::empty()).unwrap()));
        tokio::task::yield_now().await;
        assert!(!again.is_finished(), "the slot was released: the next request is admitted");
    }

    /// A refusal holds the connection it came on: the one given to `call_held`, else the one in
    /// the request's `Peer` extension. An admitted request holds nothing.
    #[tokio::test(start_paused = true)]
    async fn a_refusal_holds_its_connection() {
        let mut service = BoundLayer::new("test", 1, Duration::from_secs(5)).layer(tower::service_fn(|_: Request| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }));
        let (given, in_extension) = (Backoff::default(), Backoff::default());
        let _admitted = service.call_held(Request::new(Body::empty()), Some(&given));
        assert!(given.until().is_none(), "admitted: not held");
        let refused = service.call_held(Request::new(Body::empty()), Some(&given)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(given.until().is_some(), "refused: the given connection is held");
        let mut request = Request::new(Body::empty());
        request.extensions_mut().insert(Peer { addr: ([127, 0, 0, 1], 9).into(), backoff: in_extension.clone() });
        assert_eq!(service.call(request).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(in_extension.until().is_some(), "refused: the request's peer is held");
    }

    /// Consecutive refusals ask for waits of 1 s and 2 s in turn, so that connections refused
    /// together do not all come back together.
    #[test]
    fn refusals_ask_for_one_and_two_seconds_in_turn() {
        let waits: Vec<u64> =
            (0..64).map(|_| at_capacity().headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap()).collect();
        assert!(waits.iter().all(|w| (1..=2).contains(w)), "{waits:?}");
        // Other tests in the same process may refuse in between: about half each, not exactly.
        let ones = waits.iter().filter(|w| **w == 1).count();
        assert!((16..=48).contains(&ones), "{waits:?}");
    }

    /// A request read past a line of connections too long to join (`limits::turns`) is refused
    /// however free the bound, and its connection held; the mark is used up by the refusal.
    #[tokio::test(start_paused = true)]
    async fn a_request_come_past_the_line_is_refused() {
        let mut service = BoundLayer::new("test", 8, Duration::from_secs(5))
            .layer(tower::service_fn(|_: Request| async { Ok::<_, Infallible>(Response::new(Body::empty())) }));
        let backoff = Backoff::default();
        backoff.set_past_line(true);
        let refused = service.call_held(Request::new(Body::empty()), Some(&backoff)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(["1", "2"].contains(&refused.headers()[header::RETRY_AFTER].to_str().unwrap()));
        assert!(backoff.until().is_some(), "the refused connection is held");
        assert!(!backoff.take_past_line(), "the mark outlived its request");
        let served = service.call_held(Request::new(Body::empty()), Some(&Backoff::default())).await.unwrap();
        assert_eq!(served.status(), StatusCode::OK, "a request on its turn is served");
        assert_eq!(service.bound.in_flight.load(Ordering::Relaxed), 0, "the refusal took no slot");
    }
}
