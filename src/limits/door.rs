//! The door: while the line is being refused, idle connections are watched by a thread of their own, which
//! refuses a visitor's request there (503 with `Retry-After`) when the line is too long to join,
//! instead of leaving it to wait for the busy runtime.
//!
//! Why: under overload the runtime's run queue is long, and a request that is only to be told
//! "no" waited its place in it behind the requests being served: on the benchmark's saturated
//! core the probe saw such refusals take 2–4 ms at the median and 10–30 ms at p99
//! (`BENCHMARKS.md`, overload). The door's thread sleeps until a watched socket is readable and
//! runs under the real-time policy when the process may ask for it (`CAP_SYS_NICE`), so the
//! kernel gives it the core the moment it wakes; a refusal is a peek, a parse and two small
//! copies.
//!
//! How: a connection's task hands its connection to the door when it is between requests and
//! holds no turn while the line was full a moment ago (`backoff::Throttled`): when it runs out of
//! requests, and when it is held after a refusal a worker made. One that goes idle beside a line
//! before anything is refused is offered to the door instead (an `Offer`: a duplicate socket
//! made ready), which takes it over when refusals begin (`Turns::when_refusals_begin`): the
//! thread that finds the line full queues the offers, and the door's thread takes them over a
//! batch at a time (`ToTake`); one that went idle with no line at all is woken
//! when a line forms, to be offered then (`Turns::when_line_forms`). The door watches a duplicate of the socket on its own runtime; the task waits for the door to
//! hand the connection back (a `Watch`, one atomic state they share), so the socket is read by
//! one side at a time and the door, woken at once, decides for each request. When data arrives:
//! - the line has room: the request is admitted, and joins the line even if the line has grown
//!   by the time the task reads it;
//! - the line is full and the head is a complete, bodyless `GET` of a route the door may refuse
//!   (the visitors' hot routes: the flood's): the door reads the head, writes the refusal and
//!   holds the connection (`backoff`), as the shed layer would, and keeps it: the door looks
//!   at the next request when it comes, or, if it comes before the hold is over, when the
//!   hold ends;
//! - anything else (another route, a body, an incomplete head, the end of the stream) is left
//!   unread for the task, which serves it as usual.
//!
//! A connection closed by its task while watched is let go by the door at once.

use std::io;
use std::net::{Shutdown, TcpStream as StdTcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::AcqRel, Ordering::Acquire, Ordering::Release};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::backoff::Backoff;
use super::shed::{at_capacity_body, retry_after_secs, LONGEST_HOLD, RETRY_AFTER, RETRY_AFTER_SPREAD};
use super::turns::Turns;

/// The route of a path the door may refuse (the name the request metrics give it), if any.
pub type Refusable = fn(&str) -> Option<&'static str>;

/// How much of a request the door looks at: a visitor's `GET` head is a few hundred bytes; a
/// longer one is handed back (hyper reads it).
const HEAD_PEEK: usize = 4096;

/// The door of one listener: its thread, which runs while a handle to it exists.
#[derive(Clone)]
pub struct Door(Arc<Shared>);

struct Shared {
    runtime: tokio::runtime::Handle,
    desk: Arc<Desk>,
    /// Offers to take over, queued by whichever thread rang the refusal bell (`Offer`'s wake).
    to_take: Arc<ToTake>,
    /// The listener's connection slots: a watched connection's duplicate socket takes one, so
    /// the door never holds more sockets than `limits.max_connections` leaves room for.
    slots: Arc<Semaphore>,
    /// Dropped with the last handle: the thread's runtime stops, ending its watches.
    _stop: oneshot::Sender<()>,
}

/// What the door's watches share: what to refuse, and how to count it.
struct Desk {
    turns: Turns,
    refusable: Refusable,
    /// Per route the door may refuse: its request counter (503) and duration histogram.
    routes: Mutex<Vec<(&'static str, metrics::Counter, metrics::Histogram)>>,
    watching: metrics::Gauge,
    watched: metrics::Counter,
    refused: metrics::Counter,
    returned: metrics::Counter,
    shed: metrics::Counter,
    line_refused: metrics::Counter,
    #[cfg(test)]
    seen: std::sync::atomic::AtomicU64,
    #[cfg(test)]
    refused_here: std::sync::atomic::AtomicU64,
}

impl Door {
    /// Starts the door's thread, which refuses on behalf of `turns` the paths `refusable`
    /// names; its duplicate sockets take `slots` (the listener's connection slots).
    pub fn start(turns: Turns, refusable: Refusable, slots: Arc<Semaphore>) -> io::Result<Door> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let to_take = Arc::new(ToTake::default());
        let taking = to_take.clone();
        std::thread::Builder::new().name("weir-door".into()).spawn(move || {
            let priority = raise_priority();
            metrics::gauge!("weir_door_priority_raised").set(priority as u8 as f64);
            match priority {
                Priority::RealTime => {}
                Priority::Nice => tracing::info!("the door's thread could not take the real-time policy; it runs {PRIORITY_ABOVE} nice levels above the workers"),
                Priority::Workers => {
                    tracing::info!("the door's thread runs at the workers' priority (no CAP_SYS_NICE): refusals under overload may wait for the CPU")
                }
            }
            runtime.block_on(async {
                tokio::select! {
                    _ = stopped => {}
                    _ = taking.take_over() => {}
                }
            });
        })?;
        let desk = Desk {
            turns,
            refusable,
            routes: Mutex::new(Vec::new()),
            watching: metrics::gauge!("weir_door_watching"),
            watched: metrics::counter!("weir_door_watched_total"),
            refused: metrics::counter!("weir_door_refused_total"),
            returned: metrics::counter!("weir_door_returned_total"),
            shed: metrics::counter!("weir_shed_total", "group" => "visitors"),
            line_refused: metrics::counter!("weir_connection_turns_refused_total"),
            #[cfg(test)]
            seen: Default::default(),
            #[cfg(test)]
            refused_here: Default::default(),
        };
        Ok(Door(Arc::new(Shared { runtime: handle, desk: Arc::new(desk), to_take, slots, _stop: stop })))
    }

    /// Tests: requests the door has looked at (refused or handed back).
    #[cfg(test)]
    fn seen(&self) -> u64 {
        self.0.desk.seen.load(Acquire)
    }

    /// Tests: requests the door has refused.
    #[cfg(test)]
    fn refused(&self) -> u64 {
        self.0.desk.refused_here.load(Acquire)
    }

    /// Whether an idle connection should be handed to the door now: the line was full a moment
    /// ago, so its next request may come past a full line. (Not merely while no turn is free:
    /// a hand-over costs a few system calls, and a line that stays within its bound refuses
    /// nothing; handing every idle connection over while one existed took ~10 % of the goodput
    /// of a 3× flood held in line.)
    pub(crate) fn open(&self) -> bool {
        self.0.desk.turns.refusing()
    }

    /// Whether connections wait in line for a turn: refusals may begin soon.
    pub(crate) fn has_line(&self) -> bool {
        self.0.desk.turns.has_line()
    }

    /// Ready once refusals begin, for a future polled before (`Turns::when_refusals_begin`).
    pub(crate) fn when_refusals_begin(&self) -> tokio::sync::futures::OwnedNotified {
        self.0.desk.turns.when_refusals_begin()
    }

    /// How many times the bell of [`Door::when_line_forms`] has rung (`Turns::line_rings`).
    pub(crate) fn line_rings(&self) -> u64 {
        self.0.desk.turns.line_rings()
    }

    /// Ready once a line forms after a while without one (`Turns::when_line_forms`).
    pub(crate) fn when_line_forms(&self) -> tokio::sync::futures::OwnedNotified {
        self.0.desk.turns.when_line_forms()
    }

    /// Hands the idle connection on `stream` to the door; its [`Watch`], or `None` if no
    /// connection slot is free for the duplicate socket or it could not be made (the task keeps
    /// the connection).
    pub(crate) fn watch(&self, stream: &TcpStream, backoff: &Backoff) -> Option<Arc<Watch>> {
        let (socket, slot) = self.duplicate(stream)?;
        let watch = Arc::new(Watch::new(WATCHED));
        self.spawn_watch(socket, slot, watch.clone(), backoff.clone());
        Some(watch)
    }

    /// Offers the idle connection on `stream` to the door, which takes it over when refusals
    /// begin, without waiting for the connection's task to be polled: poll the refusal bell with
    /// the offer as its waker (its wake queues it for the door's thread, `ToTake`). `None`
    /// if no slot is free for the duplicate socket or it could not be made.
    pub(crate) fn offer(&self, stream: &TcpStream, backoff: &Backoff) -> Option<Arc<Offer>> {
        let (socket, slot) = self.duplicate(stream)?;
        let watch = Arc::new(Watch::new(OFFERED));
        Some(Arc::new(Offer { watch, socket: Mutex::new(Some((socket, slot))), door: self.clone(), backoff: backoff.clone() }))
    }

    /// A duplicate of `stream`'s socket for the door, and the connection slot it takes.
    fn duplicate(&self, stream: &TcpStream) -> Option<(StdTcpStream, OwnedSemaphorePermit)> {
        let slot = self.0.slots.clone().try_acquire_owned().ok()?;
        let socket: StdTcpStream = socket2::SockRef::from(stream).try_clone().ok()?.into();
        Some((socket, slot))
    }

    fn spawn_watch(&self, socket: StdTcpStream, slot: OwnedSemaphorePermit, watch: Arc<Watch>, backoff: Backoff) {
        self.0.desk.watched.increment(1);
        let desk = self.0.desk.clone();
        self.0.runtime.spawn(async move {
            watch_at_the_door(socket, &watch, &desk, &backoff).await;
            drop(slot);
        });
    }
}

/// An idle connection offered to the door beside a line, before anything is refused: whoever
/// moves first has it, the door when refusals begin (the offer is the refusal bell's waker) or
/// the connection's task when it is polled again.
///
/// Why: handed over only once refusals began, idle connections were handed over by their tasks,
/// woken through the busy workers' run queue behind the flood's own tasks, and requests that
/// arrived meanwhile were refused by a worker, milliseconds late: the refusals of a flood's
/// onset (`BENCHMARKS.md`, eighteenth round).
pub(crate) struct Offer {
    watch: Arc<Watch>,
    /// The duplicate socket and its slot, until the door takes them or the task withdraws.
    socket: Mutex<Option<(StdTcpStream, OwnedSemaphorePermit)>>,
    door: Door,
    backoff: Backoff,
}

impl Offer {
    /// From the connection's task, polled again: withdraws the offer. The task keeps the
    /// connection (`None`), or, if the door has taken it, waits on the [`Watch`] returned.
    pub(crate) fn withdraw(&self) -> Option<Arc<Watch>> {
        if self.watch.state.compare_exchange(OFFERED, TASK, AcqRel, Acquire).is_ok() {
            // The duplicate is closed and its slot freed.
            self.socket.lock().take();
            return None;
        }
        Some(self.watch.clone())
    }
}

impl Offer {
    /// From the door's thread: takes the connection, unless its task has it back.
    fn take(&self) -> bool {
        if self.watch.state.compare_exchange(OFFERED, WATCHED, AcqRel, Acquire).is_ok() {
            if let Some((socket, slot)) = self.socket.lock().take() {
                self.door.spawn_watch(socket, slot, self.watch.clone(), self.backoff.clone());
                return true;
            }
        }
        false
    }
}

impl Wake for Offer {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    /// Refusals began: queued for the door's thread to take.
    fn wake_by_ref(self: &Arc<Self>) {
        self.door.0.to_take.queue(self.clone());
    }
}

/// The offers to take over, and the door's thread taking them a batch at a time.
///
/// Why: refusals begin with every idle connection offered at once (thousands under a flood),
/// and the bell rings on a worker, in the middle of a refusal. Taken over there, one at a time,
/// each woke the door's thread, which under the real-time policy took the core back for each
/// one: the ring took 33 ms (`BENCHMARKS.md`, the thirtieth round), and the refusal being made,
/// and every request behind it on that worker, waited it out. Queued, the ring costs a push per
/// offer; the door's thread, woken once, lets the ringing worker finish, then takes
/// [`TAKE_AT_ONCE`] at a time with [`TAKE_PAUSE`] between them, so the workers it shares a core
/// with are never held up long. A connection whose request arrives before its offer is taken is
/// served or refused by its task, as before it was offered.
#[derive(Default)]
struct ToTake {
    offers: Mutex<std::collections::VecDeque<Arc<Offer>>>,
    queued: Notify,
    /// Tests: offers taken over by the door's thread.
    #[cfg(test)]
    taken: std::sync::atomic::AtomicUsize,
}

/// How many offers the door takes over between pauses: a few hundred microseconds' work.
const TAKE_AT_ONCE: usize = 64;
/// The door's pause before taking over a batch (the core goes back to the workers meanwhile).
const TAKE_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

impl ToTake {
    fn queue(&self, offer: Arc<Offer>) {
        let first = {
            let mut offers = self.offers.lock();
            offers.push_back(offer);
            offers.len() == 1
        };
        if first {
            self.queued.notify_one();
        }
    }

    /// The door's thread: takes over what is queued, a batch at a time, forever.
    async fn take_over(&self) {
        loop {
            self.queued.notified().await;
            loop {
                tokio::time::sleep(TAKE_PAUSE).await;
                let batch: Vec<Arc<Offer>> = {
                    let mut offers = self.offers.lock();
                    let n = offers.len().min(TAKE_AT_ONCE);
                    offers.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let _taken = batch.iter().filter(|offer| offer.take()).count();
                #[cfg(test)]
                self.taken.fetch_add(_taken, AcqRel);
            }
        }
    }
}

/// How many nice levels above the process's threads the door's thread asks to run when it may
/// not take the real-time policy.
const PRIORITY_ABOVE: i32 = 10;

/// The priority the door's thread got (the `weir_door_priority_raised` gauge's value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Priority {
    /// The workers': the door waits for the core like any of them.
    Workers = 0,
    /// [`PRIORITY_ABOVE`] nice levels above the workers.
    Nice = 1,
    /// `SCHED_FIFO` at its lowest priority.
    RealTime = 2,
}

/// Moves the calling thread to the real-time FIFO policy at its lowest priority, or, if the
/// process may not, [`PRIORITY_ABOVE`] nice levels above the rest of the process; which it got
/// (either needs `CAP_SYS_NICE`).
///
/// Why real time: under the fair scheduler, even ten nice levels up, the woken door waited for
/// the saturated worker's time slice often enough to make the refusals' tail: in five
/// alternating probe-only pairs (`BENCHMARKS.md`, eighteenth round) their p99 from 3 s into the
/// flood was 0.24–0.36 ms under `SCHED_FIFO` against 0.60–1.84 ms ten nice levels up, with the
/// same goodput. A real-time thread preempts the workers the moment it wakes. What bounds it:
/// it sleeps until a watched socket has data, its work per request is a peek, a parse and two
/// small copies, and the kernel keeps 5 % of every second for other threads whatever real-time
/// threads do (`sched_rt_runtime_us`).
fn raise_priority() -> Priority {
    use thread_priority::unix::{set_thread_priority_and_policy, thread_native_id, RealtimeThreadSchedulePolicy, ThreadSchedulePolicy};
    let fifo = ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo);
    if set_thread_priority_and_policy(thread_native_id(), thread_priority::ThreadPriority::Min, fifo).is_ok() {
        return Priority::RealTime;
    }
    let thread = rustix::thread::gettid();
    let Ok(nice) = rustix::process::getpriority_process(Some(thread)) else { return Priority::Workers };
    let wanted = (nice - PRIORITY_ABOVE).max(-20);
    if wanted < nice && rustix::process::setpriority_process(Some(thread), wanted).is_ok() {
        Priority::Nice
    } else {
        Priority::Workers
    }
}

/// The connection's task has it.
const TASK: u8 = 0;
/// The door watches it: the task waits for the door to hand it back.
const WATCHED: u8 = 1;
/// The door is answering on it.
const DOOR: u8 = 2;
/// Offered to the door: the door or the task takes it (`Offer`).
const OFFERED: u8 = 3;

/// One hand-over of a connection to the door.
pub(crate) struct Watch {
    state: AtomicU8,
    /// The task, waiting for the door to finish.
    task: Mutex<Option<Waker>>,
    /// Tells the door the task closed the connection.
    ended: Notify,
    /// Set by the door: the request arrived while the line had room.
    admitted: AtomicBool,
}

impl Watch {
    fn new(state: u8) -> Self {
        Watch { state: AtomicU8::new(state), task: Mutex::new(None), ended: Notify::new(), admitted: AtomicBool::new(false) }
    }

    /// Whether the door saw the request arrive while the line had room (`Answer::Admitted`).
    pub(crate) fn admitted(&self) -> bool {
        self.admitted.load(Acquire)
    }

    /// From the connection's task: takes the connection back once the door has looked at its
    /// request. Pending until then (the task is woken when the door hands it back): the door,
    /// woken at once, decides for the request, not the task, woken later by its busy runtime.
    pub(crate) fn take_back(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.load(Acquire) == TASK {
            return Poll::Ready(());
        }
        *self.task.lock() = Some(cx.waker().clone());
        if self.state.load(Acquire) == TASK {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// From the connection's task, closing: the door lets go of the socket (at once if it is
    /// watching; when done, if it is answering).
    pub(crate) fn close(&self) {
        if self.state.swap(TASK, AcqRel) == WATCHED {
            self.ended.notify_one();
        }
    }

    /// From the door, having refused: goes on watching; false if the task closed the
    /// connection meanwhile.
    fn keep(&self) -> bool {
        self.state.compare_exchange(DOOR, WATCHED, AcqRel, Acquire).is_ok()
    }

    /// From the door, on data: whether the connection is still open.
    fn claim(&self) -> bool {
        self.state.compare_exchange(WATCHED, DOOR, AcqRel, Acquire).is_ok()
    }

    /// From the door, done: the connection goes back to its task.
    fn hand_back(&self) {
        self.state.store(TASK, Release);
        if let Some(task) = self.task.lock().take() {
            task.wake();
        }
    }
}

/// Watches one idle connection until it has data (answered or handed back) or its task takes
/// it back. The duplicate socket is closed when this ends.
async fn watch_at_the_door(socket: StdTcpStream, watch: &Watch, desk: &Desk, backoff: &Backoff) {
    // Registered with the door's runtime: its readiness wakes the door, not the task's runtime.
    let Ok(socket) = TcpStream::from_std(socket) else {
        watch.hand_back();
        return;
    };
    desk.watching.increment(1.0);
    let ended = watch.ended.notified();
    tokio::pin!(ended);
    loop {
        tokio::select! {
            readable = socket.readable() => {
                // A new registration is reported readable before anything has arrived: only
                // data (or the end of the stream) is for the door to decide on. Handing back on
                // nothing made the task hand the connection over again at once, and so on: the
                // connection spent half its time with the task, where a request that arrived
                // waited for the busy runtime.
                let mut head = [0u8; HEAD_PEEK];
                let peeked = match readable {
                    Ok(()) => match peek_head(&socket, &mut head) {
                        Some(peeked) => peeked,
                        None => continue,
                    },
                    Err(_) => 0,
                };
                // A held connection is not read before its hold ends (`backoff`), at the door
                // either: what came early (a request, the end of the stream) waits it out, then
                // is looked at again. Handed back early, the connection would be handed over
                // again at once by its task, still held, and so on until the hold ended. Only
                // when something came: a client that waits as told comes back after the hold,
                // and its connection needs no timer (a timer and a wake-up a refusal: the door
                // took ~15 % more of the core per event with them, `BENCHMARKS.md`).
                if let Some(until) = backoff.until().filter(|until| *until > tokio::time::Instant::now()) {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => continue,
                        () = &mut ended => break,
                    }
                }
                if watch.claim() {
                    let answer = if peeked > 0 { desk.answer(&socket, &mut head, peeked, backoff) } else { Answer::Returned };
                    #[cfg(test)]
                    desk.seen.fetch_add(1, AcqRel);
                    match answer {
                        // Kept, held: its next request is looked at here too, not before the hold ends
                        // (unless the task closed the connection meanwhile).
                        Answer::Refused => {
                            if watch.keep() {
                                continue;
                            }
                            break;
                        }
                        Answer::Admitted => {
                            watch.admitted.store(true, Release);
                            desk.returned.increment(1);
                        }
                        Answer::Returned => desk.returned.increment(1),
                    }
                    watch.hand_back();
                }
                break;
            }
            () = &mut ended => break,
        }
    }
    desk.watching.decrement(1.0);
}

/// Copies what has arrived on `socket`, which was reported readable, into `head` without
/// taking it from the socket: how many bytes (0: the end of the stream, or an error), or `None`
/// if nothing has arrived after all (its readiness is then cleared).
fn peek_head(socket: &TcpStream, head: &mut [u8]) -> Option<usize> {
    let mut peeked = ReadBuf::new(head);
    match socket.poll_peek(&mut Context::from_waker(Waker::noop()), &mut peeked) {
        Poll::Pending => None,
        Poll::Ready(Ok(n)) => Some(n),
        Poll::Ready(Err(_)) => Some(0),
    }
}

impl Desk {
    /// Refuses the request waiting on `socket`, whose first `peeked` bytes are in `head`, if
    /// the line is full and the request is one the door may refuse. What it does not refuse it
    /// leaves unread.
    fn answer(&self, socket: &TcpStream, head: &mut [u8], peeked: usize, backoff: &Backoff) -> Answer {
        let started = Instant::now();
        if !self.turns.crowded() || !self.turns.line_full() {
            return Answer::Admitted;
        }
        let Some((length, route)) = refusable_head(&head[..peeked], self.refusable) else { return Answer::Returned };
        // The head was peeked whole: it is in the socket's buffer, and is read in one call.
        let read = socket.try_read(&mut head[..length]);
        // Held and counted before the answer goes out: the client may ask again at once.
        backoff.hold_after_refusal(LONGEST_HOLD);
        self.count_refusal(route);
        let refusal = refusal();
        if !matches!(read, Ok(n) if n == length) || !matches!(socket.try_write(refusal), Ok(n) if n == refusal.len()) {
            // Cannot happen on an idle connection (its send buffer is empty); if it does, the
            // connection is out of step: the task finds it closed.
            let _ = socket2::SockRef::from(socket).shutdown(Shutdown::Both);
        }
        self.time_refusal(route, started);
        Answer::Refused
    }
}

impl Desk {
    /// Counts a refusal as the shed layer and the request metrics would have.
    fn count_refusal(&self, route: &'static str) {
        self.refused.increment(1);
        #[cfg(test)]
        self.refused_here.fetch_add(1, AcqRel);
        self.shed.increment(1);
        self.line_refused.increment(1);
        self.route_metrics(route, |requests, _| requests.increment(1));
    }

    fn time_refusal(&self, route: &'static str, started: Instant) {
        self.route_metrics(route, |_, duration| duration.record(started.elapsed().as_secs_f64()));
    }

    /// Calls `f` with `route`'s 503 counter and duration histogram, registered on first use.
    fn route_metrics(&self, route: &'static str, f: impl FnOnce(&metrics::Counter, &metrics::Histogram)) {
        let mut routes = self.routes.lock();
        let index = routes.iter().position(|(name, ..)| *name == route).unwrap_or_else(|| {
            let requests = metrics::counter!("weir_http_requests_total", "route" => route, "method" => "GET", "status" => "503");
            routes.push((route, requests, metrics::histogram!("weir_http_request_duration_seconds", "route" => route, "method" => "GET")));
            routes.len() - 1
        });
        let (_, requests, duration) = &routes[index];
        f(requests, duration);
    }
}

/// What the door did with a request.
enum Answer {
    /// Refused it.
    Refused,
    /// Left it: the line had room when it arrived, so it joins the line (as it would have,
    /// read at once), even if the line has grown by the time its connection reads it.
    Admitted,
    /// Left it for the connection to decide (not a request the door refuses, or unreadable).
    Returned,
}

/// The length of `head` and the route of its request, if it is a complete HTTP/1.1 `GET` head
/// of a path `refusable` names, with no body and nothing that changes what a refusal does to
/// the connection (`Connection: close`, an upgrade).
fn refusable_head(head: &[u8], refusable: Refusable) -> Option<(usize, &'static str)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(length) = request.parse(head).ok()? else { return None };
    if request.method != Some("GET") || request.version != Some(1) {
        return None;
    }
    let path = request.path?;
    let route = refusable(path.split_once('?').map_or(path, |(path, _)| path))?;
    let plain = request.headers.iter().all(|h| {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("content-length") {
            value.trim_ascii() == b"0"
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            !value.windows(5).any(|w| w == b"close") && !value.windows(7).any(|w| w == b"upgrade")
        } else {
            !name.eq_ignore_ascii_case("transfer-encoding") && !name.eq_ignore_ascii_case("upgrade")
        }
    });
    plain.then_some((length, route))
}

/// The refusal on the wire: what the shed layer answers (`shed::at_capacity`), its
/// `Retry-After` spread the same way (`shed::retry_after_secs`).
fn refusal() -> &'static [u8] {
    static RESPONSES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let responses = RESPONSES.get_or_init(|| {
        let body = at_capacity_body();
        (0..RETRY_AFTER_SPREAD)
            .map(|more| {
                let mut response = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {}\r\ncontent-length: {}\r\n\r\n",
                    RETRY_AFTER.as_secs() + more,
                    body.len()
                )
                .into_bytes();
                response.extend_from_slice(body);
                response
            })
            .collect()
    });
    let secs = retry_after_secs();
    &responses[(secs - RETRY_AFTER.as_secs()) as usize % responses.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::backoff::{Listener, Throttled};
    use crate::limits::turns::Settings;
    use std::io::{Read as _, Write as _};
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

    /// What the door's thread reports about its priority is what the kernel then says the
    /// thread has, whichever of the three the process may ask for.
    #[test]
    fn the_door_reports_the_priority_its_thread_got() {
        use thread_priority::unix::{thread_schedule_policy, NormalThreadSchedulePolicy, RealtimeThreadSchedulePolicy, ThreadSchedulePolicy};
        let nice_now = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let (got, policy, nice_before, nice_after) = std::thread::spawn(move || {
            let before = nice_now();
            let got = raise_priority();
            (got, thread_schedule_policy().unwrap(), before, nice_now())
        })
        .join()
        .unwrap();
        match got {
            Priority::RealTime => assert_eq!(policy, ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo)),
            Priority::Nice => {
                assert_eq!(policy, ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other));
                assert!(nice_after < nice_before, "nice {nice_before} → {nice_after}");
            }
            Priority::Workers => {
                assert_eq!(policy, ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other));
                assert_eq!(nice_after, nice_before);
            }
        }
    }

    /// A listener with one turn and a door; a `line_wait` of 1 ms keeps the line full (a
    /// connection without the turn is refused), one of a minute leaves it room.
    async fn listener(line_wait: Duration, max_connections: usize) -> (Listener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = Settings { active: 1, length: Duration::from_millis(50), line_wait };
        (Listener::new(listener, max_connections, settings).with_door(visitor_route), addr)
    }

    async fn accept(listener: &mut Listener) -> Throttled {
        axum::serve::Listener::accept(listener).await.0
    }

    /// One poll of a read: what it read, or `None` if it had to wait.
    async fn read_now(server: &mut Throttled) -> Option<Vec<u8>> {
        let mut bytes = [0u8; 256];
        let mut buf = ReadBuf::new(&mut bytes);
        let polled = std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *server).poll_read(cx, &mut buf))).await;
        match polled {
            Poll::Ready(read) => Some(read.map(|()| buf.filled().to_vec()).unwrap()),
            Poll::Pending => None,
        }
    }

    /// A connection holding the one turn, a request in flight, and an idle one the door
    /// watches (the line was full a moment ago). Returns the listener with both, and the idle one's client.
    async fn crowded(line_wait: Duration) -> (Listener, Throttled, Throttled, std::net::TcpStream) {
        crowded_within(line_wait, 16).await
    }

    /// A connection holding the one turn of `listener`, at `addr`, with a request in flight.
    async fn turn_held(listener: &mut Listener, addr: SocketAddr) -> Throttled {
        let mut holder_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut holder = accept(listener).await;
        holder_client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        holder.read_exact(&mut buf).await.unwrap();
        holder.activity().started();
        // Kept open with the holder: the test ends before it matters.
        std::mem::forget(holder_client);
        holder
    }

    /// [`crowded`], with `max_connections` connection slots.
    async fn crowded_within(line_wait: Duration, max_connections: usize) -> (Listener, Throttled, Throttled, std::net::TcpStream) {
        let (mut listener, addr) = listener(line_wait, max_connections).await;
        let holder = turn_held(&mut listener, addr).await;
        let idle_client = std::net::TcpStream::connect(addr).unwrap();
        idle_client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut idle = accept(&mut listener).await;
        // The line was full a moment ago (it may have room now): idle connections go to the door.
        listener.door().expect("a door").0.desk.turns.refusing_now();
        assert_eq!(read_now(&mut idle).await, None, "the idle connection read something");
        (listener, holder, idle, idle_client)
    }

    /// Waits (on the real clock) until the door has looked at `n` requests.
    async fn door_saw(door: &Door, n: u64) {
        for _ in 0..5000 {
            if door.seen() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the door saw {} requests, not {n}", door.seen());
    }

    /// Sends `request` on `client` and reads the answer up to the end of a JSON body.
    fn ask(client: &mut std::net::TcpStream, request: &[u8]) -> String {
        client.write_all(request).unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&response).ends_with('}') {
            let n = client.read(&mut buf).expect("no answer while the runtime was blocked");
            assert!(n > 0, "closed without an answer");
            response.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(response).unwrap()
    }

    const VISIT: &[u8] = b"GET /r/sale HTTP/1.1\r\nhost: x\r\n\r\n";

    /// Blocks the calling runtime while a client thread asks a visit on `client` after each of
    /// `pauses`: the answers, which only the door can give, and how long after its request each came.
    fn ask_while_blocked(mut client: std::net::TcpStream, pauses: &[Duration]) -> Vec<(String, Duration)> {
        let pauses = pauses.to_vec();
        let asked = std::thread::spawn(move || {
            pauses
                .into_iter()
                .map(|pause| {
                    std::thread::sleep(pause);
                    let sent = Instant::now();
                    (ask(&mut client, VISIT), sent.elapsed())
                })
                .collect()
        });
        asked.join().expect("the client's thread failed")
    }

    /// Longer than a first hold (`backoff`, 125 ms).
    const PAST_A_HOLD: Duration = Duration::from_millis(150);

    /// The door answers while the connection's runtime is blocked: the refusal does not wait
    /// for it. What follows the refused request is left for the connection, which is held.
    #[tokio::test]
    async fn a_request_past_a_full_line_is_refused_at_the_door_while_the_runtime_is_busy() {
        let (listener, _holder, mut idle, mut client) = crowded(Duration::from_millis(1)).await;
        let door = listener.door().expect("a door").clone();
        let asked = std::thread::spawn(move || ask(&mut client, b"GET /r/sale HTTP/1.1\r\nhost: x\r\n\r\nping"));
        // Blocks this runtime (the connection's) until the client has its answer.
        let response = asked.join().expect("the client's thread failed");
        assert!(response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{response}");
        assert!(response.contains("\r\nretry-after: 1\r\n") || response.contains("\r\nretry-after: 2\r\n"), "{response}");
        let body = response.split_once("\r\n\r\n").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "unavailable");
        assert!(response.contains(&format!("content-length: {}\r\n", body.len())), "{response}");
        assert_eq!(door.refused(), 1);
        assert!(idle.backoff().until().is_some(), "the refused connection is not held");
        let mut rest = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), idle.read_exact(&mut rest)).await.expect("not read after the hold").unwrap();
        assert_eq!(&rest, b"ping", "the door read more than the refused request");
    }

    /// A connection the door refused stays at the door while held: the request its client sends
    /// once the hold is over is refused there too, with the connection's runtime still blocked.
    #[tokio::test]
    async fn a_refused_connection_waits_out_its_hold_at_the_door() {
        let (listener, _holder, _idle, client) = crowded(Duration::from_millis(1)).await;
        let door = listener.door().expect("a door").clone();
        // The second visit is sent at once: the door answers it only once the hold is over.
        let answers = ask_while_blocked(client, &[Duration::ZERO, Duration::ZERO]);
        assert!(answers.iter().all(|(a, _)| a.starts_with("HTTP/1.1 503 ")), "{answers:?}");
        assert!(answers[1].1 >= Duration::from_millis(120), "answered {:?} into a 125 ms hold", answers[1].1);
        assert_eq!(door.refused(), 2);
    }

    /// A client that closes its connection while it is held: the door hands the connection back
    /// once, when the hold is over, not each time its task (which will not read a held
    /// connection) hands it over again.
    #[tokio::test]
    async fn a_connection_closed_during_its_hold_goes_back_once_the_hold_is_over() {
        let (listener, _holder, mut idle, mut client) = crowded(Duration::from_millis(1)).await;
        let door = listener.door().expect("a door").clone();
        let refused = std::thread::spawn(move || {
            let answer = ask(&mut client, VISIT);
            client.shutdown(Shutdown::Write).unwrap();
            (answer, client)
        });
        let (answer, _client) = refused.join().expect("the client's thread failed");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        let mut rest = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut rest)).await.expect("the end of the stream not read");
        assert_eq!(read.unwrap(), 0);
        assert_eq!((door.refused(), door.seen()), (1, 2), "looked at more than the request and the end of the stream");
    }

    /// A connection whose request its task refused (it was not at the door when the request
    /// came) waits out its hold at the door, which answers its next request.
    #[tokio::test]
    async fn a_connection_refused_by_its_task_goes_to_the_door_for_its_hold() {
        let (mut listener, addr) = listener(Duration::from_millis(1), 16).await;
        let door = listener.door().expect("a door").clone();
        let _holder = turn_held(&mut listener, addr).await;
        // Nothing refused yet: the connection is not at the door when its request arrives.
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut conn = accept(&mut listener).await;
        client.write_all(VISIT).unwrap();
        let mut request = vec![0u8; VISIT.len()];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut request)).await.expect("not read").unwrap();
        assert!(conn.backoff().take_past_line(), "read without coming past the full line");
        // Refused as the shed layer does: held, the request finished.
        conn.activity().started();
        conn.backoff().hold_after_refusal(LONGEST_HOLD);
        conn.activity().finished();
        assert_eq!(read_now(&mut conn).await, None);
        assert_eq!(door.refused(), 0);
        let answers = ask_while_blocked(client, &[PAST_A_HOLD]);
        assert!(answers[0].0.starts_with("HTTP/1.1 503 "), "{answers:?}");
        assert_eq!(door.refused(), 1);
    }

    /// Whatever the door does not refuse reaches the connection whole, and is not held.
    #[tokio::test]
    async fn what_the_door_does_not_refuse_it_leaves_for_the_connection() {
        let cases: [(&str, Duration); 5] = [
            ("GET /r/sale HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(60)),
            ("GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_millis(1)),
            ("POST /r/sale HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi", Duration::from_millis(1)),
            ("GET /r/sa", Duration::from_millis(1)),
            // The line has room: the request is to wait in it, not to be refused.
            ("GET /r/sale HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(60)),
        ];
        for (request, line_wait) in cases {
            let (listener, mut holder, mut idle, mut client) = crowded(line_wait).await;
            let door = listener.door().expect("a door").clone();
            client.write_all(request.as_bytes()).unwrap();
            door_saw(&door, 1).await;
            assert_eq!(door.refused(), 0, "{request:?} was refused");
            // The turn is free again: the connection with the request may take it.
            holder.activity().finished();
            assert_eq!(read_now(&mut holder).await, None);
            let mut got = vec![0u8; request.len()];
            tokio::time::timeout(Duration::from_secs(5), idle.read_exact(&mut got)).await.expect("the request never reached the connection").unwrap();
            assert_eq!(String::from_utf8_lossy(&got), request);
            assert!(idle.backoff().until().is_none(), "{request:?}: held");
        }
    }

    /// A visitor's request the door may refuse.
    const REQUEST: &str = "GET /r/sale HTTP/1.1\r\nhost: x\r\n\r\n";

    /// An idle connection's task that waits for a request, as hyper's would between requests;
    /// what it reads comes out of the receiver.
    fn reading(mut idle: Throttled) -> oneshot::Receiver<Vec<u8>> {
        let (read_tx, read_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut request = [0u8; 64];
            let n = idle.read(&mut request).await.unwrap();
            let _ = read_tx.send(request[..n].to_vec());
        });
        read_rx
    }

    /// Rings the start of refusals, then keeps this (the idle connections' runtime's) thread
    /// busy while a request arrives on `idle_client`: whether the door saw it meanwhile.
    async fn refusals_begin_while_the_runtime_is_busy(door: &Door, idle_client: &mut std::net::TcpStream) -> bool {
        door.0.desk.turns.refusing_now();
        idle_client.write_all(REQUEST.as_bytes()).unwrap();
        let busy_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < busy_until && door.seen() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        door.seen() == 1
    }

    /// The one turn held and a second connection waiting in line for it: a line with room (its
    /// bound is a minute). Returns what keeps it so: the holder, the waiter and its client.
    async fn a_line(listener: &mut Listener, addr: SocketAddr) -> impl Sized {
        let holder = turn_held(listener, addr).await;
        let mut waiter_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut waiter = accept(listener).await;
        waiter_client.write_all(b"ping").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(read_now(&mut waiter).await, None, "the waiter read without the turn");
        (holder, waiter, waiter_client)
    }

    /// A connection that went idle while a line existed but nothing was refused yet is taken by
    /// the door the moment refusals begin, without its task (whose runtime is busy): so even
    /// its first request after that is looked at by the door, not read by its busy task.
    #[tokio::test]
    async fn an_idle_connection_beside_a_line_is_taken_by_the_door_when_refusals_begin_without_its_task() {
        let (mut listener, addr) = listener(Duration::from_secs(60), 16).await;
        let door = listener.door().expect("a door").clone();
        let _line = a_line(&mut listener, addr).await;
        let mut idle_client = std::net::TcpStream::connect(addr).unwrap();
        let read_rx = reading(accept(&mut listener).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(door.seen(), 0);
        assert!(refusals_begin_while_the_runtime_is_busy(&door, &mut idle_client).await, "the door waited for the idle connection's task to hand it over");
        // The line had room: the door admitted the request, and the task read it whole.
        let got = tokio::time::timeout(Duration::from_secs(5), read_rx).await.expect("the request never reached the connection").unwrap();
        assert_eq!(String::from_utf8_lossy(&got), REQUEST);
        assert_eq!(door.refused(), 0);
    }

    /// Refusals begin with more idle connections offered than the door takes over at once: the
    /// door's own thread takes them all (not the thread that rang), a batch at a time, without
    /// their tasks (whose runtime is busy), and looks at the next request on each.
    #[tokio::test]
    async fn every_offered_connection_is_taken_over_a_batch_at_a_time_when_refusals_begin() {
        let offered = 2 * TAKE_AT_ONCE + 1;
        let (mut listener, addr) = listener(Duration::from_secs(60), 3 * offered).await;
        let door = listener.door().expect("a door").clone();
        let _line = a_line(&mut listener, addr).await;
        let mut idle = Vec::new();
        for _ in 0..offered {
            let client = std::net::TcpStream::connect(addr).unwrap();
            idle.push((client, reading(accept(&mut listener).await)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(door.0.to_take.taken.load(Acquire), 0, "taken over before refusals began");
        door.0.desk.turns.refusing_now();
        // This thread (the tasks' runtime) stays busy: only the door can take them.
        let busy_until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < busy_until && door.0.to_take.taken.load(Acquire) < offered {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(door.0.to_take.taken.load(Acquire), offered, "not every offered connection was taken over");
        for (client, _) in &mut idle {
            client.write_all(REQUEST.as_bytes()).unwrap();
        }
        door_saw(&door, offered as u64).await;
        // The line had room: each request was admitted and read whole by its task.
        for (_, read_rx) in idle {
            let got = tokio::time::timeout(Duration::from_secs(5), read_rx).await.expect("a request never reached its connection").unwrap();
            assert_eq!(String::from_utf8_lossy(&got), REQUEST);
        }
        assert_eq!(door.refused(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_that_saw_no_line_is_offered_to_the_door_when_one_forms() {
        let (mut listener, addr) = listener(Duration::from_secs(60), 16).await;
        let door = listener.door().expect("a door").clone();
        // Idle before any line exists.
        let mut idle_client = std::net::TcpStream::connect(addr).unwrap();
        let read_rx = reading(accept(&mut listener).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _line = a_line(&mut listener, addr).await;
        // The line formed: the idle connection's task was woken, and offered it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(refusals_begin_while_the_runtime_is_busy(&door, &mut idle_client).await, "the idle connection was not offered when the line formed");
        let got = tokio::time::timeout(Duration::from_secs(5), read_rx).await.expect("the request never reached the connection").unwrap();
        assert_eq!(String::from_utf8_lossy(&got), REQUEST);
    }

    /// The door's duplicate socket takes a connection slot: with none free, the connection stays
    /// with its task, which reads (and here refuses) the request itself.
    #[tokio::test]
    async fn the_door_holds_no_more_sockets_than_the_connection_slots_leave() {
        let (listener, _holder, mut idle, mut client) = crowded_within(Duration::from_millis(1), 2).await;
        let request = "GET /r/sale HTTP/1.1\r\nhost: x\r\n\r\n";
        client.write_all(request.as_bytes()).unwrap();
        let mut got = vec![0u8; request.len()];
        tokio::time::timeout(Duration::from_secs(5), idle.read_exact(&mut got)).await.expect("the request never reached the connection").unwrap();
        assert_eq!(String::from_utf8_lossy(&got), request);
        assert_eq!(listener.door().expect("a door").seen(), 0, "the door watched without a slot");
    }

    /// A connection closed while the door watches it is closed for its client too: the door's
    /// duplicate of the socket does not keep it open.
    #[tokio::test]
    async fn a_connection_closed_while_at_the_door_is_closed() {
        let (listener, _holder, idle, client) = crowded(Duration::from_millis(1)).await;
        drop(idle);
        let mut client = tokio::net::TcpStream::from_std({
            client.set_nonblocking(true).unwrap();
            client
        })
        .unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.expect("still open after the server closed it");
        assert_eq!(read.unwrap(), 0);
        assert_eq!(listener.door().expect("a door").seen(), 0);
    }

    fn visitor_route(path: &str) -> Option<&'static str> {
        path.strip_prefix("/r/").filter(|room| !room.is_empty() && !room.contains('/')).map(|_| "/r/{room}")
    }

    #[test]
    fn only_a_whole_bodyless_get_of_a_refusable_route_is_refused() {
        let refused = |head: &str| refusable_head(head.as_bytes(), visitor_route);
        let get = "GET /r/sale?from=ad HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n";
        assert_eq!(refused(get), Some((get.len(), "/r/{room}")));
        assert_eq!(refused(&format!("{get}GET /r/next HTTP/1.1\r\n")), Some((get.len(), "/r/{room}")), "a pipelined request after it is left");
        for head in [
            "GET /r/sale HTTP/1.1\r\nhost: x\r\n",
            "POST /r/sale HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
            "GET /r/sale HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /r/sale HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
            "GET /r/sale HTTP/1.1\r\nConnection: Close\r\n\r\n",
            "GET /r/sale HTTP/1.1\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
            "GET /r/sale HTTP/1.0\r\n\r\n",
            "GET /readyz HTTP/1.1\r\n\r\n",
            "GET /r/sale/extra HTTP/1.1\r\n\r\n",
            "\u{1}\u{2} nonsense\r\n\r\n",
        ] {
            assert_eq!(refused(head), None, "{head:?}");
        }
    }
}
