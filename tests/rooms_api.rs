//! Admin API for rooms: CRUD, statistics, and one test per bad-input class.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

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
