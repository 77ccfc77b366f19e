//! # weir — a surge gateway
//!
//! One binary that runs virtual **waiting rooms** in front of an existing website (the *origin*)
//! and a **realtime server** speaking the Pusher Channels protocol v7.
//!
//! ## Layout
//!
//! - [`config`]: one `Config` from defaults, file, `WEIR_*` env and flags; validated at startup.
//! - [`error`]: `ApiError`, the single JSON error shape, and extractors that keep it.
//! - [`store`]: the `Store` trait, the only door to durable state; `store::redb` embeds it
//!   (documents, counters and reserved ticket ranges in redb, written through one group-committing thread);
//!   `store::redis` shares it between the nodes of a cluster.
//! - [`secrets`]: admin key and cookie key, generated on first start and persisted.
//! - [`outbound`]: the HTTP(S) connector of every client weir runs (the reverse proxy, probes,
//!   webhooks, the CLI) and the Redis client (`rediss://`): rustls with built-in roots plus
//!   `tls_ca_file`.
//! - [`room`]: rooms, the durable queue, the admission driver, visitor cookies, tokens;
//!   `room::policy` holds the admission engine (ranks, skips, sessions, pre-queue shuffle),
//!   the adaptive-rate controller and abuse resistance (bypass, per-IP limit, proof-of-work);
//!   `room::notify`, the rooms' webhooks (queueing started and ended, state changed), observed
//!   by the admission driver and delivered by the realtime webhooks' workers.
//! - [`gateway`]: how an origin checks a visitor: `/api/v1/verify`, forward auth, and
//!   `gateway::proxy`, weir itself as the reverse proxy in front of the origin (`mode: proxy`).
//! - [`web`]: server-rendered pages (minijinja templates compiled into the binary), branding
//!   and languages (`web::i18n`), custom room templates (`web::template_api`) and the page
//!   script and its caching (`web::assets`). The waiting page is a realtime client: it
//!   subscribes to `room-{id}` on the internal app and computes its position locally.
//! - [`realtime`]: the Pusher-protocol server (apps, WebSocket, channels, subscription counts,
//!   watchlists, HTTP API, webhooks).
//! - [`cluster`]: several nodes through Redis (when `cluster.redis_url` is set): the bus carrying
//!   events, client events, presence, signed-in users, subscription counts, channel queries,
//!   terminations and app changes between
//!   nodes, their heartbeats, and the admission lease (`cluster::lease`, which also fences the
//!   leader's admission writes in the store); `room::sync` carries
//!   the waiting rooms' messages on it (the leader's steps, the visitors each node saw, room and
//!   key changes).
//! - [`admin`]: the `/api/v1` admin API (bearer admin key) and the `weir` CLI that drives it.
//! - [`limits`]: load shedding (an in-flight bound per route group, refusing with a
//!   pre-serialized 503; a refused connection is held unread briefly, up to nearly its
//!   `Retry-After` while it keeps asking), turns (when more connections have requests than the
//!   CPU can serve, a few dozen are served at a time, each for a turn of many requests, while
//!   the rest wait in line — their state stays in the caches; turns shorten to bound the wait in
//!   line, and a line too long for that is not joined: its arrivals are refused), the door
//!   (while the line is refused, idle and held connections are watched by a thread of its own,
//!   under the real-time policy where the process may ask for it, which refuses visitors' requests there instead of behind the busy
//!   workers, and keeps what it refused until its hold is over), timeouts, body limits, the slow request-head guard; [`ops`]: metrics, health,
//!   shutdown, and the live dashboard (`ops::dashboard` samples rooms and realtime once a
//!   second into a five-minute ring for `/dashboard` and `GET /api/v1/stats`; `ops::talkers`
//!   counts the top channels, apps and client IPs of the last minute in bounded buckets).
//! - [`http`]: `AppState`, the router (where every layer's order is decided) and `App`, which
//!   serves the three hottest routes (forward auth, status, entry) in front of the router
//!   under the same bound and metrics; [`serve`], the accept loop (hyper HTTP/1.1 connections with upgrades,
//!   over sockets that honour their refusal hold and their turn, and that write an answer only
//!   after the other connections ready at the same time have been served, so answers leave in
//!   bursts and a waiting client is woken once a burst; peer address per request, slow-head
//!   guard, graceful drain).
//!
//! ## Data flow of a visitor
//!
//! 1. `GET /r/{room}` → `room::visitor` reads the signed visitor cookie. Without a valid one it
//!    asks `store::issue_ticket` for the next ticket, taken from a range the store reserved
//!    durably ahead (`store::ranges`: the next range is reserved in the background when half is
//!    used, so a visitor waits for a commit only when a burst outruns it); the response leaves
//!    with a signed HttpOnly cookie `{room, ticket, visitor}` and the waiting page, filled into a
//!    skeleton pre-rendered once per room, language and page (`web::pages`). After a crash,
//!    numbering resumes above every reserved ticket; reserved tickets nobody may have held are
//!    *unclaimed* and admitted only once a holder shows up.
//! 2. `room::driver` ticks every 100 ms: each open room's engine plans a step — slots from
//!    `rate × elapsed` (fractions carried over), limited by the active-user cap; returners
//!    first, then ranks in order, skipping visitors unseen for `abandon_after_seconds`. All
//!    steps are written in one durable batch and only then committed in memory and broadcast
//!    on the room's realtime channel.
//! 3. The waiting page (and `GET /r/{room}/status`) asks the engine about the cookie's ticket:
//!    admitted when its rank is at or below the serving counter and it was not skipped;
//!    position = places ahead; ETA = live share of them ÷ measured admission rate.
//! 4. Once admitted, `room::token` signs an ES256 JWT (`kid`, `iss`, `aud`, `sub`, `room`,
//!    `ticket`, `iat`, `exp`); the visitor is redirected to the origin with `?weir_token=` and a
//!    `weir_token` cookie.
//! 5. The origin verifies offline with `/.well-known/jwks.json`, online with
//!    `POST /api/v1/verify`, or lets its proxy ask `GET /auth/{room}` (forward auth).
//!
//! In a cluster every node answers steps 1, 3, 4 and 5 from its own engine and the shared Redis
//! store (tickets come from one counter there); step 2 runs only on the node holding the
//! admission lease, which sends each committed step to the others (`room::sync`).
//!
//! Realtime: a publish (`POST /apps/{id}/events`) → `realtime` fan-out serializes the frame once
//! and pushes the shared bytes onto each subscriber's bounded outbox (in the order they
//! subscribed, which keeps the walk over connection state close to memory order), waking that
//! connection's single task (which reads and writes its socket) only when the outbox was empty; a
//! full outbox disconnects that client with a reconnect code instead of growing memory. In a
//! cluster the publish goes to Redis first (a script numbers it and publishes it on one
//! channel); every node, the publisher's included, fans out what it receives from there.
//! Each fan-out counts its channel and the messages it delivered for the dashboard's top
//! talkers; each new visitor and each WebSocket upgrade counts its client IP.

pub mod admin;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod fast_map;
pub mod gateway;
pub mod http;
pub mod limits;
pub mod ops;
pub mod outbound;
pub mod realtime;
pub mod room;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::clock::Clock;
use crate::store::{Store, StoreError};

/// Startup failed before serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("secrets: {0}")]
    Secrets(String),
    #[error("{0}")]
    Tls(String),
}

/// A bound, ready-to-run server. Splitting bind from run lets callers learn the port first.
pub struct Server {
    listener: TcpListener,
    state: http::AppState,
    /// Set when the admin key was generated by this start (first start).
    pub generated_admin_key: Option<String>,
}

impl Server {
    /// Opens the store, loads or generates secrets, starts background tasks and binds.
    pub async fn start(
        config: Config,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<Server, RunError> {
        // First: metric handles resolved before the recorder exists would count into nothing.
        let metrics = ops::metrics::handle();
        let mut config = config;
        let listener = bind(config.listen).map_err(|source| RunError::Bind { addr: config.listen, source })?;
        if config.public_url.is_none() {
            // With port 0 only the bound socket knows the real port.
            let addr = listener.local_addr().unwrap_or(config.listen);
            config.public_url = Some(format!("http://{addr}"));
        }
        // Before any client exists: the proxy's, the webhooks', Redis's.
        outbound::configure(config.tls_ca_file.as_deref()).map_err(RunError::Tls)?;
        // A cluster's nodes share their durable state through Redis; one node keeps it embedded.
        let store: Arc<dyn Store> = match &config.cluster.redis_url {
            Some(url) => Arc::new(store::redis::RedisStore::connect(url, &config.cluster.prefix).await?),
            None => Arc::new(store::redb::RedbStore::open(&config.data_dir)?),
        };
        let secrets = secrets::Secrets::load_or_generate(&config, store.as_ref()).await?;
        let generated_admin_key = secrets.generated_admin_key.clone();
        let config = Arc::new(config);
        let talkers = Arc::new(ops::talkers::Talkers::default());
        let realtime = realtime::Realtime::start(&config, store.clone(), talkers.clone(), shutdown.clone()).await?;
        let rooms = room::Rooms::load(store.clone(), clock.clone(), &secrets, &config, realtime.cluster().cloned()).await?;
        if let Some(sync) = &rooms.sync {
            sync.listen(Arc::downgrade(&rooms), Arc::downgrade(&realtime));
        }
        room::driver::spawn(rooms.clone(), realtime.clone(), shutdown.clone());
        let state = http::AppState::new(http::Shared {
            config,
            store,
            clock,
            realtime,
            rooms,
            admin_key: Arc::new(secrets.admin_key),
            metrics,
            shutdown,
            dashboard: Arc::new(ops::dashboard::Dashboard::new(talkers)),
        });
        ops::dashboard::spawn(state.clone());
        Ok(Server { listener, state, generated_admin_key })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.state.config.listen)
    }

    /// Serves until the shutdown token is cancelled, then drains: stops accepting, tells
    /// realtime clients to reconnect, waits for in-flight requests up to the grace period,
    /// and flushes the store.
    pub async fn run(self) -> Result<(), RunError> {
        let Server { listener, state, .. } = self;
        let shutdown = state.shutdown.clone();
        let grace = Duration::from_secs(state.config.shutdown_grace_seconds);
        let store = state.store.clone();
        let realtime = state.realtime.clone();
        let limits = &state.config.limits;
        let turns = limits::turns::Settings {
            active: limits.active_connections,
            length: Duration::from_millis(limits.turn_ms),
            line_wait: Duration::from_millis(limits.line_wait_ms),
        };
        let max_connections = limits.max_connections;
        let header_timeout = Duration::from_millis(state.config.limits.header_timeout_ms);
        let app = http::app(state);
        let listener = limits::backoff::Listener::new(listener, max_connections, turns).with_door(http::hot_route_of);
        let serve = serve::serve(listener, app, header_timeout, shutdown.clone().cancelled_owned());
        let deadline = async {
            shutdown.cancelled().await;
            realtime.close_all().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            () = serve => {}
            _ = deadline => tracing::warn!(?grace, "in-flight requests still running at the shutdown deadline; closing"),
        }
        store.close().await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Runs weir with the system clock until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    Server::start(config, clock::system(), shutdown).await?.run().await
}

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`).
/// A surge opens thousands of connections at once; with tokio's default of 1,024 the rest of
/// their SYNs are dropped and the clients retry only after a second.
const ACCEPT_BACKLOG: u32 = 8192;

/// A listening socket on `addr` with room for a surge of connections.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std's `TcpListener::bind` does: a restarted server can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// 3,000 connections opened at once, none accepted yet, all complete their handshake: with
    /// tokio's default backlog of 1,024 the rest would wait out a SYN retry of a second.
    #[tokio::test]
    async fn a_surge_of_connections_is_queued_for_accept_not_dropped() {
        let listener = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..3_000).map(|_| tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)));
        let results = futures_util::future::join_all(connects).await;
        let connected = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(connected, 3_000, "handshakes not completed within 500 ms while the server was busy");
        drop(listener);
    }
}
