//! Shared store on Redis 7, so that several weir nodes serve the same rooms, apps, secrets,
//! tickets and admission counters. It mirrors [`RedbStore`](super::redb::RedbStore) method for
//! method; the room and realtime logic cannot tell them apart.
//!
//! Key layout (`{p}` is the configured prefix):
//! - `{p}:doc:{table}`: one hash per [`Table`]; field = document key, value = its bytes.
//! - `{p}:q:{room}`: a room's queue counters, hash fields `last` (highest ticket issued) and
//!   `serving`.
//! - `{p}:q:{room}:skipped`: set of the room's skipped tickets (decimal strings).
//!
//! Room ids match `[a-z0-9][a-z0-9-]{0,63}` (`room::model`), so no room's queue hash can be
//! mistaken for another room's `:skipped` set.
//!
//! Why each operation is atomic across nodes: every document operation and ticket is one
//! single-key command (HSET, HSETNX, HDEL, HINCRBY), which Redis runs alone. An admission batch
//! reads `last` and `serving` and writes depending on them, so it runs as one Lua script: no
//! ticket issued, and no other node's admission recorded, between the read and the write.
//! Deleting a queue touches three keys and runs in one MULTI/EXEC.
//!
//! Redis has no reserved ticket ranges, so `unclaimed` is always `(0, 0)` and every ticket is
//! one round trip (`try_issue_ticket` keeps the trait's `None`).
//!
//! Each call waits at most `CALL_TIMEOUT` (2 s); a failed call drops the connection and the next
//! call opens a new one, so a restarted Redis is picked up without restarting weir.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use super::{order_key, sessions_key, AdmissionRecord, Fence, QueueCounters, Store, StoreError, Table};

/// Longest wait for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for any one Redis call, and for a reconnection before one.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// One admission batch. KEYS[1]: the Meta document hash; record `i` (1-based) has its queue hash
/// at KEYS[2i] and skipped set at KEYS[2i+1], its fields in the JSON array ARGV[1] and, when it
/// has a session list, the list's stored bytes at ARGV[2+i]. With a fence, ARGV[2] is its holder
/// and the last key its lease key: the batch is written only while the lease names the holder
/// (returns -1 and writes nothing otherwise). ARGV[2] is empty without a fence.
///
/// Tickets travel as decimal strings and `serving` is written back as one of the strings it was
/// read from, so no value goes through Lua's `%.14g` number formatting.
const ADMISSIONS_SCRIPT: &str = r"
local holder = ARGV[2]
if holder ~= '' and redis.call('GET', KEYS[#KEYS]) ~= holder then
  return -1
end
local records = cjson.decode(ARGV[1])
local function in_chunks(command, key, members)
  -- unpack is bounded by Lua's C stack (about 8000 values).
  for i = 1, #members, 1000 do
    redis.call(command, key, unpack(members, i, math.min(i + 999, #members)))
  end
end
for i, rec in ipairs(records) do
  local queue, skipped = KEYS[2 * i], KEYS[2 * i + 1]
  local current = redis.call('HMGET', queue, 'last', 'serving')
  local last = tonumber(current[1]) or 0
  local serving = tonumber(current[2]) or 0
  local next_str, next_num = rec.serving, tonumber(rec.serving)
  if next_num > last then
    next_str, next_num = current[1], last
  end
  if next_num > serving then
    redis.call('HSET', queue, 'serving', next_str)
  end
  in_chunks('SADD', skipped, rec.skipped)
  in_chunks('SREM', skipped, rec.unskipped)
  if rec.sessions then
    redis.call('HSET', KEYS[1], rec.sessions_key, ARGV[2 + i])
  end
end
return 0
";

#[derive(Serialize)]
struct ScriptRecord<'a> {
    serving: String,
    skipped: Vec<String>,
    unskipped: Vec<String>,
    sessions: bool,
    sessions_key: &'a str,
}

/// The command connection and its generation: a failure drops the connection only if no other
/// call has replaced it meanwhile.
type Slot = Option<(u64, MultiplexedConnection)>;

pub struct RedisStore {
    prefix: String,
    client: redis::Client,
    connection: tokio::sync::Mutex<Slot>,
    generation: AtomicU64,
    admissions: redis::Script,
    /// Whether the last call (or connection attempt) succeeded.
    ready: AtomicBool,
    closed: AtomicBool,
}

/// Opens a multiplexed connection. redis-rs's own defaults (1 s to connect, 500 ms per
/// response) would cut the store's timeouts short, so connecting gets `timeout` and responses are
/// bounded only by the store's [`CALL_TIMEOUT`].
async fn open(client: &redis::Client, timeout: Duration) -> redis::RedisResult<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(None);
    client.get_multiplexed_async_connection_with_config(&config).await
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedisStore {
    /// Connects to `url` (`redis://…`); every key starts with `prefix`, so several deployments
    /// can share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = crate::outbound::redis_client(url).map_err(backend)?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, open(&client, CONNECT_TIMEOUT))
            .await
            .map_err(|_| backend(format!("Redis did not answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(backend)?;
        Ok(Self {
            prefix: prefix.into(),
            client,
            connection: tokio::sync::Mutex::new(Some((0, connection))),
            generation: AtomicU64::new(1),
            admissions: redis::Script::new(ADMISSIONS_SCRIPT),
            ready: AtomicBool::new(true),
            closed: AtomicBool::new(false),
        })
    }

    fn doc_key(&self, table: Table) -> String {
        format!("{}:doc:{}", self.prefix, table.name())
    }

    fn queue_key(&self, room: &str) -> String {
        format!("{}:q:{room}", self.prefix)
    }

    fn skipped_key(&self, room: &str) -> String {
        format!("{}:q:{room}:skipped", self.prefix)
    }

    /// The shared connection, opened on first use and after a failure.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let mut slot = self.connection.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let opened = match tokio::time::timeout(CALL_TIMEOUT, open(&self.client, CALL_TIMEOUT)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.failed(backend(e))),
            Err(_) => return Err(self.failed(backend(format!("Redis did not answer within {CALL_TIMEOUT:?}")))),
        };
        let c = (self.generation.fetch_add(1, Ordering::Relaxed), opened);
        *slot = Some(c.clone());
        Ok(c)
    }

    fn failed(&self, e: StoreError) -> StoreError {
        self.ready.store(false, Ordering::Release);
        tracing::warn!(error = %e, "Redis store call failed");
        e
    }

    /// Runs one command on the shared connection (see [`run`](Self::run)).
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.run(|mut c| async move { cmd.query_async(&mut c).await }).await
    }

    /// Runs one call on the shared connection with the call timeout; a failure drops that
    /// connection, so the next call opens a fresh one. A call that found its connection already
    /// dropped (Redis restarted since the last call) never reached Redis: it is tried once more
    /// on a fresh connection instead of failing a request that Redis can serve.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match self.attempt(&f).await {
            Err(Attempt::Dropped(_)) => self.attempt(&f).await.map_err(Attempt::into_error),
            other => other.map_err(Attempt::into_error),
        }
    }

    async fn attempt<T, F, Fut>(&self, f: &F) -> Result<T, Attempt>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let (generation, c) = self.connection().await.map_err(Attempt::Failed)?;
        let (dropped, error) = match tokio::time::timeout(CALL_TIMEOUT, f(c)).await {
            Ok(Ok(v)) => {
                self.ready.store(true, Ordering::Release);
                return Ok(v);
            }
            Ok(Err(e)) => (e.is_connection_dropped(), backend(e)),
            Err(_) => (false, backend(format!("Redis did not answer within {CALL_TIMEOUT:?}"))),
        };
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
        drop(slot);
        let error = self.failed(error);
        Err(if dropped { Attempt::Dropped(error) } else { Attempt::Failed(error) })
    }
}

/// How a call failed: on a connection found dropped (worth one more try), or otherwise.
enum Attempt {
    Dropped(StoreError),
    Failed(StoreError),
}

impl Attempt {
    fn into_error(self) -> StoreError {
        match self {
            Attempt::Dropped(e) | Attempt::Failed(e) => e,
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let hash = self.doc_key(table);
        self.query(redis::cmd("HGET").arg(hash).arg(key)).await
    }

    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let hash = self.doc_key(table);
        self.query::<u64>(redis::cmd("HSET").arg(hash).arg(key).arg(value)).await.map(|_| ())
    }

    async fn insert_new(&self, table: Table, key: &str, value: Vec<u8>) -> Result<bool, StoreError> {
        let hash = self.doc_key(table);
        self.query(redis::cmd("HSETNX").arg(hash).arg(key).arg(value)).await
    }

    async fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let hash = self.doc_key(table);
        self.query(redis::cmd("HDEL").arg(hash).arg(key)).await
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let hash = self.doc_key(table);
        // Sorted by key, as redb's range scan returns them.
        let docs: BTreeMap<String, Vec<u8>> =
            self.query(redis::cmd("HGETALL").arg(hash)).await?;
        Ok(docs.into_iter().collect())
    }

    async fn issue_ticket(&self, room: &str) -> Result<u64, StoreError> {
        let queue = self.queue_key(room);
        self.query(redis::cmd("HINCRBY").arg(queue).arg("last").arg(1)).await
    }

    async fn counters(&self, room: &str) -> Result<QueueCounters, StoreError> {
        let queue = self.queue_key(room);
        let (last, serving): (Option<u64>, Option<u64>) = self
            .query(redis::cmd("HMGET").arg(queue).arg("last").arg("serving"))
            .await?;
        Ok(QueueCounters { last_ticket: last.unwrap_or(0), serving: serving.unwrap_or(0), unclaimed: (0, 0) })
    }

    async fn record_admissions(&self, records: &[AdmissionRecord], fence: Option<Fence<'_>>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = records.iter().map(|rec| sessions_key(&rec.room)).collect();
        let fields: Vec<ScriptRecord<'_>> = records
            .iter()
            .zip(&keys)
            .map(|(rec, key)| ScriptRecord {
                serving: rec.serving.to_string(),
                skipped: rec.skipped.iter().map(u64::to_string).collect(),
                unskipped: rec.unskipped.iter().map(u64::to_string).collect(),
                sessions: rec.sessions.is_some(),
                sessions_key: key,
            })
            .collect();
        let json = serde_json::to_string(&fields).map_err(backend)?;
        let mut invocation = self.admissions.key(self.doc_key(Table::Meta));
        for rec in records {
            invocation.key(self.queue_key(&rec.room)).key(self.skipped_key(&rec.room));
        }
        if let Some(fence) = fence {
            invocation.key(fence.key);
        }
        invocation.arg(json).arg(fence.map_or("", |f| f.holder));
        for rec in records {
            // The encoding RedbStore writes and `room` reads: each ticket as 8 little-endian bytes.
            let bytes: Vec<u8> = rec.sessions.iter().flatten().flat_map(|t| t.to_le_bytes()).collect();
            invocation.arg(bytes);
        }
        let invocation = &invocation;
        match self.run(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await }).await? {
            -1 => Err(StoreError::Fenced),
            _ => Ok(()),
        }
    }

    async fn skipped(&self, room: &str) -> Result<Vec<u64>, StoreError> {
        let set = self.skipped_key(room);
        let mut tickets: Vec<u64> =
            self.query(redis::cmd("SMEMBERS").arg(set)).await?;
        tickets.sort_unstable();
        Ok(tickets)
    }

    async fn delete_queue(&self, room: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL").arg(self.queue_key(room)).arg(self.skipped_key(room)).ignore()
            .cmd("HDEL").arg(self.doc_key(Table::Meta)).arg(order_key(room)).arg(sessions_key(room)).ignore();
        let pipe = &pipe;
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await }).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.query::<()>(&redis::cmd("PING")).await
    }

    fn is_ready(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.ready.load(Ordering::Acquire)
    }

    /// Nothing to flush: every acknowledged call is already in Redis, which owns durability.
    /// With `appendonly yes` and `appendfsync everysec`, a Redis crash loses at most the last
    /// second of writes (`appendfsync always` loses none, at a cost per write). Later calls fail
    /// with [`StoreError::Closed`], as on the embedded store.
    async fn close(&self) -> Result<(), StoreError> {
        self.closed.store(true, Ordering::Release);
        *self.connection.lock().await = None;
        Ok(())
    }
}

// The integration tests' throwaway `redis-server`, shared rather than written twice.
#[cfg(test)]
#[path = "../../tests/support/redis.rs"]
pub(crate) mod redis_server;

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;

    use super::*;
    use super::redis_server::Redis;

    async fn store(redis: &Redis) -> RedisStore {
        RedisStore::connect(&redis.url(), "test").await.unwrap()
    }

    #[tokio::test]
    async fn documents_by_table() {
        let redis = Redis::start();
        let store = store(&redis).await;
        assert!(store.insert_new(Table::Rooms, "x", b"1".to_vec()).await.unwrap());
        assert!(!store.insert_new(Table::Rooms, "x", b"2".to_vec()).await.unwrap());
        store.put(Table::Apps, "x", b"app".to_vec()).await.unwrap();
        store.put(Table::Rooms, "y", b"3".to_vec()).await.unwrap();
        store.put(Table::Rooms, "a", vec![0, 255, 1]).await.unwrap();
        let rooms = store.list(Table::Rooms).await.unwrap();
        assert_eq!(rooms, vec![("a".into(), vec![0, 255, 1]), ("x".into(), b"1".to_vec()), ("y".into(), b"3".to_vec())]);
        assert_eq!(store.list(Table::Apps).await.unwrap(), vec![("x".into(), b"app".to_vec())]);
        assert!(store.list(Table::Meta).await.unwrap().is_empty());
        assert_eq!(store.get(Table::Apps, "x").await.unwrap(), Some(b"app".to_vec()));
        assert_eq!(store.get(Table::Meta, "x").await.unwrap(), None, "tables are separate");
        store.put(Table::Rooms, "y", b"4".to_vec()).await.unwrap();
        assert_eq!(store.get(Table::Rooms, "y").await.unwrap(), Some(b"4".to_vec()));
        assert!(store.delete(Table::Rooms, "x").await.unwrap());
        assert!(!store.delete(Table::Rooms, "x").await.unwrap());
        assert_eq!(store.get(Table::Rooms, "x").await.unwrap(), None);
        assert_eq!(store.get(Table::Apps, "x").await.unwrap(), Some(b"app".to_vec()), "deleting in one table keeps the other");
        let other = RedisStore::connect(&redis.url(), "other").await.unwrap();
        assert!(other.list(Table::Rooms).await.unwrap().is_empty(), "prefixes are separate");
    }

    #[tokio::test]
    async fn tickets_are_sequential_and_shared_between_stores() {
        let redis = Redis::start();
        let a = Arc::new(store(&redis).await);
        let b = Arc::new(store(&redis).await);
        assert_eq!(a.issue_ticket("r").await.unwrap(), 1);
        assert_eq!(b.issue_ticket("r").await.unwrap(), 2);
        assert_eq!(a.issue_ticket("other").await.unwrap(), 1, "rooms count separately");
        assert_eq!(a.try_issue_ticket("r"), None);
        let handles: Vec<_> = (0..400)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move { s.issue_ticket("r").await.unwrap() })
            })
            .collect();
        let mut tickets = Vec::new();
        for h in handles {
            tickets.push(h.await.unwrap());
        }
        tickets.sort_unstable();
        assert_eq!(tickets, (3..=402).collect::<Vec<_>>(), "concurrent tickets from two nodes: distinct, no gaps");
        assert_eq!(b.counters("r").await.unwrap(), QueueCounters { last_ticket: 402, serving: 0, unclaimed: (0, 0) });
        assert_eq!(a.counters("none").await.unwrap(), QueueCounters::default());
    }

    #[tokio::test]
    async fn admissions_raise_serving_within_the_issued_tickets() {
        let redis = Redis::start();
        let store = store(&redis).await;
        let rec = |room: &str, serving| AdmissionRecord { room: room.into(), serving, ..Default::default() };
        store.record_admissions(&[rec("empty", 5)], None).await.unwrap();
        assert_eq!(store.counters("empty").await.unwrap().serving, 0, "no ticket issued, none admitted");
        for _ in 0..10 {
            store.issue_ticket("a").await.unwrap();
        }
        for _ in 0..3 {
            store.issue_ticket("b").await.unwrap();
        }
        store.record_admissions(&[rec("a", 4), rec("b", 50)], None).await.unwrap();
        assert_eq!(store.counters("a").await.unwrap().serving, 4);
        assert_eq!(store.counters("b").await.unwrap().serving, 3, "never past the last ticket");
        store.record_admissions(&[rec("a", 2)], None).await.unwrap();
        assert_eq!(store.counters("a").await.unwrap().serving, 4, "never lowered");
        store.record_admissions(&[rec("a", 800)], None).await.unwrap();
        assert_eq!(store.counters("a").await.unwrap(), QueueCounters { last_ticket: 10, serving: 10, unclaimed: (0, 0) });
        store.record_admissions(&[], None).await.unwrap();
    }

    #[tokio::test]
    async fn fenced_admissions_land_only_while_the_lease_names_their_holder() {
        let redis = Redis::start();
        let store = store(&redis).await;
        for _ in 0..10 {
            store.issue_ticket("a").await.unwrap();
        }
        let rec = |serving| [AdmissionRecord { room: "a".into(), serving, skipped: vec![1], sessions: Some(vec![2]), ..Default::default() }];
        let fence = Fence { key: "test:lease:rooms", holder: "node-a" };
        let mut c = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let mut lease = async |holder: &str| redis::cmd("SET").arg(fence.key).arg(holder).query_async::<()>(&mut c).await.unwrap();
        assert!(matches!(store.record_admissions(&rec(3), Some(fence)).await, Err(StoreError::Fenced)), "nobody holds the lease");
        lease("node-b").await;
        assert!(matches!(store.record_admissions(&rec(3), Some(fence)).await, Err(StoreError::Fenced)), "another node holds it");
        assert_eq!(store.counters("a").await.unwrap().serving, 0, "a refused batch writes nothing");
        assert!(store.skipped("a").await.unwrap().is_empty());
        assert_eq!(store.get(Table::Meta, &sessions_key("a")).await.unwrap(), None);
        lease("node-a").await;
        store.record_admissions(&rec(3), Some(fence)).await.unwrap();
        assert_eq!(store.counters("a").await.unwrap().serving, 3);
        assert_eq!(store.skipped("a").await.unwrap(), vec![1]);
        store.record_admissions(&rec(5), None).await.unwrap();
        assert_eq!(store.counters("a").await.unwrap().serving, 5, "no fence, no check");
    }

    #[tokio::test]
    async fn admissions_record_skips_and_sessions() {
        let redis = Redis::start();
        let store = store(&redis).await;
        for _ in 0..20 {
            store.issue_ticket("a").await.unwrap();
        }
        let many: Vec<u64> = (100..2600).collect();
        let first = AdmissionRecord { room: "a".into(), serving: 9, skipped: vec![7, 3, 12, 4], unskipped: vec![], sessions: Some(vec![1, 2, 1 << 40]) };
        let second = AdmissionRecord { room: "b".into(), serving: 0, skipped: many.clone(), unskipped: vec![], sessions: None };
        store.record_admissions(&[first, second], None).await.unwrap();
        assert_eq!(store.skipped("a").await.unwrap(), vec![3, 4, 7, 12], "ascending");
        assert_eq!(store.skipped("b").await.unwrap(), many, "more than one Lua unpack's worth");
        let sessions = store.get(Table::Meta, &sessions_key("a")).await.unwrap().unwrap();
        let expected: Vec<u8> = [1u64, 2, 1 << 40].iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(sessions, expected, "RedbStore's encoding, under RedbStore's key");
        assert_eq!(store.get(Table::Meta, &sessions_key("b")).await.unwrap(), None, "no list, nothing written");

        let next = AdmissionRecord { room: "a".into(), serving: 9, skipped: vec![5], unskipped: vec![4, 12, 99], sessions: None };
        store.record_admissions(&[next], None).await.unwrap();
        assert_eq!(store.skipped("a").await.unwrap(), vec![3, 5, 7]);
        assert_eq!(store.get(Table::Meta, &sessions_key("a")).await.unwrap(), Some(expected), "kept when unchanged");
        let cleared = AdmissionRecord { room: "a".into(), serving: 9, sessions: Some(vec![]), ..Default::default() };
        store.record_admissions(&[cleared], None).await.unwrap();
        assert_eq!(store.get(Table::Meta, &sessions_key("a")).await.unwrap(), Some(vec![]), "an empty list replaces it");
    }

    #[tokio::test]
    async fn delete_queue_starts_the_room_again() {
        let redis = Redis::start();
        let store = store(&redis).await;
        for _ in 0..5 {
            store.issue_ticket("a").await.unwrap();
            store.issue_ticket("b").await.unwrap();
        }
        let rec = |room: &str| AdmissionRecord { room: room.into(), serving: 3, skipped: vec![2], unskipped: vec![], sessions: Some(vec![3]) };
        store.record_admissions(&[rec("a"), rec("b")], None).await.unwrap();
        store.put(Table::Meta, &order_key("a"), b"order".to_vec()).await.unwrap();
        store.put(Table::Meta, "secret", b"s".to_vec()).await.unwrap();
        store.delete_queue("a").await.unwrap();
        assert_eq!(store.counters("a").await.unwrap(), QueueCounters::default());
        assert!(store.skipped("a").await.unwrap().is_empty());
        assert_eq!(store.get(Table::Meta, &sessions_key("a")).await.unwrap(), None);
        assert_eq!(store.get(Table::Meta, &order_key("a")).await.unwrap(), None);
        assert_eq!(store.issue_ticket("a").await.unwrap(), 1, "a deleted queue starts again");
        assert_eq!(store.counters("b").await.unwrap(), QueueCounters { last_ticket: 5, serving: 3, unclaimed: (0, 0) }, "other rooms untouched");
        assert_eq!(store.skipped("b").await.unwrap(), vec![2]);
        assert!(store.get(Table::Meta, &sessions_key("b")).await.unwrap().is_some());
        assert_eq!(store.get(Table::Meta, "secret").await.unwrap(), Some(b"s".to_vec()));
        store.delete_queue("never").await.unwrap();
    }

    #[tokio::test]
    async fn the_first_call_after_a_redis_restart_succeeds() {
        let redis = Redis::start();
        let store = store(&redis).await;
        store.put(Table::Meta, "k", b"v".to_vec()).await.unwrap();
        let port = redis.stop();
        let _redis = Redis::start_on(port);
        // The connection this store holds died with the old process; the call finds it dropped
        // and runs on a fresh one instead of failing.
        assert_eq!(store.get(Table::Meta, "k").await.unwrap(), None, "a new, empty Redis");
        assert!(store.is_ready());
    }

    #[tokio::test]
    async fn readiness_follows_redis() {
        let redis = Redis::start();
        let store = store(&redis).await;
        assert!(store.is_ready());
        assert_eq!(store.issue_ticket("a").await.unwrap(), 1);
        let port = redis.stop();
        assert!(matches!(store.issue_ticket("a").await, Err(StoreError::Backend(_))));
        assert!(!store.is_ready(), "a failed call");
        assert!(store.get(Table::Meta, "x").await.is_err(), "reconnecting to a stopped Redis fails too");
        assert!(!store.is_ready());
        let _redis = Redis::start_on(port);
        assert_eq!(store.issue_ticket("a").await.unwrap(), 1, "a new, empty Redis on the same port");
        assert!(store.is_ready(), "reconnected on the next call");
        store.close().await.unwrap();
        assert!(!store.is_ready());
        assert!(matches!(store.issue_ticket("a").await, Err(StoreError::Closed)));
    }

    #[tokio::test]
    async fn a_frozen_redis_times_out_and_is_used_again_once_it_answers() {
        let redis = Redis::start();
        let store = store(&redis).await;
        store.put(Table::Meta, "k", b"v".to_vec()).await.unwrap();
        let signal = |sig: &str| {
            let status = Command::new("kill").args([sig, &redis.pid().to_string()]).status().unwrap();
            assert!(status.success(), "kill {sig}");
        };
        signal("-STOP");
        let started = std::time::Instant::now();
        let result = store.get(Table::Meta, "k").await;
        signal("-CONT");
        assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
        let waited = started.elapsed();
        // At least the store's timeout (redis-rs's own would give up after 0.5 s), and bounded.
        assert!(waited >= CALL_TIMEOUT && waited < CALL_TIMEOUT * 5, "the call timeout, not redis-rs's: {waited:?}");
        assert!(!store.is_ready());
        assert_eq!(store.get(Table::Meta, "k").await.unwrap(), Some(b"v".to_vec()));
        assert!(store.is_ready());
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let result = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "test").await;
        assert!(matches!(result, Err(StoreError::Backend(_))));
    }
}
