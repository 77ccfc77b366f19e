//! The waiting rooms' admission lease: one key in Redis naming the node that drives admission.
//! Its holder renews it every heartbeat; if the holder dies, another node takes it once it
//! lapses. A node counts itself the holder only until a margin before the lapse, so it stops
//! admitting before anyone else can start. That rests on clocks and timely scheduling; what does
//! not is the fence: the store writes an admission batch only while this key still names the
//! writer, checked in the same atomic step (`store::Fence`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use redis::aio::MultiplexedConnection;

/// The lease's lifetime in Redis; renewed every heartbeat.
pub(super) const LEASE_MS: i64 = 3_000;
/// A holder stops admitting this long before its lease could have lapsed in Redis.
const LEASE_MARGIN_MS: i64 = 1_000;
/// Takes the lease when nobody holds it, or renews it for its holder; returns 1 if `ARGV[1]`
/// holds it now.
const LEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";
/// Gives the lease up if `ARGV[1]` holds it.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub(super) struct Lease {
    key: String,
    take: redis::Script,
    release: redis::Script,
    /// Until when (ms, wall clock) this node holds the lease.
    held_until: AtomicI64,
    /// This node's acquisitions of the lease, so the admission driver can tell a fresh term (its
    /// rooms' state must be reloaded from the store) from a continuing one.
    terms: AtomicU64,
}

impl Lease {
    pub(super) fn new(prefix: &str) -> Self {
        Lease {
            key: format!("{prefix}:lease:rooms"),
            take: redis::Script::new(LEASE_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            held_until: AtomicI64::new(0),
            terms: AtomicU64::new(0),
        }
    }

    /// The Redis key naming the holder (the admissions' [`Fence`](crate::store::Fence)).
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    pub(super) fn is_held(&self) -> bool {
        super::now_ms() < self.held_until.load(Ordering::Acquire)
    }

    pub(super) fn term(&self) -> u64 {
        self.terms.load(Ordering::Acquire)
    }

    /// Takes or renews the lease for `node`: whether `node` holds it now.
    pub(super) async fn renew(&self, c: &mut MultiplexedConnection, node: &str) -> redis::RedisResult<bool> {
        let mut take = self.take.key(&self.key);
        take.arg(node).arg(LEASE_MS);
        Ok(take.invoke_async::<i64>(c).await? == 1)
    }

    /// Records the outcome of a renewal sent at `sent_ms`.
    pub(super) fn renewed(&self, held: bool, sent_ms: i64, node: &str) {
        if held {
            if !self.is_held() {
                self.terms.fetch_add(1, Ordering::AcqRel);
                tracing::info!(node, "cluster: this node now drives the waiting rooms");
            }
            self.held_until.store(sent_ms + LEASE_MS - LEASE_MARGIN_MS, Ordering::Release);
        } else {
            self.give_up();
        }
        metrics::gauge!("weir_cluster_leader").set(if held { 1.0 } else { 0.0 });
    }

    /// Stops counting this node as the holder (it is leaving).
    pub(super) fn give_up(&self) {
        self.held_until.store(0, Ordering::Release);
    }

    /// Gives the lease up in Redis if `node` holds it, so the next holder need not wait for it to
    /// lapse.
    pub(super) async fn release(&self, c: &mut MultiplexedConnection, node: &str) -> redis::RedisResult<i64> {
        let mut release = self.release.key(&self.key);
        release.arg(node);
        release.invoke_async::<i64>(c).await
    }
}
