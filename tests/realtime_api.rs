//! Realtime HTTP side: the admin apps API, the signed Pusher HTTP API, history/resume and
//! webhooks.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
#[path = "support/realtime.rs"]
mod rt;

use std::time::Duration;

use rt::{create_app, data, Api, Creds, Ws};
use serde_json::{json, Value};
use support::TestApp;
use weir::realtime::{signature, AppSpec};

#[tokio::test]
async fn admin_apps_crud_and_persistence() {
    let app = TestApp::start().await;
    let r = app.admin(reqwest::Method::POST, "/apps").json(&json!({"max_connections": 50})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(created["max_connections"], 50);
    assert_eq!(created["max_message_bytes"], 10240);
    assert_eq!(created["max_presence_members"], 100);
    assert!(created["key"].as_str().unwrap().len() >= 16 && created["secret"].as_str().unwrap().len() >= 16);
    let list: Value = app.admin(reqwest::Method::GET, "/apps").send().await.unwrap().json().await.unwrap();
    assert!(list["apps"].as_array().unwrap().iter().any(|a| a["id"] == id.as_str()));
    let r = app.admin(reqwest::Method::PATCH, &format!("/apps/{id}")).json(&json!({"client_events": true})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.admin(reqwest::Method::PATCH, &format!("/apps/{id}")).json(&json!({"key": "other"})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // Its own id, sent back as a number (app ids are digits), is no change; another id is.
    let numeric: u64 = id.parse().unwrap();
    let r = app.admin(reqwest::Method::PATCH, &format!("/apps/{id}")).json(&json!({"id": numeric, "client_events": true})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.admin(reqwest::Method::PATCH, &format!("/apps/{id}")).json(&json!({"id": numeric + 1})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = app.admin(reqwest::Method::PATCH, &format!("/apps/{id}")).json(&json!({"max_message_bytes": 0})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert!(err["error"]["message"].as_str().unwrap().starts_with("max_message_bytes"), "{err}");
    let r = app.admin(reqwest::Method::POST, "/apps").json(&json!({"nonsense": 1})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = app.admin(reqwest::Method::POST, "/apps").json(&json!({"key": created["key"]})).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let r = app.admin(reqwest::Method::POST, "/apps").json(&json!({"key": "weir-internal"})).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let r = app.http.get(app.url("/api/v1/apps")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let doomed = create_app(&app, json!({})).await;
    let r = app.admin(reqwest::Method::DELETE, &format!("/apps/{}", doomed.id)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = app.admin(reqwest::Method::GET, &format!("/apps/{}", doomed.id)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Survives a restart.
    let dir = app.stop().await;
    let app = TestApp::builder().data_dir(dir).start().await;
    let shown: Value = app.admin(reqwest::Method::GET, &format!("/apps/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(shown["client_events"], true);
    assert_eq!(shown["source"], "api");
    assert_eq!(shown["stats"]["connections"], 0);
    assert_eq!(shown["key"], created["key"]);
    let r = app.admin(reqwest::Method::GET, &format!("/apps/{}", doomed.id)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn config_file_apps_work_and_are_read_only() {
    let spec = AppSpec::new("42".into(), "config-key".into(), "config-secret".into());
    let app = TestApp::builder().config(|c| c.apps = vec![spec]).start().await;
    let creds = Creds { id: "42".into(), key: "config-key".into(), secret: "config-secret".into() };
    let mut ws = Ws::connect(&app, &creds.key).await;
    ws.subscribe("c").await;
    Api::new(&app, &creds).trigger("c", "e", "d").await;
    ws.recv_event("e").await;
    let r = app.admin(reqwest::Method::PATCH, "/apps/42").json(&json!({"enabled": false})).send().await.unwrap();
    assert_eq!(r.status(), 409);
}

fn message(v: &Value) -> String {
    v["error"]["message"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn http_api_signing() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let api = Api::new(&app, &c);
    let path = format!("/apps/{}/events", c.id);
    let body = json!({"name": "e", "channels": ["a"], "data": "x"}).to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let send = |url: String, body: String| {
        let http = api.http.clone();
        async move { http.post(url).header("content-type", "application/json").body(body).send().await.unwrap() }
    };
    // Good.
    let r = send(api.signed_url("POST", &path, &[], body.as_bytes(), now), body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));
    // Bad signature.
    let url = api.signed_url("POST", &path, &[], body.as_bytes(), now).replace("auth_signature=", "auth_signature=0");
    let r = send(url, body.clone()).await;
    assert_eq!(r.status(), 401);
    assert!(message(&r.json().await.unwrap()).contains("auth_signature"));
    // Stale timestamp.
    let r = send(api.signed_url("POST", &path, &[], body.as_bytes(), now - 601), body.clone()).await;
    assert_eq!(r.status(), 401);
    assert!(message(&r.json().await.unwrap()).contains("auth_timestamp"));
    // Body changed after signing → body_md5.
    let r = send(api.signed_url("POST", &path, &[], body.as_bytes(), now), body.replace("\"x\"", "\"y\"")).await;
    assert_eq!(r.status(), 401);
    assert!(message(&r.json().await.unwrap()).contains("body_md5"));
    // Wrong key.
    let other = Api { creds: Creds { key: "nope".into(), ..c.clone() }, ..Api::new(&app, &c) };
    let r = send(other.signed_url("POST", &path, &[], body.as_bytes(), now), body.clone()).await;
    assert_eq!(r.status(), 401);
    assert!(message(&r.json().await.unwrap()).contains("auth_key"));
    // Unknown app.
    let r = send(api.signed_url("POST", "/apps/999999/events", &[], body.as_bytes(), now), body.clone()).await;
    assert_eq!(r.status(), 404);
    // Invalid body.
    let r = api.post(&path, &json!({"name": "e"})).await;
    assert_eq!(r.status(), 400);
    // Data over 10 KB.
    let r = api.post(&path, &json!({"name": "e", "channels": ["a"], "data": "x".repeat(10 * 1024 + 1)})).await;
    assert_eq!(r.status(), 413);
    // Body far over any limit.
    let huge = "x".repeat(1024 * 1024);
    let r = send(api.signed_url("POST", &path, &[], huge.as_bytes(), now), huge).await;
    assert_eq!(r.status(), 413);
    // GET with the md5 of an empty body (as the Python SDK sends it) is tolerated.
    let cpath = format!("/apps/{}/channels", c.id);
    let md5 = signature::body_md5(b"");
    let r = api.http.get(api.signed_url("GET", &cpath, &[("body_md5", &md5)], b"", now)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn trigger_and_batch_limits() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let api = Api::new(&app, &c);
    let channels: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let r = api.post(&format!("/apps/{}/events", c.id), &json!({"name": "e", "channels": channels, "data": "x"})).await;
    assert_eq!(r.status(), 400);
    let r = api.post(&format!("/apps/{}/events", c.id), &json!({"name": "e", "channels": &channels[..100], "data": "x"})).await;
    assert_eq!(r.status(), 200);
    let batch: Vec<Value> = (0..11).map(|i| json!({"channel": format!("c{i}"), "name": "e", "data": "x"})).collect();
    let r = api.post(&format!("/apps/{}/batch_events", c.id), &json!({"batch": batch})).await;
    assert_eq!(r.status(), 400);
    let r = api.post(&format!("/apps/{}/batch_events", c.id), &json!({"batch": &batch[..10]})).await;
    assert_eq!(r.status(), 200);
    let r = api.post(&format!("/apps/{}/events", c.id), &json!({"name": "e", "channels": ["bad name"], "data": "x"})).await;
    assert_eq!(r.status(), 400);
    // The protocol's own event names are not the server's to publish.
    for name in ["pusher_internal:member_added", "pusher:error"] {
        let r = api.post(&format!("/apps/{}/events", c.id), &json!({"name": name, "channels": ["a"], "data": "{}"})).await;
        assert_eq!(r.status(), 400, "{name}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["message"].as_str().unwrap().contains("reserved"), "{e}");
    }
}

#[tokio::test]
async fn publish_rate_limit_answers_429() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({"max_publish_per_second": 2})).await;
    let api = Api::new(&app, &c);
    let path = format!("/apps/{}/events", c.id);
    let body = json!({"name": "e", "channels": ["a"], "data": "x"});
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = api.post(&path, &body).await;
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some());
        }
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn channel_queries() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let api = Api::new(&app, &c);
    let mut a = Ws::connect(&app, &c.key).await;
    let mut b = Ws::connect(&app, &c.key).await;
    a.subscribe("public-1").await;
    b.subscribe("public-1").await;
    a.subscribe_presence(&c, "presence-x", "u1").await;
    b.subscribe_presence(&c, "presence-x", "u2").await;
    let v: Value = api.get(&format!("/apps/{}/channels", c.id), &[]).await.json().await.unwrap();
    assert!(v["channels"]["public-1"].is_object() && v["channels"]["presence-x"].is_object(), "{v}");
    let v: Value = api
        .get(&format!("/apps/{}/channels", c.id), &[("filter_by_prefix", "presence-"), ("info", "user_count")])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"channels": {"presence-x": {"user_count": 2}}}));
    let r = api.get(&format!("/apps/{}/channels", c.id), &[("info", "user_count")]).await;
    assert_eq!(r.status(), 400);
    let v: Value = api
        .get(&format!("/apps/{}/channels/public-1", c.id), &[("info", "subscription_count")])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"occupied": true, "subscription_count": 2}));
    let v: Value = api.get(&format!("/apps/{}/channels/empty", c.id), &[]).await.json().await.unwrap();
    assert_eq!(v, json!({"occupied": false}));
    let v: Value = api.get(&format!("/apps/{}/channels/presence-x", c.id), &[("info", "user_count")]).await.json().await.unwrap();
    assert_eq!(v["user_count"], 2);
    let r = api.get(&format!("/apps/{}/channels/public-1/users", c.id), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = api.post(&format!("/apps/{}/events", c.id), &json!({"name": "e", "channels": ["public-1"], "data": "x", "info": "subscription_count"})).await.json().await.unwrap();
    assert_eq!(v, json!({"channels": {"public-1": {"subscription_count": 2}}}));
}

fn serial(v: &Value) -> u64 {
    v["serial"].as_u64().unwrap_or_else(|| panic!("no serial in {v}"))
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_events() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({})).await;
    let api = Api::new(&app, &c);
    let mut ws = Ws::connect(&app, &c.key).await;
    let sub = ws.subscribe("train").await;
    let mut last = serial(&sub);
    for i in 0..2 {
        api.trigger("train", "tick", &i.to_string()).await;
        last = serial(&ws.recv_event("tick").await);
    }
    drop(ws); // into the tunnel
    for i in 2..7 {
        api.trigger("train", "tick", &i.to_string()).await;
    }
    api.trigger("other", "tick", "noise").await;
    let mut ws = Ws::connect(&app, &c.key).await;
    ws.send(json!({"event": "pusher:subscribe", "data": {"channel": "train", "resume_from": last}})).await;
    assert_eq!(ws.recv().await["event"], "pusher_internal:subscription_succeeded");
    let mut got = Vec::new();
    for _ in 0..5 {
        let e = ws.recv().await;
        assert_eq!(e["event"], "tick");
        assert!(serial(&e) > last);
        got.push(e["data"].as_str().unwrap().to_string());
    }
    assert_eq!(got, ["2", "3", "4", "5", "6"]);
    let done = ws.recv().await;
    assert_eq!(done["event"], "weir:resume_succeeded");
    assert_eq!(data(&done)["replayed"], 5);
    // Live events continue after the replay.
    api.trigger("train", "tick", "7").await;
    assert_eq!(ws.recv().await["data"], "7");
}

#[tokio::test]
async fn resume_fails_clearly_when_history_is_too_short() {
    let app = TestApp::start().await;
    let c = create_app(&app, json!({"history_len": 3})).await;
    let api = Api::new(&app, &c);
    let mut ws = Ws::connect(&app, &c.key).await;
    let last = serial(&ws.subscribe("train").await);
    drop(ws);
    for i in 0..5 {
        api.trigger("train", "tick", &i.to_string()).await;
    }
    let mut ws = Ws::connect(&app, &c.key).await;
    ws.send(json!({"event": "pusher:subscribe", "data": {"channel": "train", "resume_from": last}})).await;
    assert_eq!(ws.recv().await["event"], "pusher_internal:subscription_succeeded");
    let failed = ws.recv().await;
    assert_eq!(failed["event"], "weir:resume_failed");
    assert_eq!(failed["channel"], "train");
    assert!(data(&failed)["earliest"].as_u64().unwrap() > last);
}

#[tokio::test]
async fn webhooks_are_signed_batched_and_retried() {
    let app = TestApp::start().await;
    let (url, seen) = rt::webhook_receiver(1).await;
    let c = create_app(&app, json!({"client_events": true, "webhooks": [{"url": url}]})).await;
    let mut a = Ws::connect(&app, &c.key).await;
    let mut b = Ws::connect(&app, &c.key).await;
    a.subscribe_presence(&c, "presence-w", "ua").await;
    b.subscribe_presence(&c, "presence-w", "ub").await;
    a.send(json!({"event": "client-x", "channel": "presence-w", "data": "hi"})).await;
    b.recv_event("client-x").await;
    drop(a);
    drop(b);
    let wanted = ["channel_occupied", "member_added", "client_event", "member_removed", "channel_vacated"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let names: Vec<String> = seen
            .lock()
            .iter()
            .flat_map(|(_, body)| {
                let v: Value = serde_json::from_str(body).unwrap();
                v["events"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect::<Vec<_>>()
            })
            .collect();
        if wanted.iter().all(|w| names.iter().any(|n| n == w)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "webhooks seen: {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (headers, body) in seen.lock().iter() {
        assert_eq!(headers["x-pusher-key"], c.key.as_str());
        let sig = headers["x-pusher-signature"].to_str().unwrap();
        assert_eq!(sig, signature::hmac_hex(&c.secret, body));
        let v: Value = serde_json::from_str(body).unwrap();
        assert!(v["time_ms"].as_i64().unwrap() > 0);
    }
    // A filtered, dead endpoint never slows delivery.
    let dead = create_app(&app, json!({"webhooks": [{"url": "http://127.0.0.1:9/hook", "event_types": ["channel_occupied"]}]})).await;
    let mut ws = Ws::connect(&app, &dead.key).await;
    ws.subscribe("x").await;
    let started = tokio::time::Instant::now();
    Api::new(&app, &dead).trigger("x", "e", "d").await;
    ws.recv_event("e").await;
    assert!(started.elapsed() < Duration::from_secs(1));
}
