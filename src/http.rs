//! The HTTP surface: the shared [`AppState`] and [`router`], which assembles every route group
//! with its resilience layers. Layer order is decided here and only here.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, Extensions, HeaderMap, HeaderValue, StatusCode, Version};
use tower_http::compression::predicate::{Predicate, SizeAbove};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use tower::{Layer, Service};

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::{method_not_allowed_fallback, not_found_fallback};
use crate::limits::backoff::Peer;
use crate::limits::shed::{self, BoundFuture, BoundService};
use crate::serve::PeerService;
use crate::ops::metrics::{Track, TrackFuture, TrackLayer};
use crate::ops;
use crate::realtime::Realtime;
use crate::store::Store;

/// What every handler can reach: one `Arc`, so the per-request clone axum makes is one
/// reference count, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Each field is owned by its module; this struct only bundles them.
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub realtime: Arc<Realtime>,
    pub rooms: Arc<crate::room::Rooms>,
    pub admin_key: Arc<String>,
    pub metrics: PrometheusHandle,
    pub shutdown: CancellationToken,
    pub dashboard: Arc<crate::ops::dashboard::Dashboard>,
}

impl AppState {
    /// Brings point-in-time gauges up to date before a scrape.
    pub fn refresh_gauges(&self) {}
}

/// Builds the whole router.
///
/// Outermost first: metrics tracking sees every request including refusals; each route group
/// has its own shed/timeout bound so a flood on one (visitor entry) cannot starve another
/// (admin, health, realtime).
pub fn router(state: AppState, visitors_bound: shed::BoundLayer) -> Router {
    let limits = &state.config.limits;
    let timeout = Duration::from_millis(limits.request_timeout_ms);
    let ops_routes = Router::new()
        .route("/healthz", get(ops::health::healthz))
        .route("/readyz", get(ops::health::readyz))
        .route("/metrics", get(ops::metrics::render))
        .merge(ops::dashboard::page_routes());
    let realtime = shed::bounded(Realtime::routes(), "realtime", limits.max_in_flight, timeout);
    let admin = shed::bounded(
        Router::new().nest(
            "/api/v1",
            Realtime::admin_routes()
                .merge(crate::admin::rooms::routes())
                .merge(crate::web::template_api::admin_routes())
                .merge(ops::dashboard::admin_routes())
                .layer(axum::extract::DefaultBodyLimit::max(limits.admin_body_bytes))
                .layer(axum::middleware::from_fn(crate::limits::body::refuse_declared_over(limits.admin_body_bytes)))
                .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::admin::auth::require_admin,
            )),
        ),
        "admin",
        limits.max_in_flight,
        timeout,
    );
    // Visitors are the flood: their group is bounded separately so admin and health stay up.
    // Pages and the page script are gzip-compressed when the client accepts it; the small
    // JSON answers (status, forward auth) are not worth the work.
    let pages = crate::room::routes::page_routes()
        .merge(crate::web::assets::routes())
        .layer(tower_http::compression::CompressionLayer::new().compress_when(SizeAbove::new(COMPRESS_ABOVE).and(is_text as TextPredicate)));
    let visitors = pages.merge(crate::room::routes::api_routes()).merge(crate::gateway::routes()).layer(visitors_bound);
    // Reverse-proxy mode bounds its own origin requests and times (`gateway::proxy`): bodies
    // stream for longer than the request timeout, and WebSocket upgrades live on.
    let proxied = crate::gateway::proxy::routes();
    Router::new()
        .merge(ops_routes)
        .merge(visitors)
        .merge(proxied)
        .merge(realtime)
        .merge(admin)
        .fallback(not_found_fallback)
        .method_not_allowed_fallback(method_not_allowed_fallback)
        .layer(TrackLayer::default())
        .with_state(state)
}

/// Bodies up to this many bytes are sent as they are: compressing them saves too little.
const COMPRESS_ABOVE: u16 = 256;

type TextPredicate = fn(StatusCode, Version, &HeaderMap, &Extensions) -> bool;

/// Pages, the page script and JSON: everything weir itself writes that compresses well. (One
/// header look-up; tower-http's default predicate parses the content type three times.)
fn is_text(_: StatusCode, _: Version, headers: &HeaderMap, _: &Extensions) -> bool {
    headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes).is_some_and(|t| {
        t.starts_with(b"text/") || t.starts_with(b"application/javascript") || t.starts_with(b"application/json")
    })
}

/// A `GET {prefix}{room}{suffix}` route answered in front of the router. Forward auth runs on
/// every request the origin gets, status on every poll of a waiting visitor and entry on every
/// new visitor of a flood, so these three skip axum's routing and extractors (a quarter of
/// forward auth's cost, see BENCHMARKS.md). They keep what the routed versions have: the
/// visitors' in-flight bound and per-route metrics (and entry its compression, see
/// [`compress_text`]). The same handlers stay in the router for other methods and for tests of
/// the router alone.
#[derive(Clone)]
pub struct HotRoute {
    state: AppState,
    prefix: &'static str,
    suffix: &'static str,
    answer: Answer,
    /// The address of the peer whose request is being called (the app, and so this route, is
    /// cloned for each connection): given to a route that reads it without putting it in the
    /// request's extensions, a map allocated for each request.
    peer_ip: IpAddr,
}

/// How a hot route answers: within its call, or by a future (entry may wait for a durable
/// ticket; when it need not, its future is done within the call too).
#[derive(Clone, Copy)]
enum Answer {
    Now(fn(&AppState, &str, &Request) -> Response),
    Later(fn(AppState, Box<str>, IpAddr, Request) -> LaterAnswer),
}

pub type LaterAnswer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// A hot route's answer, ready or to be awaited.
pub enum HotFuture {
    Now(std::future::Ready<Result<Response, Infallible>>),
    Later(LaterAnswer),
}

impl Future for HotFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            HotFuture::Now(ready) => Pin::new(ready).poll(cx),
            HotFuture::Later(later) => later.as_mut().poll(cx).map(Ok),
        }
    }
}

impl HotRoute {
    /// The room of a request this route serves. Room ids are `[a-z0-9-]`, so the raw path
    /// needs no percent-decoding: an encoded id never names a room.
    fn room_of<'r>(&self, request: &'r Request) -> Option<&'r str> {
        if request.method() != axum::http::Method::GET {
            return None;
        }
        room_in(request.uri().path(), self.prefix, self.suffix)
    }

    /// Entry reads the peer's address (the per-IP limit); the others need the peer only to
    /// hold a refused connection.
    fn reads_peer(&self) -> bool {
        matches!(self.answer, Answer::Later(_))
    }
}

/// The room in `path` between `prefix` and `suffix`: one non-empty segment.
fn room_in<'p>(path: &'p str, prefix: &str, suffix: &str) -> Option<&'p str> {
    let room = path.get(prefix.len()..path.len().checked_sub(suffix.len())?)?;
    let (head, tail) = (&path.as_bytes()[..prefix.len()], &path.as_bytes()[path.len() - suffix.len()..]);
    // Byte by byte: `str::strip_prefix` calls `memcmp`, and for these few bytes the call costs
    // more than the comparison (~2 % of an entry, run for each hot route in turn).
    let same = |a: &[u8], b: &str| a.iter().zip(b.as_bytes()).all(|(x, y)| x == y);
    (same(head, prefix) && same(tail, suffix) && !room.is_empty() && !room.contains('/')).then_some(room)
}

impl Service<Request> for HotRoute {
    type Response = Response;
    type Error = Infallible;
    type Future = HotFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let response = match (self.room_of(&request), self.answer) {
            (Some(room), Answer::Now(answer)) => answer(&self.state, room, &request),
            (Some(room), Answer::Later(answer)) => {
                let mut later = answer(self.state.clone(), room.into(), self.peer_ip, request);
                // Polled once here, where it almost always completes (its ticket is already
                // reserved): the request is then dropped before hyper reads ahead on the
                // connection, so hyper finds its read buffer no longer shared and reuses it,
                // instead of copying it into a new 8 KB one for every entry. The waker is a
                // no-op: a future still pending is polled again at once by hyper, with the
                // connection's waker, which is the one it must wake.
                return match later.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop())) {
                    Poll::Ready(response) => HotFuture::Now(std::future::ready(Ok(response))),
                    Poll::Pending => HotFuture::Later(later),
                };
            }
            (None, _) => crate::error::ApiError::not_found("no such route").into_response(),
        };
        HotFuture::Now(std::future::ready(Ok(response)))
    }
}

type Hot = Track<BoundService<HotRoute>>;

/// What the visitors' compression layer does to a response, for a hot route that answers pages
/// outside it: text above `COMPRESS_ABOVE` bytes varies on `Accept-Encoding` and is
/// gzip-compressed when the client takes it. Responses already compressed (pages from a
/// skeleton) pass as they are.
pub async fn compress_text(response: Response, request_headers: &HeaderMap) -> Response {
    use axum::body::HttpBody as _;
    let size = response.body().size_hint().exact();
    let worth = !response.headers().contains_key(header::CONTENT_ENCODING)
        && is_text(response.status(), Version::HTTP_11, response.headers(), response.extensions())
        && size.is_none_or(|n| n > u64::from(COMPRESS_ABOVE));
    if !worth {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    if !crate::web::gzip::accepts_gzip(request_headers) {
        return Response::from_parts(parts, body);
    }
    // weir's own pages and JSON: small, and already whole in memory.
    // Boxed, so that an entry's future, which awaits this one, does not carry its state.
    let Ok(plain) = Box::pin(axum::body::to_bytes(body, usize::MAX)).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match crate::web::gzip::compress(&plain) {
        Some(gzip) => {
            parts.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, axum::body::Body::from(gzip))
        }
        None => Response::from_parts(parts, axum::body::Body::from(plain)),
    }
}

/// The whole HTTP surface: the router, with the hot routes served in front of it.
#[derive(Clone)]
pub struct App {
    router: Router,
    /// Cloned with the app for each connection, so a request borrows its route, never clones it.
    hot: Vec<Hot>,
}

pub fn app(state: AppState) -> App {
    let limits = &state.config.limits;
    let visitors_bound = shed::BoundLayer::new("visitors", limits.max_in_flight, Duration::from_millis(limits.request_timeout_ms));
    let hot = |route: &'static str, prefix, suffix, answer| {
        let service = visitors_bound.layer(HotRoute { state: state.clone(), prefix, suffix, answer, peer_ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) });
        // A route that answers within its call has nothing to time out.
        let service = if matches!(answer, Answer::Now(_)) { service.untimed() } else { service };
        TrackLayer::named(route).layer(service)
    };
    let answers = [
        Answer::Now(crate::gateway::forward_auth::answer),
        Answer::Now(crate::room::routes::status_answer),
        Answer::Later(crate::room::routes::entry_answer),
    ];
    let hot = HOT_ROUTES.iter().zip(answers).map(|(&(route, prefix, suffix), answer)| hot(route, prefix, suffix, answer)).collect();
    App { router: router(state, visitors_bound), hot }
}

/// The hot routes, as (name, prefix, suffix), in the order they are tried: forward auth,
/// status, entry.
const HOT_ROUTES: [(&str, &str, &str); 3] = [("/auth/{room}", "/auth/", ""), ("/r/{room}/status", "/r/", "/status"), ("/r/{room}", "/r/", "")];

/// The hot route serving `path`, by name: the visitors' routes a flood comes to, which
/// `limits::door` may refuse on their behalf.
pub fn hot_route_of(path: &str) -> Option<&'static str> {
    HOT_ROUTES.iter().find(|(_, prefix, suffix)| room_in(path, prefix, suffix).is_some()).map(|&(route, ..)| route)
}

impl PeerService for App {
    type Future = AppFuture;

    /// A hot route gets the peer only to hold the connection if it is refused; the router gets
    /// it as a request extension (axum's handlers read it from there).
    fn call_from(&mut self, mut request: Request, peer: &Peer) -> AppFuture {
        match self.hot.iter_mut().find(|h| h.inner().inner().room_of(&request).is_some()) {
            Some(hot) => {
                let route = hot.inner_mut().inner_mut();
                if route.reads_peer() {
                    route.peer_ip = peer.addr.ip();
                }
                AppFuture::Hot { work: hot.call_with(request, |bound, request| bound.call_held(request, Some(&peer.backoff))) }
            }
            None => {
                request.extensions_mut().insert(peer.clone());
                AppFuture::Routed { work: self.router.call(request) }
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = AppProj]
    pub enum AppFuture {
        Hot { #[pin] work: TrackFuture<BoundFuture<HotFuture>> },
        Routed { #[pin] work: RouteFuture<Infallible> },
    }
}

impl Future for AppFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AppProj::Hot { work } => work.poll(cx),
            AppProj::Routed { work } => work.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::room_in;

    #[test]
    fn a_hot_route_takes_one_room_segment_between_its_prefix_and_suffix() {
        assert_eq!(room_in("/r/sale", "/r/", ""), Some("sale"));
        assert_eq!(room_in("/r/sale/status", "/r/", "/status"), Some("sale"));
        assert_eq!(room_in("/r/sale/status", "/r/", ""), None, "two segments");
        assert_eq!(room_in("/r/", "/r/", ""), None, "no room");
        assert_eq!(super::hot_route_of("/r/sale/status"), Some("/r/{room}/status"));
        assert_eq!(super::hot_route_of("/auth/sale"), Some("/auth/{room}"));
        assert_eq!(super::hot_route_of("/r/sale/events"), None);
        assert_eq!(room_in("/r/status", "/r/", "/status"), None, "shorter than prefix and suffix");
        assert_eq!(room_in("/r", "/r/", ""), None);
        assert_eq!(room_in("/x/sale", "/r/", ""), None);
        assert_eq!(room_in("/r/sale/statuz", "/r/", "/status"), None);
        assert_eq!(room_in("/auth/é", "/auth/", ""), Some("é"));
        assert_eq!(room_in("/r/é/status", "/r/", "/status"), Some("é"));
    }
}
