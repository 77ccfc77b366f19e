//! Pusher Channels protocol v7 server: apps (tenants), WebSocket connections, channels,
//! presence, fan-out, history/resume, subscription counts, watchlists, the signed HTTP API and
//! webhooks.
//!
//! The rest of weir talks to it through [`Realtime`]: `routes()` for the public endpoints,
//! `admin_routes()` for `/api/v1/apps`, and `publish_internal` for events weir itself emits
//! (the waiting room's position updates).
//!
//! Layout: `app` (settings), `protocol` (frames, codes, names), `signature` (HMACs),
//! `connection` (one socket), `tenant` (one app's channels and fan-out), `presence`,
//! `history` (resume), `subscription_count` (`pusher:subscription_count`), `watchlist` (signed-in
//! users and their watchlists), `http_api` (`/apps/{id}/...`), `admin_api` (`/api/v1/apps`),
//! `webhook`.
//!
//! ## Internal app
//!
//! weir's own events go out on an app with key [`INTERNAL_APP_KEY`] (`weir-internal`, id
//! `0`, not listed by the admin API). Any WebSocket client may connect to `/app/weir-internal`
//! and subscribe to its public channels; only weir publishes on them.

pub mod admin_api;
pub mod app;
pub mod connection;
pub mod history;
pub mod http_api;
pub mod presence;
pub mod protocol;
pub mod signature;
pub mod subscription_count;
pub mod tenant;
pub mod watchlist;
pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

pub use app::AppSpec;

use crate::clock::Clock;
use crate::config::Config;
use crate::http::AppState;
use crate::store::{Store, StoreError, Table};
use crate::error::ApiError;
use crate::cluster::Cluster;
use crate::ops::talkers::Talkers;
use tenant::{ChannelFilter, ChannelReport, Tenant};

/// Key of weir's internal app (waiting-room updates and other events weir emits).
pub const INTERNAL_APP_KEY: &str = "weir-internal";
/// Id of the internal app.
pub const INTERNAL_APP_ID: &str = "0";
/// How often history and idle channels are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often subscription counts held back by their interval are told (`subscription_count`).
const COUNT_TICK: Duration = Duration::from_millis(250);
/// How long `close_all` waits for sockets to finish closing.
const CLOSE_ALL_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Registry {
    by_id: HashMap<String, Arc<Tenant>>,
    by_key: HashMap<String, Arc<Tenant>>,
}

/// The realtime subsystem's handle, shared by every request.
pub struct Realtime {
    store: Arc<dyn Store>,
    registry: RwLock<Registry>,
    /// Apps from the config file: read-only through the admin API.
    config_ids: HashSet<String>,
    internal: Arc<Tenant>,
    hooks: webhook::Deliverer,
    serials: Arc<AtomicU64>,
    next_conn: AtomicU64,
    closing: AtomicBool,
    /// Serializes admin writes (check-then-store-then-register) so two creates cannot take the
    /// same key. Held across the store await on purpose; only admin calls take it.
    admin_lock: tokio::sync::Mutex<()>,
    /// Set when `cluster.redis_url` is: events, channel queries and terminations cross nodes.
    cluster: Option<Arc<Cluster>>,
    /// Where every app's channels count their events (the dashboard's top talkers).
    talkers: Arc<Talkers>,
}

impl Realtime {
    /// Loads apps from the config and the store and starts background tasks
    /// (webhook delivery, history expiry); they stop when `shutdown` is cancelled.
    pub async fn start(config: &Config, store: Arc<dyn Store>, talkers: Arc<Talkers>, shutdown: CancellationToken) -> Result<Arc<Self>, StoreError> {
        let hooks = webhook::Deliverer::new(shutdown.clone());
        let cluster = match &config.cluster.redis_url {
            Some(url) => Some(Cluster::new(url, &config.cluster.prefix).map_err(|e| StoreError::Backend(format!("cluster: {e}")))?),
            None => None,
        };
        // Seeded with the wall clock (µs) so serials keep increasing across restarts.
        let seed = (crate::clock::SystemClock.now_ms().max(0) as u64).saturating_mul(1000);
        let serials = Arc::new(AtomicU64::new(seed));
        let mut registry = Registry::default();
        let mut config_ids = HashSet::new();
        let mut internal_spec = AppSpec::new(INTERNAL_APP_ID.into(), INTERNAL_APP_KEY.into(), hex::encode(rand::random::<[u8; 16]>()));
        internal_spec.max_message_bytes = 64 * 1024;
        let internal = Tenant::new(internal_spec, true, serials.clone(), &hooks, None, talkers.clone());
        registry.by_key.insert(INTERNAL_APP_KEY.into(), internal.clone());
        for spec in &config.apps {
            if registry.by_key.contains_key(&spec.key) || registry.by_id.contains_key(&spec.id) {
                tracing::warn!(app = %spec.id, "config app skipped: duplicate id or key");
                continue;
            }
            let t = Tenant::new(spec.clone(), false, serials.clone(), &hooks, cluster.clone(), talkers.clone());
            registry.by_id.insert(spec.id.clone(), t.clone());
            registry.by_key.insert(spec.key.clone(), t);
            config_ids.insert(spec.id.clone());
        }
        for (id, raw) in store.list(Table::Apps).await? {
            let spec = match serde_json::from_slice::<AppSpec>(&raw) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(app = %id, error = %e, "stored app is unreadable; skipped");
                    continue;
                }
            };
            if registry.by_key.contains_key(&spec.key) || registry.by_id.contains_key(&spec.id) {
                tracing::warn!(app = %id, "stored app skipped: its id or key is taken by a config app");
                continue;
            }
            let t = Tenant::new(spec.clone(), false, serials.clone(), &hooks, cluster.clone(), talkers.clone());
            registry.by_id.insert(spec.id.clone(), t.clone());
            registry.by_key.insert(spec.key.clone(), t);
        }
        let rt = Arc::new(Self {
            store,
            registry: RwLock::new(registry),
            config_ids,
            internal,
            hooks,
            serials,
            next_conn: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            admin_lock: tokio::sync::Mutex::new(()),
            cluster,
            talkers,
        });
        if let Some(cluster) = &rt.cluster {
            cluster.start(Arc::downgrade(&rt), shutdown.clone());
            tracing::info!(node = cluster.node(), "cluster: realtime events cross nodes through Redis");
        }
        // Counts held back by their interval are told within a quarter second of its end.
        every_tenant(&rt, COUNT_TICK, shutdown.clone(), Tenant::tell_due_counts);
        every_tenant(&rt, SWEEP_INTERVAL, shutdown, Tenant::sweep);
        Ok(rt)
    }

    /// `/app/{key}` (WebSocket) and `/apps/{id}/...` (signed HTTP API).
    pub fn routes() -> Router<AppState> {
        Router::new()
            .route("/app/{key}", get(connection::ws_handler))
            .route("/apps/{app_id}/events", post(http_api::trigger))
            .route("/apps/{app_id}/batch_events", post(http_api::batch))
            .route("/apps/{app_id}/channels", get(http_api::channels))
            .route("/apps/{app_id}/channels/{channel}", get(http_api::channel))
            .route("/apps/{app_id}/channels/{channel}/users", get(http_api::users))
            .route("/apps/{app_id}/users/{user_id}/terminate_connections", post(http_api::terminate))
            .route("/users/{user_id}/terminate_connections", post(http_api::terminate_by_key))
    }

    /// `/api/v1/apps...`, mounted behind the admin key check.
    pub fn admin_routes() -> Router<AppState> {
        admin_api::routes()
    }

    /// Publishes an event to `channels` of `tenant`, except to `socket_id`: on this node, or
    /// with a cluster on every node once Redis has taken it.
    pub async fn publish(&self, tenant: &Tenant, channels: &[String], event: &str, data: &str, socket_id: Option<&str>) -> Result<(), ApiError> {
        match &self.cluster {
            Some(cluster) => cluster
                .publish_event(&tenant.spec().id, channels, event, data, socket_id)
                .await
                .map_err(|e| ApiError::unavailable(format!("cluster: event not published: {e}"), 1)),
            None => {
                let exclude = socket_id.and_then(|s| tenant.conn_id_of(s));
                for channel in channels {
                    tenant.publish(channel, event, data, exclude, None);
                }
                Ok(())
            }
        }
    }

    /// The occupied channels of `tenant` matching `filter`, on every node of a cluster.
    pub async fn channel_reports(&self, tenant: &Tenant, filter: ChannelFilter) -> Result<Vec<ChannelReport>, ApiError> {
        let local = tenant.reports(&filter);
        match &self.cluster {
            Some(cluster) => cluster
                .query(&tenant.spec().id, filter, local)
                .await
                .map(tenant::merge_reports)
                .map_err(|e| ApiError::unavailable(format!("cluster: {e}"), 1)),
            None => Ok(local),
        }
    }

    /// Closes a signed-in user's connections, on every node of a cluster.
    pub async fn terminate_user(&self, tenant: &Tenant, user_id: &str) -> Result<(), ApiError> {
        match &self.cluster {
            Some(cluster) => cluster
                .terminate_user(&tenant.spec().id, user_id)
                .await
                .map_err(|e| ApiError::unavailable(format!("cluster: {e}"), 1)),
            None => {
                tenant.terminate_user(user_id);
                Ok(())
            }
        }
    }

    /// The cluster this node is part of, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Whether this node receives the other nodes' events (always, without a cluster).
    pub fn cluster_connected(&self) -> Option<bool> {
        self.cluster.as_ref().map(|c| c.is_connected())
    }

    /// Publishes an event on a (public) channel of weir's internal app, key [`INTERNAL_APP_KEY`].
    /// Never blocks; returns nothing because nobody may be listening.
    pub fn publish_internal(&self, channel: &str, event: &str, data: &str) {
        self.internal.publish(channel, event, data, None, None);
    }

    /// Tells every connected client to reconnect (Pusher code 4200) and closes the sockets,
    /// waiting up to two seconds for them to go.
    pub async fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let tenants = self.all_tenants();
        for t in &tenants {
            t.close_all(protocol::code::RECONNECT, "server shutting down; reconnect");
        }
        let deadline = tokio::time::Instant::now() + CLOSE_ALL_WAIT;
        while tenants.iter().any(|t| t.connection_count() > 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `socket_id` is a live connection to weir's internal app (a waiting page).
    pub fn internal_socket_connected(&self, socket_id: &str) -> bool {
        self.tenant_by_key(INTERNAL_APP_KEY).is_some_and(|t| t.conn_id_of(socket_id).is_some())
    }

    pub fn tenant_by_key(&self, key: &str) -> Option<Arc<Tenant>> {
        self.registry.read().by_key.get(key).cloned()
    }

    pub fn tenant_by_id(&self, id: &str) -> Option<Arc<Tenant>> {
        self.registry.read().by_id.get(id).cloned()
    }

    /// Open WebSocket connections across all apps (including the internal one).
    pub fn connection_count(&self) -> usize {
        self.all_tenants().iter().map(|t| t.connection_count()).sum()
    }

    pub(crate) fn all_tenants(&self) -> Vec<Arc<Tenant>> {
        let r = self.registry.read();
        r.by_key.values().cloned().collect()
    }

    /// The current global serial (tests and diagnostics).
    pub fn current_serial(&self) -> u64 {
        self.serials.load(Ordering::SeqCst)
    }
}

/// Runs `task` on every tenant each `period` until shutdown or until the server is gone.
fn every_tenant(rt: &Arc<Realtime>, period: Duration, shutdown: CancellationToken, task: fn(&Tenant)) {
    let weak = Arc::downgrade(rt);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let Some(rt) = weak.upgrade() else { return };
            for t in rt.all_tenants() {
                task(&t);
            }
        }
    });
}
