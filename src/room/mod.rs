//! Waiting rooms: definitions ([`model`]), admission arithmetic ([`queue`]), the admission
//! loop ([`driver`]), visitor cookies ([`visitor`]), admission tokens ([`token`]) and the
//! registry of live rooms ([`Rooms`]).
//!
//! A live [`Room`] keeps its counters in atomics so visitor requests read them without locks;
//! only the driver writes the serving counter, and only after the store has made it durable.

pub mod driver;
pub mod model;
pub mod queue;
pub mod routes;
pub mod token;
pub mod visitor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::ApiError;
use crate::secrets::Secrets;
use crate::store::{Store, StoreError, Table, TicketEntry};

use model::{RoomSpec, RoomState};
use queue::Admission;
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

/// A room as served: its definition plus live counters.
pub struct Room {
    pub id: String,
    spec: RwLock<Arc<RoomSpec>>,
    last_ticket: AtomicU64,
    serving: AtomicU64,
    admission: Mutex<Admission>,
    admitted_window: Mutex<MinuteWindow>,
    entries_window: Mutex<MinuteWindow>,
}

/// Live statistics reported by the admin API and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct RoomStats {
    pub queue_length: u64,
    pub next_ticket: u64,
    pub last_ticket: u64,
    pub serving: u64,
    pub admitted_last_minute: u64,
    pub entries_last_minute: u64,
}

impl Room {
    fn new(spec: RoomSpec, last_ticket: u64, serving: u64) -> Self {
        Room {
            id: spec.id.clone(),
            spec: RwLock::new(Arc::new(spec)),
            last_ticket: AtomicU64::new(last_ticket),
            serving: AtomicU64::new(serving),
            admission: Mutex::new(Admission::default()),
            admitted_window: Mutex::new(MinuteWindow::default()),
            entries_window: Mutex::new(MinuteWindow::default()),
        }
    }

    pub fn spec(&self) -> Arc<RoomSpec> {
        self.spec.read().clone()
    }

    pub fn serving(&self) -> u64 {
        self.serving.load(Ordering::Acquire)
    }

    pub fn last_ticket(&self) -> u64 {
        self.last_ticket.load(Ordering::Acquire)
    }

    /// The state in force at `now_ms`: a scheduled room whose start has passed is open.
    pub fn effective_state(&self, now_ms: i64) -> RoomState {
        let spec = self.spec();
        match spec.state {
            RoomState::Scheduled if spec.starts_at_ms().is_some_and(|t| now_ms >= t) => RoomState::Open,
            s => s,
        }
    }

    pub fn stats(&self, now_s: i64) -> RoomStats {
        let (last, serving) = (self.last_ticket(), self.serving());
        RoomStats {
            queue_length: last.saturating_sub(serving),
            next_ticket: last + 1,
            last_ticket: last,
            serving,
            admitted_last_minute: self.admitted_window.lock().last_minute(now_s),
            entries_last_minute: self.entries_window.lock().last_minute(now_s),
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
    /// The room's display name (for pages).
    #[serde(skip)]
    pub name: String,
    /// The token for the redirect (set as a cookie too).
    #[serde(skip)]
    pub token: Option<String>,
}

/// Every live room plus what visitor handling needs (keys, cookie signer, store, clock).
pub struct Rooms {
    rooms: RwLock<HashMap<String, Arc<Room>>>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub keys: KeyRing,
    pub cookies: CookieSigner,
    pub public_url: String,
}

impl Rooms {
    pub async fn load(store: Arc<dyn Store>, clock: Arc<dyn Clock>, secrets: &Secrets, config: &Config) -> Result<Arc<Self>, StoreError> {
        let keys = KeyRing::load(store.clone(), clock.clone(), config.public_url(), config.token_ttl_seconds).await?;
        let mut rooms = HashMap::new();
        for (id, bytes) in store.list(Table::Rooms).await? {
            let spec: RoomSpec = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(format!("room {id}: {e}")))?;
            let counters = store.counters(&id).await?;
            rooms.insert(id, Arc::new(Room::new(spec, counters.last_ticket, counters.serving)));
        }
        Ok(Arc::new(Rooms {
            rooms: RwLock::new(rooms),
            store,
            clock,
            keys,
            cookies: CookieSigner::new(&secrets.cookie_key),
            public_url: config.public_url(),
        }))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Room>> {
        self.rooms.read().get(id).cloned()
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
        let room = Arc::new(Room::new(spec, 0, 0));
        self.rooms.write().insert(room.id.clone(), room.clone());
        Ok(room)
    }

    pub async fn update(&self, room: &Room, spec: RoomSpec) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        self.store.put(Table::Rooms, &spec.id, bytes).await?;
        *room.spec.write() = Arc::new(spec);
        Ok(())
    }

    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        if !self.store.delete(Table::Rooms, id).await? {
            return Err(ApiError::not_found(format!("no room {id:?}")));
        }
        self.rooms.write().remove(id);
        self.store.delete_queue(id).await?;
        metrics::gauge!("weir_room_queue_length", "room" => id.to_string()).set(0.0);
        Ok(())
    }

    /// Issues a durable ticket to a new visitor.
    pub async fn enter(&self, room: &Room, deep_link: Option<String>) -> Result<VisitorCookie, ApiError> {
        let visitor = visitor::new_visitor_id();
        let mut id = [0u8; 16];
        hex::decode_to_slice(&visitor, &mut id).map_err(|e| ApiError::internal(e.to_string()))?;
        let now = self.clock.now_ms();
        let ticket = self.store.issue_ticket(&room.id, TicketEntry { visitor: id, entered_at_ms: now }).await?;
        room.last_ticket.fetch_max(ticket, Ordering::AcqRel);
        room.entries_window.lock().add(now.div_euclid(1000), 1);
        metrics::counter!("weir_room_entries_total", "room" => room.id.clone()).increment(1);
        Ok(VisitorCookie { generation: room.spec().created_at_ms, ticket, visitor, deep_link })
    }

    /// The visitor's cookie for `room`, if present and genuine for this generation of the room.
    pub fn recognise(&self, room: &Room, raw: Option<&str>) -> Option<VisitorCookie> {
        let cookie = self.cookies.decode(&room.id, raw?)?;
        (cookie.generation == room.spec().created_at_ms && cookie.ticket <= room.last_ticket()).then_some(cookie)
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

    /// Computes what a visitor holding `cookie` (or, in passthrough, nobody in particular) sees.
    pub fn status(&self, room: &Room, cookie: Option<&VisitorCookie>) -> VisitorStatus {
        let spec = room.spec();
        let now = self.clock.now_ms();
        let state = room.effective_state(now);
        let serving = room.serving();
        let ticket = cookie.map(|c| c.ticket);
        let admitted = match (state, cookie) {
            (RoomState::Passthrough, _) => true,
            (_, Some(c)) => c.ticket <= serving,
            _ => false,
        };
        let position = if admitted { None } else { ticket.and_then(|t| queue::position(t, serving)) };
        let eta_seconds = match (state, position) {
            (RoomState::Open, Some(p)) => queue::eta_seconds(p, spec.rate_per_minute),
            (RoomState::Scheduled, Some(p)) => spec.starts_at_ms().and_then(|start| {
                queue::eta_seconds(p, spec.rate_per_minute).map(|e| e + ((start - now).max(0) as u64).div_ceil(1000))
            }),
            _ => None,
        };
        let (token, redirect_url) = if admitted {
            let visitor = cookie.map(|c| c.visitor.clone()).unwrap_or_else(visitor::new_visitor_id);
            let token = self.keys.issue(&room.id, &spec.origin, &visitor, ticket.unwrap_or(0));
            let url = Self::redirect_url(&spec, cookie.and_then(|c| c.deep_link.as_deref()), &token);
            (Some(token), Some(url))
        } else {
            (None, None)
        };
        VisitorStatus {
            room: room.id.clone(),
            state,
            ticket,
            position,
            eta_seconds,
            admitted,
            redirect_url,
            starts_at: spec.starts_at.clone(),
            name: spec.name.clone(),
            token,
        }
    }
}
