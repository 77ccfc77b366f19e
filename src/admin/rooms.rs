//! `/api/v1/rooms` and `/api/v1/keys/rotate`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::error::{ApiError, ApiJson, ApiPath};
use crate::http::AppState;
use crate::room::model::{format_time_ms, NewRoom, RoomPatch, RoomSpec};
use crate::room::{driver, Room, RoomStats};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/rooms", post(create).get(list))
        .route("/rooms/{id}", get(show).patch(update).delete(remove))
        .route("/keys/rotate", post(rotate_keys))
}

#[derive(Serialize)]
pub struct RoomView {
    #[serde(flatten)]
    spec: RoomSpec,
    created_at: String,
    stats: RoomStats,
}

fn view(state: &AppState, room: &Room) -> RoomView {
    let spec = (*room.spec()).clone();
    RoomView { created_at: format_time_ms(spec.created_at_ms), spec, stats: room.stats(state.clock.now_ms()) }
}

async fn create(State(state): State<AppState>, ApiJson(input): ApiJson<NewRoom>) -> Result<(StatusCode, Json<RoomView>), ApiError> {
    let spec = RoomSpec::create(input, state.clock.now_ms())?;
    let room = state.rooms.create(spec).await?;
    Ok((StatusCode::CREATED, Json(view(&state, &room))))
}

async fn list(State(state): State<AppState>) -> Json<serde_json::Value> {
    let rooms: Vec<RoomView> = state.rooms.all().iter().map(|r| view(&state, r)).collect();
    Json(serde_json::json!({ "rooms": rooms }))
}

async fn show(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<RoomView>, ApiError> {
    let room = state.rooms.require(&id)?;
    Ok(Json(view(&state, &room)))
}

async fn update(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<RoomPatch>,
) -> Result<Json<RoomView>, ApiError> {
    let room = state.rooms.require(&id)?;
    let before = room.spec();
    let next = before.apply(patch)?;
    let state_changed = next.state != before.state || next.starts_at != before.starts_at;
    state.rooms.update(&room, next).await?;
    if state_changed {
        driver::publish_state(&state.realtime, &room);
    }
    Ok(Json(view(&state, &room)))
}

async fn remove(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<StatusCode, ApiError> {
    state.rooms.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_keys(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let kid = state.rooms.rotate_keys().await?;
    Ok(Json(serde_json::json!({ "kid": kid, "jwks": state.rooms.keys.jwks() })))
}
