//! The admission engine of one room: which ticket goes in next, and who counts as admitted.
//!
//! Tickets are numbers fixed at entry; the engine admits *ranks*. A rank is a ticket's place
//! in line: the ticket itself, except for a scheduled room's pre-queue, whose tickets are
//! shuffled once at the start (CSPRNG Fisher–Yates) and placed ahead of later arrivals.
//! The serving counter is a rank: every rank at or below it has had its turn. A visitor
//! whose turn came while it was away (not seen for `abandon_after_seconds`) is *skipped*:
//! the turn passes without using a slot. When it comes back it is queued as a *returner* and
//! admitted at the next tick, ahead of everyone still waiting.
//!
//! Each tick is planned ([`Engine::plan`]) from explicit inputs, persisted by the caller, then
//! committed ([`Engine::commit`]), so nothing is announced before it is durable.

use std::collections::VecDeque;

use crate::fast_map::{FastMap, FastSet};
use std::time::Duration;

use rand::seq::SliceRandom;

use crate::room::queue::Admission;
use crate::store::QueueCounters;

/// Most skips per tick: bounds the work of one tick when a long stretch of the line has left.
pub const MAX_SKIPS_PER_TICK: usize = 10_000;
/// Time constant of the measured admission rate (moving average), seconds.
const METER_WINDOW_S: f64 = 60.0;

/// What the engine needs to know about the room's policy at this tick.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    pub now_ms: i64,
    pub elapsed: Duration,
    /// Effective rate (configured, or the adaptive controller's).
    pub rate_per_minute: f64,
    /// False while paused, closed or before a scheduled start.
    pub admitting: bool,
    pub max_active_users: Option<u64>,
    pub session_seconds: u64,
    pub abandon_after_seconds: Option<u64>,
}

/// One tick's decisions, to persist before [`Engine::commit`].
#[derive(Debug, Clone, Default)]
pub struct Step {
    pub serving: u64,
    /// Tickets whose turn passed while they were away.
    pub skipped: Vec<u64>,
    /// Returners admitted this tick (no longer skipped).
    pub readmitted: Vec<u64>,
    /// Tickets admitted in line this tick.
    pub admitted: Vec<u64>,
    credit: Admission,
    expired_sessions: Vec<u64>,
}

impl Step {
    /// A step decided elsewhere (the cluster's leader), to commit as it is.
    pub fn decided(serving: u64, skipped: Vec<u64>, readmitted: Vec<u64>, admitted: Vec<u64>, expired_sessions: Vec<u64>) -> Self {
        Step { serving, skipped, readmitted, admitted, expired_sessions, ..Default::default() }
    }
    pub fn expired_sessions(&self) -> &[u64] {
        &self.expired_sessions
    }
    pub fn is_empty(&self) -> bool {
        self.skipped.is_empty() && self.readmitted.is_empty() && self.admitted.is_empty() && self.expired_sessions.is_empty()
    }
    pub fn admissions(&self) -> usize {
        self.admitted.len() + self.readmitted.len()
    }
}

#[derive(Debug, Default, Clone)]
pub struct Engine {
    /// Pre-queue order: `order[i]` is the ticket at rank `i + 1` (tickets `1..=order.len()`).
    order: Vec<u32>,
    /// `rank_of[t - 1]` is the rank of pre-queue ticket `t`.
    rank_of: Vec<u32>,
    serving: u64,
    last_ticket: u64,
    skipped: FastSet<u64>,
    returners: VecDeque<u64>,
    /// Per ticket (index `t - 1`): last seen, seconds since the Unix epoch (0: never).
    last_seen: Vec<u32>,
    /// Tickets `a + 1 ..= b` a crash left perhaps never handed out (`store::ranges`): until
    /// seen, each is skipped when its turn comes, so it cannot take a real visitor's slot.
    unclaimed: (u64, u64),
    /// Admitted ticket → last activity (ms).
    sessions: FastMap<u64, i64>,
    /// Waiting ticket → its page's realtime socket id: an open socket counts as being seen.
    sockets: FastMap<u64, String>,
    admission: Admission,
    /// Moving average of admissions per minute.
    measured_per_minute: f64,
    metered: bool,
    /// In a cluster: what this node saw, for the other nodes (`room::sync`).
    logs: Option<Box<Logs>>,
}

/// Tickets seen and sessions active on this node since the last batch went to the others.
#[derive(Debug, Default, Clone)]
struct Logs {
    seen: Vec<Sighting>,
    active: Vec<Sighting>,
}

/// A ticket and when (ms) it was seen, or its session active.
pub type Sighting = (u64, i64);

/// Most tickets a log keeps between two batches (a batch goes every half second); more are
/// not recorded, and a visitor polling again is logged in the next batch.
const MAX_LOGGED: usize = 200_000;

fn log(list: &mut Vec<Sighting>, ticket: u64, at_ms: i64) {
    if list.len() < MAX_LOGGED {
        list.push((ticket, at_ms));
    }
}

/// A census of the waiting line (computed by a scan every few seconds, not per request).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Census {
    pub waiting: u64,
    pub live: u64,
    pub abandoned: u64,
}

impl Engine {
    /// Rebuilds the engine from durable state.
    pub fn restore(counters: &QueueCounters, order: Vec<u32>, skipped: Vec<u64>, sessions: Vec<u64>, now_ms: i64) -> Self {
        let QueueCounters { last_ticket, serving, unclaimed } = *counters;
        let mut e = Engine { last_ticket, serving, unclaimed, ..Default::default() };
        e.set_order(order);
        e.skipped = skipped.into_iter().collect();
        // After a restart nobody has been seen yet: everyone gets a fresh grace period, and every
        // recorded session counts as active for a full session (never above the cap).
        let now_s = (now_ms / 1000) as u32;
        e.last_seen = vec![now_s; last_ticket as usize];
        let (from, to) = (unclaimed.0.min(last_ticket) as usize, unclaimed.1.min(last_ticket) as usize);
        e.last_seen[from..to.max(from)].fill(0);
        e.sessions = sessions.into_iter().map(|t| (t, now_ms)).collect();
        e
    }

    fn set_order(&mut self, order: Vec<u32>) {
        let mut rank_of = vec![0u32; order.len()];
        for (i, t) in order.iter().enumerate() {
            rank_of[(*t - 1) as usize] = i as u32 + 1;
        }
        self.order = order;
        self.rank_of = rank_of;
    }

    /// Shuffles tickets `1..=last_ticket` (the pre-queue) with a cryptographically secure RNG.
    /// Returns the order to persist; [`Engine::install_order`] applies it.
    pub fn shuffled_prequeue(&self) -> Vec<u32> {
        // ThreadRng is a CSPRNG (ChaCha, seeded from the OS).
        self.shuffled_prequeue_with(&mut rand::rng())
    }

    /// The shuffle with a given generator (tests pass a seeded one, so their verdict is fixed).
    pub fn shuffled_prequeue_with(&self, rng: &mut impl rand::Rng) -> Vec<u32> {
        let mut order: Vec<u32> = (1..=self.last_ticket.min(u32::MAX as u64) as u32).collect();
        order.shuffle(rng);
        order
    }

    pub fn install_order(&mut self, order: Vec<u32>) {
        if self.order.is_empty() && self.serving == 0 {
            self.set_order(order);
        }
    }

    pub fn has_order(&self) -> bool {
        !self.order.is_empty()
    }

    pub fn rank(&self, ticket: u64) -> u64 {
        match self.rank_of.get((ticket as usize).wrapping_sub(1)) {
            Some(r) if ticket >= 1 => *r as u64,
            _ => ticket,
        }
    }

    pub fn ticket_at(&self, rank: u64) -> u64 {
        match self.order.get((rank as usize).wrapping_sub(1)) {
            Some(t) if rank >= 1 => *t as u64,
            _ => rank,
        }
    }

    pub fn serving(&self) -> u64 {
        self.serving
    }

    pub fn last_ticket(&self) -> u64 {
        self.last_ticket
    }

    pub fn queue_length(&self) -> u64 {
        self.last_ticket.saturating_sub(self.serving) + self.returners.len() as u64
    }

    pub fn skipped_count(&self) -> usize {
        self.skipped.len()
    }

    pub fn measured_per_minute(&self) -> Option<f64> {
        self.metered.then_some(self.measured_per_minute)
    }

    pub fn is_admitted(&self, ticket: u64) -> bool {
        ticket >= 1 && ticket <= self.last_ticket && self.rank(ticket) <= self.serving && !self.skipped.contains(&ticket)
    }

    /// Tickets ahead that are not yet admitted; `None` once admitted. A skipped visitor who
    /// came back is next (0).
    pub fn position(&self, ticket: u64) -> Option<u64> {
        if self.is_admitted(ticket) {
            return None;
        }
        if self.skipped.contains(&ticket) {
            return Some(self.returners.iter().position(|t| *t == ticket).unwrap_or(self.returners.len()) as u64);
        }
        let rank = self.rank(ticket);
        Some(rank.saturating_sub(self.serving + 1) + self.returners.len() as u64)
    }

    /// A new ticket was issued (durably) at `now_ms`.
    pub fn on_entry(&mut self, ticket: u64, now_ms: i64) {
        self.last_ticket = self.last_ticket.max(ticket);
        if self.last_seen.len() < self.last_ticket as usize {
            self.last_seen.resize(self.last_ticket as usize, 0);
        }
        self.seen(ticket, now_ms);
    }

    /// The visitor holding `ticket` showed it is still there (status call, open connection).
    pub fn seen(&mut self, ticket: u64, now_ms: i64) {
        if let Some(logs) = &mut self.logs {
            log(&mut logs.seen, ticket, now_ms);
        }
        self.seen_elsewhere(ticket, now_ms);
    }

    /// [`seen`](Self::seen) at `now_ms`, on this node or another of the cluster (a sighting
    /// reported late never moves the last one back).
    pub fn seen_elsewhere(&mut self, ticket: u64, now_ms: i64) {
        if let Some(slot) = self.last_seen.get_mut((ticket as usize).wrapping_sub(1)) {
            *slot = (*slot).max((now_ms / 1000).max(0) as u32);
        }
        if self.skipped.contains(&ticket) && !self.returners.contains(&ticket) {
            self.returners.push_back(ticket);
        }
    }

    /// Unclaimed after a crash and not seen since.
    fn is_unclaimed(&self, ticket: u64) -> bool {
        ticket > self.unclaimed.0
            && ticket <= self.unclaimed.1
            && self.last_seen.get((ticket as usize).wrapping_sub(1)).is_some_and(|s| *s == 0)
    }

    fn is_live(&self, ticket: u64, now_ms: i64, abandon_after_s: u64) -> bool {
        let seen = self.last_seen.get((ticket as usize).wrapping_sub(1)).copied().unwrap_or(0) as i64;
        now_ms / 1000 - seen <= i64::try_from(abandon_after_s).unwrap_or(i64::MAX)
    }

    /// The waiting page of `ticket` holds realtime socket `socket_id` (one per ticket).
    pub fn watch_socket(&mut self, ticket: u64, socket_id: String, now_ms: i64) {
        if ticket >= 1 && ticket <= self.last_ticket && !self.is_admitted(ticket) {
            self.sockets.insert(ticket, socket_id);
            self.seen(ticket, now_ms);
        }
    }

    /// Marks every ticket whose socket is still open as seen; forgets closed sockets and
    /// admitted tickets. `connected` answers for one socket id.
    pub fn refresh_sockets(&mut self, now_ms: i64, connected: impl Fn(&str) -> bool) {
        let mut sockets = std::mem::take(&mut self.sockets);
        sockets.retain(|t, s| self.rank(*t) > self.serving && connected(s));
        let live: Vec<u64> = sockets.keys().copied().collect();
        self.sockets = sockets;
        for t in live {
            self.seen(t, now_ms);
        }
    }

    pub fn watched_sockets(&self) -> usize {
        self.sockets.len()
    }

    /// Activity of an admitted visitor (forward-auth check, proxied request): extends its session.
    pub fn activity(&mut self, ticket: u64, now_ms: i64) {
        if let Some(logs) = &mut self.logs {
            log(&mut logs.active, ticket, now_ms);
        }
        self.active_elsewhere(ticket, now_ms);
    }

    /// [`activity`](Self::activity) on another node of the cluster.
    pub fn active_elsewhere(&mut self, ticket: u64, now_ms: i64) {
        if self.is_admitted(ticket) {
            let last = self.sessions.entry(ticket).or_insert(now_ms);
            *last = (*last).max(now_ms);
        }
    }

    /// Starts logging what this node sees, for the other nodes of a cluster.
    pub fn log_for_cluster(&mut self) {
        self.logs.get_or_insert_with(Box::default);
    }

    /// The tickets seen and the sessions active since the last call, with when (ms).
    pub fn take_logs(&mut self) -> (Vec<Sighting>, Vec<Sighting>) {
        match &mut self.logs {
            Some(logs) => (std::mem::take(&mut logs.seen), std::mem::take(&mut logs.active)),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Keeps logging (and what is logged but unsent) across a reload of the engine.
    pub fn carry_logs_from(&mut self, before: &Engine) {
        self.logs = before.logs.clone();
    }

    /// Tickets up to `last` were issued (on any node); the ones new here entered just now.
    pub fn note_last_ticket(&mut self, last: u64, now_ms: i64) {
        let before = self.last_ticket;
        if last <= before {
            return;
        }
        self.last_ticket = last;
        self.last_seen.resize(last as usize, 0);
        for t in before + 1..=last {
            self.seen_elsewhere(t, now_ms);
        }
    }

    /// A follower catching up with the serving counter it read from the store.
    pub fn follow_serving(&mut self, serving: u64) {
        self.serving = self.serving.max(serving.min(self.last_ticket));
    }

    /// The origin ended this visitor's session: its slot frees now. Returns whether it existed.
    pub fn end_session(&mut self, ticket: u64) -> bool {
        self.sessions.remove(&ticket).is_some()
    }

    pub fn active_users(&self, now_ms: i64, session_seconds: u64) -> u64 {
        let horizon = now_ms - session_seconds as i64 * 1000;
        self.sessions.values().filter(|t| **t > horizon).count() as u64
    }

    /// Tickets with a session that has not lapsed (persisted so a restart never exceeds the cap).
    pub fn session_tickets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.sessions.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The session list as it will be once `step` is committed (for persisting first).
    pub fn sessions_after(&self, step: &Step, _input: &Inputs) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .sessions
            .keys()
            .filter(|t| !step.expired_sessions.contains(t))
            .chain(step.admitted.iter())
            .chain(step.readmitted.iter())
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Decides this tick's admissions without changing anything.
    pub fn plan(&self, input: &Inputs) -> Step {
        let horizon = input.now_ms - input.session_seconds as i64 * 1000;
        let expired_sessions: Vec<u64> = self.sessions.iter().filter(|(_, t)| **t <= horizon).map(|(k, _)| *k).collect();
        let mut step = Step { serving: self.serving, credit: self.admission.clone(), expired_sessions, ..Default::default() };
        if !input.admitting {
            step.credit.hold();
            return step;
        }
        let active = self.sessions.len() as u64 - step.expired_sessions.len() as u64;
        let capacity = input.max_active_users.map(|m| m.saturating_sub(active)).unwrap_or(u64::MAX);
        let waiting = self.queue_length();
        let granted = step.credit.advance(0, waiting, input.rate_per_minute, input.elapsed);
        let mut slots = granted.min(capacity);
        // Slots the cap withheld are returned, up to one second's worth, so freed places are
        // filled at once without ever exceeding the rate by more than a second's flow.
        step.credit.refund(granted - slots, (input.rate_per_minute / 60.0).max(1.0));

        for t in self.returners.iter().take(slots as usize) {
            step.readmitted.push(*t);
        }
        slots -= step.readmitted.len() as u64;
        let mut skips = 0;
        while slots > 0 && step.serving < self.last_ticket && skips < MAX_SKIPS_PER_TICK {
            let rank = step.serving + 1;
            let ticket = self.ticket_at(rank);
            step.serving = rank;
            match input.abandon_after_seconds {
                _ if self.is_unclaimed(ticket) => {
                    step.skipped.push(ticket);
                    skips += 1;
                }
                Some(after) if !self.is_live(ticket, input.now_ms, after) => {
                    step.skipped.push(ticket);
                    skips += 1;
                }
                _ => {
                    step.admitted.push(ticket);
                    slots -= 1;
                }
            }
        }
        // Skips used no slot; any slot left unused goes back as credit (capped as above).
        step.credit.refund(slots, (input.rate_per_minute / 60.0).max(1.0));
        step
    }

    /// Applies a planned (and persisted) step.
    pub fn commit(&mut self, step: Step, input: &Inputs) {
        self.serving = self.serving.max(step.serving);
        for t in &step.expired_sessions {
            self.sessions.remove(t);
        }
        for t in &step.skipped {
            self.skipped.insert(*t);
        }
        for t in &step.readmitted {
            self.skipped.remove(t);
            self.returners.retain(|r| r != t);
        }
        for t in step.admitted.iter().chain(&step.readmitted) {
            self.sessions.insert(*t, input.now_ms);
        }
        let admitted = step.admissions() as f64;
        self.admission = step.credit;
        let dt = input.elapsed.as_secs_f64();
        if input.admitting && dt > 0.0 {
            let instant = admitted * 60.0 / dt;
            let w = (dt / METER_WINDOW_S).min(1.0);
            if self.metered {
                self.measured_per_minute += w * (instant - self.measured_per_minute);
            } else {
                self.measured_per_minute = instant;
                self.metered = true;
            }
        }
    }

    /// Admits `ticket` at once if it is next in line and nobody else is waiting (safety net).
    /// Returns the step to persist, or `None`.
    pub fn plan_immediate(&self, ticket: u64) -> Option<Step> {
        (self.returners.is_empty() && self.rank(ticket) == self.serving + 1 && ticket == self.last_ticket).then(|| Step {
            serving: self.serving + 1,
            admitted: vec![ticket],
            credit: self.admission.clone(),
            ..Default::default()
        })
    }

    /// Counts live and abandoned visitors among those waiting (O(waiting); run every few seconds).
    pub fn census(&self, now_ms: i64, abandon_after_seconds: Option<u64>) -> Census {
        let live = abandon_after_seconds.map(|after| self.live_among((self.serving + 1)..(self.last_ticket + 1), now_ms, after));
        self.census_with(live)
    }

    /// The waiting visitors' ranks: those after the serving counter.
    pub fn waiting_ranks(&self) -> std::ops::Range<u64> {
        (self.serving + 1)..(self.last_ticket + 1)
    }

    /// Live visitors among the waiting ones with these ranks (a slice of a census: a caller can
    /// scan a long line a slice per lock, so no request waits on the whole scan).
    pub fn live_among(&self, ranks: std::ops::Range<u64>, now_ms: i64, abandon_after_s: u64) -> u64 {
        let ranks = ranks.start.max(self.serving + 1)..ranks.end.min(self.last_ticket + 1);
        ranks.filter(|r| self.is_live(self.ticket_at(*r), now_ms, abandon_after_s)).count() as u64
    }

    /// The census from a count of live waiters (`None`: nobody is ever counted as gone).
    pub fn census_with(&self, live: Option<u64>) -> Census {
        let waiting = self.last_ticket.saturating_sub(self.serving);
        let live = live.map_or(waiting, |l| l.min(waiting));
        Census { waiting, live, abandoned: self.skipped.len() as u64 - self.returners.len() as u64 + (waiting - live) }
    }
}

/// Honest wait for a visitor `position` places back: only the live share of the line ahead
/// counts, at the measured admission rate when there is one (the effective rate until then).
pub fn eta_seconds(position: u64, census: &Census, measured_per_minute: Option<f64>, effective_rate: f64) -> Option<u64> {
    let live_fraction = if census.waiting > 0 { census.live as f64 / census.waiting as f64 } else { 1.0 };
    let live_ahead = (position as f64 * live_fraction).round() as u64;
    let rate = match measured_per_minute {
        Some(m) if m > 0.0 => m,
        _ => effective_rate,
    };
    crate::room::queue::eta_seconds(live_ahead, rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn inputs(now_ms: i64, rate: f64) -> Inputs {
        Inputs {
            now_ms,
            elapsed: TICK,
            rate_per_minute: rate,
            admitting: true,
            max_active_users: None,
            session_seconds: 600,
            abandon_after_seconds: None,
        }
    }

    fn tick(e: &mut Engine, input: Inputs) -> Step {
        let step = e.plan(&input);
        e.commit(step.clone(), &input);
        step
    }

    /// A census counted a slice at a time (as the driver does) equals the whole scan, and only
    /// visitors not seen within the abandonment window are counted as gone.
    #[test]
    fn a_census_in_slices_equals_the_whole_scan() {
        let mut e = Engine::default();
        for t in 1..=100 {
            e.on_entry(t, 0);
        }
        for t in (1..=100).filter(|t| t % 3 == 0) {
            e.seen(t, 50_000);
        }
        let (now, after) = (60_000, 30);
        let whole = e.census(now, Some(after));
        assert_eq!((whole.waiting, whole.live), (100, 33), "only tickets seen at 50 s are live at 60 s");
        for slice in [1u64, 7, 16, 100, 1_000] {
            let ranks = e.waiting_ranks();
            let live = (ranks.start..ranks.end).step_by(slice as usize).map(|from| e.live_among(from..(from + slice).min(ranks.end), now, after)).sum();
            assert_eq!(e.census_with(Some(live)), whole, "slices of {slice}");
        }
        assert_eq!(e.census(now, None).live, 100, "without abandonment everyone waiting is live");
        assert_eq!(e.census_with(Some(1_000)).live, 100, "a count from a line that has moved is capped");
    }

    #[test]
    fn fifo_by_default() {
        let mut e = Engine::default();
        for t in 1..=5 {
            e.on_entry(t, 0);
        }
        let mut order = Vec::new();
        for i in 0..100 {
            order.extend(tick(&mut e, inputs(i * 100, 600.0)).admitted);
        }
        assert_eq!(order, vec![1, 2, 3, 4, 5]);
        assert!((1..=5).all(|t| e.is_admitted(t)));
    }

    #[test]
    fn shuffle_is_a_permutation_placed_ahead_of_later_arrivals() {
        let mut e = Engine::default();
        for t in 1..=50 {
            e.on_entry(t, 0);
        }
        let order = e.shuffled_prequeue();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (1..=50).collect::<Vec<u32>>());
        e.install_order(order.clone());
        for t in 51..=60 {
            e.on_entry(t, 0);
        }
        let mut admitted = Vec::new();
        for i in 0..200 {
            admitted.extend(tick(&mut e, inputs(i * 100, 600.0)).admitted);
        }
        let expected: Vec<u64> = order.iter().map(|t| *t as u64).chain(51..=60).collect();
        assert_eq!(admitted, expected);
        // Positions agree with ranks.
        let e2 = Engine::restore(&QueueCounters { last_ticket: 60, ..Default::default() }, order.clone(), vec![], vec![], 0);
        assert_eq!(e2.position(order[0] as u64), Some(0));
        assert_eq!(e2.position(order[49] as u64), Some(49));
        assert_eq!(e2.position(51), Some(50));
    }

    /// After a crash, tickets 6..=10 may never have been handed out: those never seen are
    /// skipped without using a slot; one whose holder shows up is admitted, first if it comes late.
    #[test]
    fn unclaimed_tickets_wait_for_their_holder() {
        let counters = QueueCounters { last_ticket: 10, serving: 0, unclaimed: (5, 10) };
        let mut e = Engine::restore(&counters, vec![], vec![], vec![], 1_000_000);
        e.seen(7, 1_000_000);
        let mut admitted = Vec::new();
        for i in 0..100 {
            admitted.extend(tick(&mut e, inputs(1_000_000 + i * 100, 600.0)).admitted);
        }
        assert_eq!(admitted, vec![1, 2, 3, 4, 5, 7], "unclaimed and unseen: 6, 8, 9, 10");
        assert_eq!(e.skipped_count(), 4);
        e.seen(9, 1_020_000);
        let step = tick(&mut e, inputs(1_020_000, 600.0));
        assert_eq!(step.readmitted, vec![9], "a holder who turns up late is let in first");
    }
}
