//! Admission policies and abuse resistance through the real HTTP routes.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, token_from_redirect, TestApp};
use weir::clock::ManualClock;

const ORIGIN: &str = "http://127.0.0.1:9/shop";

async fn patch(app: &TestApp, room: &str, body: Value) -> Value {
    let r = app.admin(Method::PATCH, &format!("/rooms/{room}")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "patch {body}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn per_ip_limit_refuses_new_tickets_with_retry_after() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "ip", "origin": ORIGIN, "rate_per_minute": 0, "per_ip_entries_per_minute": 2})).await;
    let mut first = app.visitor();
    first.enter("ip").await;
    app.visitor().enter("ip").await;
    let r = app.visitor().get("/r/ip", true).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let page = app.visitor().get("/r/ip", false).await;
    assert_eq!(page.status(), 429);
    assert!(page.text().await.unwrap().contains("Too many new visitors"), "the page says why");
    // A visitor who already has a ticket is not a new entry.
    assert_eq!(first.enter("ip").await["ticket"], 1);
    assert_eq!(app.room("ip").await["stats"]["last_ticket"], 2);
}

#[tokio::test]
async fn bypass_by_cidr_and_by_secret_header() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "staff", "origin": ORIGIN, "rate_per_minute": 0, "bypass": {"cidrs": ["127.0.0.0/8"]}})).await;
    let r = app.visitor().get("/r/staff", false).await;
    assert_eq!(r.status(), 302, "loopback is in the bypass range");
    let token = token_from_redirect(r.headers()["location"].to_str().unwrap());
    let verdict: Value = app.http.post(app.url("/api/v1/verify")).json(&json!({"token": token, "room": "staff"})).send().await.unwrap().json().await.unwrap();
    assert_eq!(verdict["valid"], true);
    assert_eq!(app.room("staff").await["stats"]["last_ticket"], 0, "no ticket used");

    let secret = "partner-secret-0123456789";
    app.create_room(json!({"id": "partner", "origin": ORIGIN, "rate_per_minute": 0, "bypass": {"header_value": secret}})).await;
    let r = app.http.get(app.url("/r/partner")).header("x-weir-bypass", secret).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let r = app.http.get(app.url("/r/partner")).header("x-weir-bypass", "partner-secret-0123456780").send().await.unwrap();
    assert_eq!(r.status(), 200, "a wrong secret queues like anyone");
    let r = app.http.get(app.url("/r/partner")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Validation of the bypass fields.
    let r = app.admin(Method::PATCH, "/rooms/partner").json(&json!({"bypass": {"cidrs": ["10.0.0.0/40"]}})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = app.admin(Method::PATCH, "/rooms/partner").json(&json!({"bypass": {"header_value": "short"}})).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn proof_of_work_valid_invalid_replayed_too_easy() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "pow", "origin": ORIGIN, "rate_per_minute": 0, "pow_difficulty": 8})).await;
    let mut v = app.visitor();
    let r = v.get("/r/pow", true).await;
    assert_eq!(r.status(), 428);
    let body: Value = r.json().await.unwrap();
    let challenge = body["pow"]["challenge"].as_str().unwrap().to_string();
    assert_eq!(body["pow"]["difficulty"], 8);
    assert!(v.cookie("weir_v_pow").is_none(), "no ticket before the work is done");

    let solution = weir::room::policy::pow::solve(&challenge, 8);
    let proof = format!("{challenge}:{solution}");
    let enc = |p: &str| url::form_urlencoded::byte_serialize(p.as_bytes()).collect::<String>();
    let r = v.get(&format!("/r/pow?pow={}", enc(&proof)), true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["ticket"], 1);

    // Replay from another client: refused.
    let r = app.visitor().get(&format!("/r/pow?pow={}", enc(&proof)), true).await;
    assert_eq!(r.status(), 428);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("replayed"));

    // A wrong answer.
    let c2 = app.visitor().get("/r/pow", true).await.json::<Value>().await.unwrap()["pow"]["challenge"].as_str().unwrap().to_string();
    let wrong = (0..)
        .map(|n: u32| n.to_string())
        .find(|s| weir::room::policy::pow::leading_zero_bits(weir::room::policy::pow::hash(&c2, s).as_ref()) < 8)
        .unwrap();
    let r = app.visitor().get(&format!("/r/pow?pow={}", enc(&format!("{c2}:{wrong}"))), true).await;
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("wrong_answer"));

    // Raised difficulty, live: a challenge solved at the old difficulty is too easy now.
    patch(&app, "pow", json!({"pow_difficulty": 12})).await;
    let old_solution = weir::room::policy::pow::solve(&c2, 8);
    let r = app.visitor().get(&format!("/r/pow?pow={}", enc(&format!("{c2}:{old_solution}"))), true).await;
    assert_eq!(r.status(), 428);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("too_easy"));

    // The HTML page carries the challenge and a solver script.
    let page = app.visitor().get("/r/pow", false).await.text().await.unwrap();
    assert!(page.contains("crypto.subtle.digest"), "page solves in the browser");
    assert_eq!(app.room("pow").await["stats"]["last_ticket"], 1);
}

#[tokio::test]
async fn active_user_cap_and_session_end_free_the_slot_at_once() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "cap", "origin": ORIGIN, "rate_per_minute": 600000, "max_active_users": 1, "session_seconds": 3600})).await;
    let mut a = app.visitor();
    a.enter("cap").await;
    let s = a.wait_admitted("cap", Duration::from_secs(10)).await;
    let token = token_from_redirect(s["redirect_url"].as_str().unwrap());
    let mut b = app.visitor();
    b.enter("cap").await;
    // Many ticks pass; B stays out while A's session is active (forward-auth checks keep it so).
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = app.http.get(app.url("/auth/cap")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(b.status("cap").await["admitted"], false);
    }
    let stats = app.room("cap").await["stats"].clone();
    assert_eq!(stats["active_users"], 1);
    let r = app.http.post(app.url("/api/v1/sessions/end")).json(&json!({"token": token})).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["ended"], true);
    b.wait_admitted("cap", Duration::from_secs(10)).await;
    // A forged token cannot end sessions.
    let r = app.http.post(app.url("/api/v1/sessions/end")).json(&json!({"token": "x.y.z"})).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn abandoned_visitors_are_skipped_and_readmitted_when_they_return() {
    let clock = ManualClock::at(1_900_000_000_000);
    let app = TestApp::builder().manual_clock(clock.clone()).start().await;
    app.create_room(json!({"id": "ab", "origin": ORIGIN, "rate_per_minute": 0, "abandon_after_seconds": 60})).await;
    let mut gone = app.visitor();
    gone.enter("ab").await;
    let mut here = app.visitor();
    here.enter("ab").await;
    clock.advance_ms(120_000);
    here.status("ab").await; // still here
    patch(&app, "ab", json!({"rate_per_minute": 600000})).await;
    here.wait_admitted("ab", Duration::from_secs(10)).await;
    let stats = eventually(Duration::from_secs(10), || async {
        let s = app.room("ab").await["stats"].clone();
        (s["abandoned"] == 1).then_some(s)
    })
    .await;
    assert_eq!(stats["serving"], 2);
    // The leaver comes back: next in line, admitted at the next tick.
    let back = gone.status("ab").await;
    assert_eq!((back["admitted"].as_bool(), back["position"].as_u64()), (Some(false), Some(0)));
    gone.wait_admitted("ab", Duration::from_secs(10)).await;
}

#[tokio::test]
async fn safety_net_passes_visitors_until_the_policy_is_exceeded() {
    let clock = ManualClock::at(1_900_000_000_000);
    let app = TestApp::builder().manual_clock(clock.clone()).start().await;
    app.create_room(json!({"id": "net", "origin": ORIGIN, "rate_per_minute": 2, "safety_net": true})).await;
    for _ in 0..2 {
        let r = app.visitor().get("/r/net", false).await;
        assert_eq!(r.status(), 302, "within the policy: straight to the origin");
    }
    let mut third = app.visitor();
    let r = third.get("/r/net", false).await;
    assert_eq!(r.status(), 200, "over the rate: the queue forms");
    assert_eq!(third.status("net").await["admitted"], false);
    // The surge passes: the queue drains, arrivals fall back within the policy.
    patch(&app, "net", json!({"rate_per_minute": 600000})).await;
    third.wait_admitted("net", Duration::from_secs(10)).await;
    patch(&app, "net", json!({"rate_per_minute": 2})).await;
    clock.advance_ms(61_000);
    let r = app.visitor().get("/r/net", false).await;
    assert_eq!(r.status(), 302, "back to pass-through");
}

/// A tiny origin whose health endpoint answers after a delay the test controls.
async fn slow_origin(delay_ms: Arc<AtomicU64>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let delay = delay_ms.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(delay.load(Ordering::Relaxed))).await;
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/health")
}

#[tokio::test]
async fn adaptive_rate_against_a_real_slow_origin() {
    let delay = Arc::new(AtomicU64::new(0));
    let probe_url = slow_origin(delay.clone()).await;
    let app = TestApp::start().await;
    let room = app
        .create_room(json!({"id": "ad", "origin": ORIGIN, "rate_per_minute": 600,
            "adaptive": {"probe_url": probe_url, "interval_seconds": 1, "target_latency_ms": 150, "min_per_minute": 60, "max_per_minute": 1200}}))
        .await;
    assert_eq!(room["adaptive"]["max_per_minute"], 1200.0);
    let rate = |s: &Value| s["stats"]["adaptive_rate"].as_f64().unwrap();
    // Healthy origin: the rate climbs.
    let healthy = eventually(Duration::from_secs(15), || async {
        let s = app.room("ad").await;
        (rate(&s) > 600.0 && s["stats"]["probe_latency_ms"].is_number()).then_some(s)
    })
    .await;
    let before = rate(&healthy);
    // The origin slows past the target: the rate is cut.
    delay.store(400, Ordering::Relaxed);
    let slowed = eventually(Duration::from_secs(15), || async {
        let s = app.room("ad").await;
        (rate(&s) <= before / 2.0).then_some(s)
    })
    .await;
    assert!(rate(&slowed) >= 60.0, "never below min");
    assert_eq!(slowed["stats"]["target_per_minute"], slowed["stats"]["adaptive_rate"], "admission uses the adaptive rate");
    // Metrics show it too.
    // Gauges are refreshed by the census every 2 s.
    let text = eventually(Duration::from_secs(10), || async {
        let t = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        t.contains("weir_room_measured_per_minute{room=\"ad\"}").then_some(t)
    })
    .await;
    for gauge in ["adaptive_rate", "probe_latency_seconds", "live_waiters", "abandoned", "active_users", "target_per_minute", "measured_per_minute"] {
        assert!(text.contains(&format!("weir_room_{gauge}{{room=\"ad\"}}")), "metrics lack weir_room_{gauge}");
    }
    // Bad adaptive settings are refused.
    let r = app.admin(Method::PATCH, "/rooms/ad").json(&json!({"adaptive": {"probe_url": "http://x/", "target_latency_ms": 10, "min_per_minute": 10, "max_per_minute": 5}})).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn an_open_waiting_page_socket_counts_as_presence() {
    use futures_util::StreamExt;
    let clock = ManualClock::at(1_900_000_000_000);
    let app = TestApp::builder().manual_clock(clock.clone()).start().await;
    app.create_room(json!({"id": "ws", "origin": ORIGIN, "rate_per_minute": 0, "abandon_after_seconds": 60})).await;
    let mut v = app.visitor();
    v.enter("ws").await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/app/weir-internal?protocol=7", app.addr)).await.unwrap();
    let hello = socket.next().await.unwrap().unwrap().into_text().unwrap();
    let frame: Value = serde_json::from_str(&hello).unwrap();
    let data: Value = serde_json::from_str(frame["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap().to_string();

    let register = |id: String| {
        let v = v.clone();
        async move {
            let cookie = format!("weir_v_ws={}", v.cookie("weir_v_ws").unwrap());
            v.http.post(format!("{}/r/ws/socket", v.base)).header("cookie", cookie).json(&json!({"socket_id": id})).send().await.unwrap().status()
        }
    };
    assert_eq!(register("1.2".into()).await, 400, "not a live connection");
    assert_eq!(register("abc".into()).await, 400);
    assert_eq!(app.http.post(app.url("/r/ws/socket")).json(&json!({"socket_id": socket_id})).send().await.unwrap().status(), 401);
    assert_eq!(register(socket_id.clone()).await, 204);

    // Two minutes without a single status call: the open socket keeps the visitor present.
    clock.advance_ms(120_000);
    eventually(Duration::from_secs(10), || async {
        let s = app.room("ws").await["stats"].clone();
        (s["live_waiters"] == 1).then_some(())
    })
    .await;
    patch(&app, "ws", json!({"rate_per_minute": 600000})).await;
    eventually(Duration::from_secs(10), || async { (app.room("ws").await["stats"]["serving"] == 1).then_some(()) }).await;
    assert_eq!(app.room("ws").await["stats"]["abandoned"], 0);
    assert_eq!(v.status("ws").await["admitted"], true, "admitted, not skipped");
}

#[tokio::test]
async fn prequeue_is_shuffled_once_and_survives_restart() {
    let clock = ManualClock::at(1_900_000_000_000);
    let app = TestApp::builder().manual_clock(clock.clone()).start().await;
    // Starts 20 s after "now"; rate 0 so nobody moves while we look.
    app.create_room(json!({"id": "drop", "origin": ORIGIN, "rate_per_minute": 0, "starts_at": "2030-03-17T17:47:00Z"})).await;
    let mut early = Vec::new();
    for _ in 0..30 {
        let mut v = app.visitor();
        v.enter("drop").await;
        early.push(v);
    }
    clock.advance_ms(21_000);
    eventually(Duration::from_secs(10), || async { (app.room("drop").await["state"] == "open").then_some(()) }).await;
    let mut late = app.visitor();
    assert_eq!(late.enter("drop").await["position"], 30, "later arrivals queue behind the whole pre-queue");
    let mut positions = Vec::new();
    for v in early.iter_mut() {
        positions.push(v.status("drop").await["position"].as_u64().unwrap());
    }
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(sorted, (0..30).collect::<Vec<u64>>(), "the pre-queue is a permutation of places 0..30");
    assert_ne!(positions, (0..30).collect::<Vec<u64>>(), "shuffled, not FIFO (1 in 30! chance of a false alarm)");
    // Opening another tab (same cookie) changes nothing.
    assert_eq!(early[0].enter("drop").await["position"].as_u64(), Some(positions[0]));

    // Restart on the same data directory: the same order, no reshuffle.
    let dir = app.stop().await;
    let app = TestApp::builder().manual_clock(clock.clone()).data_dir(dir).start().await;
    for (v, before) in early.iter_mut().zip(&positions) {
        v.base = app.base.clone();
        assert_eq!(v.status("drop").await["position"].as_u64(), Some(*before), "place changed across restart");
    }
}
