//! One WebSocket connection at `/app/{key}?protocol=7`: checks the app and protocol version,
//! announces the socket id, then runs a reader (this task) and a writer (a spawned task that owns
//! the socket's sink and drains the connection's bounded queue, coalescing frames per flush).
//!
//! The reader enforces the activity timeout (ping, then close 4201 without a pong), the sign-in
//! deadline and per-connection limits, and turns client messages into calls on the `tenant`.
//! Any part may close the connection through [`Conn::close`], which records the code once and
//! wakes both halves; the writer then sends `pusher:error` and a close frame with that code.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::protocol::{self, code, ChannelKind, ChannelType, Incoming};
use super::signature;
use super::tenant::{Bucket, Member, SubscribeError, Tenant};
use super::Realtime;
use crate::error::ApiError;
use crate::http::AppState;

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
    tx: mpsc::Sender<Utf8Bytes>,
    kill: CancellationToken,
    close_reason: Mutex<Option<(u16, String)>>,
    slow: metrics::Counter,
}

impl Conn {
    /// Queues a frame without waiting. A full queue means the client cannot keep up: it is
    /// closed with 4200 (reconnect) and counted. Returns whether the frame was queued.
    pub fn send(&self, frame: &Utf8Bytes) -> bool {
        match self.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.close(code::RECONNECT, "slow consumer: too many undelivered messages") {
                    self.slow.increment(1);
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Closes the connection with `code`; the first reason wins. Returns whether this call closed it.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        let mut slot = self.close_reason.lock();
        if slot.is_some() {
            return false;
        }
        *slot = Some((code, reason.to_string()));
        drop(slot);
        self.kill.cancel();
        true
    }

    pub fn is_closed(&self) -> bool {
        self.kill.is_cancelled()
    }
}

/// `GET /app/{key}`: upgrades, then reports app and protocol problems over the socket as Pusher
/// does (`pusher:error` + close code), so clients see the documented codes.
pub async fn ws_handler(
    State(state): State<AppState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return ApiError::bad_request(format!("WebSocket upgrade required: {e}")).into_response(),
    };
    let rt = state.realtime.clone();
    let tenant = rt.tenant_by_key(&key);
    let protocol = query
        .as_deref()
        .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "protocol").map(|(_, v)| v.into_owned()));
    let max_bytes = tenant.as_ref().map(|t| t.spec().max_message_bytes).unwrap_or(10 * 1024);
    // Hard cap on one inbound message; the app's own limit is checked per message so that an
    // over-limit message gets an error instead of a dropped connection.
    let hard_cap = max_bytes.saturating_mul(2) + 16 * 1024;
    ws.max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        // tungstenite's default read buffer is 128 KiB per connection, touched at once: 137 KB of
        // RSS per idle connection in `bench/run connections`; 4 KiB brings it to ~10 KB. Larger
        // messages still arrive whole (frames are assembled outside this buffer).
        .read_buffer_size(4 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(hard_cap + 1024 * 1024)
        .on_upgrade(move |socket| async move {
            match admit(&rt, tenant, protocol.as_deref()) {
                Ok(tenant) => run(socket, rt, tenant).await,
                Err((code, message)) => refuse(socket, code, &message).await,
            }
        })
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

/// Close reasons are limited to 123 bytes by the WebSocket protocol.
fn close_reason(message: &str) -> Utf8Bytes {
    let mut end = message.len().min(120);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Utf8Bytes::from(message[..end].to_string())
}

async fn run(socket: WebSocket, rt: Arc<Realtime>, tenant: Arc<Tenant>) {
    let spec = tenant.spec();
    let id = rt.next_conn_id();
    let socket_id = format!("{}.{}", rand::random::<u32>() % 1_000_000_000, id);
    let (tx, rx) = mpsc::channel(spec.outbound_queue_frames);
    let conn = Arc::new(Conn {
        id,
        socket_id,
        tx,
        kill: CancellationToken::new(),
        close_reason: Mutex::new(None),
        slow: tenant.metrics.slow_consumers.clone(),
    });
    if !tenant.add_conn(&conn, spec.max_connections) {
        refuse(socket, code::OVER_CONNECTION_QUOTA, "Over connection quota").await;
        return;
    }
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_loop(sink, rx, conn.clone()));
    conn.send(&protocol::connection_established(&conn.socket_id, spec.activity_timeout_s));
    let mut session = Session {
        tenant: tenant.clone(),
        conn: conn.clone(),
        subscribed: HashMap::new(),
        user_id: None,
        client_events: Bucket::new(CLIENT_EVENTS_PER_SECOND),
    };
    session.read_loop(stream).await;
    // Whatever ended the session, make sure the writer stops too.
    conn.close(1000, "closed");
    tenant.remove_conn(&conn, session.subscribed.into_keys(), session.user_id.as_deref());
    let _ = writer.await;
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    conn: Arc<Conn>,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = conn.kill.cancelled() => break,
            f = rx.recv() => match f { Some(f) => f, None => break },
        };
        let write = async {
            sink.feed(Message::Text(first)).await?;
            // Coalesce: everything already queued goes out with one flush.
            while let Ok(more) = rx.try_recv() {
                sink.feed(Message::Text(more)).await?;
            }
            sink.flush().await
        };
        let ok = tokio::select! {
            biased;
            _ = conn.kill.cancelled() => break,
            r = write => r.is_ok(),
        };
        if !ok {
            conn.close(1006, "write failed");
            return;
        }
    }
    let reason = conn.close_reason.lock().clone();
    // 1006 (abnormal closure) must never be sent on the wire: the socket is already broken.
    if let Some((code, message)) = reason.filter(|(code, _)| *code != 1006) {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if code >= 4000 {
                sink.send(Message::Text(protocol::error(code, &message))).await?;
            }
            sink.send(Message::Close(Some(CloseFrame { code, reason: close_reason(&message) }))).await
        })
        .await;
    }
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
    async fn read_loop(&mut self, mut stream: futures_util::stream::SplitStream<WebSocket>) {
        let spec = self.tenant.spec();
        let activity = Duration::from_secs(spec.activity_timeout_s);
        let pong_wait = Duration::from_secs(spec.pong_timeout_s);
        let signin_deadline = (spec.signin_within_s > 0).then(|| Instant::now() + Duration::from_secs(spec.signin_within_s));
        let mut last_seen = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        loop {
            let timer = match ping_sent {
                Some(at) => at + pong_wait,
                None => last_seen + activity,
            };
            let signin_due = signin_deadline.filter(|_| self.user_id.is_none());
            tokio::select! {
                biased;
                _ = self.conn.kill.cancelled() => return,
                _ = tokio::time::sleep_until(timer) => {
                    if ping_sent.is_some() {
                        self.conn.close(code::PONG_TIMEOUT, "Pong reply not received");
                        return;
                    }
                    self.conn.send(&protocol::ping());
                    ping_sent = Some(Instant::now());
                }
                _ = sleep_until_opt(signin_due), if signin_due.is_some() => {
                    self.conn.close(code::UNAUTHORIZED, "Connection not signed in within the allowed time");
                    return;
                }
                msg = stream.next() => {
                    let Some(Ok(msg)) = msg else {
                        if let Some(Err(e)) = msg {
                            tracing::debug!(error = %e, "websocket read failed");
                            if matches!(e.to_string(), s if s.contains("Space limit") || s.contains("too long") || s.contains("too big")) {
                                self.conn.close(1009, "message too big");
                            }
                        }
                        return;
                    };
                    last_seen = Instant::now();
                    ping_sent = None;
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
        let id = match serde_json::from_str::<Value>(user_data) {
            Ok(v) => match v.get("id") {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 200 => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return self.error(code::UNAUTHORIZED, "user_data.id must be a non-empty string"),
            },
            Err(_) => return self.error(code::UNAUTHORIZED, "user_data must be a JSON object"),
        };
        if self.user_id.as_deref() == Some(id.as_str()) {
            // Re-signing as the same user just confirms it.
        } else if self.user_id.is_some() {
            return self.error(code::UNAUTHORIZED, "already signed in as another user");
        } else {
            self.tenant.sign_in(&self.conn, &id);
            self.user_id = Some(id);
        }
        self.conn.send(&protocol::json_string_event("pusher:signin_success", None, &json!({ "user_data": user_data })));
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
        self.tenant.publish(channel, &msg.event, &data, Some(self.conn.id), user_id.as_deref());
        let mut hook = json!({ "name": "client_event", "channel": channel, "event": msg.event, "data": data,
                               "socket_id": self.conn.socket_id });
        if let Some(u) = user_id {
            hook["user_id"] = Value::String(u);
        }
        self.tenant.webhook(hook);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
