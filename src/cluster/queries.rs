//! Channel queries in flight: each waits for the answers of the other live nodes, merged into
//! this node's own, or for its deadline. Bounded: past [`MAX_PENDING`] a query is refused.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::ClusterError;
use crate::realtime::tenant::ChannelReport;

/// Longest wait for every live node's answer.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Queries in flight at once.
const MAX_PENDING: usize = 1_024;

struct Pending {
    waiting_for: HashSet<String>,
    channels: Vec<ChannelReport>,
    done: Option<oneshot::Sender<()>>,
}

pub(super) struct Queries {
    pending: Mutex<HashMap<u64, Pending>>,
    next: AtomicU64,
    timeouts: metrics::Counter,
}

/// A query registered and waiting for answers.
pub(super) struct Asked {
    pub id: u64,
    answered: oneshot::Receiver<()>,
}

impl Queries {
    pub(super) fn new() -> Self {
        Queries { pending: Mutex::new(HashMap::new()), next: AtomicU64::new(1), timeouts: metrics::counter!("weir_cluster_query_timeouts_total") }
    }

    /// Registers a query to `others`, starting from this node's own answer.
    pub(super) fn ask(&self, others: HashSet<String>, local: Vec<ChannelReport>) -> Result<Asked, ClusterError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (done, answered) = oneshot::channel();
        let mut pending = self.pending.lock();
        if pending.len() >= MAX_PENDING {
            return Err(ClusterError::Busy);
        }
        pending.insert(id, Pending { waiting_for: others, channels: local, done: Some(done) });
        Ok(Asked { id, answered })
    }

    /// Forgets a query that could not be sent.
    pub(super) fn cancel(&self, id: u64) {
        self.pending.lock().remove(&id);
    }

    /// Every answer merged in, or which node failed to answer in time.
    pub(super) async fn answers(&self, asked: Asked) -> Result<Vec<ChannelReport>, ClusterError> {
        let in_time = tokio::time::timeout(TIMEOUT, asked.answered).await.is_ok();
        let Some(query) = self.pending.lock().remove(&asked.id) else {
            return Ok(Vec::new());
        };
        if !in_time {
            self.timeouts.increment(1);
            return Err(ClusterError::NoAnswer(query.waiting_for.into_iter().next().unwrap_or_default()));
        }
        Ok(query.channels)
    }

    /// `node`'s answer to query `id`.
    pub(super) fn answer(&self, id: u64, node: &str, channels: Vec<ChannelReport>) {
        let mut pending = self.pending.lock();
        let Some(query) = pending.get_mut(&id) else { return };
        if query.waiting_for.remove(node) {
            query.channels.extend(channels);
        }
        if query.waiting_for.is_empty() {
            if let Some(done) = query.done.take() {
                let _ = done.send(());
            }
        }
    }
}
