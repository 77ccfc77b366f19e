//! Visitor pages: branding through the admin API, languages, custom templates (validation and
//! fallback), the page script's caching and compression, and coalesced counter publishes on
//! the room channel of weir's internal realtime app.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, TestApp};
use tokio_tungstenite::tungstenite::Message;

async fn page(app: &TestApp, room: &str, accept_language: Option<&str>) -> (reqwest::StatusCode, String) {
    let mut req = app.http.get(app.url(&format!("/r/{room}")));
    if let Some(l) = accept_language {
        req = req.header("accept-language", l);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test]
async fn branding_is_validated_and_shown() {
    let app = TestApp::start().await;
    for (branding, field) in [
        (json!({"primary_color": "red"}), "branding.primary_color"),
        (json!({"background_color": "#12345"}), "branding.background_color"),
        (json!({"logo_url": "javascript:alert(1)"}), "branding.logo_url"),
        (json!({"title": "x".repeat(201)}), "branding.title"),
        (json!({"text": "x".repeat(2001)}), "branding.text"),
        (json!({"language": "tlh"}), "branding.language"),
        (json!({"colour": "#ffffff"}), "branding"),
    ] {
        let r = app
            .admin(Method::POST, "/rooms")
            .json(&json!({"id": "b", "origin": "https://o.example", "rate_per_minute": 1, "branding": branding}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{branding}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(field), "{body}");
    }
    let branding = json!({"title": "Big <Sale>", "text": "Hold on", "primary_color": "#c2410c",
        "background_color": "#fff7ed", "logo_url": "https://cdn.example/logo.svg"});
    let room = app.create_room(json!({"id": "b", "origin": "https://o.example", "rate_per_minute": 0, "branding": branding})).await;
    assert_eq!(room["branding"]["primary_color"], "#c2410c");
    let (status, html) = page(&app, "b", None).await;
    assert_eq!(status, 200);
    assert!(html.contains("Big &lt;Sale&gt;"), "title escaped");
    assert!(html.contains("--primary:#c2410c") && html.contains("--bg:#fff7ed"));
    // minijinja's HTML escaping writes `/` as `&#x2f;`, which attributes decode.
    assert!(html.contains(r#"<img src="https:&#x2f;&#x2f;cdn.example&#x2f;logo.svg""#), "{html}");
    assert!(html.contains(r#"aria-live="polite""#));
    // PATCH replaces the branding.
    let r = app.admin(Method::PATCH, "/rooms/b").json(&json!({"branding": {"title": "New"}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, html) = page(&app, "b", None).await;
    assert!(html.contains("<h1>New</h1>") && !html.contains("c2410c"));
}

#[tokio::test]
async fn language_follows_accept_language_unless_the_room_sets_one() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "l", "origin": "https://o.example", "rate_per_minute": 0})).await;
    let (_, en) = page(&app, "l", None).await;
    assert!(en.contains(r#"<html lang="en">"#) && en.contains("People ahead of you"));
    let (_, de) = page(&app, "l", Some("de-CH, de;q=0.9, en;q=0.5")).await;
    assert!(de.contains(r#"<html lang="de">"#) && de.contains("Personen vor Ihnen"));
    let (_, es) = page(&app, "l", Some("es-MX")).await;
    assert!(es.contains("Personas delante de usted"));
    let (_, weird) = page(&app, "l", Some(";;;q=,,,=-é")).await;
    assert!(weird.contains(r#"<html lang="en">"#));
    app.admin(Method::PATCH, "/rooms/l").json(&json!({"branding": {"language": "fr"}})).send().await.unwrap();
    let (_, fr) = page(&app, "l", Some("de")).await;
    assert!(fr.contains(r#"<html lang="fr">"#) && fr.contains("Personnes devant vous"));
    // Unknown rooms get a localized 404 page, not a 500.
    let (status, html) = page(&app, "nope", Some("de")).await;
    assert_eq!(status, 404);
    assert!(html.contains("Diesen Warteraum gibt es nicht"));
}

#[tokio::test]
async fn custom_templates_are_validated_and_never_take_a_room_down() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "c", "origin": "https://o.example", "rate_per_minute": 0})).await;
    let put = |body: String| app.admin(Method::PUT, "/rooms/c/template").body(body).send();

    let r = put("<p>fine</p>\n<p>{% if %}</p>".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().starts_with("template: line 2"), "{e}");

    let r = put("ok\n\n{{ position | no_such_filter }}".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("line 3"), "{e}");

    let r = put("x".repeat(70 * 1024)).await.unwrap();
    assert_eq!(r.status(), 413);

    // Small source, huge page: refused, naming the size.
    let r = put("{{ 'x' * 100000000 }}".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("at most 262144"), "{e}");

    let r = app.admin(Method::PUT, "/rooms/nope/template").body("x").send().await.unwrap();
    assert_eq!(r.status(), 404);

    let custom = "<!doctype html><html><head>{{ weir_head }}</head><body><h1 id=custom>{{ title }}</h1>\
        {% if page == 'waiting' %}<p id=position>{{ position }}</p>{% endif %}\
        {% if position == 0 %}{{ 1 // 0 }}{% endif %}{% if position == 3 %}{{ 'x' * 300000 }}{% endif %}</body></html>";
    let r = put(custom.into()).await.unwrap();
    assert_eq!(r.status(), 204);

    // The first visitor (position 0) hits the template's runtime error: built-in page instead.
    let (status, html) = page(&app, "c", None).await;
    assert_eq!(status, 200);
    assert!(!html.contains("id=custom") && html.contains("People ahead of you"), "{html}");
    // The second visitor (position 1) gets the custom page, with the live-update script.
    let (status, html) = page(&app, "c", None).await;
    assert_eq!(status, 200);
    assert!(html.contains("<h1 id=custom>c</h1>") && html.contains("id=position>1<"), "{html}");
    assert!(html.contains(r#"id="weir-config""#) && html.contains("/_weir/static/room.js?v="));
    // A custom page is compressed per request, for a client that takes gzip.
    let r = app.http.get(app.url("/r/c")).header("accept-encoding", "gzip").send().await.unwrap();
    assert_eq!((r.headers()["content-encoding"].to_str().unwrap(), r.headers()["vary"].to_str().unwrap()), ("gzip", "accept-encoding"));
    assert!(gunzip(&r.bytes().await.unwrap()).contains("id=position>2<"));
    // The fourth (position 3) would get a page over the size cap: the built-in page instead.
    let (status, html) = page(&app, "c", None).await;
    assert_eq!(status, 200);
    assert!(!html.contains("id=custom") && html.contains("People ahead of you") && html.len() < 64 * 1024);

    // A PATCH of the branding keeps the template; DELETE removes it.
    app.admin(Method::PATCH, "/rooms/c").json(&json!({"branding": {"title": "T"}})).send().await.unwrap();
    assert!(page(&app, "c", None).await.1.contains("<h1 id=custom>T</h1>"));
    let r = app.admin(Method::DELETE, "/rooms/c/template").send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(!page(&app, "c", None).await.1.contains("id=custom"));
}

#[tokio::test]
async fn page_script_is_cached_and_compressed() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "s", "origin": "https://o.example", "rate_per_minute": 0})).await;
    let (_, html) = page(&app, "s", None).await;
    let start = html.find("/_weir/static/room.js?v=").unwrap();
    let src = &html[start..start + html[start..].find('"').unwrap()];
    let r = app.http.get(app.url(src)).header("accept-encoding", "gzip, deflate, br").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.headers()["vary"], "accept-encoding");
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    let gzip_etag = r.headers()["etag"].clone();
    let script = gunzip(&r.bytes().await.unwrap());
    let plain = app.http.get(app.url(src)).send().await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    assert_ne!(plain.headers()["etag"], gzip_etag, "each encoding has its own ETag");
    assert_eq!(script, plain.text().await.unwrap(), "the compressed script is the script");
    let r = app.http.get(app.url(src)).header("accept-encoding", "gzip").header("if-none-match", gzip_etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    let r = app.http.get(app.url("/_weir/static/room.js")).send().await.unwrap();
    assert_eq!(r.headers()["cache-control"], "public, max-age=300");
    // The page itself is per visitor: never cached, but compressed (stitched from text
    // compressed once and the visitor's values, see `web::gzip`).
    let r = app.http.get(app.url("/r/s")).header("accept-encoding", "gzip, deflate, br").send().await.unwrap();
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.headers()["vary"], "accept-encoding");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let page = gunzip(&r.bytes().await.unwrap());
    assert!(page.contains(r#"id="weir-config""#) && page.trim_end().ends_with("</html>"), "{page}");
    // The script reloads the page at the no-JavaScript pace if it fails to load.
    assert!(page.contains(r#","refresh_ms":15000}</script>"#) && page.contains(r#"content="15">"#), "{page}");
    // The same visitor again, uncompressed: the same page but for the clock.
    let r = app.http.get(app.url("/r/s")).header("cookie", cookie).send().await.unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    let without_clock = |p: &str| {
        let (before, after) = p.split_once("\"now_ms\":").unwrap();
        format!("{before}{}", after.trim_start_matches(|c: char| c.is_ascii_digit()))
    };
    assert_eq!(without_clock(&page), without_clock(&r.text().await.unwrap()));
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(bytes), &mut text).unwrap();
    text
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next(ws: &mut Ws) -> Value {
    serde_json::from_str(&ws.next().await.unwrap().unwrap().into_text().unwrap()).unwrap()
}

/// Counter updates reach a plain Pusher client on `room-{id}` of the internal app, at most a
/// few per second however fast admission runs.
#[tokio::test]
async fn counter_publishes_are_coalesced() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "fast", "origin": "https://o.example", "rate_per_minute": 0})).await;
    for _ in 0..400 {
        app.visitor().enter("fast").await;
    }
    let url = format!("ws://{}/app/weir-internal?protocol=7&client=test&version=1", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next(&mut ws).await["event"], "pusher:connection_established");
    ws.send(Message::text(json!({"event": "pusher:subscribe", "data": {"channel": "room-fast"}}).to_string())).await.unwrap();
    assert_eq!(next(&mut ws).await["event"], "pusher_internal:subscription_succeeded");
    // 6000 per minute: the serving counter moves on every 100 ms tick.
    app.admin(Method::PATCH, "/rooms/fast").json(&json!({"rate_per_minute": 6000})).send().await.unwrap();
    let started = tokio::time::Instant::now();
    let mut events: Vec<(Duration, u64)> = Vec::new();
    while events.len() < 12 {
        let f = tokio::time::timeout(Duration::from_secs(10), next(&mut ws)).await.expect("counter events");
        if f["event"] == "weir:counter" {
            let d: Value = serde_json::from_str(f["data"].as_str().unwrap()).unwrap();
            assert_eq!(d["rate_per_minute"], 6000.0);
            events.push((started.elapsed(), d["serving"].as_u64().unwrap()));
        }
    }
    // The driver ticks every 100 ms but publishes at most every other tick (5 a second); the
    // bound is checked on average (delivery on a busy machine bunches single gaps), and the
    // counter only moves forward.
    for w in events.windows(2) {
        assert!(w[1].1 >= w[0].1, "{events:?}");
    }
    let span = (events.last().unwrap().0 - events[0].0).as_secs_f64();
    assert!((events.len() - 1) as f64 / span <= 6.0, "{events:?}");
    assert!(events.last().unwrap().1 > events[0].1);
    // The status endpoint agrees with what was broadcast.
    let stats = eventually(Duration::from_secs(5), || async { Some(app.room("fast").await) }).await;
    assert!(stats["stats"]["serving"].as_u64().unwrap() >= events.last().unwrap().1);
}
