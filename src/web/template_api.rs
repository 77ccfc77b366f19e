//! `PUT /api/v1/rooms/{id}/template` (raw minijinja source as the body) and
//! `DELETE /api/v1/rooms/{id}/template`: a room's custom page template. The upload is checked
//! (size, syntax, a trial render of every state in the sandbox) and refused with a 400 naming
//! the line; the stored template lives in `branding.template`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::put;
use axum::Router;

use crate::error::{ApiError, ApiPath};
use crate::http::AppState;
use crate::room::branding::{validate_template, MAX_TEMPLATE_BYTES};

pub fn admin_routes() -> Router<AppState> {
    Router::new().route("/rooms/{id}/template", put(upload).delete(remove))
}

async fn upload(State(state): State<AppState>, ApiPath(id): ApiPath<String>, body: Result<Bytes, BytesRejection>) -> Result<StatusCode, ApiError> {
    let room = state.rooms.require(&id)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(format!("template: larger than {MAX_TEMPLATE_BYTES} bytes"))
        } else {
            ApiError::bad_request(format!("template: {e}"))
        }
    })?;
    let source = String::from_utf8(body.to_vec()).map_err(|_| ApiError::invalid_field("template", "must be UTF-8 text"))?;
    validate_template(&source)?;
    let mut spec = (*room.spec()).clone();
    spec.branding.template = Some(source);
    state.rooms.update(&room, spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<StatusCode, ApiError> {
    let room = state.rooms.require(&id)?;
    let mut spec = (*room.spec()).clone();
    spec.branding.template = None;
    state.rooms.update(&room, spec).await?;
    Ok(StatusCode::NO_CONTENT)
}
