//! weir's history extension: a bounded, expiring ring of a channel's recent events, each with a
//! serial, from which a reconnecting client resumes.
//!
//! Serials come from one process-wide counter seeded with the wall clock in microseconds, so
//! they increase within a channel and across restarts; they are not consecutive within a channel.
//! `floor` is the highest serial this ring can no longer vouch for (evicted, expired, or older
//! than the channel's entry): a resume from below it fails instead of silently skipping events.

use std::collections::VecDeque;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::time::Instant;

pub struct History {
    events: VecDeque<Entry>,
    floor: u64,
    last: u64,
    /// Bytes of the frames held, for the app-wide history budget.
    bytes: usize,
}

struct Entry {
    serial: u64,
    at: Instant,
    frame: Utf8Bytes,
}

/// Why a resume cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub struct TooOld {
    /// Resuming from this serial or later would succeed.
    pub earliest: u64,
}

impl History {
    /// A ring for a channel first seen when the global counter stood at `floor`.
    pub fn new(floor: u64) -> Self {
        Self { events: VecDeque::new(), floor, last: floor, bytes: 0 }
    }

    /// The newest serial covered: a client that has seen it has seen everything.
    pub fn last_serial(&self) -> u64 {
        self.last
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records that event `serial` happened but is not kept (over a memory budget): a resume
    /// from before it then fails instead of silently missing it.
    pub fn skip(&mut self, serial: u64) {
        self.last = serial;
        self.floor = serial;
    }

    /// Appends an event, evicting the oldest beyond `capacity`.
    pub fn push(&mut self, serial: u64, at: Instant, frame: Utf8Bytes, capacity: usize) {
        self.last = serial;
        if capacity == 0 {
            self.floor = serial;
            return;
        }
        while self.events.len() >= capacity {
            if let Some(old) = self.events.pop_front() {
                self.floor = old.serial;
                self.bytes -= old.frame.as_str().len();
            }
        }
        self.bytes += frame.as_str().len();
        self.events.push_back(Entry { serial, at, frame });
    }

    /// Drops events older than `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some(front) = self.events.front() {
            if now.saturating_duration_since(front.at) < ttl {
                break;
            }
            self.floor = front.serial;
            self.bytes -= front.frame.as_str().len();
            self.events.pop_front();
        }
    }

    /// The frames after `from` (the last serial the client saw), oldest first.
    pub fn since(&self, from: u64) -> Result<impl Iterator<Item = &Utf8Bytes>, TooOld> {
        if from < self.floor {
            return Err(TooOld { earliest: self.floor });
        }
        Ok(self.events.iter().filter(move |e| e.serial > from).map(|e| &e.frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: u64) -> Utf8Bytes {
        Utf8Bytes::from(s.to_string())
    }

    #[test]
    fn resume_inside_and_outside_the_ring() {
        let now = Instant::now();
        let mut h = History::new(10);
        for s in [12, 15, 17, 20] {
            h.push(s, now, f(s), 3);
        }
        // 12 was evicted: a client that saw 12 or later is fine, one that saw only 11 is not.
        assert_eq!(h.since(11).err(), Some(TooOld { earliest: 12 }));
        let got: Vec<_> = h.since(12).unwrap().map(|b| b.as_str().to_string()).collect();
        assert_eq!(got, ["15", "17", "20"]);
        assert_eq!(h.since(20).unwrap().count(), 0);
        h.expire(now + Duration::from_secs(5), Duration::from_secs(5));
        assert!(h.is_empty());
        assert!(h.since(17).is_err());
        assert!(h.since(20).is_ok());
    }
}
