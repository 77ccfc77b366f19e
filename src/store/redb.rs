//! Embedded, crash-safe store on [redb](https://docs.rs/redb): one file in the data directory.
//!
//! Every write goes through one writer thread that drains whatever is queued (up to
//! `MAX_BATCH` operations) into one durable step: new tickets are appended to their room's
//! journal (`ticket_log`, one `fdatasync` per room), everything else goes into a single redb
//! write transaction committed with an fsync — group commit. Under load hundreds of tickets
//! share one sync; idle, a single ticket pays one. When a batch is committed is the
//! [`pacing`] module's call: once the runtime has nothing more to hand over.
//! Callers wait on a oneshot, so a response is sent only after its data is durable. Reads use redb's MVCC read transactions (or read the
//! immutable journal records) and never wait for the writer.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::pacing::{self, CommitPacer};
use super::ticket_log::{self, LastTickets, TicketLogs};
use super::{order_key, sessions_key, AdmissionRecord, QueueCounters, Store, StoreError, Table, TicketEntry};

const DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
const COUNTERS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counters");
/// Tickets issued before the journals existed (read-only now; see `ticket_log`).
const TICKETS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("tickets");
const SKIPPED: TableDefinition<(&str, u64), ()> = TableDefinition::new("skipped");

/// redb's page cache (its default is 1 GiB): tickets are written once and rarely read back, so
/// a small cache keeps a million queued visitors within a few hundred bytes of RSS each.
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
    IssueTicket { room: String, entry: TicketEntry, reply: Reply<u64> },
    RecordAdmissions { records: Vec<AdmissionRecord>, reply: Reply<()> },
    DeleteQueue { room: String, reply: Reply<()> },
    Close { reply: Reply<()> },
    /// A taken-out op's place while a batch is partitioned.
    Noop,
}

pub struct RedbStore {
    db: Arc<Database>,
    tickets_dir: std::path::PathBuf,
    /// Durable last ticket per room with a journal, kept by the writer.
    last_tickets: LastTickets,
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
        txn.commit().map_err(backend)?;
        let db = Arc::new(db);
        let tickets_dir = dir.join("tickets");
        let (mut logs, last_tickets) = TicketLogs::open(tickets_dir.clone())?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let open = Arc::new(AtomicBool::new(true));
        let writer_db = db.clone();
        let writer_pacer = pacer.clone();
        let handle = std::thread::Builder::new()
            .name("weir-store-writer".into())
            .spawn(move || writer_loop(&writer_db, &mut logs, rx, writer_pacer.as_deref()))
            .map_err(backend)?;
        let queue_depth = metrics::gauge!("weir_store_write_queue_depth");
        Ok(Self { db, tickets_dir, last_tickets, writer: tx, queue_depth, open, pacer, writer_thread: parking_lot::Mutex::new(Some(handle)) })
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

fn decode_entry(bytes: &[u8]) -> Result<TicketEntry, StoreError> {
    if bytes.len() != 24 {
        return Err(StoreError::Corrupt(format!("ticket entry of {} bytes", bytes.len())));
    }
    let mut visitor = [0u8; 16];
    visitor.copy_from_slice(&bytes[..16]);
    let mut at = [0u8; 8];
    at.copy_from_slice(&bytes[16..]);
    Ok(TicketEntry { visitor, entered_at_ms: i64::from_le_bytes(at) })
}

fn writer_loop(db: &Database, logs: &mut TicketLogs, mut rx: mpsc::Receiver<WriteOp>, pacer: Option<&CommitPacer>) {
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
        apply_batch(db, logs, &mut batch);
        if closing {
            rx.close();
        }
    }
}

/// Replies deferred until commit: each closure sends its op's answer, or the commit error.
type Deferred = Box<dyn FnOnce(Result<(), StoreError>)>;

/// The last ticket redb recorded for `room` (tickets from before its journal existed).
fn legacy_last_ticket(db: &Database, room: &str) -> Result<u64, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let counters = txn.open_table(COUNTERS).map_err(backend)?;
    Ok(counters.get(room).map_err(backend)?.map(|g| g.value().0).unwrap_or(0))
}

fn apply_batch(db: &Database, logs: &mut TicketLogs, batch: &mut Vec<WriteOp>) {
    // Tickets first: they only touch the journals, and a batch of nothing but tickets (the
    // flood) never opens a redb transaction.
    let mut ticket_replies: Vec<Deferred> = Vec::new();
    batch.retain_mut(|op| {
        let WriteOp::IssueTicket { room, entry, .. } = op else { return true };
        let outcome = logs.append(room, entry, || legacy_last_ticket(db, room));
        let WriteOp::IssueTicket { reply, .. } = std::mem::replace(op, WriteOp::Noop) else { return false };
        ticket_replies.push(defer(reply, outcome));
        false
    });
    if !ticket_replies.is_empty() {
        let committed = logs.commit();
        if let Err(e) = &committed {
            tracing::error!(error = %e, "ticket journal write failed");
        }
        for reply in ticket_replies {
            reply(committed.as_ref().map(|_| ()).map_err(|e| StoreError::Backend(e.to_string())));
        }
    }
    if batch.is_empty() {
        return;
    }
    let mut deferred: Vec<Deferred> = Vec::with_capacity(batch.len());
    let result = (|| -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(backend)?;
        {
            let mut docs = txn.open_table(DOCS).map_err(backend)?;
            let mut counters = txn.open_table(COUNTERS).map_err(backend)?;
            let mut tickets = txn.open_table(TICKETS).map_err(backend)?;
            let mut skipped = txn.open_table(SKIPPED).map_err(backend)?;
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
                    WriteOp::IssueTicket { reply, .. } => {
                        deferred.push(defer(reply, Err(StoreError::Backend("ticket left in a redb batch".into()))));
                    }
                    WriteOp::Noop => {}
                    WriteOp::RecordAdmissions { records, reply } => {
                        let r = records.iter().try_for_each(|rec| {
                            let room = rec.room.as_str();
                            let (last, serving) =
                                counters.get(room).map_err(backend)?.map(|g| g.value()).unwrap_or((0, 0));
                            let issued = last.max(logs.last_ticket(room).unwrap_or(0));
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
                            logs.delete(&room)?;
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
                    WriteOp::Close { reply } => deferred.push(defer(reply, Ok(()))),
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

    async fn issue_ticket(&self, room: &str, entry: TicketEntry) -> Result<u64, StoreError> {
        let room = room.to_string();
        self.write(|reply| WriteOp::IssueTicket { room, entry, reply }).await
    }

    async fn ticket(&self, room: &str, ticket: u64) -> Result<Option<TicketEntry>, StoreError> {
        let room = room.to_string();
        let dir = self.tickets_dir.clone();
        self.read(move |db| {
            if let Some(entry) = ticket_log::read(&dir, &room, ticket)? {
                return Ok(Some(entry));
            }
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(TICKETS).map_err(backend)?;
            match t.get((room.as_str(), ticket)).map_err(backend)? {
                Some(g) => Ok(Some(decode_entry(g.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn counters(&self, room: &str) -> Result<QueueCounters, StoreError> {
        let room = room.to_string();
        let last_tickets = self.last_tickets.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(COUNTERS).map_err(backend)?;
            let (last_ticket, serving) =
                t.get(room.as_str()).map_err(backend)?.map(|g| g.value()).unwrap_or((0, 0));
            let journal = last_tickets.read().get(&room).copied().unwrap_or(0);
            Ok(QueueCounters { last_ticket: last_ticket.max(journal), serving })
        })
        .await
    }

    async fn record_admissions(&self, records: &[AdmissionRecord]) -> Result<(), StoreError> {
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

    fn entry(n: u8) -> TicketEntry {
        TicketEntry { visitor: [n; 16], entered_at_ms: n as i64 }
    }

    #[tokio::test]
    async fn tickets_are_sequential_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            let mut handles = Vec::new();
            let store = Arc::new(store);
            for i in 0..50u8 {
                let s = store.clone();
                handles.push(tokio::spawn(async move { s.issue_ticket("a", entry(i)).await.unwrap() }));
            }
            let mut tickets: Vec<u64> = Vec::new();
            for h in handles {
                tickets.push(h.await.unwrap());
            }
            tickets.sort();
            assert_eq!(tickets, (1..=50).collect::<Vec<_>>());
            let rec = |serving| AdmissionRecord { room: "a".into(), serving, skipped: vec![3, 4], unskipped: vec![4], sessions: Some(vec![1, 2]) };
            store.record_admissions(&[rec(80)]).await.unwrap();
            store.record_admissions(&[rec(10)]).await.unwrap();
            assert_eq!(store.counters("a").await.unwrap().serving, 50, "never past the last ticket, never lowered");
            assert_eq!(store.skipped("a").await.unwrap(), vec![3]);
            store.close().await.unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(store.counters("a").await.unwrap(), QueueCounters { last_ticket: 50, serving: 50 });
        assert!(store.ticket("a", 7).await.unwrap().is_some());
        store.delete_queue("a").await.unwrap();
        assert_eq!(store.counters("a").await.unwrap(), QueueCounters::default());
        assert!(store.ticket("a", 7).await.unwrap().is_none());
        assert!(store.skipped("a").await.unwrap().is_empty());
        assert!(store.get(Table::Meta, &sessions_key("a")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_paced_writer_commits_when_the_batch_is_full_or_the_runtime_idles() {
        let dir = tempfile::tempdir().unwrap();
        let pacer = Arc::new(CommitPacer::new(3, std::time::Duration::from_secs(30)));
        let store = Arc::new(RedbStore::open_paced(dir.path(), Some(pacer.clone())).unwrap());
        let issue = |i: u8| {
            let s = store.clone();
            tokio::spawn(async move { s.issue_ticket("a", entry(i)).await.unwrap() })
        };
        let (first, second) = (issue(1), issue(2));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!first.is_finished() && !second.is_finished(), "no worker idle and the batch is not full");
        let third = issue(3);
        let mut tickets = vec![first.await.unwrap(), second.await.unwrap(), third.await.unwrap()];
        tickets.sort();
        assert_eq!(tickets, vec![1, 2, 3], "the third write fills the batch");
        let fourth = issue(4);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!fourth.is_finished());
        pacer.worker_parked();
        assert_eq!(fourth.await.unwrap(), 4, "an idle worker releases a partial batch");
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
