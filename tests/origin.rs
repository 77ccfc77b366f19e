//! How an origin checks visitors: JWKS, /api/v1/verify, forward auth — including forged,
//! expired, foreign-room tokens and key rotation.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};
use support::{token_from_redirect, TestApp};
use weir::clock::ManualClock;

async fn admitted_token(app: &TestApp, room: &str) -> String {
    let mut v = app.visitor();
    v.enter(room).await;
    let s = v.wait_admitted(room, Duration::from_secs(10)).await;
    token_from_redirect(s["redirect_url"].as_str().unwrap())
}

async fn verify(app: &TestApp, body: Value) -> Value {
    let r = app.http.post(app.url("/api/v1/verify")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn auth(app: &TestApp, room: &str, header: (&str, String)) -> u16 {
    app.http.get(app.url(&format!("/auth/{room}"))).header(header.0, header.1).send().await.unwrap().status().as_u16()
}

fn rooms() -> [Value; 2] {
    [
        json!({"id": "a", "origin": "https://a.example", "rate_per_minute": 600000}),
        json!({"id": "b", "origin": "https://b.example", "rate_per_minute": 600000}),
    ]
}

#[tokio::test]
async fn verify_forward_auth_and_expiry() {
    let clock = ManualClock::at(1_900_000_000_000);
    let app = TestApp::builder().manual_clock(clock.clone()).config(|c| c.token_ttl_seconds = 600).start().await;
    for r in rooms() {
        app.create_room(r).await;
    }
    let token = admitted_token(&app, "a").await;

    // JWKS: ES256 key whose kid is in the token header.
    let jwks: Value = app.http.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    let header: Value = serde_json::from_slice(&B64.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert!(jwks["keys"].as_array().unwrap().iter().any(|k| k["kid"] == header["kid"] && k["crv"] == "P-256"));

    let ok = verify(&app, json!({"token": token})).await;
    assert_eq!(ok["valid"], true);
    for claim in ["iss", "aud", "sub", "room", "ticket", "iat", "exp"] {
        assert!(ok["claims"].get(claim).is_some(), "claim {claim}");
    }
    assert_eq!(ok["claims"]["iss"], app.base.as_str());
    assert_eq!(verify(&app, json!({"token": token, "room": "b"})).await["reason"], "wrong_room");
    assert_eq!(verify(&app, json!({"token": "abc.def"})).await["reason"], "malformed");
    let none = format!("{}.{}.", B64.encode(br#"{"alg":"none"}"#), token.split('.').nth(1).unwrap());
    assert_eq!(verify(&app, json!({"token": none})).await["valid"], false);
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut sig = B64.decode(parts[2]).unwrap();
    sig[0] ^= 0x40;
    let flipped = B64.encode(sig);
    parts[2] = &flipped;
    assert_eq!(verify(&app, json!({"token": parts.join(".")})).await["reason"], "bad_signature");
    // Bad bodies are 4xx, not 500.
    let r = app.http.post(app.url("/api/v1/verify")).header("content-type", "application/json").body("{").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = app.http.post(app.url("/api/v1/verify")).json(&json!({"tok": 1})).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Forward auth: bearer, cookie, original URI; other room, no token, unknown room.
    assert_eq!(auth(&app, "a", ("authorization", format!("Bearer {token}"))).await, 204);
    assert_eq!(auth(&app, "a", ("cookie", format!("x=1; weir_token={token}"))).await, 204);
    assert_eq!(auth(&app, "a", ("x-original-uri", format!("/shop?x=1&weir_token={token}"))).await, 204);
    assert_eq!(auth(&app, "a", ("x-forwarded-uri", format!("/shop?weir_token={token}"))).await, 204);
    assert_eq!(auth(&app, "b", ("authorization", format!("Bearer {token}"))).await, 401);
    assert_eq!(auth(&app, "a", ("authorization", format!("Bearer {none}"))).await, 401);
    assert_eq!(auth(&app, "zz", ("authorization", format!("Bearer {token}"))).await, 401);
    assert_eq!(app.http.get(app.url("/auth/a")).send().await.unwrap().status(), 401);
    let r = app.http.get(app.url("/auth/a?redirect=1")).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], format!("{}/r/a", app.base).as_str());
    // Forward auth is served in front of the router; what the router would do around it stays.
    assert_eq!(app.http.get(app.url("/auth/a/more")).send().await.unwrap().status(), 404);
    assert_eq!(app.http.head(app.url("/auth/a")).send().await.unwrap().status(), 401);
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("weir_http_requests_total{") && l.contains(r#"route="/auth/{room}""#) && l.contains(r#"status="204""#)),
        "forward auth is counted under its route"
    );

    // Past exp: refused everywhere.
    clock.advance_ms(601_000);
    assert_eq!(verify(&app, json!({"token": token})).await["reason"], "expired");
    assert_eq!(auth(&app, "a", ("authorization", format!("Bearer {token}"))).await, 401);
}

#[tokio::test]
async fn rotation_keeps_old_tokens_valid() {
    let app = TestApp::start().await;
    app.create_room(rooms()[0].clone()).await;
    let old = admitted_token(&app, "a").await;
    let rotated: Value = app.admin(Method::POST, "/keys/rotate").send().await.unwrap().json().await.unwrap();
    let new_kid = rotated["kid"].as_str().unwrap().to_string();
    let jwks: Value = app.http.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    assert_eq!(verify(&app, json!({"token": old})).await["valid"], true);
    let fresh = admitted_token(&app, "a").await;
    let header: Value = serde_json::from_slice(&B64.decode(fresh.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["kid"], new_kid.as_str());
    // Rotation needs the admin key.
    assert_eq!(app.http.post(app.url("/api/v1/keys/rotate")).send().await.unwrap().status(), 401);
}
