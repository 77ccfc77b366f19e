//! Tickets handed out from durably reserved ranges, the way a database caches a sequence.
//!
//! The one fact about a ticket the queue needs to survive a crash is that its number was taken:
//! the visitor's signed cookie carries the rest (room, ticket, visitor), and nothing ever reads a
//! per-visitor record back. So instead of a durable write per visitor, the store's writer durably
//! reserves a range of numbers ahead (`reserved`) and tickets up to it are handed out from memory
//! at once. Once less than half a range is left the next one is reserved in the background; only
//! a burst that outruns it waits, and its whole group waits for that one commit.
//!
//! After a crash numbering resumes above everything reserved, so no ticket is issued twice and
//! every ticket a visitor holds stays valid. What a crash loses is which reserved numbers had
//! actually been handed out: those above the count recorded with the last reservation come back
//! *unclaimed* ([`QueueCounters::unclaimed`](super::QueueCounters)), and the engine admits one only
//! once its holder has been seen. A clean shutdown records the exact count, leaving none.
//!
//! A range is a quarter second of the room's recent arrivals, within [`MIN_BLOCK`, `MAX_BLOCK`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::fast_map::FastMap;

/// Smallest range reserved at once: a quiet room still reserves rarely.
pub const MIN_BLOCK: u64 = 64;
/// Largest range: bounds how many numbers a crash can leave unclaimed.
pub const MAX_BLOCK: u64 = 4096;
/// How much of the recent arrival rate one range covers.
const BLOCK_SPAN: Duration = Duration::from_millis(250);

/// One durable reservation for the writer: record that `room`'s tickets up to `upto` may be
/// handed out and that those up to `confirmed` have been.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub room: String,
    /// The room's range generation; a reservation for a deleted queue is dropped.
    pub epoch: u64,
    pub confirmed: u64,
    pub upto: u64,
}

/// A room and its durable `(confirmed, reserved)` ticket counts.
pub type RoomCounts = (String, (u64, u64));

/// What [`Ranges::take`] found.
pub enum Take {
    /// The ticket, and a reservation to send ahead (not waited for) if the range runs low.
    Ticket(u64, Option<Reservation>),
    /// The range is used up: wait for `done`, or, with `Some`, send this reservation and wait
    /// for its commit; then take again.
    Wait(OwnedNotified, Option<Reservation>),
    /// The store is closing.
    Closed,
}

struct Range {
    /// Highest ticket handed out.
    issued: u64,
    /// Highest ticket durably reserved (as far as committed reservations tell).
    reserved: u64,
    epoch: u64,
    /// A reservation is on its way to the disk.
    pending: bool,
    block: u64,
    /// When the last reservation started, and `issued` then: the arrival rate in between sizes the next.
    started: Instant,
    issued_at_start: u64,
    done: Arc<Notify>,
    /// What a crash left unclaimed (see the module docs), as found at open.
    unclaimed: (u64, u64),
}

impl Range {
    fn new(last: u64, epoch: u64) -> Self {
        Range {
            unclaimed: (0, 0),
            issued: last,
            reserved: last,
            epoch,
            pending: false,
            block: MIN_BLOCK,
            started: Instant::now(),
            issued_at_start: last,
            done: Arc::new(Notify::new()),
        }
    }

    /// Hands out the next reserved ticket (there must be one); says whether the range runs low
    /// with no reservation on its way.
    fn take_one(&mut self) -> (u64, bool) {
        self.issued += 1;
        (self.issued, !self.pending && self.reserved - self.issued < self.block / 2)
    }

    fn start(&mut self, room: &str, now: Instant) -> Reservation {
        let elapsed = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let per_span = (self.issued - self.issued_at_start) as f64 / elapsed * BLOCK_SPAN.as_secs_f64();
        self.block = (per_span as u64).clamp(MIN_BLOCK, MAX_BLOCK);
        self.started = now;
        self.issued_at_start = self.issued;
        self.pending = true;
        Reservation { room: room.to_string(), epoch: self.epoch, confirmed: self.issued, upto: self.reserved.max(self.issued) + self.block }
    }
}

/// Every room's range, shared by the store's callers (who take tickets) and its writer (who
/// commits reservations and reports them here).
#[derive(Default)]
pub struct Ranges {
    /// Looked up on every new visitor's entry: a fast hash (room ids are ours).
    rooms: Mutex<FastMap<String, Range>>,
    epochs: AtomicU64,
    closed: std::sync::atomic::AtomicBool,
}

impl Ranges {
    /// Ranges resuming after each room's durable `(confirmed, reserved)` counts: numbering goes
    /// on above `reserved`, and the tickets in between are unclaimed.
    pub fn new(durable: impl IntoIterator<Item = RoomCounts>) -> Self {
        let ranges = Ranges::default();
        {
            let mut rooms = ranges.rooms.lock();
            for (room, (confirmed, reserved)) in durable {
                let mut range = Range::new(reserved, ranges.epochs.fetch_add(1, Ordering::Relaxed));
                if confirmed < reserved {
                    range.unclaimed = (confirmed, reserved);
                }
                rooms.insert(room, range);
            }
        }
        ranges
    }

    /// The tickets of `room` a crash left unclaimed, as found at open (`(0, 0)`: none).
    pub fn unclaimed(&self, room: &str) -> (u64, u64) {
        self.rooms.lock().get(room).map_or((0, 0), |r| r.unclaimed)
    }

    /// Takes `room`'s next ticket if its range has one.
    pub fn take(&self, room: &str) -> Take {
        self.take_at(room, Instant::now)
    }

    /// [`take`](Self::take) with the clock that times the room's arrivals.
    pub fn take_at(&self, room: &str, now: impl FnOnce() -> Instant) -> Take {
        if self.closed.load(Ordering::Acquire) {
            return Take::Closed;
        }
        let mut rooms = self.rooms.lock();
        let range = match rooms.get_mut(room) {
            Some(r) => r,
            None => rooms.entry(room.to_string()).or_insert_with(|| Range::new(0, self.epochs.fetch_add(1, Ordering::Relaxed))),
        };
        if range.issued < range.reserved {
            let (ticket, low) = range.take_one();
            return Take::Ticket(ticket, low.then(|| range.start(room, now())));
        }
        let own = (!range.pending).then(|| range.start(room, now()));
        Take::Wait(range.done.clone().notified_owned(), own)
    }

    /// Takes `room`'s next ticket only if its range has one; changes nothing otherwise.
    pub fn try_take(&self, room: &str) -> Option<(u64, Option<Reservation>)> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut rooms = self.rooms.lock();
        let range = rooms.get_mut(room).filter(|r| r.issued < r.reserved)?;
        let (ticket, low) = range.take_one();
        Some((ticket, low.then(|| range.start(room, Instant::now()))))
    }

    /// Highest ticket of `room` handed out so far (0: none).
    pub fn issued(&self, room: &str) -> u64 {
        self.rooms.lock().get(room).map_or(0, |r| r.issued)
    }

    /// Whether `r` still belongs to its room's current range (not to a deleted queue).
    pub fn is_current(&self, r: &Reservation) -> bool {
        self.rooms.lock().get(&r.room).is_some_and(|x| x.epoch == r.epoch)
    }

    /// The writer's report: `r` was committed (`durable`) or not; wakes whoever waits for it.
    pub fn settle(&self, r: &Reservation, durable: bool) {
        let mut rooms = self.rooms.lock();
        if let Some(range) = rooms.get_mut(&r.room).filter(|x| x.epoch == r.epoch) {
            if durable {
                range.reserved = range.reserved.max(r.upto);
            }
            range.pending = false;
            range.done.notify_waiters();
        }
    }

    /// Drops `room`'s range (its queue is deleted): numbering starts again from 1.
    pub fn forget(&self, room: &str) {
        if let Some(range) = self.rooms.lock().remove(room) {
            range.done.notify_waiters();
        }
    }

    /// Closes every range and returns each room's exact count, to be recorded as both confirmed
    /// and reserved: no ticket is handed out after this, so a clean restart has nothing unclaimed.
    pub fn seal(&self) -> Vec<(String, u64)> {
        self.closed.store(true, Ordering::Release);
        let rooms = self.rooms.lock();
        for range in rooms.values() {
            range.done.notify_waiters();
        }
        rooms.iter().map(|(room, r)| (room.clone(), r.issued)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(t: Take) -> (u64, Option<Reservation>) {
        match t {
            Take::Ticket(n, r) => (n, r),
            Take::Wait(..) => panic!("waited"),
            Take::Closed => panic!("closed"),
        }
    }

    #[test]
    fn the_first_ticket_waits_for_one_reservation_and_the_range_serves_the_rest() {
        let ranges = Ranges::new([]);
        let Take::Wait(_, Some(r)) = ranges.take("a") else { panic!("no reservation asked for") };
        assert_eq!((r.confirmed, r.upto), (0, MIN_BLOCK));
        let Take::Wait(_, None) = ranges.take("a") else { panic!("a second reservation while one is pending") };
        assert!(ranges.is_current(&r));
        ranges.settle(&r, true);
        let taken: Vec<u64> = (0..MIN_BLOCK / 2).map(|_| ticket(ranges.take("a")).0).collect();
        assert_eq!(taken, (1..=MIN_BLOCK / 2).collect::<Vec<_>>());
        // Below half a range left: the next reservation goes out ahead, once.
        let (t, ahead) = ticket(ranges.take("a"));
        let ahead = ahead.expect("reserve ahead when low");
        assert_eq!((t, ahead.confirmed), (MIN_BLOCK / 2 + 1, MIN_BLOCK / 2 + 1));
        assert!(ahead.upto >= MIN_BLOCK * 2);
        assert!(ticket(ranges.take("a")).1.is_none(), "only one reservation in flight");
        assert_eq!(ranges.issued("a"), MIN_BLOCK / 2 + 2);
    }

    #[test]
    fn try_take_hands_out_only_what_is_reserved() {
        let ranges = Ranges::new([]);
        assert!(ranges.try_take("a").is_none(), "nothing reserved yet");
        assert!(ranges.issued("a") == 0);
        let Take::Wait(_, Some(r)) = ranges.take("a") else { panic!("the first take still asks for a range") };
        ranges.settle(&r, true);
        assert_eq!(ranges.try_take("a").map(|(t, _)| t), Some(1));
        assert_eq!(ticket(ranges.take("a")).0, 2, "both ways share one range");
        ranges.seal();
        assert!(ranges.try_take("a").is_none());
    }

    #[test]
    fn a_failed_reservation_hands_out_nothing_and_can_be_retried() {
        let ranges = Ranges::new([("a".to_string(), (10, 10))]);
        let Take::Wait(_, Some(r)) = ranges.take("a") else { panic!() };
        ranges.settle(&r, false);
        let Take::Wait(_, Some(again)) = ranges.take("a") else { panic!("retry") };
        assert_eq!(again.confirmed, 10, "numbering resumes after the durable last ticket");
        ranges.settle(&again, true);
        assert_eq!(ticket(ranges.take("a")).0, 11);
    }

    #[test]
    fn ranges_follow_the_arrival_rate_within_bounds() {
        let t0 = Instant::now();
        let ranges = Ranges::new([]);
        let at = |ms: u64| move || t0 + Duration::from_millis(ms);
        let Take::Wait(_, Some(r)) = ranges.take_at("a", at(1_000)) else { panic!() };
        ranges.settle(&r, true);
        // Half a range taken within a millisecond: the next range is the largest.
        let next = (0..MIN_BLOCK).find_map(|_| ticket(ranges.take_at("a", at(1_001))).1).expect("reserve ahead");
        assert_eq!(next.upto, MIN_BLOCK + MAX_BLOCK);
        ranges.settle(&next, true);
        // Then a trickle: the range shrinks back to the smallest.
        let slow = (0..MAX_BLOCK * 2).find_map(|_| ticket(ranges.take_at("a", at(1_000_000))).1).expect("reserve ahead");
        assert_eq!(slow.upto - next.upto, MIN_BLOCK);
    }

    #[test]
    fn deleted_queues_and_sealed_stores_issue_nothing_stale() {
        let ranges = Ranges::new([("a".to_string(), (3, 5))]);
        assert_eq!(ranges.unclaimed("a"), (3, 5));
        let Take::Wait(_, Some(r)) = ranges.take("a") else { panic!() };
        ranges.forget("a");
        assert!(!ranges.is_current(&r), "a reservation for a deleted queue is dropped");
        assert_eq!(ranges.unclaimed("a"), (0, 0));
        ranges.settle(&r, true);
        let Take::Wait(_, Some(fresh)) = ranges.take("a") else { panic!() };
        assert_eq!((fresh.confirmed, fresh.upto), (0, MIN_BLOCK), "a recreated queue starts at 1");
        ranges.settle(&fresh, true);
        assert_eq!(ticket(ranges.take("a")).0, 1);
        assert_eq!(ranges.seal(), vec![("a".to_string(), 1)]);
        assert!(matches!(ranges.take("a"), Take::Closed));
    }
}
