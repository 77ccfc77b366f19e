//! Slow request heads: a client that sends a request head slowly (or part of one, then nothing)
//! holds one of the `max_connections` slots for as long as it likes. hyper's own header timeout
//! arms a fresh timer for every request head, which every request pays for; this guard costs a
//! counter bump per socket read and per request, and one timer per connection that fires once a
//! period.
//!
//! The rule: a connection is closed when, at two checks one period apart, its next request head
//! is awaited and has not completed: bytes have arrived since its last request finished while no
//! request was started or in flight, or, on a connection that has not started a request yet,
//! nothing has. A head that has been arriving for between one and two periods is cut off, and so
//! is a connection that says nothing for that long after it was opened (otherwise silent sockets
//! would hold `max_connections` slots for ever); a complete request, an idle keep-alive
//! connection (one that has served a request) and a response still streaming out are never
//! touched.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// What one connection has done, counted by its socket and its service.
#[derive(Default)]
pub struct Activity {
    /// Set when a response switched protocols: hyper no longer serves the connection.
    upgraded: AtomicBool,
    bytes_read: AtomicU64,
    started: AtomicU64,
    finished: AtomicU64,
    bytes_read_when_finished: AtomicU64,
}

impl Activity {
    pub fn read(&self, bytes: usize) {
        self.bytes_read.fetch_add(bytes as u64, Relaxed);
    }

    pub fn started(&self) {
        self.started.fetch_add(1, Relaxed);
    }

    pub(crate) fn finished(&self) {
        self.bytes_read_when_finished.store(self.bytes_read.load(Relaxed), Relaxed);
        self.finished.fetch_add(1, Relaxed);
    }

    /// Whether anything has been read from the connection yet.
    pub(crate) fn has_read(&self) -> bool {
        self.bytes_read.load(Relaxed) > 0
    }

    /// Whether the connection was upgraded (to a WebSocket): its reads are no longer requests.
    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Relaxed)
    }

    /// Whether a request has started and its response is not ready yet.
    pub fn in_flight(&self) -> bool {
        self.started.load(Relaxed) != self.finished.load(Relaxed)
    }

    /// Whether the connection is between requests: not upgraded, nothing in flight, nothing
    /// read of the next request.
    pub(crate) fn between_requests(&self) -> bool {
        !self.upgraded() && self.head_arriving().is_none() && !self.in_flight()
    }

    /// While a request head is arriving (bytes since the last finished request, nothing in
    /// flight): the number of requests started so far, which identifies that head.
    fn head_arriving(&self) -> Option<u64> {
        let started = self.started.load(Relaxed);
        let in_flight = started != self.finished.load(Relaxed);
        let bytes_since = self.bytes_read.load(Relaxed) > self.bytes_read_when_finished.load(Relaxed);
        (!in_flight && bytes_since).then_some(started)
    }

    /// [`head_arriving`](Self::head_arriving), or a connection still waiting for its first
    /// request: both are a head the guard is waiting for (the first one is number 0).
    fn head_awaited(&self) -> Option<u64> {
        let fresh = self.started.load(Relaxed) == 0;
        self.head_arriving().or(fresh.then_some(0))
    }
}

pin_project_lite::pin_project! {
    /// A request's work, telling its connection's [`Activity`] when it is done.
    pub struct Finished<F> {
        #[pin]
        work: F,
        activity: Arc<Activity>,
    }
}

impl<F> Finished<F> {
    pub fn new(work: F, activity: Arc<Activity>) -> Self {
        Self { work, activity }
    }
}

impl<F: Future<Output = Result<axum::response::Response, Infallible>>> Future for Finished<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.work.poll(cx));
        if matches!(&output, Ok(response) if response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS) {
            this.activity.upgraded.store(true, Relaxed);
        }
        this.activity.finished();
        Poll::Ready(output)
    }
}

pin_project_lite::pin_project! {
    /// The per-connection check of the rule above.
    pub struct HeadGuard {
        #[pin]
        timer: Sleep,
        period: Duration,
        activity: Arc<Activity>,
        // The head seen arriving at the previous check, if one was.
        suspect: Option<u64>,
    }
}

impl HeadGuard {
    pub fn new(activity: Arc<Activity>, period: Duration) -> Self {
        Self { timer: tokio::time::sleep(period), period, activity, suspect: None }
    }

    /// Whether the connection is to be closed now; otherwise the timer is (re)armed to wake
    /// this task at the next check.
    pub fn poll_expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let mut this = self.project();
        while this.timer.as_mut().poll(cx).is_ready() {
            let arriving = this.activity.head_awaited();
            if arriving.is_some() && arriving == *this.suspect {
                return true;
            }
            *this.suspect = arriving;
            let next = tokio::time::Instant::now() + *this.period;
            this.timer.as_mut().reset(next);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new connection's activity and its guard, armed.
    async fn armed() -> (Arc<Activity>, Pin<Box<HeadGuard>>) {
        let activity = Arc::new(Activity::default());
        let mut guard = Box::pin(HeadGuard::new(activity.clone(), Duration::from_secs(30)));
        assert!(!after(&mut guard, 0).await);
        (activity, guard)
    }

    /// Advances paused time by `secs` and reports whether the guard would close the connection.
    async fn after(guard: &mut Pin<Box<HeadGuard>>, secs: u64) -> bool {
        tokio::time::advance(Duration::from_secs(secs)).await;
        std::future::poll_fn(|cx| Poll::Ready(guard.as_mut().poll_expired(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_arriving_for_a_whole_period_is_cut_off() {
        let (activity, mut g) = armed().await;
        activity.read(10);
        assert!(!after(&mut g, 31).await, "first check: suspected only");
        activity.read(1);
        assert!(after(&mut g, 30).await, "second check: still no request");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_a_byte_is_cut_off() {
        let (_activity, mut g) = armed().await;
        assert!(!after(&mut g, 31).await, "first check: suspected only");
        assert!(after(&mut g, 30).await, "second check: still nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_slow_to_start_is_cut_off_from_the_connection_s_opening() {
        let (activity, mut g) = armed().await;
        assert!(!after(&mut g, 31).await);
        activity.read(5);
        assert!(after(&mut g, 30).await, "the first head still incomplete a period later");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_idle_connections_and_long_responses_are_left_alone() {
        let (activity, mut g) = armed().await;
        // A head arrives just before a check and completes just after it.
        activity.read(100);
        assert!(!after(&mut g, 31).await);
        activity.started();
        assert!(!after(&mut g, 30).await, "the head completed: a request started");
        // The response takes minutes (in flight), then the connection idles.
        assert!(!after(&mut g, 30).await);
        assert!(!after(&mut g, 30).await);
        activity.finished();
        for _ in 0..4 {
            assert!(!after(&mut g, 30).await, "idle keep-alive");
        }
    }
}
