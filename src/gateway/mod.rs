//! How an origin checks that a visitor came through the queue: the JWKS for offline checks,
//! online verification (`POST /api/v1/verify`) and forward auth for reverse proxies
//! (`GET /auth/{room}`: nginx `auth_request`, Traefik ForwardAuth, Caddy `forward_auth`), and
//! reverse-proxy mode ([`proxy`], `/p/{room}/...`) where weir forwards admitted visitors itself.

pub mod forward_auth;
pub mod proxy;
pub mod verify;

use axum::http::HeaderName;
use axum::routing::{get, post};
use axum::Router;

use crate::http::AppState;

/// Who the admitted visitor is, told to the origin (forward auth's answer, proxied requests).
pub const X_WEIR_VISITOR: HeaderName = HeaderName::from_static("x-weir-visitor");
pub const X_WEIR_TICKET: HeaderName = HeaderName::from_static("x-weir-ticket");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/.well-known/jwks.json", get(verify::jwks))
        .route("/api/v1/verify", post(verify::verify))
        .route("/api/v1/sessions/end", post(verify::end_session))
        .route("/auth/{room}", get(forward_auth::check))
}
