//! Visitor flow through the real routes: tickets, cookies, deep links, each room state,
//! admission order and redirects.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::{token_from_redirect, TestApp, Visitor};
use weir::clock::ManualClock;

const ORIGIN: &str = "http://127.0.0.1:9/shop";

fn room(id: &str, rate: f64) -> Value {
    json!({"id": id, "name": "The <Sale>", "origin": ORIGIN, "rate_per_minute": rate})
}

#[tokio::test]
async fn a_visitor_keeps_its_ticket_and_a_tampered_cookie_is_a_new_visitor() {
    let app = TestApp::start().await;
    app.create_room(room("sale", 0.0)).await;
    let mut a = app.visitor();
    let first = a.enter("sale").await;
    assert_eq!(first["ticket"], 1);
    assert_eq!(first["position"], 0);
    assert_eq!(first["admitted"], false);
    assert_eq!(first["eta_seconds"], Value::Null, "rate 0: nobody moves, no ETA");
    let cookie = a.cookie("weir_v_sale").expect("visitor cookie");
    // Reload and a new tab (same cookie jar) keep the ticket.
    assert_eq!(a.enter("sale").await["ticket"], 1);
    assert_eq!(a.status("sale").await["ticket"], 1);

    let mut b = app.visitor();
    assert_eq!(b.enter("sale").await["ticket"], 2);
    assert_eq!(b.status("sale").await["position"], 1);

    // Tampered: ticket 2's cookie edited to claim ticket 1 → treated as new (ticket 3), no error.
    let mut forger = app.visitor();
    let forged = b.cookie("weir_v_sale").unwrap().replacen(".2.", ".1.", 1);
    forger.cookies.push(("weir_v_sale".into(), forged));
    assert_eq!(forger.enter("sale").await["ticket"], 3);
    // Garbage and a cookie of another room are ignored too.
    let mut junk = app.visitor();
    junk.cookies.push(("weir_v_sale".into(), "%%%garbage".into()));
    assert_eq!(junk.enter("sale").await["ticket"], 4);
    app.create_room(room("other", 0.0)).await;
    let mut foreign = app.visitor();
    foreign.cookies.push(("weir_v_other".into(), cookie.clone()));
    assert_eq!(foreign.enter("other").await["ticket"], 1);

    // The cookie is HttpOnly + SameSite=Lax.
    let r = app.visitor().get("/r/sale", true).await;
    let set = r.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Lax"), "{set}");

    // Status without a ticket is a clear 401, unknown rooms 404.
    let r = app.visitor().get("/r/sale/status", true).await;
    assert_eq!(r.status(), 401);
    let r = app.visitor().get("/r/nope/status", true).await;
    assert_eq!(r.status(), 404);
    let r = app.visitor().get("/r/nope", false).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn concurrent_entries_get_distinct_gapless_tickets_and_are_admitted_in_order() {
    let app = TestApp::start().await;
    app.create_room(room("rush", 0.0)).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut v = app.visitor();
        tasks.push(tokio::spawn(async move {
            let s = v.enter("rush").await;
            (s["ticket"].as_u64().unwrap(), v)
        }));
    }
    let mut visitors: Vec<(u64, Visitor)> = Vec::new();
    for t in tasks {
        visitors.push(t.await.unwrap());
    }
    let tickets: HashSet<u64> = visitors.iter().map(|(t, _)| *t).collect();
    assert_eq!(tickets, (1..=200).collect::<HashSet<_>>(), "200 distinct tickets, no gaps");
    visitors.sort_by_key(|(t, _)| *t);

    // Open the gate at 6000/min (100/s) and watch order: whenever a ticket is admitted, every
    // lower ticket is too.
    app.admin(Method::PATCH, "/rooms/rush").json(&json!({"rate_per_minute": 6000})).send().await.unwrap();
    // Sampled from the highest ticket down: the counter only moves forward, so once a ticket
    // is seen admitted, every lower ticket sampled after it must be admitted too.
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut statuses = Vec::new();
        for (_, v) in visitors.iter_mut().rev() {
            statuses.push(v.status("rush").await["admitted"].as_bool().unwrap());
        }
        let first_admitted = statuses.iter().position(|a| *a).unwrap_or(statuses.len());
        assert!(statuses[first_admitted..].iter().all(|a| *a), "admitted out of order (highest ticket first): {statuses:?}");
        if first_admitted == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "not all admitted in time");
    }
    let stats = app.room("rush").await["stats"].clone();
    assert_eq!((stats["serving"].as_u64(), stats["queue_length"].as_u64()), (Some(200), Some(0)));
}

#[tokio::test]
async fn admitted_visitor_is_redirected_with_a_token_and_deep_link() {
    let app = TestApp::start().await;
    app.create_room(room("fast", 600_000.0)).await;
    let mut v = app.visitor();
    let r = v.get("/r/fast?to=/cart/42%3Fsize%3DM", false).await;
    assert_eq!(r.status(), 200, "first answer is the waiting page");
    let body = r.text().await.unwrap();
    assert!(body.contains("The &lt;Sale&gt;"), "room name is shown, escaped");
    assert!(body.contains("http-equiv=\"refresh\""), "the page refreshes itself");
    let status = v.wait_admitted("fast", Duration::from_secs(10)).await;
    let url = status["redirect_url"].as_str().unwrap();
    assert!(url.starts_with("http://127.0.0.1:9/cart/42?size=M&weir_token="), "{url}");
    assert!(v.cookie("weir_token").is_some(), "token also set as a cookie");
    // The HTML entry now answers with the redirect.
    let r = v.get("/r/fast", false).await;
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let token = token_from_redirect(&location);
    let verdict: Value = app.http.post(app.url("/api/v1/verify")).json(&json!({"token": token, "room": "fast"})).send().await.unwrap().json().await.unwrap();
    assert_eq!(verdict["valid"], true, "{verdict}");
    assert_eq!(verdict["claims"]["aud"], ORIGIN);
    assert_eq!(verdict["claims"]["ticket"], 1);
}

#[tokio::test]
async fn open_redirects_are_refused() {
    let app = TestApp::start().await;
    app.create_room(room("safe", 600_000.0)).await;
    for bad in ["https://evil.example/", "//evil.example/x", "/%5Cevil.example", "javascript:alert(1)"] {
        let mut v = app.visitor();
        v.get(&format!("/r/safe?to={}", bad.replace('/', "%2F").replace(':', "%3A")), true).await;
        let s = v.wait_admitted("safe", Duration::from_secs(10)).await;
        let url = s["redirect_url"].as_str().unwrap();
        assert!(url.starts_with("http://127.0.0.1:9/shop?weir_token="), "{bad} led to {url}");
    }
}

#[tokio::test]
async fn paused_closed_and_passthrough_rooms() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "p", "origin": ORIGIN, "rate_per_minute": 600000, "state": "paused"})).await;
    let mut v = app.visitor();
    let s = v.enter("p").await;
    assert_eq!((s["state"].as_str(), s["admitted"].as_bool(), s["eta_seconds"].is_null()), (Some("paused"), Some(false), true));
    let page = v.get("/r/p", false).await.text().await.unwrap();
    assert!(page.contains("paused"), "paused page");
    // Stay paused across many driver ticks: nobody admitted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(v.status("p").await["admitted"], false);
    assert_eq!(app.room("p").await["stats"]["serving"], 0);
    // Reopening admits live.
    app.admin(Method::PATCH, "/rooms/p").json(&json!({"state": "open"})).send().await.unwrap();
    v.wait_admitted("p", Duration::from_secs(10)).await;

    app.create_room(json!({"id": "c", "origin": ORIGIN, "rate_per_minute": 0, "state": "closed"})).await;
    let mut late = app.visitor();
    let r = late.get("/r/c", false).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("ended or is sold out"));
    assert!(late.cookie("weir_v_c").is_none(), "closed rooms issue no tickets");
    assert_eq!(app.room("c").await["stats"]["last_ticket"], 0);

    app.create_room(json!({"id": "t", "origin": ORIGIN, "rate_per_minute": 0, "state": "passthrough"})).await;
    let r = app.visitor().get("/r/t?to=/deep", false).await;
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap();
    assert!(location.starts_with("http://127.0.0.1:9/shop?weir_token="), "{location}");
    let json = app.visitor().enter("t").await;
    assert_eq!(json["admitted"], true);
}

#[tokio::test]
async fn scheduled_room_counts_down_then_admits() {
    let clock = ManualClock::at(1_900_000_000_000);
    let app = TestApp::builder().manual_clock(clock.clone()).start().await;
    let starts_at = "2030-03-17T17:47:00Z"; // 1_900_000_020_000 ms: 20 s after "now"
    app.create_room(json!({"id": "drop", "origin": ORIGIN, "rate_per_minute": 600000, "starts_at": starts_at})).await;
    let mut v = app.visitor();
    let s = v.enter("drop").await;
    assert_eq!(s["state"], "scheduled");
    assert_eq!(s["ticket"], 1, "entrants before the start get tickets");
    assert!(s["eta_seconds"].as_u64().unwrap() >= 20);
    let page = v.get("/r/drop", false).await.text().await.unwrap();
    assert!(page.contains("The queue opens at"), "countdown page");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(v.status("drop").await["admitted"], false, "nobody admitted before the start");
    clock.advance_ms(21_000);
    v.wait_admitted("drop", Duration::from_secs(10)).await;
    assert_eq!(app.room("drop").await["state"], "open", "the start is persisted as open");
}
