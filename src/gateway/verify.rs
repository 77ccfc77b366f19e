//! `GET /.well-known/jwks.json` and `POST /api/v1/verify {token, room?}`.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, ApiJson};
use crate::http::AppState;

pub async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = Json(state.rooms.keys.jwks()).into_response();
    // Short cache: verifiers refetch soon after a rotation.
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    token: String,
    room: Option<String>,
}

pub async fn verify(State(state): State<AppState>, ApiJson(req): ApiJson<VerifyRequest>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(room) = &req.room {
        crate::room::model::validate_room_id(room).map_err(|_| ApiError::invalid_field("room", "must be a room id"))?;
    }
    Ok(Json(match state.rooms.keys.verify(&req.token, req.room.as_deref()) {
        Ok(claims) => json!({"valid": true, "claims": *claims}),
        Err(reason) => json!({"valid": false, "reason": reason.as_str()}),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndSession {
    token: String,
}

/// `POST /api/v1/sessions/end {token}`: the origin says this visitor is done (checkout,
/// logout); its active-user slot frees at once. The token is the credential.
pub async fn end_session(State(state): State<AppState>, ApiJson(req): ApiJson<EndSession>) -> Result<Json<serde_json::Value>, ApiError> {
    let claims = state
        .rooms
        .keys
        .verify(&req.token, None)
        .map_err(|r| ApiError::unauthorized(format!("token refused: {}", r.as_str())))?;
    let room = state.rooms.require(&claims.room)?;
    let ended = state.rooms.end_session(&room, claims.ticket).await?;
    Ok(Json(json!({"ended": ended})))
}
