//! Embedded, crash-safe store on [redb](https://docs.rs/redb): one file in the data directory.
//!
//! Every write goes through one writer thread that drains whatever is queued (up to
//! `MAX_BATCH` operations) into one redb write transaction committed with an fsync — group
//! commit: under load hundreds of writes share one sync; idle, a single write pays one. When a
//! batch is committed is the [`pacing`] module's call: once the runtime has nothing more to hand
//! over. Callers wait on a oneshot, so a response is sent only after its data is durable.
//! Tickets are the exception that makes entry cheap: they come from ranges reserved ahead
//! through the same writer ([`ranges`](super::ranges)), so a new visitor waits for a commit only when a burst
//! outruns its room's range. Reads use redb's MVCC read transactions and never wait for the writer.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::pacing::{self, CommitPacer};
use super::legacy_journals;
use super::ranges::{Ranges, Reservation, RoomCounts, Take};
use super::{order_key, sessions_key, AdmissionRecord, Fence, QueueCounters, Store, StoreError, Table};

const DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
const COUNTERS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counters");
/// Per room: (tickets confirmed handed out, tickets reserved); see [`ranges`].
const RESERVED: TableDefinition<&str, (u64, u64)> = TableDefinition::new("reserved");
/// Per-visitor ticket records of early versions: never read, removed with their queue.
const TICKETS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("tickets");
const SKIPPED: TableDefinition<(&str, u64), ()> = TableDefinition::new("skipped");

/// redb's page cache (its default is 1 GiB): what is stored is small and mostly written, not read.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Most operations folded into one transaction; bounds the latency a batch adds to its first member.
const MAX_BATCH: usize = 2048;
/// Queued writes before callers wait; bounds memory when the disk is slower than arrivals.
const QUEUE_CAPACITY: usize = 8192;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum WriteOp {
    Put { table: Table, key: String, value: Vec<u8>, reply: Reply<()> },
    InsertNew { table: Table, key: String, value: Vec<u8>, reply: Reply<bool> },
    Delete { table: Table, key: String, reply: Reply<bool> },
    /// A ticket range; `reply` only when a caller waits for it (not when reserved ahead).
    Reserve { reservation: Reservation, reply: Option<Reply<()>> },
    RecordAdmissions { records: Vec<AdmissionRecord>, reply: Reply<()> },
    DeleteQueue { room: String, reply: Reply<()> },
    Close { reply: Reply<()> },
}

pub struct RedbStore {
    db: Arc<Database>,
    ranges: Arc<Ranges>,
    /// `weir_store_ticket_waits_total`: tickets that waited for their range's commit.
    ticket_waits: metrics::Counter,
    writer: mpsc::Sender<WriteOp>,
    /// `weir_store_write_queue_depth`, resolved once: every write sets it.
    queue_depth: metrics::Gauge,
    open: Arc<AtomicBool>,
    /// Told how many writes are queued, so a full batch need not wait for an idle runtime.
    pacer: Option<Arc<CommitPacer>>,
    /// Joined on close, so the database file is released when `close` returns.
    writer_thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) `dir/weir.redb` and starts the writer thread, pacing its commits with
    /// the process's [`pacing::installed`] pacer if there is one.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_paced(dir, pacing::installed())
    }

    /// [`open`](Self::open) with the given pacer (`None`: every batch is committed at once).
    pub fn open_paced(dir: &Path, pacer: Option<Arc<CommitPacer>>) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(dir.join("weir.redb")).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(DOCS).map_err(backend)?;
        txn.open_table(COUNTERS).map_err(backend)?;
        txn.open_table(TICKETS).map_err(backend)?;
        txn.open_table(SKIPPED).map_err(backend)?;
        let durable = migrate_counts(&txn, &dir.join("tickets"))?;
        txn.commit().map_err(backend)?;
        legacy_journals::remove(&dir.join("tickets"))?;
        let db = Arc::new(db);
        let ranges = Arc::new(Ranges::new(durable));
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let open = Arc::new(AtomicBool::new(true));
        let writer_db = db.clone();
        let writer_pacer = pacer.clone();
        let writer_ranges = ranges.clone();
        let handle = std::thread::Builder::new()
            .name("weir-store-writer".into())
            .spawn(move || writer_loop(&writer_db, &writer_ranges, rx, writer_pacer.as_deref()))
            .map_err(backend)?;
        let queue_depth = metrics::gauge!("weir_store_write_queue_depth");
        let ticket_waits = metrics::counter!("weir_store_ticket_waits_total");
        Ok(Self { db, ranges, ticket_waits, writer: tx, queue_depth, open, pacer, writer_thread: parking_lot::Mutex::new(Some(handle)) })
    }

    /// Sends a reservation made ahead of need, without waiting for it; if the writer's queue is
    /// full it is dropped (the range is told), and the next ticket asks again.
    fn reserve_ahead(&self, reservation: Reservation) {
        if let Err(e) = self.writer.try_send(WriteOp::Reserve { reservation, reply: None }) {
            let op = match e {
                mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op) => op,
            };
            if let WriteOp::Reserve { reservation, .. } = op {
                self.ranges.settle(&reservation, false);
            }
        }
    }

    async fn write<T>(&self, op: impl FnOnce(Reply<T>) -> WriteOp) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(op(reply)).await.map_err(|_| StoreError::Closed)?;
        let queued = QUEUE_CAPACITY - self.writer.capacity();
        self.queue_depth.set(queued as f64);
        if let Some(pacer) = &self.pacer {
            // The writer holds the batch's first write outside the queue.
            pacer.queued(queued + 1);
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(backend)?
    }
}

fn writer_loop(db: &Database, ranges: &Arc<Ranges>, mut rx: mpsc::Receiver<WriteOp>, pacer: Option<&CommitPacer>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let batch_size = metrics::histogram!("weir_store_batch_size");
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        if let Some(pacer) = pacer {
            pacer.wait(|| 1 + rx.len());
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        batch_size.record(batch.len() as f64);
        let closing = batch.iter().any(|op| matches!(op, WriteOp::Close { .. }));
        apply_batch(db, ranges, &mut batch);
        if closing {
            rx.close();
        }
    }
}

/// Replies deferred until commit: each closure sends its op's answer, or the commit error.
type Deferred = Box<dyn FnOnce(Result<(), StoreError>)>;

/// The rooms' durable `(confirmed, reserved)` ticket counts, with those of earlier versions
/// (redb's counters, then journals) folded in and recorded in `RESERVED`.
fn migrate_counts(txn: &redb::WriteTransaction, journals: &Path) -> Result<Vec<RoomCounts>, StoreError> {
    let mut counts = std::collections::HashMap::new();
    let mut reserved = txn.open_table(RESERVED).map_err(backend)?;
    for item in reserved.iter().map_err(backend)? {
        let (room, value) = item.map_err(backend)?;
        counts.insert(room.value().to_string(), value.value());
    }
    let mut legacy = legacy_journals::last_tickets(journals)?;
    for item in txn.open_table(COUNTERS).map_err(backend)?.iter().map_err(backend)? {
        let (room, value) = item.map_err(backend)?;
        legacy.push((room.value().to_string(), value.value().0));
    }
    for (room, last) in legacy.into_iter().filter(|(_, last)| *last > 0) {
        let (confirmed, upto) = counts.get(&room).copied().unwrap_or((0, 0));
        let merged = (confirmed.max(last), upto.max(last));
        if merged != (confirmed, upto) {
            reserved.insert(room.as_str(), merged).map_err(backend)?;
            counts.insert(room, merged);
        }
    }
    Ok(counts.into_iter().collect())
}

fn apply_batch(db: &Database, ranges: &Arc<Ranges>, batch: &mut Vec<WriteOp>) {
    let mut deferred: Vec<Deferred> = Vec::with_capacity(batch.len());
    let result = (|| -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(backend)?;
        {
            let mut docs = txn.open_table(DOCS).map_err(backend)?;
            let mut counters = txn.open_table(COUNTERS).map_err(backend)?;
            let mut tickets = txn.open_table(TICKETS).map_err(backend)?;
            let mut skipped = txn.open_table(SKIPPED).map_err(backend)?;
            let mut reserved = txn.open_table(RESERVED).map_err(backend)?;
            for op in batch.drain(..) {
                match op {
                    WriteOp::Put { table, key, value, reply } => {
                        let r = docs.insert((table.name(), key.as_str()), value.as_slice()).map(|_| ()).map_err(backend);
                        deferred.push(defer(reply, r));
                    }
                    WriteOp::InsertNew { table, key, value, reply } => {
                        let k = (table.name(), key.as_str());
                        let exists = docs.get(k).map(|g| g.is_some()).map_err(backend);
                        let r = match exists {
                            Ok(true) => Ok(false),
                            Ok(false) => docs.insert(k, value.as_slice()).map(|_| true).map_err(backend),
                            Err(e) => Err(e),
                        };
                        deferred.push(defer(reply, r));
                    }
                    WriteOp::Delete { table, key, reply } => {
                        let r = docs.remove((table.name(), key.as_str())).map(|old| old.is_some()).map_err(backend);
                        deferred.push(defer(reply, r));
                    }
                    WriteOp::Reserve { reservation, reply } => {
                        let r = if ranges.is_current(&reservation) {
                            let Reservation { room, confirmed, upto, .. } = &reservation;
                            reserved.insert(room.as_str(), (*confirmed, *upto)).map(|_| ()).map_err(backend)
                        } else {
                            Ok(())
                        };
                        let ranges = ranges.clone();
                        deferred.push(Box::new(move |commit: Result<(), StoreError>| {
                            let outcome = commit.and(r);
                            // The range learns first, so a caller woken by the reply finds its tickets.
                            ranges.settle(&reservation, outcome.is_ok());
                            if let Some(reply) = reply {
                                let _ = reply.send(outcome);
                            }
                        }));
                    }
                    WriteOp::RecordAdmissions { records, reply } => {
                        let r = records.iter().try_for_each(|rec| {
                            let room = rec.room.as_str();
                            let (last, serving) =
                                counters.get(room).map_err(backend)?.map(|g| g.value()).unwrap_or((0, 0));
                            let issued = last.max(ranges.issued(room));
                            let next = serving.max(rec.serving.min(issued));
                            if next != serving {
                                counters.insert(room, (last, next)).map_err(backend)?;
                            }
                            for t in &rec.skipped {
                                skipped.insert((room, *t), ()).map_err(backend)?;
                            }
                            for t in &rec.unskipped {
                                skipped.remove((room, *t)).map_err(backend)?;
                            }
                            if let Some(sessions) = &rec.sessions {
                                let bytes: Vec<u8> = sessions.iter().flat_map(|t| t.to_le_bytes()).collect();
                                docs.insert((Table::Meta.name(), sessions_key(room).as_str()), bytes.as_slice())
                                    .map_err(backend)?;
                            }
                            Ok::<(), StoreError>(())
                        });
                        deferred.push(defer(reply, r));
                    }
                    WriteOp::DeleteQueue { room, reply } => {
                        let r = (|| {
                            ranges.forget(&room);
                            reserved.remove(room.as_str()).map_err(backend)?;
                            counters.remove(room.as_str()).map_err(backend)?;
                            skipped
                                .retain_in((room.as_str(), 0)..=(room.as_str(), u64::MAX), |_, _| false)
                                .map_err(backend)?;
                            for key in [order_key(&room), sessions_key(&room)] {
                                docs.remove((Table::Meta.name(), key.as_str())).map_err(backend)?;
                            }
                            tickets
                                .retain_in((room.as_str(), 0)..=(room.as_str(), u64::MAX), |_, _| false)
                                .map_err(backend)?;
                            Ok(())
                        })();
                        deferred.push(defer(reply, r));
                    }
                    WriteOp::Close { reply } => {
                        // Exact counts: a clean restart has no unclaimed tickets.
                        let r = ranges.seal().into_iter().try_for_each(|(room, issued)| {
                            reserved.insert(room.as_str(), (issued, issued)).map(|_| ()).map_err(backend)
                        });
                        deferred.push(defer(reply, r));
                    }
                }
            }
        }
        txn.commit().map_err(backend)
    })();
    if let Err(e) = &result {
        tracing::error!(error = %e, "store batch failed");
    }
    for reply in deferred {
        reply(result.as_ref().map(|_| ()).map_err(|e| StoreError::Backend(e.to_string())));
    }
    batch.clear();
}

fn defer<T: Send + 'static>(reply: Reply<T>, outcome: Result<T, StoreError>) -> Deferred {
    Box::new(move |commit: Result<(), StoreError>| {
        let _ = reply.send(commit.and(outcome));
    })
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let docs = txn.open_table(DOCS).map_err(backend)?;
            Ok(docs.get((table.name(), key.as_str())).map_err(backend)?.map(|g| g.value().to_vec()))
        })
        .await
    }

    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_string();
        self.write(|reply| WriteOp::Put { table, key, value, reply }).await
    }

    async fn insert_new(&self, table: Table, key: &str, value: Vec<u8>) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.write(|reply| WriteOp::InsertNew { table, key, value, reply }).await
    }

    async fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.write(|reply| WriteOp::Delete { table, key, reply }).await
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let docs = txn.open_table(DOCS).map_err(backend)?;
            let mut out = Vec::new();
            for item in docs.range((table.name(), "")..).map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let (t, key) = k.value();
                if t != table.name() {
                    break;
                }
                out.push((key.to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    fn try_issue_ticket(&self, room: &str) -> Option<u64> {
        let (ticket, ahead) = self.ranges.try_take(room)?;
        if let Some(reservation) = ahead {
            self.reserve_ahead(reservation);
        }
        Some(ticket)
    }

    async fn issue_ticket(&self, room: &str) -> Result<u64, StoreError> {
        loop {
            match self.ranges.take(room) {
                Take::Ticket(ticket, ahead) => {
                    if let Some(reservation) = ahead {
                        self.reserve_ahead(reservation);
                    }
                    return Ok(ticket);
                }
                Take::Wait(done, own) => {
                    self.ticket_waits.increment(1);
                    match own {
                        Some(reservation) => self.write(|reply| WriteOp::Reserve { reservation, reply: Some(reply) }).await?,
                        None => done.await,
                    }
                }
                Take::Closed => return Err(StoreError::Closed),
            }
        }
    }

    async fn counters(&self, room: &str) -> Result<QueueCounters, StoreError> {
        let room = room.to_string();
        let ranges = self.ranges.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(COUNTERS).map_err(backend)?;
            let (legacy_last, serving) =
                t.get(room.as_str()).map_err(backend)?.map(|g| g.value()).unwrap_or((0, 0));
            Ok(QueueCounters { last_ticket: legacy_last.max(ranges.issued(&room)), serving, unclaimed: ranges.unclaimed(&room) })
        })
        .await
    }

    /// One node and no lease: the fence has nothing to check.
    async fn record_admissions(&self, records: &[AdmissionRecord], _fence: Option<Fence<'_>>) -> Result<(), StoreError> {
        let records = records.to_vec();
        self.write(|reply| WriteOp::RecordAdmissions { records, reply }).await
    }

    async fn skipped(&self, room: &str) -> Result<Vec<u64>, StoreError> {
        let room = room.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(SKIPPED).map_err(backend)?;
            let mut out = Vec::new();
            for item in t.range((room.as_str(), 0)..=(room.as_str(), u64::MAX)).map_err(backend)? {
                out.push(item.map_err(backend)?.0.value().1);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_queue(&self, room: &str) -> Result<(), StoreError> {
        let room = room.to_string();
        self.write(|reply| WriteOp::DeleteQueue { room, reply }).await
    }

    fn is_ready(&self) -> bool {
        self.open.load(Ordering::Relaxed) && !self.writer.is_closed()
    }

    async fn close(&self) -> Result<(), StoreError> {
        let result = self.write(|reply| WriteOp::Close { reply }).await;
        self.open.store(false, Ordering::Relaxed);
        let handle = self.writer_thread.lock().take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl RedbStore {
        /// Stops like a crash: the writer ends without recording exact counts.
        fn crash(self) {
            let handle = self.writer_thread.lock().take();
            drop(self);
            handle.unwrap().join().unwrap();
        }
    }

    async fn issue_many(store: &Arc<RedbStore>, room: &'static str, n: usize) -> Vec<u64> {
        let handles: Vec<_> = (0..n).map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.issue_ticket(room).await.unwrap() })
        }).collect();
        let mut tickets = Vec::new();
        for h in handles {
            tickets.push(h.await.unwrap());
        }
        tickets.sort();
        tickets
    }

    #[tokio::test]
    async fn tickets_are_sequential_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(RedbStore::open(dir.path()).unwrap());
            assert_eq!(issue_many(&store, "a", 500).await, (1..=500).collect::<Vec<_>>(), "concurrent entries, no gaps");
            let rec = |serving| AdmissionRecord { room: "a".into(), serving, skipped: vec![3, 4], unskipped: vec![4], sessions: Some(vec![1, 2]) };
            store.record_admissions(&[rec(800)], None).await.unwrap();
            store.record_admissions(&[rec(10)], None).await.unwrap();
            assert_eq!(store.counters("a").await.unwrap().serving, 500, "never past the last ticket, never lowered");
            assert_eq!(store.skipped("a").await.unwrap(), vec![3]);
            store.close().await.unwrap();
            assert!(matches!(store.issue_ticket("a").await, Err(StoreError::Closed)));
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let clean = QueueCounters { last_ticket: 500, serving: 500, unclaimed: (0, 0) };
        assert_eq!(store.counters("a").await.unwrap(), clean, "a clean shutdown leaves exact counts");
        assert_eq!(store.issue_ticket("a").await.unwrap(), 501);
        store.delete_queue("a").await.unwrap();
        assert_eq!(store.counters("a").await.unwrap(), QueueCounters::default());
        assert!(store.skipped("a").await.unwrap().is_empty());
        assert!(store.get(Table::Meta, &sessions_key("a")).await.unwrap().is_none());
        assert_eq!(store.issue_ticket("a").await.unwrap(), 1, "a deleted queue starts again");
    }

    #[tokio::test]
    async fn after_a_crash_numbering_resumes_above_every_reserved_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let taken = issue_many(&store, "a", 10).await;
        assert_eq!(taken.last(), Some(&10));
        Arc::into_inner(store).unwrap().crash();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let counters = store.counters("a").await.unwrap();
        let reserved = counters.last_ticket;
        assert!(reserved >= 10, "every handed-out ticket is covered: {counters:?}");
        assert_eq!(counters.unclaimed, (0, reserved), "nothing was confirmed before the crash");
        assert_eq!(store.issue_ticket("a").await.unwrap(), reserved + 1, "never issued twice");
        // Tickets taken past half a range reserve the next one ahead, confirming those before.
        let more = issue_many(&store, "a", 200).await;
        Arc::into_inner(store).unwrap().crash();
        let store = RedbStore::open(dir.path()).unwrap();
        let counters = store.counters("a").await.unwrap();
        assert!(counters.last_ticket >= *more.last().unwrap());
        assert!(counters.unclaimed.0 > reserved, "the reservations ahead confirmed tickets: {counters:?}");
        assert_eq!(counters.unclaimed.1, counters.last_ticket);
    }

    #[tokio::test]
    async fn counts_of_earlier_versions_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        legacy_journals::write_for_test(&dir.path().join("tickets"), "old", 0, 7, &[0; 64]);
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(!dir.path().join("tickets").exists(), "journals are removed once migrated");
        assert_eq!(store.counters("old").await.unwrap(), QueueCounters { last_ticket: 7, serving: 0, unclaimed: (0, 0) });
        assert_eq!(store.issue_ticket("old").await.unwrap(), 8);
        store.crash();
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(store.counters("old").await.unwrap().last_ticket >= 8, "the migrated count stays durable");
    }

    #[tokio::test]
    async fn a_paced_writer_commits_when_the_batch_is_full_or_the_runtime_idles() {
        let dir = tempfile::tempdir().unwrap();
        let pacer = Arc::new(CommitPacer::new(3, std::time::Duration::from_secs(30)));
        let store = Arc::new(RedbStore::open_paced(dir.path(), Some(pacer.clone())).unwrap());
        let put = |i: u8| {
            let s = store.clone();
            tokio::spawn(async move { s.put(Table::Meta, &format!("k{i}"), vec![i]).await.unwrap() })
        };
        let (first, second) = (put(1), put(2));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!first.is_finished() && !second.is_finished(), "no worker idle and the batch is not full");
        let third = put(3);
        first.await.unwrap();
        second.await.unwrap();
        third.await.unwrap();
        let fourth = put(4);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!fourth.is_finished());
        pacer.worker_parked();
        fourth.await.unwrap();
        assert_eq!(store.get(Table::Meta, "k4").await.unwrap(), Some(vec![4]), "an idle worker releases a partial batch");
    }

    #[tokio::test]
    async fn documents_by_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(store.insert_new(Table::Rooms, "x", b"1".to_vec()).await.unwrap());
        assert!(!store.insert_new(Table::Rooms, "x", b"2".to_vec()).await.unwrap());
        store.put(Table::Apps, "x", b"app".to_vec()).await.unwrap();
        store.put(Table::Rooms, "y", b"3".to_vec()).await.unwrap();
        let rooms = store.list(Table::Rooms).await.unwrap();
        assert_eq!(rooms, vec![("x".into(), b"1".to_vec()), ("y".into(), b"3".to_vec())]);
        assert_eq!(store.get(Table::Apps, "x").await.unwrap(), Some(b"app".to_vec()));
        assert!(store.delete(Table::Rooms, "x").await.unwrap());
        assert!(!store.delete(Table::Rooms, "x").await.unwrap());
    }
}
