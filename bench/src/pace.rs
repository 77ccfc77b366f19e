//! The open loop's clock: one task releases send slots at their scheduled instants and each
//! connection waits for its own. tokio's timer rounds every deadline up to its next millisecond
//! tick, so at 30,000 req/s requests left in bursts of ~30 and the half-load p99 measured the
//! burst, not the server. A timerfd, polled through the same epoll as the sockets, wakes the pacer
//! at the instant (at most every [`MIN_WAKE_GAP`]); no spinning, so the client's CPU share still
//! means something. How late each slot went out is recorded and reported.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::hist::Hist;

/// Wakes no more often than this (100 µs): a wake from the timer costs ~20 µs of CPU on the
/// benchmark VM, so this bounds the pacer to ~20 % of a core at any rate, while slots closer
/// together go out in small groups (~3 at 30,000 req/s instead of ~30 at each millisecond tick).
/// The VM's wake-up latency is ~100 µs anyway.
const MIN_WAKE_GAP: Duration = Duration::from_micros(100);

/// Slot `j` is due at `t0 + j / rate` and belongs to connection `j % conns` (its
/// `j / conns`-th slot): every connection sends at the same interval, offset from the others.
pub struct Slots {
    t0: Instant,
    rate: f64,
    conns: usize,
    released: Vec<Cell<u64>>,
    wake: Vec<Notify>,
    /// How late each slot was released: the client's share of any burstiness.
    pub late: RefCell<Hist>,
}

impl Slots {
    pub fn new(t0: Instant, rate: f64, conns: usize) -> Self {
        Slots {
            t0,
            rate,
            conns,
            released: (0..conns).map(|_| Cell::new(0)).collect(),
            wake: (0..conns).map(|_| Notify::new()).collect(),
            late: RefCell::new(Hist::new()),
        }
    }

    /// When connection `c` is to send its `k`-th request.
    pub fn due(&self, c: usize, k: u64) -> Instant {
        self.at(k * self.conns as u64 + c as u64)
    }

    fn at(&self, j: u64) -> Instant {
        self.t0 + Duration::from_secs_f64(j as f64 / self.rate)
    }

    /// Waits until the pacer has released connection `c`'s `k`-th slot.
    pub async fn wait(&self, c: usize, k: u64) {
        while self.released[c].get() <= k {
            self.wake[c].notified().await;
        }
    }

    /// Releases every slot due before `end` at its instant, or with the next slots if closer than
    /// [`MIN_WAKE_GAP`] after the last wake, or at once if already late.
    pub async fn run(&self, end: Instant) {
        let timer = Timer::new();
        let mut j = 0u64;
        let mut last = Instant::now();
        loop {
            let at = self.at(j);
            if at >= end {
                return;
            }
            let at = at.max(last + MIN_WAKE_GAP);
            match &timer {
                Ok(t) => t.sleep_until(at).await,
                // No timerfd (not Linux?): millisecond bursts, as before.
                Err(_) => tokio::time::sleep_until(at.into()).await,
            }
            let now = Instant::now();
            last = now;
            let mut late = self.late.borrow_mut();
            while self.at(j) <= now && self.at(j) < end {
                late.record((now - self.at(j)).as_nanos() as u64);
                let c = (j % self.conns as u64) as usize;
                self.released[c].set(self.released[c].get() + 1);
                self.wake[c].notify_one();
                j += 1;
            }
        }
    }
}

/// A one-shot CLOCK_MONOTONIC timerfd (the clock `Instant` reads) registered with tokio.
struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    fn new() -> io::Result<Timer> {
        let fd = rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        // `new` is deprecated for `register`, which is `unsafe` because the caller must keep the
        // descriptor open; an `OwnedFd` moved in does, and this crate has no `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        Ok(Timer(fd))
    }

    async fn sleep_until(&self, at: Instant) {
        loop {
            let now = Instant::now();
            if now >= at {
                return;
            }
            // Relative, and never zero (a zero value disarms the timer).
            let left = Timespec::try_from(at - now).unwrap_or(Timespec { tv_sec: 0, tv_nsec: 1 });
            let spec = Itimerspec { it_interval: Timespec::default(), it_value: left };
            if rustix::time::timerfd_settime(self.0.get_ref(), TimerfdTimerFlags::empty(), &spec).is_err() {
                return tokio::time::sleep_until(at.into()).await;
            }
            let Ok(mut guard) = self.0.readable().await else {
                return tokio::time::sleep_until(at.into()).await;
            };
            // Reading the expiry count re-arms readiness; WouldBlock (not yet expired) clears it.
            let mut count = [0u8; 8];
            let _ = guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut count).map_err(io::Error::from));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every slot is released, none before its instant. (How late is left to measurement: a
    /// shared test machine may stall any wake.)
    #[tokio::test]
    async fn releases_every_slot_never_early() {
        let conns = 4;
        let t0 = Instant::now() + Duration::from_millis(5);
        let slots = std::rc::Rc::new(Slots::new(t0, 10_000.0, conns));
        let end = t0 + Duration::from_millis(20);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let pacer = {
                    let s = slots.clone();
                    tokio::task::spawn_local(async move { s.run(end).await })
                };
                for k in 0..50u64 {
                    slots.wait(1, k).await;
                    assert!(Instant::now() >= slots.due(1, k), "slot {k} released early");
                }
                pacer.await.unwrap();
            })
            .await;
        assert_eq!(slots.released[0].get(), 50);
        assert_eq!(slots.late.borrow().count(), 200);
    }
}
