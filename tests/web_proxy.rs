//! Reverse-proxy mode: `/p/{room}/...` forwards admitted visitors to the origin (streaming
//! bodies, `X-Forwarded-*`, WebSocket upgrades), sends everyone else to the room, and shows a
//! clear 502 page when the origin is down.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;
#[path = "support/realtime.rs"]
mod rt;
#[path = "support/tls.rs"]
mod tls;

use std::net::SocketAddr;

use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{TestApp, Visitor};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// An origin under `/shop`: `/shop/echo` answers with what it received; `/shop/upload` counts
/// the streamed body; `/shop/ws` echoes WebSocket messages.
async fn origin() -> SocketAddr {
    async fn echo(headers: HeaderMap, req: Request) -> axum::Json<Value> {
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        axum::Json(json!({
            "uri": req.uri().to_string(), "host": h("host"), "xff": h("x-forwarded-for"),
            "xfh": h("x-forwarded-host"), "xfp": h("x-forwarded-proto"), "prefix": h("x-forwarded-prefix"),
            "ticket": h("x-weir-ticket"), "cookie": h("cookie"),
        }))
    }
    async fn upload(req: Request) -> String {
        let mut body = req.into_body().into_data_stream();
        let mut n = 0usize;
        while let Some(chunk) = body.next().await {
            n += chunk.unwrap().len();
        }
        n.to_string()
    }
    async fn ws(upgrade: WebSocketUpgrade) -> impl IntoResponse {
        upgrade.on_upgrade(|mut socket| async move {
            while let Some(Ok(AxMessage::Text(t))) = socket.recv().await {
                let _ = socket.send(AxMessage::Text(format!("echo: {}", t.as_str()).into())).await;
            }
        })
    }
    let app = axum::Router::new()
        .route("/shop/echo", any(echo))
        .route("/shop/upload", any(upload))
        .route("/shop/ws", get(ws));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn admitted_cookie(app: &TestApp, room: &str) -> String {
    let mut v: Visitor = app.visitor();
    v.enter(room).await;
    let s = v.wait_admitted(room, std::time::Duration::from_secs(10)).await;
    let redirect = s["redirect_url"].as_str().unwrap().to_string();
    assert!(redirect.starts_with(&app.url(&format!("/p/{room}/"))), "{redirect}");
    // The redirect sets the cookie and drops the token from the URL.
    let r = app.http.get(&redirect).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], format!("/p/{room}/"));
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(set.starts_with("weir_token=") && set.contains("HttpOnly"));
    set.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn admitted_visitors_are_proxied_and_others_sent_to_the_room() {
    let app = TestApp::start().await;
    let addr = origin().await;
    app.create_room(json!({"id": "px", "origin": format!("http://{addr}/shop"), "rate_per_minute": 6000, "mode": "proxy"})).await;
    app.create_room(json!({"id": "other", "origin": format!("http://{addr}/shop"), "rate_per_minute": 6000, "mode": "proxy"})).await;

    // No token: to the room, keeping the path as the deep link.
    let r = app.http.get(app.url("/p/px/echo?a=1")).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/r/px?to=%2Fecho%3Fa%3D1");

    let cookie = admitted_cookie(&app, "px").await;
    let r = app.http.get(app.url("/p/px/echo?a=1")).header("cookie", &cookie).header("host", "queue.example").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["uri"], "/shop/echo?a=1");
    assert_eq!(seen["host"], addr.to_string());
    assert_eq!(seen["xff"], "127.0.0.1");
    assert_eq!(seen["xfh"], "queue.example");
    assert_eq!(seen["xfp"], "http");
    assert_eq!(seen["prefix"], "/p/px");
    assert_eq!(seen["ticket"], "1");

    // A 4 MiB request body streams through (weir never buffers it whole).
    let r = app
        .http
        .post(app.url("/p/px/upload"))
        .header("cookie", &cookie)
        .body(vec![7u8; 64 * 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), (64 * 64 * 1024).to_string());

    // WebSocket upgrade passes through.
    let mut req = format!("ws://{}/p/px/ws", app.addr).into_client_request().unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "echo: hi");

    // A token for another room is sent to this room; garbage too.
    let other = admitted_cookie(&app, "other").await;
    let r = app.http.get(app.url("/p/px/echo")).header("cookie", &other).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/r/px?to=%2Fecho");
    let r = app.http.get(app.url("/p/px/echo?weir_token=garbage")).send().await.unwrap();
    assert_eq!(r.status(), 302);

    // A room not in proxy mode, or no room: 404 page.
    app.create_room(json!({"id": "plain", "origin": "https://o.example", "rate_per_minute": 1})).await;
    for p in ["/p/plain/x", "/p/nope/x", "/p/"] {
        let r = app.http.get(app.url(p)).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(r.status(), 404, "{p}");
    }
}

#[tokio::test]
async fn unreachable_origin_gives_a_502_page() {
    let app = TestApp::start().await;
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    app.create_room(json!({"id": "down", "origin": format!("http://{closed}"), "rate_per_minute": 6000, "mode": "proxy"})).await;
    let cookie = admitted_cookie(&app, "down").await;
    let r = app.http.get(app.url("/p/down/")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(r.headers().contains_key("retry-after"));
    let body = r.text().await.unwrap();
    assert!(body.contains("not reachable"), "{body}");
}

/// Every outbound client speaks https: a proxied origin, an adaptive-rate probe and a webhook,
/// all on a server whose certificate comes from a private CA given as `tls_ca_file`; an origin
/// whose certificate nobody vouches for is a 502, not a plain-text fallback.
#[tokio::test]
async fn https_origins_probes_and_webhooks_trust_the_built_in_roots_and_the_ca_file() {
    let trusted = tls::TlsServer::start().await;
    let stranger = tls::TlsServer::start().await;
    let ca_file = trusted.ca_file.clone();
    let app = TestApp::builder().config(move |c| c.tls_ca_file = Some(ca_file)).start().await;

    app.create_room(json!({"id": "px", "origin": trusted.url("/shop"), "rate_per_minute": 6000, "mode": "proxy",
        "adaptive": {"probe_url": trusted.url("/health"), "interval_seconds": 1, "target_latency_ms": 200,
                     "min_per_minute": 60, "max_per_minute": 6000}}))
        .await;
    let cookie = admitted_cookie(&app, "px").await;
    let r = app.http.get(app.url("/p/px/echo?a=1")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen, json!({"uri": "/shop/echo?a=1", "tls": true}));
    let proxied = trusted.seen().into_iter().find(|s| s.uri == "/shop/echo?a=1").unwrap();
    assert_eq!(proxied.host, trusted.addr.to_string(), "the origin's own name, as over http");

    support::eventually(std::time::Duration::from_secs(10), || async {
        trusted.seen().iter().any(|s| s.method == "GET" && s.uri == "/health").then_some(())
    })
    .await;

    let creds = rt::create_app(&app, json!({"webhooks": [{"url": trusted.url("/hook"), "event_types": ["channel_occupied"]}]})).await;
    let mut ws = rt::Ws::connect(&app, &creds.key).await;
    ws.subscribe("news").await;
    let hook = support::eventually(std::time::Duration::from_secs(10), || async {
        trusted.seen().into_iter().find(|s| s.uri == "/hook")
    })
    .await;
    let body: Value = serde_json::from_str(&hook.body).unwrap();
    assert_eq!(body["events"][0], json!({"name": "channel_occupied", "channel": "news"}));

    app.create_room(json!({"id": "untrusted", "origin": stranger.url("/shop"), "rate_per_minute": 6000, "mode": "proxy"})).await;
    let cookie = admitted_cookie(&app, "untrusted").await;
    let r = app.http.get(app.url("/p/untrusted/echo")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(stranger.seen().is_empty(), "no request crosses an untrusted handshake");
}
