//! One WebSocket connection at `/app/{key}?protocol=7`: checks the app and protocol version,
//! announces the socket id, then runs one task that both reads the socket and writes the
//! connection's bounded outbox to it, coalescing queued frames per flush.
//!
//! One task instead of a reader and a writer halves what an idle connection costs (a task, a
//! split socket's shared lock); the outbox is a `VecDeque` behind a mutex that grows only with
//! what is queued, where an mpsc channel allocates 32 slots up front. Writing never blocks
//! reading: the task polls both, so a client that stops reading still gets its pings answered
//! until its outbox overflows.
//!
//! The task enforces the activity timeout (ping, then close 4201 without a pong), the sign-in
//! deadline and per-connection limits, and turns client messages into calls on the `tenant`.
//! Any part may close the connection through [`Conn::close`], which records the code once and
//! wakes the task; it then sends `pusher:error` and a close frame with that code.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::task::AtomicWaker;
use futures_util::{Sink, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::protocol::{self, code, ChannelKind, ChannelType, Incoming};
use super::signature;
use super::watchlist;
use super::tenant::{Bucket, Member, SubscribeError, Tenant};
use super::Realtime;
use crate::error::{ApiError, ApiPath};
use crate::http::AppState;
use crate::limits::backoff::Peer;
use crate::room::policy::abuse::client_ip;

/// How long the writer tries to deliver the final error and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Client events per second per connection (Pusher: 10).
const CLIENT_EVENTS_PER_SECOND: u32 = 10;
/// Room for the envelope around an event's data (channel, event name, auth) in one frame.
const ENVELOPE_SLACK: usize = 2048;

/// The shared half of a connection: what fan-out and other connections see.
pub struct Conn {
    pub id: u64,
    pub socket_id: String,
    outbox: Mutex<Outbox>,
    /// The connection's task, woken when the outbox gets its first frame or the connection closes.
    waker: AtomicWaker,
    /// Set when the socket may have something to read (see the `Wake` impl): the task then polls
    /// the read side only when woken for it, not on every frame it writes.
    readable: AtomicBool,
    slow: metrics::Counter,
}

struct Outbox {
    frames: VecDeque<Utf8Bytes>,
    /// Frames the outbox may hold (the app's `outbound_queue_frames`).
    limit: usize,
    /// The close code and reason; the first close wins.
    closed: Option<(u16, String)>,
}

impl Outbox {
    fn close(&mut self, code: u16, reason: &str) -> bool {
        if self.closed.is_some() {
            return false;
        }
        self.closed = Some((code, reason.to_string()));
        // Nothing queued is written after a close: free it now rather than with the task.
        self.frames = VecDeque::new();
        true
    }
}

impl Conn {
    pub(super) fn new(id: u64, socket_id: String, limit: usize, slow: metrics::Counter) -> Self {
        Self {
            id,
            socket_id,
            // Room for one frame: an idle connection rarely holds more, and a first push into an
            // empty `VecDeque` would reserve four (128 bytes). Busier connections grow it once.
            outbox: Mutex::new(Outbox { frames: VecDeque::with_capacity(1), limit, closed: None }),
            waker: AtomicWaker::new(),
            readable: AtomicBool::new(true),
            slow,
        }
    }

    /// Queues a frame without waiting. A full queue means the client cannot keep up: it is
    /// closed with 4200 (reconnect) and counted. Returns whether the frame was queued.
    pub fn send(&self, frame: &Utf8Bytes) -> bool {
        let mut outbox = self.outbox.lock();
        if outbox.closed.is_some() {
            return false;
        }
        if outbox.frames.len() >= outbox.limit {
            outbox.close(code::RECONNECT, "slow consumer: too many undelivered messages");
            drop(outbox);
            self.slow.increment(1);
            self.waker.wake();
            return false;
        }
        let was_empty = outbox.frames.is_empty();
        outbox.frames.push_back(frame.clone());
        drop(outbox);
        // The task writes until the outbox is empty or the socket blocks (and the socket wakes
        // it), so only a frame into an empty outbox needs a wake-up.
        if was_empty {
            self.waker.wake();
        }
        true
    }

    /// Closes the connection with `code`; the first reason wins. Returns whether this call closed it.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        let closed = self.outbox.lock().close(code, reason);
        if closed {
            self.waker.wake();
        }
        closed
    }

    /// The connection id a socket id was made from (`{random}.{id}`, see `Session::open`).
    pub fn id_in(socket_id: &str) -> Option<u64> {
        socket_id.rsplit_once('.')?.1.parse().ok()
    }

    pub fn is_closed(&self) -> bool {
        self.outbox.lock().closed.is_some()
    }

    fn pop(&self) -> Option<Utf8Bytes> {
        self.outbox.lock().frames.pop_front()
    }
}

/// The waker the socket's read side is polled with: it marks the socket readable, then wakes the
/// task. Being the `Conn` itself, it costs no allocation.
impl Wake for Conn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.readable.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// `GET /app/{key}`: upgrades, then reports app and protocol problems over the socket as Pusher
/// does (`pusher:error` + close code), so clients see the documented codes.
pub async fn ws_handler(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return ApiError::bad_request(format!("WebSocket upgrade required: {e}")).into_response(),
    };
    if let Some(axum::Extension(peer)) = peer {
        let rooms = &state.rooms;
        state.dashboard.talkers.ip(client_ip(peer.addr.ip(), &headers, &rooms.trusted_proxies, &rooms.client_ip_header));
    }
    let rt = state.realtime.clone();
    let tenant = rt.tenant_by_key(&key);
    let protocol = query
        .as_deref()
        .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "protocol").map(|(_, v)| v.into_owned()));
    let max_bytes = tenant.as_ref().map(|t| t.spec().max_message_bytes).unwrap_or(10 * 1024);
    // Hard cap on one inbound message; the app's own limit is checked per message so that an
    // over-limit message gets an error instead of a dropped connection.
    let hard_cap = max_bytes.saturating_mul(2) + 16 * 1024;
    let start = Box::new(Start { rt, tenant, protocol });
    ws.max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        // tungstenite allocates the read buffer up front for every connection and reads at most
        // this much per read call. Its default, 128 KiB, cost 137 KB of RSS per idle connection in
        // `bench/run connections`; 256 bytes cost 2,272 B per idle connection in all, 64 bytes
        // 2,087. Client messages are small and rare: 64 bytes reads a ping or a short client
        // event at once, a subscribe (~100 bytes) in two reads; larger ones take several and
        // still arrive whole (the buffer grows to the frame's size).
        .read_buffer_size(64)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(hard_cap + 1024 * 1024)
        .on_upgrade(move |socket| run(socket, start))
}

/// What an upgraded connection starts from. Boxed before the upgrade: axum's upgrade task keeps
/// the callback and `run`'s future keeps its argument for as long as the connection lives, 8
/// bytes each instead of 40.
struct Start {
    rt: Arc<Realtime>,
    tenant: Option<Arc<Tenant>>,
    protocol: Option<String>,
}

fn admit(rt: &Realtime, tenant: Option<Arc<Tenant>>, protocol: Option<&str>) -> Result<Arc<Tenant>, (u16, String)> {
    let Some(tenant) = tenant else {
        return Err((code::APP_NOT_FOUND, "App key not found".into()));
    };
    if !tenant.spec().enabled {
        return Err((code::APP_DISABLED, "App is disabled".into()));
    }
    if rt.is_closing() {
        return Err((code::RECONNECT, "server is shutting down; reconnect".into()));
    }
    match protocol {
        None => Err((code::NO_PROTOCOL, "No protocol version supplied".into())),
        Some(p) => match p.parse::<u32>() {
            Err(_) => Err((code::INVALID_VERSION_FORMAT, format!("Invalid version string format: {p:?}"))),
            Ok(v) if !(protocol::MIN_PROTOCOL..=protocol::MAX_PROTOCOL).contains(&v) => Err((
                code::UNSUPPORTED_PROTOCOL,
                format!("Unsupported protocol version {v}; supported: {}-{}", protocol::MIN_PROTOCOL, protocol::MAX_PROTOCOL),
            )),
            Ok(_) => Ok(tenant),
        },
    }
}

async fn refuse(mut socket: WebSocket, code: u16, message: &str) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        socket.send(Message::Text(protocol::error(code, message))).await?;
        socket.send(Message::Close(Some(CloseFrame { code, reason: close_reason(message) }))).await
    })
    .await;
}

/// The close code RFC 6455 gives a client's broken frame, from the WebSocket library's error
/// (axum does not expose its type): 1009 too big, 1007 text that is not UTF-8, 1002 any other
/// protocol violation (unmasked or reserved frames, a stray continuation). Anything else (the
/// connection reset, say) has no one left to tell.
fn close_for_read_error(error: &str) -> Option<(u16, &'static str)> {
    if error.contains("Space limit") || error.contains("too long") || error.contains("too big") {
        Some((1009, "message too big"))
    } else if error.contains("UTF-8") || error.contains("utf-8") {
        Some((1007, "invalid UTF-8 in a text message"))
    } else if error.contains("protocol error") {
        Some((1002, "WebSocket protocol error"))
    } else {
        None
    }
}

/// Close reasons are limited to 123 bytes by the WebSocket protocol.
fn close_reason(message: &str) -> Utf8Bytes {
    let mut end = message.len().min(120);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Utf8Bytes::from(message[..end].to_string())
}

/// Admits an upgraded socket, then serves it until it closes.
///
/// Not an `async fn`, which would keep its arguments in the future twice (as arguments and as
/// locals): the WebSocket alone is ~370 bytes, held as long as the connection lives. The async
/// block below uses its captures in place. Rarely taken paths (refusal, goodbye) are boxed so
/// their state does not enlarge every connection's task.
#[allow(clippy::manual_async_fn)]
fn run(mut socket: WebSocket, start: Box<Start>) -> impl Future<Output = ()> + Send {
    async move {
        let mut session = match Session::open(*start) {
            Ok(session) => session,
            Err((code, message)) => return Box::pin(refuse(socket, code, &message)).await,
        };
        session.serve(&mut socket).await;
        let conn = session.close();
        Box::pin(goodbye(socket, &conn)).await;
    }
}

/// Sends the close reason to the client: `pusher:error` for Pusher codes, then a close frame.
async fn goodbye(mut socket: WebSocket, conn: &Conn) {
    let reason = conn.outbox.lock().closed.clone();
    // 1006 (abnormal closure) must never be sent on the wire: the socket is already broken.
    if let Some((code, message)) = reason.filter(|(code, _)| *code != 1006) {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if code >= 4000 {
                socket.send(Message::Text(protocol::error(code, &message))).await?;
            }
            socket.send(Message::Close(Some(CloseFrame { code, reason: close_reason(&message) }))).await
        })
        .await;
    }
}

/// What woke the connection's task.
enum Event {
    Closed,
    Timer,
    Inbound(Option<Result<Message, axum::Error>>),
}

/// Moves queued frames into the socket's write buffer until the outbox is empty or the socket
/// blocks, then flushes them with one write. Pending parts register `cx` and return `Ok`.
fn poll_write(conn: &Conn, socket: &mut WebSocket, cx: &mut Context<'_>, unflushed: &mut bool) -> Result<(), axum::Error> {
    loop {
        match Pin::new(&mut *socket).poll_ready(cx) {
            Poll::Pending => return Ok(()),
            Poll::Ready(r) => r?,
        }
        let Some(frame) = conn.pop() else { break };
        Pin::new(&mut *socket).start_send(Message::Text(frame))?;
        *unflushed = true;
    }
    if *unflushed {
        if let Poll::Ready(r) = Pin::new(&mut *socket).poll_flush(cx) {
            r?;
            *unflushed = false;
        }
    }
    Ok(())
}

struct Session {
    tenant: Arc<Tenant>,
    conn: Arc<Conn>,
    /// Subscribed channels with the presence user id each subscription counts for.
    subscribed: HashMap<String, (ChannelType, Option<String>)>,
    user_id: Option<String>,
    client_events: Bucket,
}

impl Session {
    /// Admits the connection, registers it with its app and queues `connection_established`.
    fn open(start: Start) -> Result<Session, (u16, String)> {
        let Start { rt, tenant, protocol } = start;
        let tenant = admit(&rt, tenant, protocol.as_deref())?;
        let spec = tenant.spec();
        let id = rt.next_conn_id();
        let socket_id = format!("{}.{}", rand::random::<u32>() % 1_000_000_000, id);
        let conn = Arc::new(Conn::new(id, socket_id, spec.outbound_queue_frames, tenant.metrics.slow_consumers.clone()));
        if !tenant.add_conn(&conn, spec.max_connections) {
            return Err((code::OVER_CONNECTION_QUOTA, "Over connection quota".into()));
        }
        conn.send(&protocol::connection_established(&conn.socket_id, spec.activity_timeout_s));
        Ok(Session {
            tenant,
            conn,
            subscribed: HashMap::new(),
            user_id: None,
            client_events: Bucket::new(CLIENT_EVENTS_PER_SECOND),
        })
    }

    /// Closes the connection (the first reason stays) and forgets it everywhere.
    fn close(self) -> Arc<Conn> {
        self.conn.close(1000, "closed");
        self.tenant.remove_conn(&self.conn, self.subscribed.into_keys(), self.user_id.as_deref());
        self.conn
    }

    /// The connection's event loop; returns once the connection is closed.
    async fn serve(&mut self, socket: &mut WebSocket) {
        // Everything here lives as long as the connection, in every connection's task: only what
        // is needed across the wait below is kept.
        let (activity, pong_wait, signin_deadline) = {
            let spec = self.tenant.spec();
            let signin = (spec.signin_within_s > 0).then(|| Instant::now() + Duration::from_secs(spec.signin_within_s));
            (Duration::from_secs(spec.activity_timeout_s), Duration::from_secs(spec.pong_timeout_s), signin)
        };
        // The activity deadline (ping when it passes), or after a ping the pong deadline.
        let mut timer = Instant::now() + activity;
        let mut pinged = false;
        let mut unflushed = false;
        let read_waker = Waker::from(self.conn.clone());
        // One timer for the activity, pong and sign-in deadlines. It is moved only when a deadline
        // comes earlier (or it fired): a message that pushes the activity deadline later just
        // lets it fire early once, instead of re-arming it for every message.
        let sleep = tokio::time::sleep_until(timer);
        tokio::pin!(sleep);
        loop {
            {
                // Scoped: the future would otherwise keep `due` across the wait below.
                let due = match signin_deadline.filter(|_| self.user_id.is_none()) {
                    Some(signin) => signin.min(timer),
                    None => timer,
                };
                if sleep.is_elapsed() || due < sleep.deadline() {
                    sleep.as_mut().reset(due);
                }
            }
            let conn = &*self.conn;
            let event = poll_fn(|cx| {
                conn.waker.register(cx.waker());
                if conn.is_closed() {
                    return Poll::Ready(Event::Closed);
                }
                if let Err(e) = poll_write(conn, socket, cx, &mut unflushed) {
                    tracing::debug!(error = %e, "websocket write failed");
                    conn.close(1006, "write failed");
                    return Poll::Ready(Event::Closed);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Timer);
                }
                if conn.readable.swap(false, Ordering::AcqRel) {
                    if let Poll::Ready(msg) = socket.poll_next_unpin(&mut Context::from_waker(&read_waker)) {
                        // More may be buffered already, with no wake-up to come for it.
                        conn.readable.store(true, Ordering::Release);
                        return Poll::Ready(Event::Inbound(msg));
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Closed => return,
                Event::Timer => {
                    let now = Instant::now();
                    if now >= timer {
                        if pinged {
                            self.conn.close(code::PONG_TIMEOUT, "Pong reply not received");
                            return;
                        }
                        self.conn.send(&protocol::ping());
                        pinged = true;
                        timer = now + pong_wait;
                    } else if signin_deadline.is_some_and(|at| now >= at) && self.user_id.is_none() {
                        self.conn.close(code::UNAUTHORIZED, "Connection not signed in within the allowed time");
                        return;
                    }
                }
                Event::Inbound(msg) => {
                    let Some(Ok(msg)) = msg else {
                        if let Some(Err(e)) = msg {
                            tracing::debug!(error = %e, "websocket read failed");
                            if let Some((code, reason)) = close_for_read_error(&e.to_string()) {
                                self.conn.close(code, reason);
                            }
                        }
                        return;
                    };
                    timer = Instant::now() + activity;
                    pinged = false;
                    match msg {
                        Message::Text(text) => {
                            self.tenant.metrics.messages_in.increment(1);
                            self.tenant.metrics.bytes_in.increment(text.len() as u64);
                            self.handle(text.as_str());
                        }
                        Message::Binary(_) => self.error(code::INVALID_MESSAGE, "binary frames are not supported; send JSON text"),
                        Message::Close(_) => return,
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
            }
            if self.conn.is_closed() {
                return;
            }
        }
    }

    fn error(&self, code: u16, message: &str) {
        self.conn.send(&protocol::error(code, message));
    }

    fn handle(&mut self, text: &str) {
        let spec = self.tenant.spec();
        if text.len() > spec.max_message_bytes + ENVELOPE_SLACK {
            self.error(
                code::MESSAGE_TOO_LARGE,
                &format!("message of {} bytes exceeds the limit of {} bytes", text.len(), spec.max_message_bytes),
            );
            return;
        }
        let msg = match Incoming::parse(text) {
            Ok(m) => m,
            Err(e) => return self.error(code::INVALID_MESSAGE, &e),
        };
        match msg.event.as_str() {
            "pusher:ping" => {
                self.conn.send(&protocol::pong());
            }
            "pusher:pong" => {}
            "pusher:subscribe" => self.subscribe(&msg),
            "pusher:unsubscribe" => {
                let channel = msg.data_object().and_then(|d| d.get("channel").and_then(Value::as_str).map(str::to_string));
                if let Some(channel) = channel {
                    if self.subscribed.remove(&channel).is_some() {
                        self.tenant.unsubscribe(&self.conn, &channel);
                    }
                }
            }
            "pusher:signin" => self.signin(&msg),
            e if e.starts_with("client-") => self.client_event(&msg),
            other => self.error(code::INVALID_MESSAGE, &format!("unsupported event {:?}", truncate(other, 64))),
        }
    }

    fn subscribe(&mut self, msg: &Incoming) {
        let Some(data) = msg.data_object() else {
            return self.error(code::INVALID_MESSAGE, "pusher:subscribe needs data: {\"channel\": ...}");
        };
        let Some(channel) = data.get("channel").and_then(Value::as_str) else {
            return self.error(code::INVALID_MESSAGE, "pusher:subscribe needs data.channel");
        };
        let conn = self.conn.clone();
        let sub_error = move |kind: &str, message: &str, status: u16| {
            conn.send(&protocol::subscription_error(truncate(channel, protocol::MAX_CHANNEL_NAME + 8), kind, message, status));
        };
        let ty = match ChannelType::parse(channel) {
            Ok(t) => t,
            Err(e) => return sub_error("InvalidChannel", &e, 400),
        };
        if self.subscribed.contains_key(channel) {
            return;
        }
        let spec = self.tenant.spec();
        if self.subscribed.len() >= spec.max_channels_per_connection {
            return sub_error(
                "LimitReached",
                &format!("at most {} channels per connection", spec.max_channels_per_connection),
                400,
            );
        }
        let mut member = None;
        if ty.needs_auth() {
            let Some(auth) = data.get("auth").and_then(Value::as_str) else {
                return sub_error("AuthError", "auth is required to subscribe to private and presence channels", 401);
            };
            let channel_data = data.get("channel_data").and_then(Value::as_str);
            if ty.kind == ChannelKind::Presence {
                let Some(cd) = channel_data else {
                    return sub_error("AuthError", "channel_data is required for presence channels", 401);
                };
                if let Err(e) = signature::check_channel_auth(&spec.key, &spec.secret, &self.conn.socket_id, channel, Some(cd), auth) {
                    return sub_error("AuthError", &format!("Invalid signature: {e}"), 401);
                }
                match parse_member(cd) {
                    Ok(m) => member = Some(m),
                    Err(e) => return sub_error("InvalidChannelData", &e, 400),
                }
            } else {
                // Some server SDKs sign channel_data for private channels too; accept either.
                let plain = signature::check_channel_auth(&spec.key, &spec.secret, &self.conn.socket_id, channel, None, auth);
                let with_data = channel_data.map(|cd| {
                    signature::check_channel_auth(&spec.key, &spec.secret, &self.conn.socket_id, channel, Some(cd), auth)
                });
                if let (Err(e), None | Some(Err(_))) = (plain, with_data) {
                    return sub_error("AuthError", &format!("Invalid signature: {e}"), 401);
                }
            }
        }
        if let ChannelKind::ServerToUser(user) = &ty.kind {
            if self.user_id.as_deref() != Some(user.as_str()) {
                return sub_error("AuthError", "sign in as this user (pusher:signin) before subscribing", 401);
            }
        }
        let resume_from = data.get("resume_from").and_then(|v| match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        });
        let user_id = member.as_ref().map(|m: &Member| m.user_id.clone());
        match self.tenant.subscribe(&self.conn, channel, ty.clone(), member, resume_from) {
            Ok(()) => {
                self.subscribed.insert(channel.to_string(), (ty, user_id));
            }
            Err(SubscribeError::PresenceFull(max)) => {
                sub_error("LimitReached", &format!("presence channel is full ({max} members)"), 403)
            }
        }
    }

    fn signin(&mut self, msg: &Incoming) {
        let spec = self.tenant.spec();
        let data = msg.data_object().unwrap_or_default();
        let (Some(auth), Some(user_data)) =
            (data.get("auth").and_then(Value::as_str), data.get("user_data").and_then(Value::as_str))
        else {
            return self.error(code::UNAUTHORIZED, "pusher:signin needs data.auth and data.user_data");
        };
        if let Err(e) = signature::check_user_auth(&spec.key, &spec.secret, &self.conn.socket_id, user_data, auth) {
            return self.error(code::UNAUTHORIZED, &format!("Invalid signin: {e}"));
        }
        let Ok(user) = serde_json::from_str::<Value>(user_data) else {
            return self.error(code::UNAUTHORIZED, "user_data must be a JSON object");
        };
        let id = match user.get("id") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 200 => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return self.error(code::UNAUTHORIZED, "user_data.id must be a non-empty string"),
        };
        let watchlist = match watchlist::parse(&user) {
            Ok(w) => w,
            Err(e) => return self.error(code::UNAUTHORIZED, &e),
        };
        let first = match self.user_id.as_deref() {
            None => true,
            // Re-signing as the same user just confirms it (the first watchlist stays).
            Some(same) if same == id => false,
            Some(_) => return self.error(code::UNAUTHORIZED, "already signed in as another user"),
        };
        self.conn.send(&protocol::json_string_event("pusher:signin_success", None, &json!({ "user_data": user_data })));
        if first {
            self.tenant.sign_in(&self.conn, &id, watchlist);
            self.user_id = Some(id);
        }
    }

    fn client_event(&mut self, msg: &Incoming) {
        let spec = self.tenant.spec();
        let conn = self.conn.clone();
        let reject = move |m: &str| {
            conn.send(&protocol::error(code::CLIENT_EVENT_REJECTED, m));
        };
        if !spec.client_events {
            return reject("client events are not enabled for this app");
        }
        let Some(channel) = msg.channel.as_deref() else {
            return reject("client events need a channel");
        };
        let Some((ty, user_id)) = self.subscribed.get(channel) else {
            return reject("subscribe to the channel before sending client events on it");
        };
        match ty.kind {
            ChannelKind::Private | ChannelKind::Presence => {}
            ChannelKind::PrivateEncrypted => return reject("client events are not allowed on encrypted channels"),
            _ => return reject("client events are only allowed on private and presence channels"),
        }
        if let Err(e) = protocol::validate_event_name(&msg.event) {
            return reject(&e);
        }
        let data = msg.data_string();
        if data.len() > spec.max_message_bytes {
            return self.error(
                code::MESSAGE_TOO_LARGE,
                &format!("event data of {} bytes exceeds the limit of {} bytes", data.len(), spec.max_message_bytes),
            );
        }
        if self.client_events.take(1, Instant::now()).is_err() {
            return self.error(
                code::CLIENT_EVENT_RATE_LIMIT,
                &format!("client event rejected: more than {CLIENT_EVENTS_PER_SECOND} per second"),
            );
        }
        let user_id = user_id.clone();
        self.tenant.publish_client_event(&self.conn, channel, &msg.event, &data, user_id.as_deref());
        let mut hook = json!({ "name": "client_event", "channel": channel, "event": msg.event, "data": data,
                               "socket_id": self.conn.socket_id });
        if let Some(u) = user_id {
            hook["user_id"] = Value::String(u);
        }
        self.tenant.webhook(hook);
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Parses presence `channel_data`: `{"user_id": string|number, "user_info": any}`.
fn parse_member(channel_data: &str) -> Result<Member, String> {
    let v: Value = serde_json::from_str(channel_data).map_err(|e| format!("channel_data is not JSON: {e}"))?;
    let user_id = match v.get("user_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 200 => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("channel_data.user_id must be a non-empty string or a number".into()),
    };
    Ok(Member { user_id, info: v.get("user_info").cloned().unwrap_or(Value::Null) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_carry_the_connection_id() {
        assert_eq!(Conn::id_in("123456.42"), Some(42));
        assert_eq!(Conn::id_in("42"), None);
        assert_eq!(Conn::id_in("1.x"), None);
    }
}
