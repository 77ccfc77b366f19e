//! The only door to durable state. [`Store`] has two kinds of method: a small keyed document
//! store (rooms, apps, secrets, serialized by their owners) and one method per queue step that
//! must be atomic across a cluster (issue a ticket, advance the serving counter).
//!
//! `redb.rs` is the default, embedded implementation; `redis.rs` lets several nodes share one
//! Redis behind the same trait. The room and realtime logic never see which one runs.

pub mod legacy_journals;
pub mod pacing;
pub mod ranges;
pub mod redb;
pub mod redis;

use async_trait::async_trait;

/// Document namespaces. Keys inside a namespace are the owner's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Generated secrets and other process-wide settings.
    Meta,
    /// Room definitions (JSON owned by `room::model`).
    Rooms,
    /// Pusher apps created through the API (JSON owned by `realtime::app`).
    Apps,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Rooms => "rooms",
            Table::Apps => "apps",
        }
    }
}

/// A room's durable queue position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// The highest ticket issued so far (0 = none yet). Tickets start at 1.
    pub last_ticket: u64,
    /// Tickets at or below this number are admitted.
    pub serving: u64,
    /// Tickets `a + 1 ..= b` that a crash left reserved but perhaps never handed out
    /// ([`ranges`]): admitted only once a holder shows up. `(0, 0)`: none.
    pub unclaimed: (u64, u64),
}

/// One room's admission step, as persisted by [`Store::record_admissions`].
#[derive(Debug, Clone, Default)]
pub struct AdmissionRecord {
    pub room: String,
    pub serving: u64,
    pub skipped: Vec<u64>,
    pub unskipped: Vec<u64>,
    /// Tickets with an active session, when they changed.
    pub sessions: Option<Vec<u64>>,
}

/// Who may write an admission batch in a cluster: the batch is written only while the Redis key
/// `key` names `holder` (the admission lease, `cluster::lease`), in the same atomic step. A leader
/// that lost its lease without noticing yet (stalled past the lease's margin, cut off from Redis
/// while its successor took over) thus cannot admit beside the next one. A store of one node
/// has no lease to check and ignores it.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    pub key: &'a str,
    pub holder: &'a str,
}

/// Meta-table key of a room's persisted pre-queue order.
pub fn order_key(room: &str) -> String {
    format!("order/{room}")
}

/// Meta-table key of a room's active sessions.
pub fn sessions_key(room: &str) -> String {
    format!("sessions/{room}")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("storage is shutting down")]
    Closed,
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    /// An admission batch refused by its [`Fence`]: this node no longer holds the lease.
    #[error("admissions refused: this node no longer holds the admission lease")]
    Fenced,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Inserts only when `key` is absent; returns `false` if it already existed.
    async fn insert_new(&self, table: Table, key: &str, value: Vec<u8>) -> Result<bool, StoreError>;
    /// Returns whether the key existed.
    async fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError>;
    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Issues the next ticket of `room` (1, 2, 3, …). Returns only once the number is durably
    /// taken: after a crash numbering resumes above it, so it is never issued twice.
    async fn issue_ticket(&self, room: &str) -> Result<u64, StoreError>;
    /// The next ticket of `room` if it can be issued without waiting (a store that reserves
    /// numbers ahead, `ranges`); `None`: call [`issue_ticket`](Store::issue_ticket).
    fn try_issue_ticket(&self, _room: &str) -> Option<u64> {
        None
    }
    async fn counters(&self, room: &str) -> Result<QueueCounters, StoreError>;
    /// Records admission steps of several rooms in one durable write: each raises its room's
    /// serving counter (never lowers it, never past the last issued ticket), adds skipped
    /// tickets, removes re-admitted ones and replaces the active-session list. Refused with
    /// [`StoreError::Fenced`], writing nothing, if `fence` no longer holds.
    async fn record_admissions(&self, records: &[AdmissionRecord], fence: Option<Fence<'_>>) -> Result<(), StoreError>;
    /// Tickets of `room` currently skipped (their turn passed while they were away).
    async fn skipped(&self, room: &str) -> Result<Vec<u64>, StoreError>;
    /// Removes a room's counters, tickets, skips and admission documents.
    async fn delete_queue(&self, room: &str) -> Result<(), StoreError>;

    /// Whether the store can serve requests now.
    fn is_ready(&self) -> bool;
    /// Asks the backend whether it answers again (after [`is_ready`](Store::is_ready) turned
    /// false); `/readyz` calls it, so a node that no request touches still recovers.
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Makes everything acknowledged so far durable and stops background writers.
    async fn close(&self) -> Result<(), StoreError>;
}
