//! The HTTP surface: the shared [`AppState`] and [`router`], which assembles every route group
//! with its resilience layers. Layer order is decided here and only here.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::not_found_fallback;
use crate::limits::shed;
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
pub fn router(state: AppState) -> Router {
    let limits = &state.config.limits;
    let timeout = Duration::from_millis(limits.request_timeout_ms);
    let ops_routes = Router::new()
        .route("/healthz", get(ops::health::healthz))
        .route("/readyz", get(ops::health::readyz))
        .route("/metrics", get(ops::metrics::render));
    let realtime = shed::bounded(Realtime::routes(), "realtime", limits.max_in_flight, timeout);
    let admin = shed::bounded(
        Router::new().nest(
            "/api/v1",
            Realtime::admin_routes()
                .merge(crate::admin::rooms::routes())
                .merge(crate::web::template_api::admin_routes())
                .layer(axum::extract::DefaultBodyLimit::max(limits.admin_body_bytes))
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
        .layer(tower_http::compression::CompressionLayer::new());
    let visitors = shed::bounded(
        pages.merge(crate::room::routes::api_routes()).merge(crate::gateway::routes()),
        "visitors",
        limits.max_in_flight,
        timeout,
    );
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
        .layer(ops::metrics::TrackLayer)
        .with_state(state)
}
