//! Pusher-protocol helpers for the realtime tests: a raw WebSocket client that speaks frames,
//! a signed HTTP API client, and app creation through the admin API. Used with `TestApp` from
//! `support/mod.rs`; include with `#[path = "support/realtime.rs"] mod rt;`.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weir::realtime::signature;

use crate::support::TestApp;

pub const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Creds {
    pub id: String,
    pub key: String,
    pub secret: String,
}

/// Creates an app through the admin API with `settings` and returns its credentials.
pub async fn create_app(app: &TestApp, settings: Value) -> Creds {
    let r = app.admin(reqwest::Method::POST, "/apps").json(&settings).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    Creds {
        id: v["id"].as_str().unwrap().to_string(),
        key: v["key"].as_str().unwrap().to_string(),
        secret: v["secret"].as_str().unwrap().to_string(),
    }
}

pub type Raw = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn raw(app: &TestApp, path_and_query: &str) -> Raw {
    let url = format!("ws://{}{}", app.addr, path_and_query);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

pub struct Ws {
    pub inner: Raw,
    pub socket_id: String,
}

impl Ws {
    pub async fn connect(app: &TestApp, key: &str) -> Ws {
        Self::connect_to(app.addr, key).await
    }

    /// [`connect`](Self::connect) to a server at `addr` (a `Binary`, say).
    pub async fn connect_to(addr: std::net::SocketAddr, key: &str) -> Ws {
        let url = format!("ws://{addr}/app/{key}?protocol=7&client=js&version=8.4.0");
        let mut ws = Ws { inner: tokio_tungstenite::connect_async(url).await.unwrap().0, socket_id: String::new() };
        let est = ws.recv_event("pusher:connection_established").await;
        let data: Value = serde_json::from_str(est["data"].as_str().expect("data is a string")).unwrap();
        ws.socket_id = data["socket_id"].as_str().unwrap().to_string();
        ws
    }

    pub async fn send(&mut self, v: Value) {
        self.inner.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_text(&mut self, text: String) {
        self.inner.send(Message::text(text)).await.unwrap();
    }

    /// The next JSON frame, or panic after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        self.try_recv(WAIT).await.expect("expected a frame")
    }

    /// The next JSON frame within `wait`, `None` on timeout or close.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.inner.next()).await.ok()??;
            match msg.ok()? {
                Message::Text(t) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Skips frames until one with `event`.
    pub async fn recv_event(&mut self, event: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.try_recv(left).await.unwrap_or_else(|| panic!("no {event} before the deadline"));
            if v["event"] == event {
                return v;
            }
        }
    }

    /// Asserts nothing but pings arrive for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(v) = self.try_recv(wait).await {
            panic!("expected silence, got {v}");
        }
    }

    /// Reads until the server closes; returns the close code and the frames seen before it.
    pub async fn expect_close(&mut self) -> (Option<u16>, Vec<Value>) {
        expect_close(&mut self.inner).await
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.send(json!({"event": "pusher:subscribe", "data": {"channel": channel}})).await;
        self.recv_sub(channel).await
    }

    /// Waits for `subscription_succeeded` or `subscription_error` on `channel`.
    pub async fn recv_sub(&mut self, channel: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.try_recv(left).await.expect("no subscription answer");
            if v["channel"] == channel
                && (v["event"] == "pusher_internal:subscription_succeeded" || v["event"] == "pusher:subscription_error")
            {
                return v;
            }
        }
    }

    pub async fn subscribe_private(&mut self, c: &Creds, channel: &str) -> Value {
        let auth = signature::channel_auth(&c.key, &c.secret, &self.socket_id, channel, None);
        self.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}})).await;
        self.recv_sub(channel).await
    }

    pub async fn subscribe_presence(&mut self, c: &Creds, channel: &str, user: &str) -> Value {
        let cd = json!({"user_id": user, "user_info": {"name": format!("name-{user}")}}).to_string();
        let auth = signature::channel_auth(&c.key, &c.secret, &self.socket_id, channel, Some(&cd));
        self.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": cd}})).await;
        self.recv_sub(channel).await
    }

    pub async fn signin(&mut self, c: &Creds, user: &str) -> Value {
        self.signin_as(c, &json!({"id": user})).await
    }

    /// Signs in with `user_data` (an object with at least `id`); returns the next frame.
    pub async fn signin_as(&mut self, c: &Creds, user_data: &Value) -> Value {
        let ud = user_data.to_string();
        let auth = signature::user_auth(&c.key, &c.secret, &self.socket_id, &ud);
        self.send(json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": ud}})).await;
        self.recv().await
    }
}

pub async fn expect_close(ws: &mut Raw) -> (Option<u16>, Vec<Value>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("connection not closed; frames seen: {seen:?}"),
            Ok(None) | Ok(Some(Err(_))) => return (None, seen),
            Ok(Some(Ok(Message::Close(frame)))) => return (frame.map(|f| u16::from(f.code)), seen),
            Ok(Some(Ok(Message::Text(t)))) => seen.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Some(Ok(_))) => {}
        }
    }
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

/// Decodes a frame's string `data`.
pub fn data(v: &Value) -> Value {
    match &v["data"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        other => other.clone(),
    }
}

/// A signed Pusher HTTP API client.
pub struct Api {
    pub base: String,
    pub creds: Creds,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(app: &TestApp, creds: &Creds) -> Api {
        Api { base: app.base.clone(), creds: creds.clone(), http: reqwest::Client::new() }
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    pub fn signed_url(&self, method: &str, path: &str, extra: &[(&str, &str)], body: &[u8], ts: i64) -> String {
        let q = signature::sign_api_query(&self.creds.key, &self.creds.secret, method, path, extra, body, ts);
        format!("{}{}?{}", self.base, path, q)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        let raw = body.to_string();
        let url = self.signed_url("POST", path, &[], raw.as_bytes(), Self::now());
        self.http.post(url).header("content-type", "application/json").body(raw).send().await.unwrap()
    }

    pub async fn get(&self, path: &str, extra: &[(&str, &str)]) -> reqwest::Response {
        let url = self.signed_url("GET", path, extra, b"", Self::now());
        self.http.get(url).send().await.unwrap()
    }

    pub async fn trigger(&self, channel: &str, event: &str, data: &str) -> Value {
        let r = self
            .post(&format!("/apps/{}/events", self.creds.id), &json!({"name": event, "channels": [channel], "data": data}))
            .await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub async fn trigger_except(&self, channel: &str, event: &str, data: &str, socket_id: &str) {
        let body = json!({"name": event, "channels": [channel], "data": data, "socket_id": socket_id});
        let r = self.post(&format!("/apps/{}/events", self.creds.id), &body).await;
        assert_eq!(r.status(), 200);
    }
}

/// The webhook requests a [`webhook_receiver`] took: headers and body.
pub type Hooks = std::sync::Arc<parking_lot::Mutex<Vec<(axum::http::HeaderMap, String)>>>;

/// A tiny webhook receiver: answers 500 to the first `fail_first` requests, then 200.
pub async fn webhook_receiver(fail_first: usize) -> (String, Hooks) {
    use axum::routing::post;
    let seen: Hooks = Hooks::default();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = seen.clone();
    let router = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let s = s.clone();
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                s.lock().push((headers, body));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, seen)
}
