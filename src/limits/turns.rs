//! Turns: when more connections have requests than the server can serve at once and the CPU is
//! the bottleneck, `active` of them are served at a time, each for a turn of up to `length`,
//! and the others wait their turn in line, their requests in the kernel's socket buffers.
//!
//! Why: a request costs more CPU the more connections are being served at the same time, because
//! each one then finds its connection's state (kernel socket, hyper's buffers, the task) cold in
//! the caches. On the benchmark machine 64 busy keep-alive connections got ~1.3× the requests per
//! CPU-second that 2,048 did (`BENCHMARKS.md`, overload). A reverse proxy's pool of upstream
//! keep-alive connections, or a crowd of browsers, makes thousands busy at once; taking them in
//! turns keeps the working set that of a few dozen, so a flood is served at the server's peak
//! rate instead of below it.
//!
//! The rule, per connection (each accepted socket has a [`Turn`]):
//! - with nothing to read it holds nothing: it waits for data without a turn;
//! - with data, it takes a turn (a permit of a semaphore, granted in arrival order) and keeps it
//!   while its requests are served;
//! - out of requests, it gives the turn back at once if nobody is waiting (so without contention
//!   a turn costs two atomic operations a request); if others wait and its client sent the next
//!   request promptly last time and the CPU is the bottleneck, it keeps the turn for [`GRACE`]
//!   more, for that next request;
//! - a turn ends after `length` (shorter while the line is long, see below) if others are
//!   waiting: the connection goes to the back of the line.
//!
//! While a line exists the governor sizes the turns to the CPU: `active` when the runtime is
//! busy, more when it has time to spare (clients slow to send their next request, requests
//! waiting on a proxied origin, turns held by slow requests that began before the line did), so
//! turns never leave a core idle while connections wait. A line that forms after a period with
//! time to spare gets more turns at once; turns added stay after the line is gone until the CPU
//! is busy again, so a moderate load over more connections than `active` does not form a line
//! (and wait out a turn) at every hiccup. Upgraded (WebSocket) connections leave the turns at
//! the upgrade.
//!
//! A connection joining a line of `waiting` waits about `waiting / turns × turn` for its turn.
//! The governor keeps that within `line_wait` by shortening the turns as the line grows (down
//! to [`MIN_TURN`]); a line too long even for the shortest turns is not joined: a connection
//! arriving with a request is read at once, without a turn, and its request refused (503 with
//! `Retry-After`, see `shed` and `backoff`; while refusals go on, idle connections are watched by
//! the door, which answers them off the busy workers, see `door`). So accepted requests wait a
//! bounded time, and a refused one is told so without waiting in line.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::head_guard::Activity;

/// How long after the line was last found full an overload counts as on (`Turns::refusing`):
/// a few times the `Retry-After` of a refusal, since refused clients come back in waves and the
/// line can have room for a second between them.
pub const REFUSING_FOR: Duration = Duration::from_secs(5);

/// How long a turn stays with a connection that has run out of requests while others wait, if
/// its client was prompt last time: about what a busy client takes to send the next request.
pub const GRACE: Duration = Duration::from_millis(2);

/// How connections take turns (`limits.active_connections`, `limits.turn_ms`,
/// `limits.line_wait_ms`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// Connections served at once under contention; 0: no turns, every connection reads freely.
    pub active: usize,
    /// The longest turn while others wait.
    pub length: Duration,
    /// The longest wait in line: turns shorten to keep it, then arrivals are refused; zero: no
    /// bound (turns stay `length`, nobody is refused).
    pub line_wait: Duration,
}

/// The turns shared by all connections of one listener.
#[derive(Clone)]
pub struct Turns(Arc<Shared>);

struct Shared {
    permits: Arc<Semaphore>,
    /// The longest turn, and the governor's period.
    length: Duration,
    /// The turn now, in microseconds: `length`, shortened by the governor while the line is long.
    turn_us: AtomicU64,
    line_wait: Duration,
    /// The number of turns the governor has set.
    turns_now: AtomicUsize,
    /// The configured number of turns, the least there are while a line exists.
    active: usize,
    /// Connections with data waiting for a turn.
    waiting: AtomicUsize,
    /// Turns to take back as they end (the governor lowering the number in use).
    surplus: AtomicUsize,
    /// Wakes the governor when the line forms.
    line_formed: Notify,
    /// Rings when refusals begin (the line was found full after [`REFUSING_FOR`] or more
    /// without): its wakers are the offers of idle connections (`door::Offer`), which the
    /// ringing thread queues for the door's thread to take over.
    refusals_began: Arc<Notify>,
    /// Wakes idle connections that saw no line when a line forms after [`REFUSING_FOR`] or more
    /// without one forming, so that they are offered to the door (`door::Offer`) before the line
    /// can fill.
    line_began: Arc<Notify>,
    /// When a line last formed, in ms since `born` (0: never).
    last_line_ms: AtomicU64,
    /// How many times `line_began` has rung.
    line_rings: AtomicU64,
    /// Whether the CPU was the bottleneck at the governor's last look: only then does a prompt
    /// connection keep its turn between requests while others wait (with time to spare, the
    /// caches are not what limits, and the turn is worth more to the next in line).
    cpu_bound: AtomicBool,
    /// When the line was last found full, in ms since `born` (0: never).
    last_full_ms: AtomicU64,
    born: Instant,
    /// Tests: the busy share the governor sees instead of the runtime's (`f64` bits; NaN: none).
    #[cfg(test)]
    forced_share: AtomicU64,
}

impl Turns {
    /// The turns `settings` describe; `None` (every connection reads freely) when
    /// `settings.active` is 0. Spawns the governor: call within a runtime.
    pub fn new(settings: Settings) -> Option<Self> {
        Self::build(settings, None)
    }

    fn build(Settings { active, length, line_wait }: Settings, #[cfg_attr(not(test), allow(unused))] forced_share: Option<f64>) -> Option<Self> {
        if active == 0 {
            return None;
        }
        metrics::gauge!("weir_connection_turns").set(active as f64);
        let turns = Self(Arc::new(Shared {
            permits: Arc::new(Semaphore::new(active)),
            length,
            turn_us: AtomicU64::new(length.as_micros() as u64),
            line_wait,
            turns_now: AtomicUsize::new(active),
            active,
            waiting: AtomicUsize::new(0),
            surplus: AtomicUsize::new(0),
            line_formed: Notify::new(),
            refusals_began: Arc::new(Notify::new()),
            line_began: Arc::new(Notify::new()),
            last_line_ms: AtomicU64::new(0),
            line_rings: AtomicU64::new(0),
            cpu_bound: AtomicBool::new(forced_share.is_some_and(|share| share >= SPARE_BELOW)),
            last_full_ms: AtomicU64::new(0),
            // A day back, so that a line found full at once is not at 0 ms ("never").
            born: Instant::now().checked_sub(Duration::from_secs(86_400)).unwrap_or_else(Instant::now),
            #[cfg(test)]
            forced_share: AtomicU64::new(forced_share.unwrap_or(f64::NAN).to_bits()),
        }));
        tokio::spawn(governor(turns.0.clone()));
        Some(turns)
    }

    /// A new connection's place in the turns.
    pub fn join(&self) -> Turn {
        Turn { turns: self.clone(), state: State::Out, idle_since: None, prompt: true, past_line: false, admitted: false, timer: None }
    }

    fn contended(&self) -> bool {
        self.0.waiting.load(Relaxed) > 0
    }

    /// Whether a connection joining the line now would wait longer than `line_wait` even with
    /// the shortest turns. Asked at each arrival, so refusals stop as soon as the line has room:
    /// a line kept full, not emptied, keeps the CPU busy.
    pub(crate) fn line_full(&self) -> bool {
        let s = &self.0;
        let full = pace(s.length, s.line_wait, s.turns_now.load(Relaxed), s.waiting.load(Relaxed) + 1).1;
        if full {
            self.found_full();
        }
        full
    }

    fn found_full(&self) {
        // Asked at every refusal, from the workers and the door: written once a millisecond at
        // most, so the line stays in the caches that read it.
        let now = self.0.born.elapsed().as_millis() as u64;
        let last = self.0.last_full_ms.load(Relaxed);
        if last != now {
            self.0.last_full_ms.store(now, Relaxed);
            if last == 0 || now.saturating_sub(last) >= REFUSING_FOR.as_millis() as u64 {
                self.0.refusals_began.notify_waiters();
            }
        }
    }

    /// Ready once a line forms after [`REFUSING_FOR`] or more without one forming, for a future
    /// polled before.
    pub(crate) fn when_line_forms(&self) -> OwnedNotified {
        self.0.line_began.clone().notified_owned()
    }

    /// A line formed: wakes the idle connections that saw none, unless one formed within
    /// [`REFUSING_FOR`] (they were woken then; under a steady load lines come and go, and each
    /// would wake them all).
    fn line_formed(&self) {
        self.0.line_formed.notify_one();
        let now = self.0.born.elapsed().as_millis() as u64;
        let last = self.0.last_line_ms.swap(now, Relaxed);
        if last == 0 || now.saturating_sub(last) >= REFUSING_FOR.as_millis() as u64 {
            self.0.line_rings.fetch_add(1, Relaxed);
            self.0.line_began.notify_waiters();
        }
    }

    /// How many times the bell of [`Turns::when_line_forms`] has rung: a connection that set
    /// it at the same count need not poll it again (a lock) at every idle spell.
    pub(crate) fn line_rings(&self) -> u64 {
        self.0.line_rings.load(Relaxed)
    }

    /// Ready once refusals begin ([`Turns::refusing`] turns true), for a future polled before.
    pub(crate) fn when_refusals_begin(&self) -> OwnedNotified {
        self.0.refusals_began.clone().notified_owned()
    }

    /// Whether connections with requests wait in line for a turn: the line may fill.
    pub(crate) fn has_line(&self) -> bool {
        self.contended()
    }

    /// Tests: as if the line had just been found full.
    #[cfg(test)]
    pub(crate) fn refusing_now(&self) {
        self.found_full();
    }

    /// Whether the line was found full within the last [`REFUSING_FOR`]: an overload is on,
    /// and may be again in a moment even if the line has room now.
    pub(crate) fn refusing(&self) -> bool {
        let s = &self.0;
        let last = s.last_full_ms.load(Relaxed);
        last != 0 && (s.born.elapsed().as_millis() as u64).saturating_sub(last) < REFUSING_FOR.as_millis() as u64
    }

    /// Whether requests are refused when the line is too long (a `line_wait` is set).
    pub(crate) fn refuses(&self) -> bool {
        !self.0.line_wait.is_zero()
    }

    /// Whether no turn is free: a connection with a request now waits in line or is refused.
    pub(crate) fn crowded(&self) -> bool {
        self.0.permits.available_permits() == 0
    }

    /// How long a turn lasts now while others wait.
    fn turn(&self) -> Duration {
        Duration::from_micros(self.0.turn_us.load(Relaxed))
    }

    /// Gives a turn back: to the next in line, or to nobody if there are more turns than the
    /// governor wants.
    fn release(&self, permit: OwnedSemaphorePermit) {
        if self.0.surplus.load(Relaxed) > 0 && self.0.surplus.fetch_update(Relaxed, Relaxed, |e| e.checked_sub(1)).is_ok() {
            permit.forget();
        }
    }
}

/// Share of the runtime's time busy over a governor period below which a line is a waste: the
/// turns are held by clients slow to send their next requests, or by requests waiting on
/// something else (a proxied origin), not by work for the CPU.
const SPARE_BELOW: f64 = 0.8;
/// Without a line, the share at or above which, for [`BUSY_PERIODS`] periods in a row, the CPU
/// is the bottleneck again and turns added earlier are taken back (above [`SPARE_BELOW`], and
/// sustained, so a load near it does not swing the turns).
const BUSY_ABOVE: f64 = 0.9;
const BUSY_PERIODS: u32 = 3;
/// Without a line, the share below which the server is quiet: the governor rests until a line
/// forms (no wake-ups on an idle server), the turns as they are. A half load measured 0.3–0.9
/// period to period.
const QUIET_BELOW: f64 = 0.1;

/// Sizes the turns: every `length`, while connections wait in line, more turns (half again as
/// many) if the runtime's workers had time to spare, fewer (down to `active`) if they did not.
/// Turns only make sense when the CPU is the bottleneck; otherwise every connection with a
/// request should be read. Turns added stay when the line is gone (unused, they cost nothing)
/// and are taken back when the CPU is busy again: shrinking them to `active` as soon as the line
/// was gone (or the server went quiet) made a moderate load over more connections than `active`
/// form a line again and again, each time leaving requests waiting out a turn (50 ms) on an idle
/// CPU. (A flood over fewer connections than the turns, right after a quiet spell, forms no line
/// and is served without turns until one does.)
async fn governor(s: Arc<Shared>) {
    let runtime = tokio::runtime::Handle::current().metrics();
    let busy = || (0..runtime.num_workers()).map(|w| runtime.worker_total_busy_duration(w)).sum::<Duration>();
    let workers = runtime.num_workers().max(1) as f64;
    let share_since = |busy_before: Duration, before: Instant| s.seen((busy() - busy_before).as_secs_f64() / (before.elapsed().as_secs_f64() * workers));
    let mut turns = s.active;
    let mut busy_periods = 0;
    let mut quiet = true;
    loop {
        let waiting = s.waiting.load(Relaxed);
        metrics::gauge!("weir_connection_turns_waiting").set(waiting as f64);
        if waiting == 0 && (turns == s.active || quiet) {
            s.turn_us.store(s.length.as_micros() as u64, Relaxed);
            let (busy_before, before) = (busy(), Instant::now());
            s.line_formed.notified().await;
            // A line just formed. If the CPU had time to spare over at least a period before it,
            // the turns are too few for this load: more now, not after a period of waiting.
            if before.elapsed() >= s.length {
                let share = share_since(busy_before, before);
                s.cpu_bound.store(share >= SPARE_BELOW, Relaxed);
                if share < SPARE_BELOW {
                    turns = add_turns(&s, turns);
                    s.set_turns(turns);
                }
            }
            quiet = false;
            continue;
        }
        let (busy_before, before) = (busy(), Instant::now());
        tokio::time::sleep(s.length).await;
        let share = share_since(busy_before, before);
        let line = s.waiting.load(Relaxed) > 0;
        s.cpu_bound.store(share >= SPARE_BELOW, Relaxed);
        busy_periods = if share >= BUSY_ABOVE { busy_periods + 1 } else { 0 };
        if line && share < SPARE_BELOW {
            turns = add_turns(&s, turns);
        } else if turns > s.active && if line { share >= SPARE_BELOW } else { busy_periods >= BUSY_PERIODS } {
            let fewer = (turns / 3).clamp(1, turns - s.active);
            turns -= fewer;
            s.surplus.fetch_add(fewer, Relaxed);
        }
        quiet = !line && share < QUIET_BELOW;
        let (turn, _) = pace(s.length, s.line_wait, turns, s.waiting.load(Relaxed));
        s.turn_us.store(turn.as_micros() as u64, Relaxed);
        s.set_turns(turns);
    }
}

impl Shared {
    /// A busy share as the governor takes it (tests: the forced one, if any).
    fn seen(&self, share: f64) -> f64 {
        #[cfg(test)]
        {
            let forced = f64::from_bits(self.forced_share.load(Relaxed));
            if !forced.is_nan() {
                return forced;
            }
        }
        share
    }

    fn set_turns(&self, turns: usize) {
        self.turns_now.store(turns, Relaxed);
        metrics::gauge!("weir_connection_turns").set(turns as f64);
    }
}

/// Half again as many turns as `turns`; returns the new number.
fn add_turns(s: &Shared, turns: usize) -> usize {
    let more = (turns / 2).max(1).min(MAX_TURNS.saturating_sub(turns));
    if more == 0 {
        return turns;
    }
    // Turns still to be taken back are cancelled first.
    let cancelled = s.surplus.fetch_update(Relaxed, Relaxed, |e| Some(e.saturating_sub(more))).unwrap_or(0).min(more);
    s.permits.add_permits(more - cancelled);
    turns + more
}

/// The most turns the governor sets: more than a process's connections (file descriptors) can
/// be. A line that persists with the CPU idle (every turn held by a request waiting on a slow
/// origin) grows the turns by half each period, and without a bound that overflowed within
/// seconds.
const MAX_TURNS: usize = 1 << 20;

/// The shortest a turn gets while the line is long: a few requests' worth, more than [`GRACE`].
pub const MIN_TURN: Duration = Duration::from_millis(5);

/// The turn length that keeps the wait of a connection joining a line of `waiting` within
/// `line_wait` (it waits about `waiting / turns` turns), between [`MIN_TURN`] and `length`; and
/// whether even the shortest turns cannot keep it (the line is full).
fn pace(length: Duration, line_wait: Duration, turns: usize, waiting: usize) -> (Duration, bool) {
    if line_wait.is_zero() || waiting == 0 {
        return (length, false);
    }
    let fits = Duration::try_from_secs_f64(line_wait.as_secs_f64() * turns as f64 / waiting as f64).unwrap_or(Duration::MAX);
    (fits.clamp(MIN_TURN.min(length), length), fits < MIN_TURN)
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

enum State {
    /// No turn: waits for data without one.
    Out,
    /// Has data, waits in line.
    Waiting(Acquire),
    /// Being served; the turn's length counts from `since`, when it was first held while
    /// others waited (so a turn nobody waits for costs no clock read).
    Holding { permit: OwnedSemaphorePermit, since: Option<Instant> },
}

/// One connection's place in the [`Turns`].
pub struct Turn {
    turns: Turns,
    state: State,
    /// When the connection last ran out of requests while others waited.
    idle_since: Option<Instant>,
    /// Whether its client sent the next request within [`GRACE`] last time.
    prompt: bool,
    /// Whether the last read came past a line too long to join: its request is to be refused.
    past_line: bool,
    /// Whether the next request was seen arriving while the line had room (`limits::door`):
    /// it joins the line even if the line has grown since.
    admitted: bool,
    /// Ends a turn held under contention (created once, reset after).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Turn {
    /// Reads from `stream` when it is this connection's turn; `activity` tells whether a
    /// request is being served.
    pub fn poll_read(&mut self, stream: &mut TcpStream, activity: &Activity, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Out => {
                    // Data (or the end of the stream) first: a turn only once there is something to read.
                    std::task::ready!(stream.poll_read_ready(cx))?;
                    if let Some(idle) = self.idle_since.take() {
                        self.prompt = idle.elapsed() <= GRACE;
                    }
                    let admitted = std::mem::take(&mut self.admitted);
                    match self.turns.0.permits.clone().try_acquire_owned() {
                        Ok(permit) => self.state = State::Holding { permit, since: None },
                        Err(_) if !admitted && self.turns.line_full() => {
                            // Read now, without a turn, for a quick refusal.
                            self.past_line = true;
                            let before = buf.filled().len();
                            let read = Pin::new(stream).poll_read(cx, buf);
                            if buf.filled().len() > before {
                                metrics::counter!("weir_connection_turns_refused_total").increment(1);
                            }
                            return read;
                        }
                        Err(_) => {
                            // A new socket is reported readable before anything arrives: only a
                            // connection with data (or at its end) takes a place in line. Once
                            // read from, its readiness is news (a read that found nothing
                            // cleared it), and the peek's system call is spared.
                            let mut byte = [0u8; 1];
                            if !activity.has_read() && std::task::ready!(stream.poll_peek(cx, &mut ReadBuf::new(&mut byte)))? == 0 {
                                return Pin::new(stream).poll_read(cx, buf);
                            }
                            metrics::counter!("weir_connection_turns_waited_total").increment(1);
                            if self.turns.0.waiting.fetch_add(1, Relaxed) == 0 {
                                self.turns.line_formed();
                            }
                            self.state = State::Waiting(Box::pin(self.turns.0.permits.clone().acquire_owned()));
                        }
                    }
                }
                State::Waiting(acquire) => {
                    let acquired = std::task::ready!(acquire.as_mut().poll(cx));
                    self.turns.0.waiting.fetch_sub(1, Relaxed);
                    match acquired {
                        Ok(permit) => self.state = State::Holding { permit, since: None },
                        // The semaphore is never closed; were it, reading freely is the safe way out.
                        Err(_) => {
                            self.state = State::Out;
                            return Pin::new(stream).poll_read(cx, buf);
                        }
                    }
                }
                State::Holding { since, .. } => {
                    // The clock is read only while others wait, once a poll.
                    let now = self.turns.contended().then(Instant::now);
                    let turn_end = now.map(|now| *since.get_or_insert(now) + self.turns.turn());
                    if let (Some(now), Some(end)) = (now, turn_end) {
                        if now >= end {
                            // Others wait and the turn is over: to the back of the line.
                            self.leave();
                            continue;
                        }
                    }
                    let read = Pin::new(&mut *stream).poll_read(cx, buf);
                    if read.is_ready() {
                        self.past_line = false;
                        if self.idle_since.take().is_some() {
                            self.prompt = true;
                        }
                        return read;
                    }
                    self.keep_or_leave(activity.in_flight(), now.zip(turn_end), cx);
                    return Poll::Pending;
                }
            }
        }
    }

    /// With nothing to read: keeps the turn while a request is `serving` (until the turn's end,
    /// if others wait) or, out of requests, for a prompt client while the CPU is the bottleneck
    /// (for [`GRACE`]); else gives it back. `clock` is (now, the turn's end) while others wait.
    fn keep_or_leave(&mut self, serving: bool, clock: Option<(Instant, Instant)>, cx: &mut Context<'_>) {
        let Some((now, turn_end)) = clock else {
            if !serving {
                self.leave();
            }
            return;
        };
        let end = if serving {
            turn_end
        } else {
            let idle = *self.idle_since.get_or_insert(now);
            if !self.prompt || !self.turns.0.cpu_bound.load(Relaxed) {
                self.leave();
                return;
            }
            (idle + GRACE).min(turn_end)
        };
        if super::poll_timer(&mut self.timer, end, cx).is_ready() {
            if !serving {
                // The client did not send its next request within the grace.
                self.prompt = false;
            }
            self.leave();
        }
    }

    /// The next request arrived while the line had room: it is not refused for the line.
    pub(crate) fn admit(&mut self) {
        self.admitted = true;
    }

    /// Whether the connection neither holds a turn nor waits for one.
    pub(crate) fn is_out(&self) -> bool {
        matches!(self.state, State::Out)
    }

    /// Whether the last read came past a line too long to join: its request is to be refused.
    pub fn past_line(&self) -> bool {
        self.past_line
    }

    /// Out of the turns: gives back a turn held, or leaves the line.
    pub fn leave(&mut self) {
        match std::mem::replace(&mut self.state, State::Out) {
            State::Holding { permit, .. } => self.turns.release(permit),
            State::Waiting(_) => {
                self.turns.0.waiting.fetch_sub(1, Relaxed);
            }
            State::Out => {}
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// One accepted connection: the client's end, the server's socket, its turn and activity.
    struct Conn {
        client: TcpStream,
        server: TcpStream,
        turn: Turn,
        activity: Activity,
    }

    impl Conn {
        async fn open(turns: &Turns) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            Self { client, server, turn: turns.join(), activity: Activity::default() }
        }

        /// The client sends a request; returns once the server's socket is readable.
        async fn send(&mut self) {
            self.client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            self.server.readable().await.unwrap();
        }

        /// One poll of a read through the turn: whether it read anything.
        async fn reads(&mut self) -> bool {
            let mut bytes = [0u8; 64];
            let mut buf = ReadBuf::new(&mut bytes);
            let polled = std::future::poll_fn(|cx| Poll::Ready(self.turn.poll_read(&mut self.server, &self.activity, cx, &mut buf))).await;
            match polled {
                Poll::Ready(result) => {
                    result.unwrap();
                    assert!(!buf.filled().is_empty(), "read the end of the stream");
                    true
                }
                Poll::Pending => false,
            }
        }

        /// Reads a request and serves it: started, answered, then looks for the next one.
        async fn serve_one(&mut self) {
            assert!(self.reads().await, "the request was not read");
            self.activity.started();
            assert!(!self.reads().await, "read more than one request");
            self.activity.finished();
            assert!(!self.reads().await);
        }
    }

    /// One turn of `length`, the line unbounded.
    fn one_turn(length: Duration) -> Settings {
        Settings { active: 1, length, line_wait: Duration::ZERO }
    }

    fn waiting(turns: &Turns) -> usize {
        turns.0.waiting.load(Relaxed)
    }

    /// A serving a request on the only turn, B's request waiting in line.
    async fn a_serving_b_waiting(turns: &Turns) -> (Conn, Conn) {
        let (mut a, mut b) = (Conn::open(turns).await, Conn::open(turns).await);
        serving_and_waiting(&mut a, &mut b, turns).await;
        (a, b)
    }

    /// `serving` takes the free turn with a request being served, `waiting`'s request waits in line.
    async fn serving_and_waiting(serving: &mut Conn, waiting_conn: &mut Conn, turns: &Turns) {
        serving.send().await;
        assert!(serving.reads().await);
        serving.activity.started();
        waiting_conn.send().await;
        assert!(!waiting_conn.reads().await, "read without a turn");
        assert_eq!(waiting(turns), 1);
    }

    /// One turn of 50 ms with a line bound of `line_wait`, held by a connection whose request is
    /// being served.
    async fn one_turn_held(line_wait: Duration) -> (Turns, Conn) {
        let turns = Turns::new(Settings { active: 1, length: Duration::from_millis(50), line_wait }).unwrap();
        let mut holder = Conn::open(&turns).await;
        holder.send().await;
        assert!(holder.reads().await);
        holder.activity.started();
        (turns, holder)
    }

    /// With the line full, a request read at once is refused (read past the line) unless the
    /// door saw it arrive while the line had room: then it joins the line. The overload counts
    /// as on for `REFUSING_FOR` after the line was last found full.
    #[tokio::test(start_paused = true)]
    async fn a_full_line_refuses_but_what_the_door_admitted_joins_it() {
        let (turns, _holder) = one_turn_held(Duration::from_millis(1)).await;
        assert!(turns.crowded() && !turns.refusing());
        let mut refused = Conn::open(&turns).await;
        refused.send().await;
        assert!(refused.reads().await && refused.turn.past_line(), "not read past the full line");
        assert!(turns.refusing());
        let mut admitted = Conn::open(&turns).await;
        admitted.turn.admit();
        admitted.send().await;
        assert!(!admitted.reads().await, "read past the line though admitted");
        assert_eq!(waiting(&turns), 1);
        tokio::time::advance(REFUSING_FOR).await;
        assert!(!turns.refusing(), "still refusing a while after the line was last full");
    }

    /// However long a line persists with the CPU idle, the turns stop growing at [`MAX_TURNS`].
    #[tokio::test(start_paused = true)]
    async fn the_turns_have_a_ceiling() {
        let turns = Turns::new(one_turn(Duration::from_millis(50))).unwrap();
        assert_eq!(add_turns(&turns.0, MAX_TURNS - 1), MAX_TURNS);
        assert_eq!(add_turns(&turns.0, MAX_TURNS), MAX_TURNS);
        assert_eq!(add_turns(&turns.0, 4), 6);
    }

    /// A new socket is reported readable before anything has arrived: it does not take a place
    /// in line for that.
    #[tokio::test(start_paused = true)]
    async fn a_new_connection_without_data_does_not_join_the_line() {
        let (turns, _holder) = one_turn_held(Duration::from_secs(60)).await;
        let mut quiet = Conn::open(&turns).await;
        assert!(!quiet.reads().await);
        assert_eq!(waiting(&turns), 0, "joined the line with nothing to read");
        quiet.send().await;
        assert!(!quiet.reads().await);
        assert_eq!(waiting(&turns), 1, "its request does join it");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_line_a_turn_is_given_back_between_requests() {
        let turns = Turns::new(one_turn(Duration::from_millis(50))).unwrap();
        let (mut a, mut b) = (Conn::open(&turns).await, Conn::open(&turns).await);
        for _ in 0..3 {
            a.send().await;
            a.serve_one().await;
            assert_eq!(turns.0.permits.available_permits(), 1, "an idle connection holds no turn");
            b.send().await;
            b.serve_one().await;
        }
        assert_eq!(waiting(&turns), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_active_connections_wait_in_line_and_are_served_in_order() {
        // The CPU is the bottleneck: prompt connections keep their turns between requests.
        let turns = Turns::build(one_turn(Duration::from_millis(50)), Some(1.0)).unwrap();
        let (mut a, mut b, mut c) = (Conn::open(&turns).await, Conn::open(&turns).await, Conn::open(&turns).await);
        a.send().await;
        assert!(a.reads().await);
        a.activity.started();
        b.send().await;
        c.send().await;
        assert!(!b.reads().await && !c.reads().await, "read without a turn");
        assert_eq!(waiting(&turns), 2);
        // A's request is answered; its prompt client sends the next within the grace: A keeps the turn.
        assert!(!a.reads().await);
        a.activity.finished();
        assert!(!a.reads().await);
        tokio::time::advance(GRACE / 2).await;
        a.send().await;
        a.serve_one().await;
        assert!(!b.reads().await, "A's turn went to B within the grace");
        // No next request within the grace: the turn goes to the first in line, B.
        tokio::time::advance(GRACE * 2).await;
        assert!(!a.reads().await);
        assert!(!c.reads().await, "C was served before B, who waited longer");
        assert!(b.reads().await);
        b.activity.started();
        assert_eq!(waiting(&turns), 1);
        // A asks again: it waits behind C now.
        a.send().await;
        assert!(!a.reads().await);
        assert!(!b.reads().await);
        b.activity.finished();
        // A was not prompt last time... but B has not been seen idle before: B gets the grace.
        assert!(!b.reads().await);
        tokio::time::advance(GRACE * 2).await;
        assert!(!b.reads().await);
        assert!(c.reads().await, "C's turn after B's");
        assert!(!a.reads().await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_ends_after_its_length_while_others_wait() {
        let length = Duration::from_millis(50);
        // The CPU is the bottleneck, so the governor adds no turns.
        let turns = Turns::build(one_turn(length), Some(1.0)).unwrap();
        let (mut a, mut b) = a_serving_b_waiting(&turns).await;
        a.activity.finished();
        // A's client keeps sending at once: A is served for the length of its turn, no longer.
        let start = Instant::now();
        let mut served = 1;
        loop {
            tokio::time::advance(Duration::from_millis(5)).await;
            a.send().await;
            if !a.reads().await {
                break;
            }
            a.activity.started();
            a.activity.finished();
            served += 1;
            assert!(!b.reads().await);
        }
        assert!(start.elapsed() >= length && served >= 10, "the turn ended after {:?} and {served} requests", start.elapsed());
        assert!(b.reads().await, "B's turn came when A's ended");
        assert_eq!(waiting(&turns), 1, "A is back in line");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_does_not_hold_the_line_while_the_cpu_idles() {
        let turns = Turns::new(one_turn(Duration::from_millis(50))).unwrap();
        // A's request takes long, and nothing polls A's connection meanwhile, so nothing ends its
        // turn (as with a request that began before anyone waited).
        let (_a, mut b) = a_serving_b_waiting(&turns).await;
        // The runtime idles while B waits: the governor adds a turn.
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(b.reads().await, "B still waits behind a slow request on an idle CPU");
        assert_eq!(waiting(&turns), 0);
    }

    fn force_share(turns: &Turns, share: f64) {
        turns.0.forced_share.store(share.to_bits(), Relaxed);
    }

    fn turns_now(turns: &Turns) -> usize {
        turns.0.turns_now.load(Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn turns_added_for_a_line_stay_until_the_cpu_is_busy() {
        let length = Duration::from_millis(50);
        // A moderate load: the CPU has time to spare, but is not quiet.
        let turns = Turns::build(one_turn(length), Some(0.6)).unwrap();
        let (a, mut b) = a_serving_b_waiting(&turns).await;
        tokio::time::sleep(length + Duration::from_millis(1)).await;
        assert!(b.reads().await, "no turn added for B while the CPU had time to spare");
        assert_eq!(turns_now(&turns), 2);
        // The line is gone; the turns stay, so the next burst finds them.
        a.activity.finished();
        b.activity.started();
        tokio::time::sleep(10 * length).await;
        assert_eq!(turns_now(&turns), 2, "turns taken back from a moderate load without a line");
        // The CPU becomes the bottleneck: after a few busy periods the added turn is taken back.
        force_share(&turns, 1.0);
        tokio::time::sleep(length * (BUSY_PERIODS + 1)).await;
        assert_eq!(turns_now(&turns), 1, "turns kept on a busy CPU");
        // A quiet spell: the turns stay as they are (the governor rests), and a line that forms
        // after it, with time to spare, gets a turn at once.
        force_share(&turns, 0.0);
        tokio::time::sleep(3 * length).await;
        assert_eq!(turns_now(&turns), 1);
        force_share(&turns, 0.6);
        let (mut c, mut d) = (Conn::open(&turns).await, Conn::open(&turns).await);
        drop((a, b));
        serving_and_waiting(&mut c, &mut d, &turns).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(d.reads().await);
        assert_eq!(turns_now(&turns), 2);
        force_share(&turns, 0.0);
        tokio::time::sleep(4 * length).await;
        assert_eq!(turns_now(&turns), 2, "a quiet spell took the added turn back");
    }

    #[tokio::test(start_paused = true)]
    async fn with_time_to_spare_a_turn_is_not_kept_between_requests_while_others_wait() {
        // Turns keep caches warm when the CPU is the bottleneck; with time to spare, the next in
        // line should not wait out a prompt client's grace.
        let turns = Turns::build(one_turn(Duration::from_millis(50)), Some(0.6)).unwrap();
        let (mut a, mut b) = a_serving_b_waiting(&turns).await;
        a.activity.finished();
        assert!(!a.reads().await);
        assert!(b.reads().await, "B waited for A's grace on a CPU with time to spare");
    }

    #[tokio::test(start_paused = true)]
    async fn a_line_formed_after_a_period_with_time_to_spare_gets_a_turn_at_once() {
        let length = Duration::from_millis(50);
        let turns = Turns::build(one_turn(length), Some(0.6)).unwrap();
        // A period without a line in which the CPU had time to spare.
        tokio::time::sleep(2 * length).await;
        let (_a, mut b) = a_serving_b_waiting(&turns).await;
        // The governor reacts when the line forms, not a period later.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(b.reads().await, "B waited for the governor's next period");
        assert_eq!(turns_now(&turns), 2);
    }

    #[test]
    fn turns_shorten_to_bound_the_wait_in_line_until_the_line_is_full() {
        let (length, line_wait) = (Duration::from_millis(50), Duration::from_millis(500));
        let ms = Duration::from_millis;
        assert_eq!(pace(length, line_wait, 64, 0), (length, false), "no line");
        assert_eq!(pace(length, line_wait, 64, 640), (length, false), "640 / 64 turns of 50 ms: 500 ms");
        assert_eq!(pace(length, line_wait, 64, 2_048), (ms(15) + Duration::from_micros(625), false));
        assert_eq!(pace(length, line_wait, 64, 6_400), (MIN_TURN, false), "the shortest turns just keep the wait");
        assert_eq!(pace(length, line_wait, 64, 6_500), (MIN_TURN, true), "beyond, the line is full");
        let (turn, full) = pace(length, line_wait, 96, 6_500);
        assert!(!full && turn > ms(7) && turn < ms(8), "more turns, a longer line: {turn:?}");
        assert_eq!(pace(length, Duration::ZERO, 64, 100_000), (length, false), "no bound: turns keep their length, nobody is refused");
        assert_eq!(pace(length, Duration::from_secs(60), usize::MAX, 1), (length, false), "many turns: no overflow");
        assert_eq!(pace(ms(1), line_wait, 1, 1_000), (ms(1), true), "turns configured shorter than the shortest stay so");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_line_is_not_joined_arrivals_are_read_at_once_to_be_refused() {
        let length = Duration::from_millis(50);
        // One turn and a line bound of two of the shortest turns: two connections waiting fill
        // it. The CPU is busy.
        let turns = Turns::build(Settings { active: 1, length, line_wait: 2 * MIN_TURN }, Some(1.0)).unwrap();
        let (mut a, mut b) = a_serving_b_waiting(&turns).await;
        assert!(!a.turn.past_line(), "A read on its turn");
        let mut c = Conn::open(&turns).await;
        c.send().await;
        assert!(!c.reads().await, "C joins a line that is not full");
        assert_eq!(waiting(&turns), 2);
        // The governor's next look: turns are as short as they get.
        tokio::time::sleep(length + Duration::from_millis(1)).await;
        assert_eq!(turns.turn(), MIN_TURN);
        let mut d = Conn::open(&turns).await;
        d.send().await;
        assert!(d.reads().await, "D was not read at once");
        assert!(d.turn.past_line(), "D's request is not marked for refusal");
        assert_eq!(waiting(&turns), 2, "D joined a full line");
        // A's client keeps asking at once, but A's turn ends after the shortened length, and
        // its next request, finding the line full, is read at once to be refused.
        a.activity.finished();
        let start = Instant::now();
        while start.elapsed() < length {
            tokio::time::advance(Duration::from_millis(1)).await;
            a.send().await;
            assert!(a.reads().await);
            if a.turn.past_line() {
                break;
            }
            a.activity.started();
            a.activity.finished();
        }
        assert!(start.elapsed() >= MIN_TURN - Duration::from_millis(1) && start.elapsed() < 2 * MIN_TURN, "A's turn lasted {:?}", start.elapsed());
        // A's turn went to B, first in line, whose request is read on it: not refused.
        assert!(b.reads().await);
        assert!(!b.turn.past_line());
        // The line drains below the bound: arrivals join it again, at once.
        drop((a, c));
        let mut e = Conn::open(&turns).await;
        e.send().await;
        assert!(!e.reads().await, "E joins a line that is no longer full");
        assert!(!e.turn.past_line());
        drop(d);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_closes_in_line_leaves_it() {
        let turns = Turns::new(one_turn(Duration::from_millis(50))).unwrap();
        let (a, b) = a_serving_b_waiting(&turns).await;
        drop(b);
        assert_eq!(waiting(&turns), 0);
        drop(a);
        assert_eq!(turns.0.permits.available_permits(), 1, "a closed connection's turn is given back");
    }
}
