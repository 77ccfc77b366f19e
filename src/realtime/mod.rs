//! Pusher Channels protocol v7 server: apps (tenants), WebSocket connections, channels,
//! presence, fan-out, history/resume, the signed HTTP API and webhooks.
//!
//! The rest of weir talks to it through [`Realtime`]: `routes()` for the public endpoints,
//! `admin_routes()` for `/api/v1/apps`, and `publish_internal` for events weir itself emits
//! (the waiting room's position updates).

pub mod app;

use std::sync::Arc;

use axum::Router;
use tokio_util::sync::CancellationToken;

pub use app::AppSpec;

use crate::config::Config;
use crate::http::AppState;
use crate::store::{Store, StoreError};

/// The realtime subsystem's handle, shared by every request.
pub struct Realtime {
    #[allow(dead_code)]
    store: Arc<dyn Store>,
}

impl Realtime {
    /// Loads apps from the config and the store and starts background tasks
    /// (webhook delivery, history expiry); they stop when `shutdown` is cancelled.
    pub async fn start(
        _config: &Config,
        store: Arc<dyn Store>,
        _shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        Ok(Arc::new(Self { store }))
    }

    /// `/app/{key}` (WebSocket) and `/apps/{id}/...` (signed HTTP API).
    pub fn routes() -> Router<AppState> {
        Router::new()
    }

    /// `/api/v1/apps...`, mounted behind the admin key check.
    pub fn admin_routes() -> Router<AppState> {
        Router::new()
    }

    /// Publishes an event on a channel of weir's internal app.
    pub fn publish_internal(&self, _channel: &str, _event: &str, _data: &str) {}

    /// Tells every connected client to reconnect (Pusher code 4200) and closes the sockets.
    pub async fn close_all(&self) {}
}
