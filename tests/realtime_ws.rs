//! Realtime WebSocket behaviour with a raw client: the frames pusher-js relies on and the error
//! cases the libraries hide.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
#[path = "support/realtime.rs"]
mod rt;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rt::{create_app, data, raw, Api, Ws};
use serde_json::{json, Value};
use support::TestApp;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn connection_established_and_ping_pong() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let mut ws = Ws::connect(&app, &c.key).await;
    let (a, b) = ws.socket_id.split_once('.').unwrap();
    assert!(a.bytes().all(|x| x.is_ascii_digit()) && b.bytes().all(|x| x.is_ascii_digit()), "{}", ws.socket_id);
    ws.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(ws.recv().await["event"], "pusher:pong");
}

async fn refused(app: &TestApp, path: &str) -> (Option<u16>, Vec<Value>) {
    let mut ws = raw(app, path).await;
    rt::expect_close(&mut ws).await
}

#[tokio::test]
async fn unknown_app_disabled_app_and_protocol_versions() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let off = create_app(&app, json!({"enabled": false})).await;
    let (code, frames) = refused(&app, "/app/nope?protocol=7").await;
    assert_eq!(code, Some(4001));
    assert_eq!(frames[0]["event"], "pusher:error");
    assert_eq!(frames[0]["data"]["code"], 4001);
    assert_eq!(refused(&app, &format!("/app/{}?protocol=7", off.key)).await.0, Some(4003));
    assert_eq!(refused(&app, &format!("/app/{}?protocol=8", c.key)).await.0, Some(4007));
    assert_eq!(refused(&app, &format!("/app/{}?protocol=x", c.key)).await.0, Some(4006));
    assert_eq!(refused(&app, &format!("/app/{}", c.key)).await.0, Some(4008));
    // Over the connection quota.
    let one = create_app(&app, json!({"max_connections": 1})).await;
    let _first = Ws::connect(&app, &one.key).await;
    assert_eq!(refused(&app, &format!("/app/{}?protocol=7", one.key)).await.0, Some(4004));
}

#[tokio::test]
async fn public_channel_events_with_socket_exclusion() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let api = Api::new(&app, &c);
    let mut a = Ws::connect(&app, &c.key).await;
    let mut b = Ws::connect(&app, &c.key).await;
    let ok = a.subscribe("news").await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(ok["data"], "{}");
    b.subscribe("news").await;
    assert_eq!(api.trigger("news", "story", "{\"n\":1}").await, json!({}));
    for ws in [&mut a, &mut b] {
        let e = ws.recv_event("story").await;
        assert_eq!(e["channel"], "news");
        assert_eq!(e["data"], "{\"n\":1}");
        assert!(e["serial"].as_u64().is_some());
    }
    api.trigger_except("news", "story", "2", &a.socket_id).await;
    assert_eq!(b.recv_event("story").await["data"], "2");
    a.expect_silence(Duration::from_millis(300)).await;
    // Unsubscribed clients get nothing more.
    b.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "news"}})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.trigger("news", "story", "3").await;
    assert_eq!(a.recv_event("story").await["data"], "3");
    b.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn private_and_encrypted_channel_auth() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({"client_events": true})).await;
    let mut ws = Ws::connect(&app, &c.key).await;
    assert_eq!(ws.subscribe_private(&c, "private-a").await["event"], "pusher_internal:subscription_succeeded");
    ws.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-b", "auth": format!("{}:deadbeef", c.key)}})).await;
    let err = ws.recv_sub("private-b").await;
    assert_eq!(err["event"], "pusher:subscription_error");
    assert_eq!(err["data"]["type"], "AuthError");
    assert_eq!(err["data"]["status"], 401);
    ws.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-c"}})).await;
    assert_eq!(ws.recv_sub("private-c").await["event"], "pusher:subscription_error");
    // A signature for another socket is refused.
    let other = weir::realtime::signature::channel_auth(&c.key, &c.secret, "1.1", "private-d", None);
    ws.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-d", "auth": other}})).await;
    assert_eq!(ws.recv_sub("private-d").await["event"], "pusher:subscription_error");
    // Encrypted channels relay the payload as is and refuse client events.
    assert_eq!(ws.subscribe_private(&c, "private-encrypted-x").await["event"], "pusher_internal:subscription_succeeded");
    let sealed = "{\"nonce\":\"bm9uY2U=\",\"ciphertext\":\"Y2lwaGVy\"}";
    Api::new(&app, &c).trigger("private-encrypted-x", "secret", sealed).await;
    assert_eq!(ws.recv_event("secret").await["data"], sealed);
    ws.send(json!({"event": "client-x", "channel": "private-encrypted-x", "data": {}})).await;
    assert_eq!(ws.recv_event("pusher:error").await["data"]["code"], 4302);
}

#[tokio::test]
async fn presence_members_with_several_connections_per_user() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let ch = "presence-room";
    let mut b = Ws::connect(&app, &c.key).await;
    let ok = b.subscribe_presence(&c, ch, "bob").await;
    let p = data(&ok);
    assert_eq!(p["presence"]["count"], 1);
    assert_eq!(p["presence"]["hash"]["bob"]["name"], "name-bob");
    let mut a1 = Ws::connect(&app, &c.key).await;
    let mut a2 = Ws::connect(&app, &c.key).await;
    let ok = a1.subscribe_presence(&c, ch, "alice").await;
    assert_eq!(data(&ok)["presence"]["count"], 2);
    let added = b.recv_event("pusher_internal:member_added").await;
    assert_eq!(data(&added)["user_id"], "alice");
    assert_eq!(data(&added)["user_info"]["name"], "name-alice");
    a2.subscribe_presence(&c, ch, "alice").await;
    b.expect_silence(Duration::from_millis(300)).await; // alice is already a member
    let users = Api::new(&app, &c).get(&format!("/apps/{}/channels/{ch}/users", c.id), &[]).await;
    let users: Value = users.json().await.unwrap();
    assert_eq!(users["users"].as_array().unwrap().len(), 2);
    a1.send(json!({"event": "pusher:unsubscribe", "data": {"channel": ch}})).await;
    b.expect_silence(Duration::from_millis(300)).await; // alice still has a2
    drop(a2);
    let removed = b.recv_event("pusher_internal:member_removed").await;
    assert_eq!(data(&removed)["user_id"], "alice");
    // A full channel refuses new members.
    let small = create_app(&app, json!({"max_presence_members": 1})).await;
    let mut x = Ws::connect(&app, &small.key).await;
    x.subscribe_presence(&small, ch, "x").await;
    let mut y = Ws::connect(&app, &small.key).await;
    let err = y.subscribe_presence(&small, ch, "y").await;
    assert_eq!(err["event"], "pusher:subscription_error");
}

#[tokio::test]
async fn client_event_rules() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({"client_events": true})).await;
    let mut a = Ws::connect(&app, &c.key).await;
    let mut b = Ws::connect(&app, &c.key).await;
    a.subscribe_private(&c, "private-chat").await;
    b.subscribe_private(&c, "private-chat").await;
    a.send(json!({"event": "client-typing", "channel": "private-chat", "data": {"who": "a"}})).await;
    let got = b.recv_event("client-typing").await;
    assert_eq!(got["data"], "{\"who\":\"a\"}");
    a.expect_silence(Duration::from_millis(300)).await; // not echoed
    // Presence client events carry the sender's user id.
    a.subscribe_presence(&c, "presence-p", "ua").await;
    b.subscribe_presence(&c, "presence-p", "ub").await;
    a.send(json!({"event": "client-hi", "channel": "presence-p", "data": "x"})).await;
    let got = b.recv_event("client-hi").await;
    assert_eq!(got["user_id"], "ua");
    // Not on public channels, not on unsubscribed channels.
    a.subscribe("public").await;
    a.send(json!({"event": "client-x", "channel": "public", "data": "x"})).await;
    assert_eq!(a.recv_event("pusher:error").await["data"]["code"], 4302);
    a.send(json!({"event": "client-x", "channel": "private-other", "data": "x"})).await;
    assert_eq!(a.recv_event("pusher:error").await["data"]["code"], 4302);
    // Rate limit: 10 per second.
    for _ in 0..15 {
        a.send(json!({"event": "client-burst", "channel": "private-chat", "data": "x"})).await;
    }
    assert_eq!(a.recv_event("pusher:error").await["data"]["code"], 4301);
    // Disabled for the app.
    let off = create_app(&app, json!({})).await;
    let mut d = Ws::connect(&app, &off.key).await;
    d.subscribe_private(&off, "private-chat").await;
    d.send(json!({"event": "client-x", "channel": "private-chat", "data": "x"})).await;
    assert_eq!(d.recv_event("pusher:error").await["data"]["code"], 4302);
}

#[tokio::test]
async fn cache_channel_replays_last_event_or_reports_a_miss() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let mut a = Ws::connect(&app, &c.key).await;
    a.subscribe("cache-prices").await;
    let miss = a.recv_event("pusher:cache_miss").await;
    assert_eq!(miss["channel"], "cache-prices");
    let api = Api::new(&app, &c);
    api.trigger("cache-prices", "price", "1").await;
    api.trigger("cache-prices", "price", "2").await;
    let mut b = Ws::connect(&app, &c.key).await;
    b.subscribe("cache-prices").await;
    let last = b.recv_event("price").await;
    assert_eq!(last["data"], "2");
    b.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn signin_server_to_user_channel_and_deadline() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({"signin_within_s": 1})).await;
    let mut good = Ws::connect(&app, &c.key).await;
    let mut lazy = Ws::connect(&app, &c.key).await;
    // Server-to-user channel needs a sign-in first.
    good.send(json!({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-u1"}})).await;
    assert_eq!(good.recv_sub("#server-to-user-u1").await["event"], "pusher:subscription_error");
    // A bad signature is refused.
    good.send(json!({"event": "pusher:signin", "data": {"auth": format!("{}:00", c.key), "user_data": "{\"id\":\"u1\"}"}})).await;
    assert_eq!(good.recv_event("pusher:error").await["data"]["code"], 4009);
    let ok = good.signin(&c, "u1").await;
    assert_eq!(ok["event"], "pusher:signin_success");
    assert_eq!(data(&ok)["user_data"], "{\"id\":\"u1\"}");
    assert_eq!(good.subscribe("#server-to-user-u1").await["event"], "pusher_internal:subscription_succeeded");
    Api::new(&app, &c).trigger("#server-to-user-u1", "hello", "u1 only").await;
    assert_eq!(good.recv_event("hello").await["data"], "u1 only");
    let (code, frames) = lazy.expect_close().await;
    assert_eq!(code, Some(4009));
    assert!(frames.iter().any(|f| f["event"] == "pusher:error" && f["data"]["code"] == 4009));
    tokio::time::sleep(Duration::from_millis(500)).await;
    good.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(good.recv_event("pusher:pong").await["event"], "pusher:pong");
}

#[tokio::test]
async fn malformed_unknown_and_oversized_messages() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let mut ws = Ws::connect(&app, &c.key).await;
    let mut bystander = Ws::connect(&app, &c.key).await;
    bystander.subscribe("calm").await;
    ws.send_text("{not json".into()).await;
    assert_eq!(ws.recv_event("pusher:error").await["data"]["code"], 4300);
    ws.send(json!({"event": "pusher:nonsense", "data": {}})).await;
    assert_eq!(ws.recv_event("pusher:error").await["data"]["code"], 4300);
    ws.send(json!({"event": "pusher:subscribe", "data": {"channel": "bad name!"}})).await;
    let err = ws.recv_sub("bad name!").await;
    assert_eq!(err["event"], "pusher:subscription_error");
    assert_eq!(err["data"]["status"], 400);
    let big = json!({"event": "client-x", "channel": "private-a", "data": "x".repeat(20 * 1024)});
    ws.send(big).await;
    assert_eq!(ws.recv_event("pusher:error").await["data"]["code"], 4303);
    ws.send(json!({"event": "pusher:ping", "data": {}})).await;
    ws.recv_event("pusher:pong").await;
    // Far over the hard cap: the connection is dropped, others are unaffected.
    ws.send_text("y".repeat(200 * 1024)).await;
    let (code, _) = ws.expect_close().await;
    assert!(code.is_none() || code == Some(1009), "{code:?}");
    Api::new(&app, &c).trigger("calm", "still", "here").await;
    assert_eq!(bystander.recv_event("still").await["data"], "here");
}

#[tokio::test]
async fn unresponsive_client_is_closed_with_4201() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({"activity_timeout_s": 1, "pong_timeout_s": 1})).await;
    let mut ws = Ws::connect(&app, &c.key).await;
    let (code, frames) = ws.expect_close().await;
    assert!(frames.iter().any(|f| f["event"] == "pusher:ping"), "{frames:?}");
    assert_eq!(code, Some(4201));
    // Answering pings keeps it open.
    let mut ok = Ws::connect(&app, &c.key).await;
    for _ in 0..3 {
        ok.recv_event("pusher:ping").await;
        ok.send(json!({"event": "pusher:pong", "data": {}})).await;
    }
}

#[tokio::test]
async fn websocket_outlives_the_request_timeout() {
    let app = TestApp::builder().config(|c| c.limits.request_timeout_ms = 200).start().await;
    let c = create_app(&app, json!({})).await;
    let mut ws = Ws::connect(&app, &c.key).await;
    ws.subscribe("long").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    ws.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(ws.recv_event("pusher:pong").await["event"], "pusher:pong");
    Api::new(&app, &c).trigger("long", "e", "d").await;
    ws.recv_event("e").await;
}

#[tokio::test]
async fn slow_consumer_is_disconnected_without_hurting_others() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({"outbound_queue_frames": 64})).await;
    let api = Api::new(&app, &c);
    let mut slow = raw(&app, &format!("/app/{}?protocol=7", c.key)).await;
    slow.send(Message::text(json!({"event": "pusher:subscribe", "data": {"channel": "firehose"}}).to_string())).await.unwrap();
    let mut fast = Ws::connect(&app, &c.key).await;
    fast.subscribe("firehose").await;
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(Ok(m)) = fast.inner.next().await {
            if let Message::Text(t) = m {
                if t.as_str().contains("\"blob\"") {
                    n += 1;
                }
            }
        }
        n
    });
    let payload = "z".repeat(10 * 1024);
    let batch: Vec<Value> = (0..10).map(|_| json!({"channel": "firehose", "name": "blob", "data": payload})).collect();
    let body = json!({ "batch": batch });
    let mut sent = 0u64;
    let mut disconnected = false;
    for _ in 0..400 {
        let r = api.post(&format!("/apps/{}/batch_events", c.id), &body).await;
        assert_eq!(r.status(), 200);
        sent += 10;
        if sent % 100 == 0 {
            let info = api.get(&format!("/apps/{}/channels/firehose", c.id), &[("info", "subscription_count")]).await;
            let info: Value = info.json().await.unwrap();
            assert_ne!(info["subscription_count"], 0, "the fast subscriber was disconnected too");
            if info["subscription_count"] == 1 {
                disconnected = true;
                break;
            }
        }
    }
    assert!(disconnected, "the slow consumer was never disconnected after {sent} events");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("weir_realtime_slow_consumer_disconnects_total"), "metric missing");
    // The fast reader keeps receiving.
    api.trigger("firehose", "blob", "last").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.shutdown.cancel();
    let got = tokio::time::timeout(Duration::from_secs(10), reader).await.unwrap().unwrap();
    assert_eq!(got, sent + 1, "fast subscriber lost events");
}

#[tokio::test]
async fn terminate_connections_closes_every_socket_of_the_user() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let mut a1 = Ws::connect(&app, &c.key).await;
    let mut a2 = Ws::connect(&app, &c.key).await;
    let mut b = Ws::connect(&app, &c.key).await;
    a1.signin(&c, "alice").await;
    a2.signin(&c, "alice").await;
    b.signin(&c, "bob").await;
    let r = Api::new(&app, &c).post(&format!("/apps/{}/users/alice/terminate_connections", c.id), &json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(a1.expect_close().await.0, Some(4009));
    assert_eq!(a2.expect_close().await.0, Some(4009));
    b.send(json!({"event": "pusher:ping", "data": {}})).await;
    b.recv_event("pusher:pong").await;
    // The PyPI SDK's path without the /apps/{id} prefix works too (app found by auth_key).
    let r = Api::new(&app, &c).post("/users/bob/terminate_connections", &json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(b.expect_close().await.0, Some(4009));
}

#[tokio::test]
async fn shutdown_tells_clients_to_reconnect() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let mut ws = Ws::connect(&app, &c.key).await;
    app.shutdown.cancel();
    let (code, frames) = ws.expect_close().await;
    assert_eq!(code, Some(4200));
    assert!(frames.iter().any(|f| f["data"]["code"] == 4200), "{frames:?}");
}

#[tokio::test]
async fn internal_app_channels_are_public() {
    let app = TestApp::start().await;
    let mut ws = Ws::connect(&app, weir::realtime::INTERNAL_APP_KEY).await;
    assert_eq!(ws.subscribe("room-demo").await["event"], "pusher_internal:subscription_succeeded");
    let _ = ws.inner.send(Message::Ping(Default::default())).await;
}

/// A WebSocket opened by hand, so that it can send frames no client library would.
async fn hand_made_socket(app: &TestApp, key: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "GET /app/{key}?protocol=7 HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !seen.ends_with(b"\r\n\r\n") {
        seen.push(s.read_u8().await.unwrap());
    }
    assert!(seen.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&seen));
    s
}

/// Reads server frames until the close frame; its status code.
async fn close_code_of(s: &mut tokio::net::TcpStream) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let read = async {
        loop {
            let (b0, b1) = (s.read_u8().await.ok()?, s.read_u8().await.ok()?);
            let len = match b1 & 0x7f {
                126 => u64::from(s.read_u16().await.ok()?),
                127 => s.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len).ok()?];
            s.read_exact(&mut payload).await.ok()?;
            if b0 & 0x0f == 0x8 {
                return Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the server closes the connection")
}

#[tokio::test]
async fn broken_frames_are_closed_with_the_rfc_code() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    // A masked text frame whose payload is not UTF-8: 1007.
    let mut s = hand_made_socket(&app, &c.key).await;
    let mask = [1u8, 2, 3, 4];
    let payload: Vec<u8> = [0xffu8, 0xfe, 0xfd].iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m).collect();
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend_from_slice(&payload);
    s.write_all(&frame).await.unwrap();
    assert_eq!(close_code_of(&mut s).await, Some(1007));
    // An unmasked frame from a client: 1002.
    let mut s = hand_made_socket(&app, &c.key).await;
    s.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(close_code_of(&mut s).await, Some(1002));
}

/// The value of `metric{app="{app}"}` on `/metrics` (0 when absent).
async fn app_gauge(app: &TestApp, metric: &str, app_id: &str) -> f64 {
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let prefix = format!("{metric}{{app=\"{app_id}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Watchlists live with the app's signed-in users (not in every connection) and are counted:
/// a watcher's state is gone once its connection is.
#[tokio::test]
async fn signed_in_users_and_watchers_are_gauged_and_freed_with_their_connection() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let mut watcher = Ws::connect(&app, &c.key).await;
    assert_eq!(watcher.signin_as(&c, &json!({"id": "ann", "watchlist": ["bob"]})).await["event"], "pusher:signin_success");
    let mut plain = Ws::connect(&app, &c.key).await;
    assert_eq!(plain.signin(&c, "bob").await["event"], "pusher:signin_success");
    let online = watcher.recv_event("pusher_internal:watchlist_events").await;
    assert_eq!(data(&online), json!({"events": [{"name": "online", "user_ids": ["bob"]}]}));
    assert_eq!(app_gauge(&app, "weir_realtime_signed_in_users", &c.id).await, 2.0);
    assert_eq!(app_gauge(&app, "weir_realtime_watching_connections", &c.id).await, 1.0);
    drop(watcher);
    support::eventually(Duration::from_secs(5), || async {
        (app_gauge(&app, "weir_realtime_watching_connections", &c.id).await == 0.0
            && app_gauge(&app, "weir_realtime_signed_in_users", &c.id).await == 1.0)
            .then_some(())
    })
    .await;
}
