//! The accept loop: every connection is served by hyper's HTTP/1.1 connection (with upgrades,
//! for WebSockets), calling the [`App`](crate::http::App) directly.
//!
//! This replaces `axum::serve`, which on every request clones the whole per-connection service
//! and polls a shutdown channel, and wraps each socket for HTTP/2 detection that weir (HTTP/1.1
//! only, behind a proxy for anything else) never uses. Here a request costs no clone, and
//! graceful shutdown costs one atomic load per wake-up of a connection.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, Notify};
use tower::Service;

use crate::limits::backoff::{Listener, Peer};
use crate::limits::head_guard::{Activity, Finished, HeadGuard};

/// Serves `app` on `listener` until `stop` resolves, then lets every open connection finish
/// the request it is on (idle keep-alive connections close at once) and returns when all have.
/// A connection whose request head is still arriving after between one and two `header_timeout`
/// periods is closed (`limits::head_guard`).
pub async fn serve<A: PeerService>(mut listener: Listener, app: A, header_timeout: Duration, stop: impl Future<Output = ()>) {
    let draining = Arc::new(Draining::default());
    // Every connection task holds a sender; `recv` returns `None` once all have ended.
    let (alive, mut all_closed) = mpsc::channel::<Infallible>(1);
    tokio::pin!(stop);
    loop {
        let (io, peer) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = &mut stop => break,
        };
        let (backoff, activity) = (io.backoff().clone(), io.activity().clone());
        let guard = HeadGuard::new(activity.clone(), header_timeout);
        let service = ConnectionService {
            app: RefCell::new(app.clone()),
            peer: Peer { addr: peer, backoff },
            activity,
        };
        // hyper's own header timeout is left off: it arms a timer per request (`head_guard`).
        let connection = http1::Builder::new().serve_connection(TokioIo::new(io), service).with_upgrades();
        let connection = Drained {
            connection,
            guard,
            begin_shutdown: http1::UpgradeableConnection::graceful_shutdown,
            signal: draining.notify.clone().notified_owned(),
            draining: draining.clone(),
            state: DrainState::Unregistered,
        };
        let alive = alive.clone();
        tokio::spawn(async move {
            match connection.await {
                Some(Err(e)) => tracing::trace!(error = %e, "connection ended with an error"),
                None => {
                    metrics::counter!("weir_slow_heads_closed_total").increment(1);
                    tracing::debug!(%peer, "closed a connection whose request head was too slow");
                }
                Some(Ok(())) => {}
            }
            drop(alive);
        });
    }
    drop(listener);
    draining.flag.store(true, Ordering::Release);
    draining.notify.notify_waiters();
    drop(alive);
    let _ = all_closed.recv().await;
}

/// What [`serve`] drives: a service told each request's [`Peer`] (address and hold) alongside
/// the request. `http::App` takes it as an argument, so a hot route that never looks at it pays
/// nothing; [`PeerExtension`] hands it to any tower service as a request extension.
pub trait PeerService: Clone + Send + 'static {
    type Future: Future<Output = Result<Response, Infallible>> + Send + 'static;
    fn call_from(&mut self, request: Request, peer: &Peer) -> Self::Future;
}

/// A tower service served with its peer in every request's extensions (one map allocation per
/// request: what axum extractors and `Request::extensions` expect).
#[derive(Clone)]
pub struct PeerExtension<S>(pub S);

impl<S> PeerService for PeerExtension<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Future = S::Future;

    fn call_from(&mut self, mut request: Request, peer: &Peer) -> S::Future {
        request.extensions_mut().insert(peer.clone());
        self.0.call(request)
    }
}

/// One connection's view of the app.
struct ConnectionService<A> {
    /// hyper calls services through `&self`; a connection makes one call at a time.
    app: RefCell<A>,
    peer: Peer,
    activity: Arc<Activity>,
}

impl<A: PeerService> hyper::service::Service<hyper::Request<Incoming>> for ConnectionService<A> {
    type Response = Response;
    type Error = Infallible;
    type Future = Finished<A::Future>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.activity.started();
        Finished::new(self.app.borrow_mut().call_from(request.map(Body::new), &self.peer), self.activity.clone())
    }
}

#[derive(Default)]
struct Draining {
    flag: AtomicBool,
    notify: Arc<Notify>,
}

#[derive(PartialEq)]
enum DrainState {
    Unregistered,
    Registered,
    Draining,
}

pin_project_lite::pin_project! {
    /// A connection that shuts down gracefully once the server drains, and is dropped (closed)
    /// when its [`HeadGuard`] says its request head is too slow. The shutdown signal is
    /// registered on the first poll (it wakes the task); after that each poll only reads the flag.
    struct Drained<C> {
        #[pin]
        connection: C,
        #[pin]
        guard: HeadGuard,
        begin_shutdown: fn(Pin<&mut C>),
        #[pin]
        signal: tokio::sync::futures::OwnedNotified,
        draining: Arc<Draining>,
        state: DrainState,
    }
}

impl<C: Future> Future for Drained<C> {
    /// `None` when the guard closed the connection.
    type Output = Option<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if this.guard.poll_expired(cx) {
            return Poll::Ready(None);
        }
        if *this.state == DrainState::Unregistered {
            // Pending unless the server is already draining, which the flag below also tells.
            let _ = this.signal.as_mut().poll(cx);
            *this.state = DrainState::Registered;
        }
        if *this.state == DrainState::Registered && this.draining.flag.load(Ordering::Acquire) {
            *this.state = DrainState::Draining;
            (this.begin_shutdown)(this.connection.as_mut());
        }
        this.connection.poll(cx).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Answers `/slow` once `release` is notified (telling `started` first), anything else at
    /// once; every answer names the peer address the app was given.
    fn app(
        started: Arc<Notify>,
        release: Arc<Notify>,
    ) -> impl PeerService {
        PeerExtension(tower::service_fn(move |request: Request| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let peer = request.extensions().get::<Peer>().map(|p| p.addr.ip().to_string()).unwrap_or_default();
                if request.uri().path() == "/slow" {
                    started.notify_one();
                    release.notified().await;
                }
                Ok::<_, Infallible>(Response::new(Body::from(format!("done for {peer}"))))
            }
        }))
    }

    async fn send(stream: &mut TcpStream, path: &str) {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
    }

    async fn read_to_end(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn drains_in_flight_requests_and_closes_idle_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, started, release) = (
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        );
        let mut server = tokio::spawn({
            let (stop, app) = (stop.clone(), app(started.clone(), release.clone()));
            async move {
                serve(Listener::new(listener, 16, Default::default()), app, Duration::from_secs(30), async move {
                    stop.notified().await
                })
                .await
            }
        });

        let mut idle = TcpStream::connect(addr).await.unwrap();
        send(&mut idle, "/fast").await;
        let mut buf = [0u8; 512];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).ends_with("done for 127.0.0.1"),
            "the app sees the peer address"
        );

        let mut busy = TcpStream::connect(addr).await.unwrap();
        send(&mut busy, "/slow").await;
        started.notified().await;
        stop.notify_one();

        assert_eq!(
            read_to_end(&mut idle).await,
            "",
            "an idle keep-alive connection is closed at once"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut server)
                .await
                .is_err(),
            "serve waits for the request in flight"
        );
        release.notify_one();
        let answered = read_to_end(&mut busy).await;
        assert!(
            answered.starts_with("HTTP/1.1 200") && answered.ends_with("done for 127.0.0.1"),
            "{answered}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns once connections are done")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    }

    /// A client that never finishes its request head, or never starts one, is cut off after one
    /// to two header-timeout periods, and a complete request on another connection is unaffected. (Paused time: the
    /// seconds pass at once.)
    #[tokio::test(start_paused = true)]
    async fn slow_headers_are_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = app(Arc::new(Notify::new()), Arc::new(Notify::new()));
        tokio::spawn(serve(Listener::new(listener, 16, Default::default()), app, Duration::from_secs(30), std::future::pending()));

        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\nx-trickle: 1").await.unwrap();
        let before = tokio::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(90), read_to_end(&mut slow)).await.expect("the server closes a slow-header connection");
        let waited = before.elapsed();
        assert!((Duration::from_secs(30)..=Duration::from_secs(61)).contains(&waited), "closed after one to two periods, not {waited:?}");
        assert!(!answer.contains("done for"), "the incomplete request never reached the app: {answer}");

        // A connection that never sends a byte is cut off the same way: silent sockets must not
        // hold `max_connections` slots for ever.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let before = tokio::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(90), read_to_end(&mut silent)).await.expect("the server closes a silent connection");
        let waited = before.elapsed();
        assert!((Duration::from_secs(30)..=Duration::from_secs(61)).contains(&waited), "closed after one to two periods, not {waited:?}");
        assert!(answer.is_empty());

        // An idle keep-alive connection is not a slow head: it is still served minutes later.
        let mut fine = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 512];
        for _ in 0..2 {
            send(&mut fine, "/fast").await;
            let n = fine.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).ends_with("done for 127.0.0.1"));
            tokio::time::sleep(Duration::from_secs(150)).await;
        }
    }
}
