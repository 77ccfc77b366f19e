//! `/healthz` (the process answers) and `/readyz` (the store is open, a cluster node receives
//! the other nodes' events, and we are not draining).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;

use crate::http::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let store = state.store.is_ready() || state.store.check().await.is_ok();
    let draining = state.shutdown.is_cancelled();
    let cluster = state.realtime.cluster_connected();
    let ready = store && !draining && cluster != Some(false);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({"ready": ready, "store": store, "draining": draining});
    if let Some(connected) = cluster {
        body["cluster"] = json!(connected);
        body["leader"] = json!(state.rooms.drives_admission());
    }
    (status, Json(body))
}
