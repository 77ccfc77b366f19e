//! Refusal that sticks: a connection that was answered 503 + `Retry-After` is not read again
//! for a while — briefly the first time, up to nearly the `Retry-After` period while it keeps
//! asking (`shed::LONGEST_HOLD`: a client that waits as told is read at once).
//!
//! Under overload an HTTP refusal still costs a parse and a response — a good part of what
//! serving costs once serving is cheap — and a client that ignores `Retry-After` and asks again
//! at once would have the server spend its core saying no. Not reading the refused connection
//! leaves the client's next request waiting in the kernel's socket buffer, at no cost to anyone,
//! so refusals stay a small share of the work however impatient the clients are. Other
//! connections are unaffected. The hold starts short (`FIRST_HOLD`) and doubles for a
//! connection refused again soon after its hold ended: a burst that only grazes the bound costs
//! each refused connection a moment of its load, while a sustained overload holds its
//! connections for the whole period (see `BENCHMARKS.md`, overload).
//!
//! [`Listener`] wraps every accepted socket in [`Throttled`]; `serve` hands each request its
//! connection's [`Backoff`] (with the peer address, as one [`Peer`]), which the shed layer sets
//! when it refuses.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::door::{Door, Offer, Refusable, Watch};
use super::head_guard::Activity;
use super::parse_errors;
use super::turns::{Settings, Turn, Turns};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Process-wide origin for the compact timestamps below: a day (or as much as the monotonic
/// clock allows) before it is first asked for, so that an instant read later from another clock
/// source still falls after it (a test runtime's paused clock starts at the real time of its
/// creation, which can precede where another test's advanced clock set the origin).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        [86_400, 3_600, 60].into_iter().find_map(|secs| now.checked_sub(Duration::from_secs(secs))).unwrap_or(now)
    })
}

/// Where a request came from: `serve` hands it to the app with every request
/// (`serve::PeerService`), and requests routed through axum carry it as an extension.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The connection's hold, set by the shed layer when it refuses.
    pub backoff: Backoff,
}

/// When a connection may be read again, and how long its last hold was.
#[derive(Clone, Default)]
pub struct Backoff(Arc<Hold>);

#[derive(Default)]
struct Hold {
    /// Milliseconds since [`epoch`]; 0 = not held.
    until: AtomicU64,
    /// Length of the last hold, in milliseconds.
    length: AtomicU64,
    /// The request being read came past a line too long to join (`limits::turns`): refuse it.
    past_line: AtomicBool,
}

/// The first hold after a refusal. A burst that briefly passes the bound should cost each
/// refused connection a moment, not a second of its load: holds that long, landing on many
/// connections at once, took far more load out than the burst brought and sent it back in a wave.
const FIRST_HOLD: Duration = Duration::from_millis(125);

impl Backoff {
    /// Don't read this connection for `period`.
    fn hold_for(&self, period: Duration) {
        let until = Self::ms_after(period);
        self.0.until.fetch_max(until, Ordering::Relaxed);
        self.0.length.store(period.as_millis() as u64, Ordering::Relaxed);
    }

    /// Hold a connection that was just refused: `FIRST_HOLD` at first, twice its last hold if
    /// it is refused again within `longest` of that hold's end (a client that keeps asking while
    /// the server is overloaded), never longer than `longest`.
    pub fn hold_after_refusal(&self, longest: Duration) {
        let longest_ms = longest.as_millis() as u64;
        let (until, length) = (self.0.until.load(Ordering::Relaxed), self.0.length.load(Ordering::Relaxed));
        let again = until != 0 && Self::ms_after(Duration::ZERO) < until + longest_ms;
        let next = if again { (length * 2).clamp(1, longest_ms) } else { (FIRST_HOLD.as_millis() as u64).min(longest_ms) };
        self.hold_for(Duration::from_millis(next));
    }

    /// Milliseconds since [`epoch`] `period` from now, rounded up (a hold lasts at least its
    /// period); never 0, which means "not held".
    fn ms_after(period: Duration) -> u64 {
        ((Instant::now() + period).duration_since(epoch()).as_micros().div_ceil(1000) as u64).max(1)
    }

    /// Marks whether the request being read came past the line (set once per read with data).
    pub(crate) fn set_past_line(&self, past: bool) {
        if self.0.past_line.load(Ordering::Relaxed) != past {
            self.0.past_line.store(past, Ordering::Relaxed);
        }
    }

    /// Whether the request came past a line too long to join, and must be refused; the mark is
    /// used up.
    pub fn take_past_line(&self) -> bool {
        self.0.past_line.load(Ordering::Relaxed) && self.0.past_line.swap(false, Ordering::Relaxed)
    }

    /// Whether a hold is on: the connection was just refused.
    fn holding(&self) -> bool {
        self.until().is_some_and(|until| Instant::now() < until)
    }

    pub(crate) fn until(&self) -> Option<Instant> {
        match self.0.until.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch() + Duration::from_millis(ms)),
        }
    }
}

/// A TCP listener whose connections honour their [`Backoff`] and take [`Turns`], with at most
/// `max_connections` open at once: beyond that, new connections wait in the kernel's accept queue.
pub struct Listener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    turns: Option<Turns>,
    door: Option<Door>,
}

impl Listener {
    /// `turns`: how connections take turns under contention (`limits::turns`). Call within a
    /// runtime.
    pub fn new(listener: TcpListener, max_connections: usize, turns: Settings) -> Self {
        metrics::gauge!("weir_connections_limit").set(max_connections as f64);
        let turns = Turns::new(turns);
        Self { listener, slots: Arc::new(Semaphore::new(max_connections.max(1))), turns, door: None }
    }

    #[cfg(test)]
    pub(crate) fn door(&self) -> Option<&Door> {
        self.door.as_ref()
    }

    /// Refuses the requests `refusable` names at the door (`limits::door`) while the line is
    /// too long to join; nothing without turns that refuse.
    pub fn with_door(mut self, refusable: Refusable) -> Self {
        let Some(turns) = self.turns.as_ref().filter(|turns| turns.refuses()) else { return self };
        match Door::start(turns.clone(), refusable, self.slots.clone()) {
            Ok(door) => self.door = Some(door),
            Err(e) => tracing::warn!(error = %e, "could not start the door's thread; refusals wait for the runtime"),
        }
        self
    }
}

impl axum::serve::Listener for Listener {
    type Io = Throttled;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Throttled, SocketAddr) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            // The semaphore is never closed; should it be, accepting stops for good.
            return std::future::pending().await;
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    // Small responses must not wait for Nagle's algorithm.
                    let _ = stream.set_nodelay(true);
                    let turn = self.turns.as_ref().map(Turns::join);
                    let throttled = Throttled {
                        stream,
                        backoff: Backoff::default(),
                        activity: Arc::default(),
                        sleep: None,
                        turn,
                        door: self.door.clone(),
                        watch: None,
                        door_bell: None,
                        offer: None,
                        line_bell: None,
                        line_bell_set_at: None,
                        rewrite: None,
                        answer_due: false,
                        answer_held: false,
                        _slot: slot,
                    };
                    return (throttled, addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A socket that yields no reads while its connection is held back.
pub struct Throttled {
    stream: TcpStream,
    backoff: Backoff,
    activity: Arc<Activity>,
    /// Only exists while a hold is being waited out.
    sleep: Option<Pin<Box<Sleep>>>,
    turn: Option<Turn>,
    door: Option<Door>,
    /// While the connection is handed to the door.
    watch: Option<Arc<Watch>>,
    /// Rings when refusals begin, polled with the current offer as its waker (made once,
    /// reused).
    door_bell: Option<Pin<Box<OwnedNotified>>>,
    /// While the idle connection is offered to the door beside a line (`door::Offer`).
    offer: Option<Arc<Offer>>,
    /// Rings when a line forms, for an idle connection that saw none (made once, reused).
    line_bell: Option<Pin<Box<OwnedNotified>>>,
    /// The bell's ring count (`Door::line_rings`) when it was last set with this task's waker.
    line_bell_set_at: Option<u64>,
    /// One of hyper's own error answers, being written with a JSON body (`parse_errors`).
    rewrite: Option<Box<Rewrite>>,
    /// A request was read and no answer written since (`poll_answer_in_burst`).
    answer_due: bool,
    /// An answer waits for its trip through the run queue: nothing is read meanwhile.
    answer_held: bool,
    /// This connection's place under `max_connections`, released when it closes.
    _slot: OwnedSemaphorePermit,
}

struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    /// The length of hyper's write it stands for, reported once it is all written.
    replaces: usize,
}

impl Throttled {
    /// The connection's hold, which the shed layer sets when it refuses a request on it.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// What the connection has read and served (for `head_guard`).
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl AsyncRead for Throttled {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.answer_held {
            // hyper's look for a client gone mid-answer: the turn and the door see the
            // connection once the answer is out, as they would have without the wait (so a turn
            // is not given back with its answer unwritten). The task is already queued, and
            // the socket's waker was set by hyper's look before the answer was made.
            return Poll::Pending;
        }
        if let Some(offer) = this.offer.take() {
            this.watch = offer.withdraw();
        }
        loop {
            if let Some(watch) = &this.watch {
                std::task::ready!(watch.take_back(cx));
                if let (true, Some(turn)) = (watch.admitted(), &mut this.turn) {
                    turn.admit();
                }
                this.watch = None;
            }
            let Some(until) = this.backoff.until().filter(|until| Instant::now() < *until) else { break };
            // A held connection is not served: its turn goes to the next in line.
            if let Some(turn) = &mut this.turn {
                turn.leave();
            }
            // While refusals go on, the hold is waited out at the door, which reads the next
            // request the moment the hold ends; this runtime, busy, would wake late, and find
            // it there to be refused by a worker.
            this.hand_to_the_door(cx);
            if this.watch.is_none() {
                std::task::ready!(super::poll_timer(&mut this.sleep, until, cx));
                break;
            }
        }
        this.sleep = None;
        let before = buf.filled().len();
        if this.turn.is_some() && this.activity.upgraded() {
            // A WebSocket takes no turns and is never refused at the door, so what was set up
            // for those goes too. The line's bell holds the ended HTTP connection's task's
            // waker: kept, it would keep that task's ~2.4 KB for as long as the WebSocket lives
            // (`bench/run connections` found one in four idle WebSockets carrying one).
            this.turn = None;
            this.door = None;
            this.line_bell = None;
            this.line_bell_set_at = None;
            this.door_bell = None;
        }
        let (read, past_line) = match &mut this.turn {
            Some(turn) => (turn.poll_read(&mut this.stream, &this.activity, cx, buf), turn.past_line()),
            None => (Pin::new(&mut this.stream).poll_read(cx, buf), false),
        };
        let bytes = buf.filled().len() - before;
        if bytes > 0 {
            this.activity.read(bytes);
            this.backoff.set_past_line(past_line);
            this.answer_due = !this.activity.upgraded();
        }
        if read.is_pending() {
            this.hand_to_the_door(cx);
        }
        read
    }
}

impl Throttled {
    /// With nothing to read, between requests and no turn held while the line is being
    /// refused: the next request may be refused too, so the door watches for it
    /// (`limits::door`). While a line exists but nothing is refused yet, the connection is
    /// offered to the door, which takes it when refusals begin; with no line, it is woken when
    /// one forms, to be offered then. Otherwise a connection that went idle before would have
    /// its first refusal made by a busy worker, milliseconds later.
    fn hand_to_the_door(&mut self, cx: &mut Context<'_>) {
        let (Some(door), Some(turn)) = (&self.door, &self.turn) else { return };
        if !turn.is_out() || !self.activity.between_requests() {
            return;
        }
        if door.open() {
            self.watch = door.watch(&self.stream, &self.backoff);
            return;
        }
        if !door.has_line() {
            let rings = door.line_rings();
            if self.line_bell_set_at != Some(rings) {
                poll_bell(&mut self.line_bell, || door.when_line_forms(), cx);
                self.line_bell_set_at = Some(rings);
            }
            return;
        }
        let Some(offer) = door.offer(&self.stream, &self.backoff) else { return };
        poll_bell(&mut self.door_bell, || door.when_refusals_begin(), &mut Context::from_waker(&Waker::from(offer.clone())));
        // Refusals may have begun before the bell was set: the door takes the connection now.
        if door.open() {
            Waker::from(offer.clone()).wake_by_ref();
        }
        self.offer = Some(offer);
    }
}

/// Polls the bell in `slot` (made by `bell` the first time) with `cx`'s waker; one that rang
/// for an earlier idle spell is made anew, for the next time.
fn poll_bell(slot: &mut Option<Pin<Box<OwnedNotified>>>, bell: impl Fn() -> OwnedNotified, cx: &mut Context<'_>) {
    let notified = slot.get_or_insert_with(|| Box::pin(bell()));
    if notified.as_mut().poll(cx).is_ready() {
        notified.set(bell());
        let _ = notified.as_mut().poll(cx);
    }
}

impl Drop for Throttled {
    fn drop(&mut self) {
        if let Some(offer) = self.offer.take() {
            self.watch = offer.withdraw();
        }
        if let Some(watch) = &self.watch {
            watch.close();
        }
    }
}

impl Throttled {
    /// Writes the rewritten answer to its end, then reports hyper's write as done.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(rewrite) = self.rewrite.as_mut() else { return Poll::Ready(Ok(0)) };
        while rewrite.written < rewrite.bytes.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &rewrite.bytes[rewrite.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => rewrite.written += n,
                other => return other,
            }
        }
        let replaces = rewrite.replaces;
        self.rewrite = None;
        Poll::Ready(Ok(replaces))
    }

    /// Starts rewriting `write` if it is one of hyper's own error answers.
    fn rewrites(&mut self, write: &[u8]) -> bool {
        if self.rewrite.is_none() {
            let Some(bytes) = parse_errors::with_json_body(write) else { return false };
            self.rewrite = Some(Box::new(Rewrite { bytes, written: 0, replaces: write.len() }));
        }
        true
    }
}

impl Throttled {
    /// The first write after a request yields once, to the back of the worker's run queue, so
    /// the answer is written after the other connections ready now have been served.
    ///
    /// Why: answers written as each is made go out one per request's CPU time, and a client
    /// (or proxy) reading them on another core has gone to sleep before the next one comes;
    /// waking it is paid by the writer (an inter-processor interrupt, a VM exit on a virtual
    /// machine): on the benchmark's microVM it took ~4 µs of the ~31 µs an entry cost. Written
    /// in bursts, the answers find the reader still awake. Measured (`BENCHMARKS.md`, the
    /// twenty-ninth round): entry 0.34× → 0.47–0.55× hello, status 0.56× → 0.70×, verify
    /// 0.64× → 0.78×, verify's p99 at half load lower, overload goodput 37,130 → 56,970 req/s.
    /// Alone on the worker, the answer waits only for its own trip through the queue. Refusals,
    /// answers while refusals go on (held, a few requests that had waited in line were refused
    /// after 50 ms at a flood's onset) and WebSocket frames are not held back.
    fn poll_answer_in_burst(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // A refusal (its hold is set as it is made) goes at once: it is meant to be quick, and
        // the connection is held unread after it anyway. So does every answer while refusals
        // go on: a request that waited in line is answered as soon as it can be.
        let refusing = || self.backoff.holding() || self.door.as_ref().is_some_and(Door::open);
        if std::mem::take(&mut self.answer_due) && !refusing() {
            self.answer_held = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.answer_held = false;
        Poll::Ready(())
    }
}

impl AsyncWrite for Throttled {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_answer_in_burst(cx));
        if self.rewrites(buf) {
            return self.poll_rewrite(cx);
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_answer_in_burst(cx));
        // hyper's error answers have no body: a head alone, or with empty slices after it.
        if let [head, rest @ ..] = bufs {
            if rest.iter().all(|b| b.is_empty()) && self.rewrites(head) {
                return self.poll_rewrite(cx);
            }
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Length of the hold `backoff` is under, from now.
    fn held_for(backoff: &Backoff) -> Duration {
        backoff.until().map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_hold_briefly_then_longer_while_the_client_keeps_asking() {
        let longest = Duration::from_secs(1);
        let backoff = Backoff::default();
        let mut holds = Vec::new();
        for _ in 0..6 {
            backoff.hold_after_refusal(longest);
            let hold = held_for(&backoff);
            holds.push(hold.as_millis());
            // Asks again as soon as the hold ends, and is refused again.
            tokio::time::sleep(hold).await;
        }
        assert_eq!(holds, [125, 250, 500, 1000, 1000, 1000]);
        // Refused again only after a quiet `longest`: back to the first hold.
        tokio::time::sleep(longest + Duration::from_millis(1)).await;
        backoff.hold_after_refusal(longest);
        assert_eq!(held_for(&backoff).as_millis(), FIRST_HOLD.as_millis());
        // A `Retry-After` shorter than the first hold caps it (holds are kept in whole ms).
        let short = Backoff::default();
        short.hold_after_refusal(Duration::from_millis(50));
        assert_eq!(held_for(&short).as_millis(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_connection_is_not_read_until_its_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = Listener::new(listener, 1, Settings::default());
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = axum::serve::Listener::accept(&mut listener).await;
        let _second = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_secs(5), axum::serve::Listener::accept(&mut listener)).await;
        assert!(waiting.is_err(), "a second connection was accepted over max_connections = 1");
        server.backoff.hold_for(Duration::from_secs(1));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(900), server.read_exact(&mut buf)).await;
        assert!(early.is_err(), "read during the hold");
        let late = tokio::time::timeout(Duration::from_millis(200), server.read_exact(&mut buf)).await;
        assert!(late.is_ok(), "not read after the hold");
        assert_eq!(&buf, b"ping");
    }

    /// Two connections accepted by one listener with `turns`, each with its client's end.
    async fn two_connections(turns: Settings) -> ((TcpStream, Throttled), (TcpStream, Throttled)) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = Listener::new(listener, 16, turns);
        let a_client = TcpStream::connect(addr).await.unwrap();
        let (a, _) = axum::serve::Listener::accept(&mut listener).await;
        let b_client = TcpStream::connect(addr).await.unwrap();
        let (b, _) = axum::serve::Listener::accept(&mut listener).await;
        ((a_client, a), (b_client, b))
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_leaves_the_turns() {
        use crate::limits::head_guard::Finished;
        use axum::http::StatusCode;
        let ((mut a_client, mut a), (mut b_client, mut b)) = two_connections(Settings { active: 1, length: Duration::from_millis(50), line_wait: Duration::ZERO }).await;
        let mut buf = [0u8; 4];
        a_client.write_all(b"ping").await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        // A's request is being served (it holds the one turn); B's waits.
        a.activity().started();
        b_client.write_all(b"ping").await.unwrap();
        let short = Duration::from_millis(10);
        assert!(tokio::time::timeout(short, b.read_exact(&mut buf)).await.is_err(), "B read while A held the turn");
        // A's response switches protocols: its reads are WebSocket frames from now on, not requests.
        let switched = async { Ok(axum::response::Response::builder().status(StatusCode::SWITCHING_PROTOCOLS).body(axum::body::Body::empty()).unwrap()) };
        Finished::new(switched, a.activity().clone()).await.unwrap();
        assert!(a.activity().upgraded());
        a_client.write_all(b"ping").await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        tokio::time::timeout(short, b.read_exact(&mut buf)).await.expect("B still waits for the upgraded connection's turn").unwrap();
    }

    /// Counts nothing; its `Arc`'s strong count tells who still holds a waker made from it.
    struct Tally;
    impl std::task::Wake for Tally {
        fn wake(self: Arc<Self>) {}
    }

    #[tokio::test]
    async fn an_upgraded_connection_lets_go_of_the_task_that_upgraded_it() {
        use crate::limits::head_guard::Finished;
        use axum::http::StatusCode;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = Settings { active: 1, length: Duration::from_millis(50), line_wait: Duration::from_millis(50) };
        let mut listener = Listener::new(listener, 16, settings).with_door(|_| None);
        assert!(listener.door().is_some());
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = axum::serve::Listener::accept(&mut listener).await;
        // The HTTP connection's task finds nothing to read yet: the connection waits for a line
        // to form with that task's waker.
        let http_task = Arc::new(Tally);
        let waker = Waker::from(http_task.clone());
        let mut buf = [0u8; 4];
        let idle = Pin::new(&mut conn).poll_read(&mut Context::from_waker(&waker), &mut ReadBuf::new(&mut buf));
        assert!(idle.is_pending());
        drop(waker);
        assert_eq!(Arc::strong_count(&http_task), 3, "the socket and the line's bell keep the task's waker");
        // It switches protocols; the WebSocket's task reads from then on.
        let switched = async { Ok(axum::response::Response::builder().status(StatusCode::SWITCHING_PROTOCOLS).body(axum::body::Body::empty()).unwrap()) };
        Finished::new(switched, conn.activity().clone()).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(Arc::strong_count(&http_task), 1, "the WebSocket still holds the ended HTTP task's waker");
    }

    /// Serves one request on `conn`: reads it, then writes `answer`, noting both in `log`.
    async fn serve_one(mut conn: Throttled, name: &'static str, log: Arc<parking_lot::Mutex<Vec<String>>>) -> Throttled {
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        log.lock().push(format!("read {name}"));
        conn.write_all(b"pong").await.unwrap();
        log.lock().push(format!("answered {name}"));
        conn
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_wait_until_the_requests_ready_together_have_been_read() {
        let ((mut a_client, a), (mut b_client, b)) = two_connections(Settings::default()).await;
        a_client.write_all(b"ping").await.unwrap();
        b_client.write_all(b"ping").await.unwrap();
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let a = tokio::spawn(serve_one(a, "A", log.clone()));
        let b = tokio::spawn(serve_one(b, "B", log.clone()));
        let (mut a, mut b) = (a.await.unwrap(), b.await.unwrap());
        assert_eq!(*log.lock(), ["read A", "read B", "answered A", "answered B"]);
        let mut buf = [0u8; 4];
        a_client.read_exact(&mut buf).await.unwrap();
        b_client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Only the first write after a request yields: the rest of an answer goes at once.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(Pin::new(&mut a).poll_write(&mut cx, b"more"), Poll::Ready(Ok(4))), "a later write of an answer waited");
        // A refusal goes at once.
        b_client.write_all(b"ping").await.unwrap();
        b.read_exact(&mut buf).await.unwrap();
        b.backoff().hold_after_refusal(Duration::from_secs(1));
        assert!(matches!(Pin::new(&mut b).poll_write(&mut cx, b"busy"), Poll::Ready(Ok(4))), "a refusal waited");
        // A WebSocket's frames are not held back.
        let switched = async { Ok(axum::response::Response::builder().status(axum::http::StatusCode::SWITCHING_PROTOCOLS).body(axum::body::Body::empty()).unwrap()) };
        crate::limits::head_guard::Finished::new(switched, a.activity().clone()).await.unwrap();
        a_client.write_all(b"ping").await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        assert!(matches!(Pin::new(&mut a).poll_write(&mut cx, b"pong"), Poll::Ready(Ok(4))), "a WebSocket frame waited");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_turn_is_kept_until_its_held_answer_is_out() {
        let ((mut a_client, mut a), (mut b_client, mut b)) = two_connections(Settings { active: 1, length: Duration::from_secs(5), line_wait: Duration::ZERO }).await;
        let mut buf = [0u8; 4];
        a_client.write_all(b"ping").await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        b_client.write_all(b"ping").await.unwrap();
        let short = Duration::from_millis(20);
        assert!(tokio::time::timeout(short, b.read_exact(&mut buf)).await.is_err(), "B read while A held the one turn");
        // A's answer waits for its burst; hyper looks for A's client leaving meanwhile, and
        // finding nothing, A keeps its turn: its answer is not out yet.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut a).poll_write(&mut cx, b"pong").is_pending(), "the answer did not wait");
        assert!(Pin::new(&mut a).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
        assert!(tokio::time::timeout(short, b.read_exact(&mut buf)).await.is_err(), "A gave its turn away before answering");
        // Once the answer is out and A has nothing more to read, B gets the turn.
        assert!(matches!(Pin::new(&mut a).poll_write(&mut cx, b"pong"), Poll::Ready(Ok(4))));
        assert!(Pin::new(&mut a).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
        tokio::time::timeout(Duration::from_secs(5), b.read_exact(&mut buf)).await.expect("B never got the turn").unwrap();
        assert_eq!(&buf, b"ping");
    }
}
