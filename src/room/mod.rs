//! Waiting rooms: definitions ([`model`]), admission arithmetic ([`queue`]), the admission
//! loop ([`driver`]), visitor cookies ([`visitor`]), admission tokens ([`token`]) and the
//! registry of live rooms ([`Rooms`]).
//!
//! A live [`Room`] keeps its counters in atomics so visitor requests read them without locks;
//! only the driver writes the serving counter, and only after the store has made it durable.

pub mod branding;
pub mod driver;
pub mod model;
pub mod notify;
pub mod policy;
pub mod queue;
pub mod routes;
pub mod sync;
pub mod token;
pub mod visitor;

use crate::fast_map::FastMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::ApiError;
use crate::secrets::Secrets;
use crate::store::{order_key, sessions_key, Store, StoreError, Table};

use model::{RoomSpec, RoomState};
use policy::abuse::PerIpLimiter;
use policy::adaptive::Controller;
use policy::engine::{Census, Engine};
use token::KeyRing;
use visitor::{CookieSigner, VisitorCookie};

/// Counts per second over the last minute, for "admitted/entries in the last minute".
#[derive(Debug)]
struct MinuteWindow {
    buckets: [u64; 60],
    /// The second each bucket belongs to.
    seconds: [i64; 60],
}

impl Default for MinuteWindow {
    fn default() -> Self {
        Self { buckets: [0; 60], seconds: [i64::MIN / 2; 60] }
    }
}

impl MinuteWindow {
    fn add(&mut self, now_s: i64, n: u64) {
        let i = now_s.rem_euclid(60) as usize;
        if self.seconds[i] != now_s {
            self.seconds[i] = now_s;
            self.buckets[i] = 0;
        }
        self.buckets[i] += n;
    }

    fn last_minute(&self, now_s: i64) -> u64 {
        (0..60).filter(|&i| now_s - self.seconds[i] < 60 && self.seconds[i] <= now_s).map(|i| self.buckets[i]).sum()
    }
}

/// A room as served: its definition plus its admission engine and live measurements.
pub struct Room {
    pub id: String,
    spec: RwLock<Arc<RoomSpec>>,
    pub(crate) engine: Mutex<Engine>,
    /// Serializes admission steps (plan → persist → commit), which span an await on the store;
    /// an async mutex is the point here, and no sync lock is held across that await.
    pub(crate) stepping: Arc<tokio::sync::Mutex<()>>,
    pub(crate) adaptive: Mutex<Option<Controller>>,
    pub(crate) census: Mutex<Census>,
    pub(crate) per_ip: PerIpLimiter,
    admitted_window: Mutex<MinuteWindow>,
    entries_window: Mutex<MinuteWindow>,
    /// `weir_room_entries_total` for this room, resolved once (entry is the hottest path).
    entries_total: metrics::Counter,
    /// Visitor cookies already checked (status polls present the same cookie again and again).
    checked_cookies: visitor::CheckedCookies,
    /// In a cluster: the time the leader's empty steps covered since the last step it sent, so
    /// the followers' measured rate averages over the same time as the leader's.
    unsent_elapsed_ms: std::sync::atomic::AtomicU64,
}

/// Live statistics reported by the admin API, the CLI and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct RoomStats {
    pub queue_length: u64,
    pub next_ticket: u64,
    pub last_ticket: u64,
    pub serving: u64,
    pub live_waiters: u64,
    pub abandoned: u64,
    /// The rate the policy aims for now (configured, or the adaptive controller's).
    pub target_per_minute: f64,
    /// Measured admissions per minute (moving average).
    pub measured_per_minute: Option<f64>,
    pub admitted_last_minute: u64,
    pub entries_last_minute: u64,
    pub active_users: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_latency_ms: Option<f64>,
    /// Estimated wait of the last ticket in line.
    pub eta_last_ticket_seconds: Option<u64>,
}

impl Room {
    fn new(spec: RoomSpec, engine: Engine) -> Self {
        let adaptive = spec.adaptive.as_ref().map(|a| Controller::new(spec.rate_per_minute, a));
        Room {
            entries_total: metrics::counter!("weir_room_entries_total", "room" => spec.id.clone()),
            id: spec.id.clone(),
            spec: RwLock::new(Arc::new(spec)),
            engine: Mutex::new(engine),
            stepping: Arc::new(tokio::sync::Mutex::new(())),
            adaptive: Mutex::new(adaptive),
            census: Mutex::new(Census::default()),
            per_ip: PerIpLimiter::default(),
            admitted_window: Mutex::new(MinuteWindow::default()),
            entries_window: Mutex::new(MinuteWindow::default()),
            checked_cookies: visitor::CheckedCookies::default(),
            unsent_elapsed_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn spec(&self) -> Arc<RoomSpec> {
        self.spec.read().clone()
    }

    pub fn serving(&self) -> u64 {
        self.engine.lock().serving()
    }

    pub fn last_ticket(&self) -> u64 {
        self.engine.lock().last_ticket()
    }

    /// The state in force at `now_ms` ([`RoomSpec::state_at`]).
    pub fn effective_state(&self, now_ms: i64) -> RoomState {
        self.spec().state_at(now_ms)
    }

    /// The rate the room admits at now: the adaptive controller's when configured.
    pub fn effective_rate(&self) -> f64 {
        self.rate_under(&self.spec())
    }

    /// [`effective_rate`](Self::effective_rate) for a caller holding the room's spec already
    /// (each read of the spec is a lock and a reference count, and an entry needs it often).
    fn rate_under(&self, spec: &RoomSpec) -> f64 {
        match (&spec.adaptive, self.adaptive.lock().as_ref()) {
            (Some(_), Some(c)) => c.rate,
            _ => spec.rate_per_minute,
        }
    }

    pub(crate) fn record_admitted(&self, now_s: i64, n: u64) {
        self.admitted_window.lock().add(now_s, n);
    }

    /// Honest wait for someone `position` places back: only live visitors ahead count, at the
    /// measured admission rate (the configured one until there is a measurement).
    pub fn eta_seconds(&self, position: u64, now_ms: i64) -> Option<u64> {
        let spec = self.spec();
        let state = spec.state_at(now_ms);
        let measured = if state == RoomState::Open { self.engine.lock().measured_per_minute() } else { None };
        self.eta_seconds_in(&spec, state, position, measured, now_ms)
    }

    /// [`eta_seconds`](Self::eta_seconds) for a caller that already has the room's spec, its
    /// state and its measured rate (read under an engine lock it holds anyway).
    fn eta_seconds_in(&self, spec: &RoomSpec, state: RoomState, position: u64, measured: Option<f64>, now_ms: i64) -> Option<u64> {
        let census = *self.census.lock();
        let measured = if state == RoomState::Open { measured } else { None };
        let eta = policy::engine::eta_seconds(position, &census, measured, self.rate_under(spec));
        match state {
            RoomState::Open => eta,
            RoomState::Scheduled => {
                let start = spec.starts_at_ms()?;
                eta.map(|e| e + ((start - now_ms).max(0) as u64).div_ceil(1000))
            }
            _ => None,
        }
    }

    pub fn stats(&self, now_ms: i64) -> RoomStats {
        let spec = self.spec();
        let now_s = now_ms.div_euclid(1000);
        let census = *self.census.lock();
        let (last, serving, queue_length, measured, active) = {
            let e = self.engine.lock();
            (e.last_ticket(), e.serving(), e.queue_length(), e.measured_per_minute(), e.active_users(now_ms, spec.session_seconds))
        };
        let (adaptive_rate, probe_latency_ms) = match self.adaptive.lock().as_ref() {
            Some(c) if spec.adaptive.is_some() => (Some(c.rate), c.last_latency_ms),
            _ => (None, None),
        };
        RoomStats {
            queue_length,
            next_ticket: last + 1,
            last_ticket: last,
            serving,
            live_waiters: census.live,
            abandoned: census.abandoned,
            target_per_minute: self.effective_rate(),
            measured_per_minute: measured,
            admitted_last_minute: self.admitted_window.lock().last_minute(now_s),
            entries_last_minute: self.entries_window.lock().last_minute(now_s),
            active_users: active,
            adaptive_rate,
            probe_latency_ms,
            eta_last_ticket_seconds: self.eta_seconds(queue_length.saturating_sub(1), now_ms),
        }
    }
}

/// What a visitor (page or JSON client) is told.
#[derive(Debug, Clone, Serialize)]
pub struct VisitorStatus {
    pub room: String,
    pub state: RoomState,
    pub ticket: Option<u64>,
    pub position: Option<u64>,
    pub eta_seconds: Option<u64>,
    pub admitted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
    /// The token for the redirect (set as a cookie too).
    #[serde(skip)]
    pub token: Option<String>,
    /// When this status was computed (the page shows times relative to it).
    #[serde(skip)]
    pub now_ms: i64,
}

impl VisitorStatus {
    /// The JSON body of `GET /r/{room}/status`, byte for byte what serde writes for this struct
    /// (a test holds them equal). Written by hand because waiting visitors poll it: serde's
    /// writer escapes every key on every call.
    pub fn to_json(&self) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            // Writing a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, s);
        }
        fn number(out: &mut Vec<u8>, key: &str, n: Option<u64>) {
            out.extend_from_slice(key.as_bytes());
            match n {
                Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
                None => out.extend_from_slice(b"null"),
            }
        }
        let mut out = Vec::with_capacity(160 + self.redirect_url.as_ref().map_or(0, String::len));
        out.extend_from_slice(b"{\"room\":");
        string(&mut out, &self.room);
        out.extend_from_slice(b",\"state\":\"");
        out.extend_from_slice(self.state.as_str().as_bytes());
        number(&mut out, "\",\"ticket\":", self.ticket);
        number(&mut out, ",\"position\":", self.position);
        number(&mut out, ",\"eta_seconds\":", self.eta_seconds);
        out.extend_from_slice(if self.admitted { b",\"admitted\":true" } else { b",\"admitted\":false" });
        if let Some(url) = &self.redirect_url {
            out.extend_from_slice(b",\"redirect_url\":");
            string(&mut out, url);
        }
        if let Some(at) = &self.starts_at {
            out.extend_from_slice(b",\"starts_at\":");
            string(&mut out, at);
        }
        out.push(b'}');
        out
    }
}

/// Every live room plus what visitor handling needs (keys, cookie signer, store, clock).
pub struct Rooms {
    rooms: RwLock<FastMap<String, Arc<Room>>>,
    /// Wakes the admission driver, which parks while there are no rooms.
    pub created: tokio::sync::Notify,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub keys: KeyRing,
    pub cookies: CookieSigner,
    pub pow: policy::pow::Pow,
    pub public_url: String,
    /// Proxies whose client-IP header is believed (`trusted_proxies` in the config).
    pub trusted_proxies: Vec<policy::abuse::Cidr>,
    pub client_ip_header: String,
    /// In a cluster: the link to the other nodes' rooms (`sync`).
    pub sync: Option<sync::RoomSync>,
}

impl Rooms {
    pub async fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        secrets: &Secrets,
        config: &Config,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Result<Arc<Self>, StoreError> {
        let keys = KeyRing::load(store.clone(), clock.clone(), config.public_url(), config.token_ttl_seconds).await?;
        let mut rooms = FastMap::default();
        for (id, bytes) in store.list(Table::Rooms).await? {
            let spec: RoomSpec = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(format!("room {id}: {e}")))?;
            let mut engine = restore_engine(store.as_ref(), &id, clock.now_ms()).await?;
            if cluster.is_some() {
                engine.log_for_cluster();
            }
            rooms.insert(id, Arc::new(Room::new(spec, engine)));
        }
        Ok(Arc::new(Rooms {
            rooms: RwLock::new(rooms),
            created: tokio::sync::Notify::new(),
            store,
            clock,
            keys,
            cookies: CookieSigner::new(&secrets.cookie_key),
            pow: policy::pow::Pow::new(&secrets.cookie_key),
            public_url: config.public_url(),
            trusted_proxies: config.trusted_proxies.iter().filter_map(|c| policy::abuse::Cidr::parse(c)).collect(),
            client_ip_header: config.client_ip_header.to_ascii_lowercase(),
            sync: cluster.map(sync::RoomSync::new),
        }))
    }

    /// Adds a room this node learnt of (`sync`).
    fn insert(&self, room: Arc<Room>) {
        if self.sync.is_some() {
            room.engine.lock().log_for_cluster();
        }
        self.rooms.write().insert(room.id.clone(), room);
        self.created.notify_one();
    }

    /// Drops a room deleted elsewhere (`sync`).
    fn forget(&self, id: &str) {
        self.rooms.write().remove(id);
        metrics::gauge!("weir_room_queue_length", "room" => id.to_string()).set(0.0);
    }

    fn announce_change(&self, id: &str) {
        if let Some(sync) = &self.sync {
            sync.room_changed(id);
        }
    }

    /// Whether this node admits visitors now: always alone, the lease holder in a cluster.
    pub fn drives_admission(&self) -> bool {
        self.sync.as_ref().is_none_or(sync::RoomSync::leading)
    }

    /// Rotates the signing keys (and has the other nodes of a cluster reload them).
    pub async fn rotate_keys(&self) -> Result<String, StoreError> {
        let kid = self.keys.rotate().await?;
        if let Some(sync) = &self.sync {
            sync.keys_rotated();
        }
        Ok(kid)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Room>> {
        self.rooms.read().get(id).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.read().is_empty()
    }

    pub fn all(&self) -> Vec<Arc<Room>> {
        let mut v: Vec<_> = self.rooms.read().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn require(&self, id: &str) -> Result<Arc<Room>, ApiError> {
        self.get(id).ok_or_else(|| ApiError::not_found(format!("no room {id:?}")))
    }

    pub async fn create(&self, spec: RoomSpec) -> Result<Arc<Room>, ApiError> {
        let bytes = serde_json::to_vec(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        if !self.store.insert_new(Table::Rooms, &spec.id, bytes).await? {
            return Err(ApiError::conflict(format!("room {:?} already exists", spec.id)));
        }
        // A previous room of this id may have left a queue behind.
        self.store.delete_queue(&spec.id).await?;
        let room = Arc::new(Room::new(spec, Engine::default()));
        self.insert(room.clone());
        self.announce_change(&room.id);
        Ok(room)
    }

    pub async fn update(&self, room: &Room, spec: RoomSpec) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        self.store.put(Table::Rooms, &spec.id, bytes).await?;
        let id = spec.id.clone();
        self.apply_spec(room, spec);
        self.announce_change(&id);
        Ok(())
    }

    /// Puts a (stored) definition in force on this node.
    fn apply_spec(&self, room: &Room, spec: RoomSpec) {
        {
            let mut adaptive = room.adaptive.lock();
            match (&spec.adaptive, adaptive.as_ref()) {
                (Some(a), None) => *adaptive = Some(Controller::new(spec.rate_per_minute, a)),
                (None, Some(_)) => *adaptive = None,
                _ => {}
            }
        }
        *room.spec.write() = Arc::new(spec);
    }

    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        if !self.store.delete(Table::Rooms, id).await? {
            return Err(ApiError::not_found(format!("no room {id:?}")));
        }
        self.forget(id);
        self.store.delete_queue(id).await?;
        self.announce_change(id);
        Ok(())
    }

    /// Issues a durable ticket to a new visitor arriving at `now` (ms).
    pub async fn enter(&self, room: &Room, deep_link: Option<String>, now: i64) -> Result<VisitorCookie, ApiError> {
        let visitor = visitor::new_visitor_id();
        // Nearly always from the range reserved ahead, without a boxed future to await.
        let ticket = match self.store.try_issue_ticket(&room.id) {
            Some(ticket) => ticket,
            None => self.store.issue_ticket(&room.id).await?,
        };
        room.engine.lock().on_entry(ticket, now);
        room.entries_window.lock().add(now.div_euclid(1000), 1);
        room.entries_total.increment(1);
        Ok(VisitorCookie { generation: room.spec().created_at_ms, ticket, visitor, deep_link })
    }

    /// Safety net: admits `ticket` at once when nobody is waiting and the room's measured
    /// arrivals and active users are within its policy; otherwise it stays queued.
    pub async fn admit_if_within_policy(&self, room: &Room, ticket: u64) -> Result<bool, ApiError> {
        let spec = room.spec();
        let now = self.clock.now_ms();
        let arrivals = room.entries_window.lock().last_minute(now.div_euclid(1000));
        let within_rate = (arrivals as f64) <= room.effective_rate();
        let active = room.engine.lock().active_users(now, spec.session_seconds);
        let within_cap = spec.max_active_users.is_none_or(|m| active < m);
        // In a cluster only the leader admits; the next tick takes this visitor.
        if !(within_rate && within_cap && self.drives_admission()) {
            return Ok(false);
        }
        let _guard = room.stepping.lock().await;
        let Some(step) = room.engine.lock().plan_immediate(ticket) else { return Ok(false) };
        let input = policy::engine::Inputs {
            now_ms: now,
            elapsed: std::time::Duration::ZERO,
            rate_per_minute: room.effective_rate(),
            admitting: true,
            max_active_users: spec.max_active_users,
            session_seconds: spec.session_seconds,
            abandon_after_seconds: spec.abandon_after_seconds,
        };
        let sessions = room.engine.lock().sessions_after(&step, &input);
        let recorded = self
            .record_admissions(&[crate::store::AdmissionRecord {
                room: room.id.clone(),
                serving: step.serving,
                sessions: Some(sessions),
                ..Default::default()
            }])
            .await;
        match recorded {
            // Another node leads now: the visitor stays queued, as on any follower.
            Err(StoreError::Fenced) => return Ok(false),
            recorded => recorded?,
        }
        if let Some(sync) = &self.sync {
            sync.step_committed(room, &step, &input);
        }
        room.engine.lock().commit(step, &input);
        room.record_admitted(now.div_euclid(1000), 1);
        metrics::counter!("weir_room_admitted_total", "room" => room.id.clone()).increment(1);
        metrics::counter!("weir_room_safety_net_passed_total", "room" => room.id.clone()).increment(1);
        Ok(true)
    }

    /// Persists admission steps; in a cluster only while this node holds the admission lease.
    pub async fn record_admissions(&self, records: &[crate::store::AdmissionRecord]) -> Result<(), StoreError> {
        let fence = self.sync.as_ref().map(sync::RoomSync::fence);
        let recorded = self.store.record_admissions(records, fence).await;
        if matches!(recorded, Err(StoreError::Fenced)) {
            metrics::counter!("weir_cluster_fenced_admissions_total").increment(1);
        }
        recorded
    }

    /// An admitted visitor was active (forward auth, proxied request): extends its session.
    pub fn activity(&self, room: &Room, ticket: u64) {
        room.engine.lock().activity(ticket, self.clock.now_ms());
    }

    /// Ends the session of the visitor holding `ticket` (the origin's checkout/logout), durably.
    pub async fn end_session(&self, room: &Room, ticket: u64) -> Result<bool, ApiError> {
        if let Some(sync) = self.sync.as_ref().filter(|s| !s.leading()) {
            // The leader persists sessions; this node forgets it at once and tells it.
            sync.end_session(&room.id, ticket);
            return Ok(room.engine.lock().end_session(ticket));
        }
        let _guard = room.stepping.lock().await;
        if !room.engine.lock().end_session(ticket) {
            return Ok(false);
        }
        let sessions = room.engine.lock().session_tickets();
        let serving = room.serving();
        self.record_admissions(&[crate::store::AdmissionRecord { room: room.id.clone(), serving, sessions: Some(sessions), ..Default::default() }]).await?;
        Ok(true)
    }

    /// The visitor's cookie for `room`, if present and genuine for this generation of the room.
    pub fn recognise(&self, room: &Room, raw: Option<&[u8]>) -> Option<VisitorCookie> {
        let cookie = self.cookies.decode_remembered(&room.id, raw?, &room.checked_cookies)?;
        if cookie.generation != room.spec().created_at_ms || cookie.ticket < 1 {
            return None;
        }
        if cookie.ticket > room.last_ticket() {
            // In a cluster another node may have issued it: the signed cookie vouches for it.
            self.sync.as_ref()?;
            room.engine.lock().on_entry(cookie.ticket, self.clock.now_ms());
        }
        Some(cookie)
    }

    /// Where an admitted visitor goes: the origin (plus deep link) with the token appended.
    pub fn redirect_url(spec: &RoomSpec, deep_link: Option<&str>, token: &str) -> String {
        let mut url = match url::Url::parse(&spec.origin) {
            Ok(u) => u,
            Err(_) => return spec.origin.clone(),
        };
        if let Some(link) = deep_link {
            if let Ok(joined) = url.join(link) {
                url = joined;
            }
        }
        url.query_pairs_mut().append_pair("weir_token", token);
        url.into()
    }

    /// In proxy mode the visitor goes to weir's own `/p/{room}{deep link}` (`gateway::proxy`).
    fn proxy_redirect_url(&self, spec: &RoomSpec, deep_link: Option<&str>, token: &str) -> String {
        let base = format!("{}/p/{}{}", self.public_url.trim_end_matches('/'), spec.id, deep_link.unwrap_or("/"));
        match url::Url::parse(&base) {
            Ok(mut url) => {
                url.query_pairs_mut().append_pair("weir_token", token);
                url.into()
            }
            Err(_) => base,
        }
    }

    /// Computes what a visitor holding `cookie` (or, in passthrough, nobody in particular) sees,
    /// and counts the call as a sign of life.
    pub fn status(&self, room: &Room, cookie: Option<&VisitorCookie>) -> VisitorStatus {
        self.status_at(room, cookie, self.clock.now_ms())
    }

    /// [`status`](Self::status) at `now` (ms), for a request that has read the clock already.
    pub fn status_at(&self, room: &Room, cookie: Option<&VisitorCookie>, now: i64) -> VisitorStatus {
        let spec = room.spec();
        let state = spec.state_at(now);
        let ticket = cookie.map(|c| c.ticket);
        let (admitted, position, measured) = match (state, ticket) {
            (RoomState::Passthrough, _) => (true, None, None),
            (_, Some(t)) => {
                let mut engine = room.engine.lock();
                engine.seen(t, now);
                (engine.is_admitted(t), engine.position(t), engine.measured_per_minute())
            }
            _ => (false, None, None),
        };
        let eta_seconds = if admitted { None } else { position.and_then(|p| room.eta_seconds_in(&spec, state, p, measured, now)) };
        let (token, redirect_url) = if admitted {
            let visitor = cookie.map(|c| c.visitor.clone()).unwrap_or_else(visitor::new_visitor_id);
            self.token_redirect(room, &visitor, ticket.unwrap_or(0), cookie.and_then(|c| c.deep_link.as_deref()))
        } else {
            (None, None)
        };
        VisitorStatus {
            room: room.id.clone(),
            state,
            ticket,
            position: if admitted { None } else { position },
            eta_seconds,
            admitted,
            redirect_url,
            starts_at: spec.starts_at.clone(),
            token,
            now_ms: now,
        }
    }

    /// A token for `visitor` and the origin URL carrying it.
    pub fn token_redirect(&self, room: &Room, visitor: &str, ticket: u64, deep_link: Option<&str>) -> (Option<String>, Option<String>) {
        let spec = room.spec();
        let token = self.keys.issue(&room.id, &spec.origin, visitor, ticket);
        let url = match spec.mode {
            model::RoomMode::Redirect => Self::redirect_url(&spec, deep_link, &token),
            model::RoomMode::Proxy => self.proxy_redirect_url(&spec, deep_link, &token),
        };
        (Some(token), Some(url))
    }
}

/// Rebuilds a room's engine from the store: counters, pre-queue order, skips, sessions.
async fn restore_engine(store: &dyn Store, room: &str, now_ms: i64) -> Result<Engine, StoreError> {
    let counters = store.counters(room).await?;
    let order = stored_order(store, room).await?.unwrap_or_default();
    let sessions: Vec<u64> = store
        .get(Table::Meta, &sessions_key(room))
        .await?
        .map(|b| b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
        .unwrap_or_default();
    let skipped = store.skipped(room).await?;
    Ok(Engine::restore(&counters, order, skipped, sessions, now_ms))
}

/// A scheduled room's pre-queue order, once its start shuffled it.
async fn stored_order(store: &dyn Store, room: &str) -> Result<Option<Vec<u32>>, StoreError> {
    let bytes = store.get(Table::Meta, &order_key(room)).await?;
    Ok(bytes.map(|b| b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_is_what_serde_writes() {
        let states = [RoomState::Scheduled, RoomState::Open, RoomState::Paused, RoomState::Passthrough, RoomState::Closed];
        let numbers = [None, Some(0), Some(7), Some(u64::MAX)];
        let texts = [None, Some("https://shop.example/p?a=1&weir_token=x.y.z".to_string()), Some("\"quoted\" \\ é \u{1} </script>".to_string())];
        for (i, state) in states.into_iter().enumerate() {
            for (j, n) in numbers.into_iter().enumerate() {
                for text in &texts {
                    let status = VisitorStatus {
                        room: format!("room-{i}"),
                        state,
                        ticket: n,
                        position: numbers[(j + 1) % numbers.len()],
                        eta_seconds: numbers[(j + 2) % numbers.len()],
                        admitted: j % 2 == 0,
                        redirect_url: text.clone(),
                        starts_at: texts[(j + 1) % texts.len()].clone(),
                        token: Some("ignored".into()),
                        now_ms: 1,
                    };
                    assert_eq!(String::from_utf8(status.to_json()).unwrap(), serde_json::to_string(&status).unwrap());
                }
            }
        }
    }
}
