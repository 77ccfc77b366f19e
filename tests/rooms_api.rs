//! Admin API for rooms: CRUD, statistics, and one test per bad-input class.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;
#[path = "support/realtime.rs"]
mod rt;

use reqwest::Method;
use serde_json::{json, Value};
use support::{TestApp, ADMIN_KEY};

fn room(id: &str) -> Value {
    json!({"id": id, "name": "Sale", "origin": "https://shop.example", "rate_per_minute": 60})
}

async fn error_of(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    (status, body["error"]["code"].as_str().unwrap().to_string(), body["error"]["message"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn create_list_show_patch_delete() {
    let app = TestApp::start().await;
    let created = app.create_room(room("sale")).await;
    assert_eq!(created["id"], "sale");
    assert_eq!(created["state"], "open");
    assert_eq!(created["stats"]["next_ticket"], 1);

    let list: Value = app.admin(Method::GET, "/rooms").send().await.unwrap().json().await.unwrap();
    assert_eq!(list["rooms"].as_array().unwrap().len(), 1);

    let mut v = app.visitor();
    v.enter("sale").await;
    let shown = app.room("sale").await;
    for key in ["queue_length", "next_ticket", "serving", "admitted_last_minute", "entries_last_minute"] {
        assert!(shown["stats"].get(key).is_some(), "stats.{key} missing: {shown}");
    }
    assert_eq!(shown["stats"]["next_ticket"], 2);
    assert_eq!(shown["stats"]["entries_last_minute"], 1);

    let patched: Value = app
        .admin(Method::PATCH, "/rooms/sale")
        .json(&json!({"state": "paused", "rate_per_minute": 0, "name": "Paused sale"}))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!((patched["state"].as_str(), patched["rate_per_minute"].as_f64(), patched["name"].as_str()), (Some("paused"), Some(0.0), Some("Paused sale")));
    assert_eq!(patched["origin"], "https://shop.example", "fields not in the patch are kept");

    let r = app.admin(Method::DELETE, "/rooms/sale").send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = app.admin(Method::GET, "/rooms/sale").send().await.unwrap();
    assert_eq!(error_of(r).await.0, 404);
    // The entry link of a deleted room is a 404 page, not an error.
    assert_eq!(v.get("/r/sale", false).await.status(), 404);
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let app = TestApp::start().await;
    let r = app.http.get(app.url("/api/v1/rooms")).send().await.unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (401, "unauthorized"));
    let r = app.http.get(app.url("/api/v1/rooms")).bearer_auth(format!("{ADMIN_KEY}x")).send().await.unwrap();
    assert_eq!(error_of(r).await.0, 401);
    let r = app.http.get(app.url("/api/v1/rooms")).bearer_auth(&ADMIN_KEY[..10]).send().await.unwrap();
    assert_eq!(error_of(r).await.0, 401);
}

#[tokio::test]
async fn bad_input_gets_4xx_naming_the_field() {
    let app = TestApp::start().await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"id": "Bad_Id", "origin": "https://o.example", "rate_per_minute": 1}), "id"),
        (json!({"id": "-x", "origin": "https://o.example", "rate_per_minute": 1}), "id"),
        (json!({"id": "x".repeat(65), "origin": "https://o.example", "rate_per_minute": 1}), "id"),
        (json!({"id": "ok", "origin": "ftp://o.example", "rate_per_minute": 1}), "origin"),
        (json!({"id": "ok", "origin": "/relative", "rate_per_minute": 1}), "origin"),
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": -5}), "rate_per_minute"),
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": "fast"}), "rate_per_minute"),
        (json!({"id": "ok", "origin": "https://o.example"}), "rate_per_minute"),
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": 1, "state": "sleeping"}), "state"),
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": 1, "state": "scheduled"}), "starts_at"),
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": 1, "starts_at": "soon"}), "starts_at"),
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": 1, "colour": "red"}), "colour"),
        (json!({"id": "ok", "name": "Sale\u{0}", "origin": "https://o.example", "rate_per_minute": 1}), "name"),
        (json!({"id": "ok", "name": "\u{202e}elaS", "origin": "https://o.example", "rate_per_minute": 1}), "name"),
        // Beyond a week, and a value that would wrap to a negative absence and skip everyone.
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": 1, "abandon_after_seconds": 604_801}), "abandon_after_seconds"),
        (json!({"id": "ok", "origin": "https://o.example", "rate_per_minute": 1, "abandon_after_seconds": u64::MAX}), "abandon_after_seconds"),
    ];
    for (body, field) in cases {
        let r = app.admin(Method::POST, "/rooms").json(&body).send().await.unwrap();
        let (status, _, message) = error_of(r).await;
        assert_eq!(status, 400, "{body}");
        assert!(message.contains(field), "message {message:?} should name {field} for {body}");
    }
    // Malformed JSON.
    let r = app.admin(Method::POST, "/rooms").header("content-type", "application/json").body("{\"id\":").send().await.unwrap();
    assert_eq!(error_of(r).await.0, 400);
    // Over 64 KiB.
    let big = json!({"id": "big", "name": "x".repeat(70 * 1024), "origin": "https://o.example", "rate_per_minute": 1});
    let r = app.admin(Method::POST, "/rooms").json(&big).send().await.unwrap();
    assert_eq!(error_of(r).await.0, 413);
    // Duplicate id.
    app.create_room(room("dup")).await;
    let r = app.admin(Method::POST, "/rooms").json(&room("dup")).send().await.unwrap();
    assert_eq!(error_of(r).await.0, 409);
    // Bad patch and unknown room.
    let r = app.admin(Method::PATCH, "/rooms/dup").json(&json!({"rate_per_minute": 1e12})).send().await.unwrap();
    let (status, _, message) = error_of(r).await;
    assert_eq!(status, 400);
    assert!(message.contains("rate_per_minute"));
    let r = app.admin(Method::PATCH, "/rooms/nope").json(&json!({"rate_per_minute": 1})).send().await.unwrap();
    assert_eq!(error_of(r).await.0, 404);
    let r = app.admin(Method::DELETE, "/rooms/nope").send().await.unwrap();
    assert_eq!(error_of(r).await.0, 404);
    // Unknown route keeps the JSON shape.
    let r = app.http.get(app.url("/no/such/route")).send().await.unwrap();
    assert_eq!(error_of(r).await.0, 404);
}

#[tokio::test]
async fn one_body_limit_covers_every_admin_route() {
    let app = TestApp::builder().config(|c| c.limits.admin_body_bytes = 1024).start().await;
    let padding = "x".repeat(4 * 1024);
    for (path, body) in [
        ("/rooms", json!({"id": "big", "name": padding, "origin": "https://o.example", "rate_per_minute": 1})),
        ("/apps", json!({"id": "big", "webhooks": [{"url": format!("https://h.example/{padding}")}]})),
    ] {
        let r = app.admin(Method::POST, path).json(&body).send().await.unwrap();
        assert_eq!(error_of(r).await.0, 413, "{path}");
    }
    // Under the limit, both are served.
    let r = app.admin(Method::POST, "/apps").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201);
}

/// Room webhooks: `queueing_started` once a line has formed, `state_changed` with both states,
/// `queueing_ended` after the calm, each signed with the endpoint's secret; an endpoint that
/// asks for some types gets only those. The room's clock is a manual one: the driver observes
/// every half second of real time, and each observation reads the time set here.
#[tokio::test]
async fn room_webhooks_tell_queueing_and_state_changes_signed() {
    use std::time::Duration;
    let clock = weir::clock::ManualClock::at(1_900_000_000_000);
    let app = TestApp::builder().manual_clock(clock.clone()).start().await;
    let (all_url, all) = rt::webhook_receiver(0).await;
    let (states_url, states) = rt::webhook_receiver(0).await;
    const SECRET: &str = "a-secret-of-24-characters";
    let hooks = json!([
        {"url": all_url, "secret": SECRET},
        {"url": states_url, "secret": "another-secret-16+", "event_types": ["state_changed"]},
    ]);
    // Nobody is admitted at a rate of 0: the first visitor in line is a queue.
    let created = app.create_room(json!({"id": "hooked", "origin": "https://shop.example", "rate_per_minute": 0, "webhooks": hooks})).await;
    assert_eq!(created["webhooks"][1]["event_types"], json!(["state_changed"]));
    app.visitor().enter("hooked").await;

    // Events as received, in order: (name, the whole event); each request's signature checked.
    let received = |seen: &rt::Hooks, secret: &str| -> Vec<(String, Value)> {
        seen.lock()
            .iter()
            .flat_map(|(headers, body)| {
                assert_eq!(headers["x-weir-room"], "hooked");
                assert_eq!(headers["x-weir-signature"].to_str().unwrap(), weir::realtime::signature::hmac_hex(secret, body), "signed with the secret");
                let v: Value = serde_json::from_str(body).unwrap();
                v["events"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap().to_string(), e.clone())).collect::<Vec<_>>()
            })
            .collect()
    };
    let names = |events: &[(String, Value)]| events.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    // Moves the clock on until `seen` holds `want` events.
    let advance_until = |seen: rt::Hooks, step_ms: i64, want: usize| {
        let clock = clock.clone();
        async move {
            support::eventually(Duration::from_secs(15), || {
                let (clock, seen) = (clock.clone(), seen.clone());
                async move {
                    if seen.lock().iter().map(|(_, b)| serde_json::from_str::<Value>(b).unwrap()["events"].as_array().unwrap().len()).sum::<usize>() >= want {
                        return Some(());
                    }
                    clock.advance_ms(step_ms);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
            })
            .await
        }
    };
    advance_until(all.clone(), 1_000, 1).await;
    let events = received(&all, SECRET);
    assert_eq!(names(&events), ["queueing_started"]);
    let (_, started) = &events[0];
    assert_eq!((started["room"].as_str(), started["queue_length"].as_u64(), started["rate_per_minute"].as_f64()), (Some("hooked"), Some(1), Some(0.0)));
    assert!(started["time_ms"].as_i64().unwrap() >= 1_900_000_005_000, "after 5 s of queue: {started}");

    let patch = |body: Value| app.admin(Method::PATCH, "/rooms/hooked").json(&body).send();
    assert_eq!(patch(json!({"state": "paused"})).await.unwrap().status(), 200);
    support::eventually(Duration::from_secs(10), || async { (received(&states, "another-secret-16+").len() == 1).then_some(()) }).await;
    let (_, changed) = &received(&states, "another-secret-16+")[0];
    assert_eq!((changed["name"].as_str(), changed["from"].as_str(), changed["to"].as_str()), (Some("state_changed"), Some("open"), Some("paused")));

    // Open again, with room for everyone: the line empties, and after the calm the queue ends.
    assert_eq!(patch(json!({"state": "open", "rate_per_minute": 600000})).await.unwrap().status(), 200);
    support::eventually(Duration::from_secs(10), || async {
        let r: Value = app.admin(Method::GET, "/rooms/hooked").send().await.unwrap().json().await.unwrap();
        (r["stats"]["queue_length"] == 0).then_some(())
    })
    .await;
    advance_until(all.clone(), 10_000, 4).await;
    assert_eq!(names(&received(&all, SECRET)), ["queueing_started", "state_changed", "state_changed", "queueing_ended"]);
    assert_eq!(names(&received(&states, "another-secret-16+")), ["state_changed", "state_changed"], "only the types it asked for");

    // Bad webhooks are refused naming the field; `[]` removes them.
    let r = patch(json!({"webhooks": [{"url": "https://ops.example/h", "secret": "short"}]})).await.unwrap();
    let (status, code, message) = error_of(r).await;
    assert_eq!((status, code.as_str()), (400, "invalid_field"));
    assert!(message.starts_with("webhooks[0].secret"), "{message}");
    let r = patch(json!({"webhooks": [{"url": "mailto:ops@example.com", "secret": SECRET}]})).await.unwrap();
    assert!(error_of(r).await.2.starts_with("webhooks[0].url"));
    let r: Value = patch(json!({"webhooks": []})).await.unwrap().json().await.unwrap();
    assert!(r.get("webhooks").is_none(), "{r}");
}
