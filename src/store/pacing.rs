//! When the store's writer commits a batch. Every commit costs a `write`, an `fdatasync` and
//! two thread switches whatever its size, so a batch should hold everything the runtime is about
//! to hand over. The writer commits as soon as a runtime worker is idle (parked: nothing more
//! is being read, so nothing more is coming soon), once the batch reaches [`BATCH_TARGET`], or
//! after [`MAX_WAIT`], whichever is first. Idle, a lone write is committed as soon as its
//! worker parks, so it waits for nothing; under load a batch grows to everything the runtime has
//! to hand over (admission steps, ticket ranges a burst is waiting for, documents) instead of
//! whatever arrived during the previous sync.
//!
//! The runtime tells the pacer when its workers park and unpark ([`install`], called where the
//! runtime is built). Without it (tests, embedders) the writer commits at once, as before.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Queued writes at which the writer stops waiting for an idle worker: beyond this a larger
/// batch saves little (the sync is already shared) and its first member has waited long enough.
pub const BATCH_TARGET: usize = 64;
/// Longest a batch waits for an idle worker: bounds the latency pacing can add when workers stay
/// busy with other work (realtime fan-out) while a few writes trickle in.
pub const MAX_WAIT: Duration = Duration::from_millis(1);

pub struct CommitPacer {
    /// Runtime workers parked right now.
    parked: AtomicUsize,
    /// The writer is waiting: parks and a full queue must wake it.
    waiting: AtomicBool,
    lock: parking_lot::Mutex<()>,
    wake: parking_lot::Condvar,
    target: usize,
    max_wait: Duration,
}

static INSTALLED: OnceLock<Arc<CommitPacer>> = OnceLock::new();

/// The process's pacer, to be told about the runtime's workers by `on_thread_park` and
/// `on_thread_unpark`; stores opened after this call pace their commits with it.
pub fn install() -> Arc<CommitPacer> {
    INSTALLED.get_or_init(|| Arc::new(CommitPacer::new(BATCH_TARGET, MAX_WAIT))).clone()
}

/// The pacer [`install`]ed, if any.
pub fn installed() -> Option<Arc<CommitPacer>> {
    INSTALLED.get().cloned()
}

impl CommitPacer {
    pub fn new(target: usize, max_wait: Duration) -> Self {
        Self {
            parked: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            lock: parking_lot::Mutex::new(()),
            wake: parking_lot::Condvar::new(),
            target: target.max(1),
            max_wait,
        }
    }

    /// A runtime worker is about to park.
    pub fn worker_parked(&self) {
        self.parked.fetch_add(1, SeqCst);
        self.nudge();
    }

    /// A runtime worker woke up.
    pub fn worker_unparked(&self) {
        // Saturating: a pacer installed while workers were already parked sees unparks first.
        let _ = self.parked.fetch_update(SeqCst, SeqCst, |n| Some(n.saturating_sub(1)));
    }

    /// A write was queued; the batch being gathered holds `queued` writes now.
    pub fn queued(&self, queued: usize) {
        if queued >= self.target {
            self.nudge();
        }
    }

    fn nudge(&self) {
        if self.waiting.load(SeqCst) {
            // Taking the lock orders this wake after the writer's check (see `wait`).
            let _guard = self.lock.lock();
            self.wake.notify_one();
        }
    }

    /// Called by the writer holding a batch's first write: returns once a worker is parked,
    /// `queued()` reaches the target, or the wait is over.
    pub fn wait(&self, queued: impl Fn() -> usize) {
        let deadline = Instant::now() + self.max_wait;
        let mut guard = self.lock.lock();
        // Set before the check: a park after the check sees it and waits for the lock, which
        // the condvar releases only once this thread is waiting.
        self.waiting.store(true, SeqCst);
        while self.parked.load(SeqCst) == 0 && queued() < self.target {
            if self.wake.wait_until(&mut guard, deadline).timed_out() {
                break;
            }
        }
        self.waiting.store(false, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Runs `pacer.wait` on a thread; the receiver gets a message when it returns.
    fn waiter(pacer: &Arc<CommitPacer>, queued: &Arc<AtomicUsize>) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (pacer, queued) = (pacer.clone(), queued.clone());
        std::thread::spawn(move || {
            pacer.wait(|| queued.load(SeqCst));
            let _ = tx.send(());
        });
        rx
    }

    const LONG: Duration = Duration::from_secs(30);
    const GRACE: Duration = Duration::from_millis(50);

    #[test]
    fn a_busy_runtime_holds_the_batch_until_a_worker_parks() {
        let pacer = Arc::new(CommitPacer::new(4, LONG));
        let queued = Arc::new(AtomicUsize::new(1));
        let done = waiter(&pacer, &queued);
        assert!(done.recv_timeout(GRACE).is_err(), "every worker is busy: the batch keeps filling");
        pacer.worker_parked();
        done.recv_timeout(LONG).expect("a parked worker releases the batch");
    }

    #[test]
    fn a_full_batch_goes_without_waiting_for_idle() {
        let pacer = Arc::new(CommitPacer::new(4, LONG));
        let queued = Arc::new(AtomicUsize::new(1));
        let done = waiter(&pacer, &queued);
        queued.store(3, SeqCst);
        pacer.queued(3);
        assert!(done.recv_timeout(GRACE).is_err(), "below the target");
        queued.store(4, SeqCst);
        pacer.queued(4);
        done.recv_timeout(LONG).expect("the target releases the batch");
    }

    #[test]
    fn an_idle_runtime_never_holds_a_write() {
        let pacer = Arc::new(CommitPacer::new(4, LONG));
        pacer.worker_parked();
        pacer.worker_parked();
        pacer.worker_unparked();
        let queued = Arc::new(AtomicUsize::new(1));
        waiter(&pacer, &queued).recv_timeout(LONG).expect("one worker is still parked");
    }

    #[test]
    fn the_wait_is_bounded() {
        let pacer = Arc::new(CommitPacer::new(4, Duration::from_millis(5)));
        let queued = Arc::new(AtomicUsize::new(1));
        waiter(&pacer, &queued).recv_timeout(LONG).expect("released by the deadline alone");
    }
}
