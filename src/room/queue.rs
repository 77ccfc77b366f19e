//! Admission arithmetic as pure functions of the inputs (no clock, no I/O), so it can be run
//! through simulated hours in milliseconds.
//!
//! The serving counter advances by `rate_per_minute × elapsed / 60 s`, carrying the fraction
//! from tick to tick: at 600/min and 100 ms ticks, one visitor per tick — a smooth flow, not a
//! batch once a minute. It never passes the last issued ticket, and an idle room does not bank
//! credit beyond one visitor (otherwise a quiet hour would release a burst later).

use std::time::Duration;

/// Credit a room may hold while its queue is empty: the next arrival may go in immediately,
/// but no burst builds up.
const IDLE_CREDIT_CAP: f64 = 1.0;

/// Per-room admission state carried between ticks (not persisted: after a restart at most one
/// visitor's worth of fraction is lost).
#[derive(Debug, Default, Clone)]
pub struct Admission {
    credit: f64,
}

impl Admission {
    /// Advances the counter for `elapsed` at `rate_per_minute`; returns the new serving counter.
    pub fn advance(&mut self, serving: u64, last_ticket: u64, rate_per_minute: f64, elapsed: Duration) -> u64 {
        let waiting = last_ticket.saturating_sub(serving);
        if rate_per_minute <= 0.0 {
            self.credit = 0.0;
            return serving;
        }
        self.credit += rate_per_minute * elapsed.as_secs_f64() / 60.0;
        let whole = self.credit.floor();
        let admit = (whole as u64).min(waiting);
        self.credit -= admit as f64;
        if admit < whole as u64 {
            // The queue ran dry: don't bank the unused slots.
            self.credit = self.credit.min(IDLE_CREDIT_CAP);
        }
        serving + admit
    }

    /// Gives back `slots` unused this tick, keeping at most `cap` in hand.
    pub fn refund(&mut self, slots: u64, cap: f64) {
        if slots > 0 {
            self.credit = (self.credit + slots as f64).min(cap.max(self.credit));
        }
    }

    /// Called while the room is not admitting (paused, closed, before its start).
    pub fn hold(&mut self) {
        self.credit = 0.0;
    }
}

/// Tickets ahead of `ticket` that are not yet admitted (0 = next in line); `None` once admitted.
pub fn position(ticket: u64, serving: u64) -> Option<u64> {
    (ticket > serving).then(|| ticket - serving - 1)
}

/// Seconds until `position` more visitors are admitted at `rate_per_minute`; `None` if the rate
/// is zero (nobody moves).
pub fn eta_seconds(position: u64, rate_per_minute: f64) -> Option<u64> {
    (rate_per_minute > 0.0).then(|| (position as f64 * 60.0 / rate_per_minute).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TICK: Duration = Duration::from_millis(100);

    /// Simulates `minutes` of 100 ms ticks with an always-full queue; returns admissions per tick.
    fn simulate(rate: f64, minutes: u64) -> Vec<u64> {
        let mut a = Admission::default();
        let mut serving = 0;
        let ticks = minutes * 600;
        let mut per_tick = Vec::with_capacity(ticks as usize);
        for _ in 0..ticks {
            let next = a.advance(serving, u64::MAX / 2, rate, TICK);
            per_tick.push(next - serving);
            serving = next;
        }
        per_tick
    }

    #[test]
    fn ten_simulated_minutes_hold_the_rate_within_two_percent_every_minute() {
        for rate in [50.0, 60.0, 100.0, 600.0, 1000.0, 7777.0, 60_000.0] {
            let per_tick = simulate(rate, 10);
            // Every full sliding minute window (600 ticks), not only aligned ones.
            let mut window: u64 = per_tick[..600].iter().sum();
            for start in 0..=(per_tick.len() - 600) {
                if start > 0 {
                    window = window - per_tick[start - 1] + per_tick[start + 599];
                }
                let err = (window as f64 - rate).abs() / rate;
                assert!(err <= 0.02, "rate {rate}: window at tick {start} admitted {window}");
            }
        }
    }

    #[test]
    fn smooth_not_bursty() {
        // 600/min = 10/s: every tick admits exactly one.
        assert!(simulate(600.0, 1).iter().all(|&n| n == 1));
        // 60/min: one every 10 ticks, never two at once.
        assert!(simulate(60.0, 1).iter().all(|&n| n <= 1));
    }

    #[test]
    fn idle_room_banks_at_most_one() {
        let mut a = Admission::default();
        // An hour with nobody waiting at 600/min.
        let serving = a.advance(0, 0, 600.0, Duration::from_secs(3600));
        assert_eq!(serving, 0);
        // 50 arrive: only one goes in at once, then the flow resumes.
        assert_eq!(a.advance(0, 50, 600.0, Duration::ZERO), 1);
    }

    #[test]
    fn zero_rate_and_hold_admit_nobody() {
        let mut a = Admission::default();
        assert_eq!(a.advance(3, 10, 0.0, Duration::from_secs(60)), 3);
        a.advance(0, 10, 60.0, Duration::from_millis(900));
        a.hold();
        assert_eq!(a.advance(0, 10, 60.0, Duration::from_millis(100)), 0);
    }

    #[test]
    fn position_and_eta() {
        assert_eq!(position(5, 2), Some(2));
        assert_eq!(position(3, 2), Some(0));
        assert_eq!(position(2, 2), None);
        assert_eq!(eta_seconds(10, 60.0), Some(10));
        assert_eq!(eta_seconds(1, 7.0), Some(9));
        assert_eq!(eta_seconds(10, 0.0), None);
    }

    proptest! {
        /// Whatever the arrivals, rates and tick lengths: the counter never decreases, never
        /// passes the last ticket, and tickets are admitted strictly in order (the counter is
        /// a prefix: everyone at or below it, nobody above it).
        #[test]
        fn counter_is_monotonic_and_bounded(
            steps in proptest::collection::vec((0u64..20, 0.0f64..5000.0, 0u64..2000), 1..300)
        ) {
            let mut a = Admission::default();
            let (mut serving, mut last) = (0u64, 0u64);
            let mut admitted_once = std::collections::HashSet::new();
            for (arrivals, rate, ms) in steps {
                last += arrivals;
                let next = a.advance(serving, last, rate, Duration::from_millis(ms));
                prop_assert!(next >= serving);
                prop_assert!(next <= last);
                for t in serving + 1..=next {
                    prop_assert!(admitted_once.insert(t), "ticket {} admitted twice", t);
                }
                serving = next;
            }
            prop_assert_eq!(admitted_once.len() as u64, serving);
        }
    }
}
