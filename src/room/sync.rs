//! Waiting rooms across the nodes of a cluster (`cluster.redis_url`).
//!
//! Every node serves every visitor request from its own in-memory engines; the rooms, tickets,
//! serving counters, skips, sessions and signing keys live in the shared store (Redis). One node
//! at a time, the holder of the cluster's admission lease ([`Cluster::is_leader`]), drives
//! admission: at the start of its term it reloads every room from the store, then plans,
//! persists and commits steps as a single node does (its writes fenced by the lease, so a
//! leader that lost it cannot admit), and sends each committed step to the others, which apply
//! it to their engines. What only a follower sees goes to every node: the
//! visitors it saw (status polls, open waiting pages) and the sessions that were active there,
//! in batches every [`SEEN_EVERY`]; sessions the origin ends there go to the leader. Changes
//! to a room (admin API, scheduled start) and key rotations are announced so the others
//! reload them from the store.
//!
//! A ticket issued on another node reaches a follower's engine with the visitor's next request
//! (its signed cookie names it) and the leader's through the store's counter, read every tick.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::engine::{Inputs, Sighting, Step};
use super::{restore_engine, Room, Rooms};
use crate::cluster::{Cluster, RoomEvent};
use crate::realtime::Realtime;
use crate::store::Table;

/// How often a node sends the visitors and sessions it saw.
pub const SEEN_EVERY: Duration = Duration::from_millis(500);
/// Most tickets one batch carries per room; more wait for the next batch (the log is bounded
/// in the engine).
const MAX_SEEN_PER_MESSAGE: usize = 8_192;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum RoomMessage {
    /// A step the leader committed (and persisted).
    Step {
        room: String,
        serving: u64,
        skipped: Vec<u64>,
        readmitted: Vec<u64>,
        admitted: Vec<u64>,
        expired: Vec<u64>,
        now_ms: i64,
        elapsed_ms: u64,
        admitting: bool,
    },
    /// Visitors seen and sessions active on the sending node: (ticket, when in ms).
    Seen { room: String, seen: Vec<Sighting>, active: Vec<Sighting> },
    /// The origin ended a session on the sending node: the leader ends it durably.
    EndSession { room: String, ticket: u64 },
    /// The room was created, changed or deleted: reload it from the store.
    Changed { room: String },
    /// The signing keys were rotated: reload them.
    Keys,
}

/// A node's link to the other nodes' waiting rooms.
pub struct RoomSync {
    cluster: Arc<Cluster>,
}

impl RoomSync {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }

    /// Whether this node drives admission now.
    pub fn leading(&self) -> bool {
        self.cluster.is_leader()
    }

    /// What the admission writes of this node are fenced with (see [`Fence`](crate::store::Fence)).
    pub fn fence(&self) -> crate::store::Fence<'_> {
        self.cluster.admission_fence()
    }

    /// The lease term this node is in (changes each time it takes the lease).
    pub fn term(&self) -> u64 {
        self.cluster.term()
    }

    /// Receives the other nodes' room messages from now on.
    pub fn listen(&self, rooms: Weak<Rooms>, realtime: Weak<Realtime>) {
        self.cluster.on_room_message(Box::new(move |event| {
            let (Some(rooms), Some(realtime)) = (rooms.upgrade(), realtime.upgrade()) else { return };
            match event {
                RoomEvent::Message(body) => match serde_json::from_str::<RoomMessage>(body) {
                    Ok(message) => receive(&rooms, &realtime, message),
                    Err(e) => tracing::warn!(error = %e, "cluster: unreadable room message; ignored"),
                },
                // Messages sent while this node was away are lost: start over from the store.
                RoomEvent::Rejoined => {
                    tokio::spawn(async move {
                        if let Err(e) = resync(&rooms, &realtime).await {
                            tracing::warn!(error = %e, "cluster: rooms not reloaded after rejoining");
                        }
                    });
                }
            }
        }));
    }

    pub fn step_committed(&self, room: &Room, step: &Step, input: &Inputs) {
        let unsent = room.unsent_elapsed_ms.swap(0, std::sync::atomic::Ordering::Relaxed);
        self.send(&RoomMessage::Step {
            room: room.id.clone(),
            serving: step.serving,
            skipped: step.skipped.clone(),
            readmitted: step.readmitted.clone(),
            admitted: step.admitted.clone(),
            expired: step.expired_sessions().to_vec(),
            now_ms: input.now_ms,
            elapsed_ms: input.elapsed.as_millis() as u64 + unsent,
            admitting: input.admitting,
        });
    }

    pub fn room_changed(&self, room: &str) {
        self.send(&RoomMessage::Changed { room: room.into() });
    }

    pub fn keys_rotated(&self) {
        self.send(&RoomMessage::Keys);
    }

    pub fn end_session(&self, room: &str, ticket: u64) {
        self.send(&RoomMessage::EndSession { room: room.into(), ticket });
    }

    /// Sends what this node's engines logged since the last call.
    pub fn send_seen(&self, rooms: &Rooms) {
        for room in rooms.all() {
            let (mut seen, mut active) = room.engine.lock().take_logs();
            while !seen.is_empty() || !active.is_empty() {
                let rest_seen = seen.split_off(seen.len().min(MAX_SEEN_PER_MESSAGE));
                let rest_active = active.split_off(active.len().min(MAX_SEEN_PER_MESSAGE));
                self.send(&RoomMessage::Seen { room: room.id.clone(), seen, active });
                (seen, active) = (rest_seen, rest_active);
            }
        }
    }

    fn send(&self, message: &RoomMessage) {
        match serde_json::to_string(message) {
            Ok(body) => self.cluster.send_room_message(body),
            Err(e) => tracing::warn!(error = %e, "cluster: room message not encoded"),
        }
    }
}

fn receive(rooms: &Arc<Rooms>, realtime: &Arc<Realtime>, message: RoomMessage) {
    match message {
        RoomMessage::Step { room, serving, skipped, readmitted, admitted, expired, now_ms, elapsed_ms, admitting } => {
            let Some(room) = rooms.get(&room) else { return };
            let admissions = (admitted.len() + readmitted.len()) as u64;
            let step = Step::decided(serving, skipped, readmitted, admitted, expired);
            let spec = room.spec();
            let input = Inputs {
                now_ms,
                elapsed: Duration::from_millis(elapsed_ms),
                rate_per_minute: room.effective_rate(),
                admitting,
                max_active_users: spec.max_active_users,
                session_seconds: spec.session_seconds,
                abandon_after_seconds: spec.abandon_after_seconds,
            };
            room.engine.lock().commit(step, &input);
            if admissions > 0 {
                room.record_admitted(now_ms.div_euclid(1000), admissions);
            }
        }
        RoomMessage::Seen { room, seen, active } => {
            let Some(room) = rooms.get(&room) else { return };
            let mut engine = room.engine.lock();
            for (t, at) in seen {
                engine.seen_elsewhere(t, at);
            }
            for (t, at) in active {
                engine.active_elsewhere(t, at);
            }
        }
        RoomMessage::EndSession { room, ticket } => {
            let Some(room) = rooms.get(&room) else { return };
            if !rooms.sync.as_ref().is_some_and(|s| s.leading()) {
                // Every node forgets the session; the leader alone makes it durable.
                room.engine.lock().end_session(ticket);
                return;
            }
            let rooms = rooms.clone();
            tokio::spawn(async move {
                if let Err(e) = rooms.end_session(&room, ticket).await {
                    tracing::warn!(room = %room.id, error = %e, "cluster: a session ended elsewhere was not recorded");
                }
            });
        }
        RoomMessage::Changed { room } => {
            let (rooms, realtime) = (rooms.clone(), realtime.clone());
            tokio::spawn(async move {
                if let Err(e) = reload_room(&rooms, &realtime, &room).await {
                    tracing::warn!(room = %room, error = %e, "cluster: a room changed elsewhere was not reloaded");
                }
            });
        }
        RoomMessage::Keys => {
            let rooms = rooms.clone();
            tokio::spawn(async move {
                if let Err(e) = rooms.keys.reload().await {
                    tracing::warn!(error = %e, "cluster: keys rotated elsewhere were not reloaded");
                }
            });
        }
    }
}

/// Brings this node's copy of `id` in line with the store: created, changed or deleted.
async fn reload_room(rooms: &Rooms, realtime: &Realtime, id: &str) -> Result<(), crate::store::StoreError> {
    let Some(bytes) = rooms.store.get(Table::Rooms, id).await? else {
        rooms.forget(id);
        return Ok(());
    };
    let spec: super::model::RoomSpec =
        serde_json::from_slice(&bytes).map_err(|e| crate::store::StoreError::Corrupt(format!("room {id}: {e}")))?;
    match rooms.get(id) {
        Some(room) if room.spec().created_at_ms == spec.created_at_ms => {
            let state_changed = room.spec().state != spec.state;
            rooms.apply_spec(&room, spec);
            if !room.engine.lock().has_order() {
                if let Some(order) = super::stored_order(rooms.store.as_ref(), id).await? {
                    room.engine.lock().install_order(order);
                }
            }
            if state_changed {
                super::driver::publish_state(realtime, &room);
            }
        }
        // New here, or deleted and created again elsewhere: start from the store.
        _ => {
            let engine = restore_engine(rooms.store.as_ref(), id, rooms.clock.now_ms()).await?;
            rooms.insert(Arc::new(Room::new(spec, engine)));
        }
    }
    Ok(())
}

/// Brings every room and the keys in line with the store.
async fn resync(rooms: &Rooms, realtime: &Realtime) -> Result<(), crate::store::StoreError> {
    let stored: Vec<String> = rooms.store.list(Table::Rooms).await?.into_iter().map(|(id, _)| id).collect();
    for room in rooms.all() {
        if !stored.contains(&room.id) {
            rooms.forget(&room.id);
        }
    }
    for id in &stored {
        reload_room(rooms, realtime, id).await?;
    }
    // Steps sent meanwhile are lost too: every engine starts over from the store.
    reload_engines(rooms).await?;
    rooms.keys.reload().await
}

/// Reloads every room's engine from the store: a node that takes the lease starts its term from
/// what the previous leader persisted, not from the steps it happened to hear.
pub async fn reload_engines(rooms: &Rooms) -> Result<(), crate::store::StoreError> {
    for room in rooms.all() {
        let _guard = room.stepping.lock().await;
        let mut engine = restore_engine(rooms.store.as_ref(), &room.id, rooms.clock.now_ms()).await?;
        engine.carry_logs_from(&room.engine.lock());
        *room.engine.lock() = engine;
    }
    Ok(())
}

/// The leader's view of a room's last ticket, from the store (tickets issued on other nodes).
pub async fn refresh_last_ticket(rooms: &Rooms, room: &Room) -> Result<(), crate::store::StoreError> {
    let counters = rooms.store.counters(&room.id).await?;
    room.engine.lock().note_last_ticket(counters.last_ticket, rooms.clock.now_ms());
    Ok(())
}
