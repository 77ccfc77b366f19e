//! Bearer admin-key check for `/api/v1`, compared in constant time.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::http::AppState;

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // `subtle` compares without data-dependent branches; a length mismatch returns early,
    // which leaks only the length.
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

pub async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => ApiError::unauthorized("missing admin key: send Authorization: Bearer <admin key>").into_response(),
        Some(key) if constant_time_eq(key.as_bytes(), state.admin_key.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::unauthorized("wrong admin key").into_response(),
    }
}
