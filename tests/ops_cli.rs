//! Operations and the command line: health, readiness, metrics, zero-config first start,
//! graceful SIGTERM, invalid configuration, and the admin CLI against a live server.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;
#[path = "support/realtime.rs"]
mod rt;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::{weir_bin, Binary, TestApp, ADMIN_KEY};

#[tokio::test]
async fn health_ready_and_metrics() {
    let app = TestApp::start().await;
    assert_eq!(app.http.get(app.url("/healthz")).send().await.unwrap().status(), 200);
    let ready: Value = app.http.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["ready"], true);
    app.create_room(json!({"id": "m", "origin": "https://o.example", "rate_per_minute": 600000})).await;
    let mut v = app.visitor();
    v.enter("m").await;
    v.wait_admitted("m", std::time::Duration::from_secs(10)).await;
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in [
        "weir_room_queue_length{room=\"m\"}",
        "weir_room_admitted_total{room=\"m\"}",
        "weir_room_entries_total{room=\"m\"}",
        "weir_http_requests_total{",
        "weir_http_request_duration_seconds_bucket{",
        "route=\"/r/{room}\"",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}");
    }
}

#[tokio::test]
async fn stats_report_rooms_apps_history_and_top_talkers_behind_the_admin_key() {
    let app = TestApp::start().await;
    // Without the key, or with a wrong one: the JSON error, nothing else.
    let r = app.http.get(app.url("/api/v1/stats")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "unauthorized");
    let r = app.http.get(app.url("/api/v1/stats")).bearer_auth("not-the-key").send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A room nobody is admitted from, three visitors in it, and an app with traffic.
    app.create_room(json!({"id": "q", "name": "Queue", "origin": "https://o.example", "rate_per_minute": 0})).await;
    for _ in 0..3 {
        app.visitor().enter("q").await;
    }
    let creds = rt::create_app(&app, json!({})).await;
    let mut ws = rt::Ws::connect(&app, &creds.key).await;
    ws.subscribe("news").await;
    let api = rt::Api::new(&app, &creds);
    for i in 0..4 {
        api.trigger("news", "e", &i.to_string()).await;
        ws.recv_event("e").await;
    }
    api.trigger("nobody-listens", "e", "x").await;

    let r = app.admin(reqwest::Method::GET, "/stats").header("accept-encoding", "gzip").send().await.unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip", "the history compresses well");
    let stats = |app: &TestApp| {
        let request = app.admin(reqwest::Method::GET, "/stats");
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    // The sampler has caught up with the queue and the traffic (it samples once a second, and
    // a rate needs a sample before the messages and one after).
    let v = support::eventually(Duration::from_secs(10), || async {
        let v = stats(&app).await;
        let latest = |series: &str| v["history"][series].as_array().and_then(|a| a.last().cloned());
        let delivered = v["history"]["messages_per_second"].as_array()?.iter().any(|m| m.as_f64() > Some(0.0));
        (latest("queue_length") == Some(json!(3)) && latest("connections").and_then(|c| c.as_u64()) >= Some(1) && delivered).then_some(v)
    })
    .await;
    let room = &v["rooms"][0];
    assert_eq!((room["id"].as_str(), room["name"].as_str(), room["state"].as_str()), (Some("q"), Some("Queue"), Some("open")));
    assert_eq!(room["queue_length"], 3);
    assert_eq!(room["target_per_minute"], 0.0);
    let history = &v["history"];
    let points = history["t"].as_array().unwrap().len();
    assert!((1..=300).contains(&points));
    for series in ["queue_length", "admitted_per_minute", "origin_latency_ms", "connections", "messages_per_second"] {
        assert_eq!(history[series].as_array().unwrap().len(), points, "{series} is aligned with t");
    }
    assert_eq!(history["rooms"]["q"]["queue_length"].as_array().unwrap().last(), Some(&json!(3)));
    assert_eq!(history["origin_latency_ms"].as_array().unwrap().last(), Some(&Value::Null), "no room probes its origin");
    let ours = v["realtime"]["apps"].as_array().unwrap().iter().find(|a| a["id"] == creds.id.as_str()).unwrap();
    assert_eq!(ours["connections"], 1);
    assert!(v["realtime"]["connections"].as_u64().unwrap() >= 1);

    // Top talkers over the last minute: the channel by events, the app by messages delivered,
    // the loopback address by tickets and connections.
    let top = &v["top"];
    assert_eq!(top["window_seconds"], 60);
    let channels = top["channels"].as_array().unwrap();
    assert_eq!(channels[0], json!({"app": creds.id, "channel": "news", "count": 4}));
    assert!(channels.contains(&json!({"app": creds.id, "channel": "nobody-listens", "count": 1})));
    assert!(top["apps"].as_array().unwrap().contains(&json!({"app": creds.id, "count": 4})));
    assert_eq!(top["ips"][0]["ip"], "127.0.0.1");
    assert!(top["ips"][0]["count"].as_u64().unwrap() >= 4, "three tickets and a connection: {}", top["ips"]);

    // A room created later has a series as long as the others, null before it existed.
    app.create_room(json!({"id": "late", "origin": "https://o.example", "rate_per_minute": 0})).await;
    let v = support::eventually(Duration::from_secs(10), || async {
        let v = stats(&app).await;
        (v["history"]["rooms"]["late"]["queue_length"].as_array()?.last() == Some(&json!(0))).then_some(v)
    })
    .await;
    let late = v["history"]["rooms"]["late"]["queue_length"].as_array().unwrap();
    assert_eq!(late.len(), v["history"]["t"].as_array().unwrap().len());
    assert_eq!(late[0], Value::Null, "no value before the room existed");
}

#[tokio::test]
async fn stats_since_answers_only_newer_samples_and_refuses_a_bad_time() {
    let app = TestApp::start().await;
    app.create_room(json!({"id": "s", "origin": "https://o.example", "rate_per_minute": 0})).await;
    let get = |query: &str| {
        let request = app.admin(reqwest::Method::GET, &format!("/stats{query}"));
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let times = |v: &Value| -> Vec<i64> { v["history"]["t"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect() };
    // Two samples at least, so that the oldest can be asked after.
    let whole = support::eventually(Duration::from_secs(10), || async {
        let (_, v) = get("").await;
        (times(&v).len() >= 2).then_some(v)
    })
    .await;
    assert_eq!(whole["history"]["full"], true);
    assert_eq!(whole["history_len"], 300);
    let t = times(&whole);
    let (_, v) = get(&format!("?since={}", t[0])).await;
    assert_eq!(v["history"]["full"], false);
    let newer = times(&v);
    assert_eq!(newer[..t.len() - 1], t[1..], "the samples after the oldest, in order");
    assert!(newer.iter().all(|x| *x > t[0]));
    for series in ["queue_length", "connections", "messages_per_second"] {
        assert_eq!(v["history"][series].as_array().unwrap().len(), newer.len(), "{series} is aligned with t");
    }
    assert_eq!(v["history"]["rooms"]["s"]["queue_length"].as_array().unwrap().len(), newer.len());
    // A time the ring no longer reaches (or never did) gets the whole history again.
    let (_, v) = get("?since=1").await;
    assert_eq!(v["history"]["full"], true);
    assert!(times(&v).len() >= t.len());

    for bad in ["?since=-5", "?since=soon", "?since=1.5", "?window=60"] {
        let (status, v) = get(bad).await;
        assert_eq!(status, 400, "{bad}");
        assert!(["invalid_field", "bad_request"].contains(&v["error"]["code"].as_str().unwrap()), "{bad}: {v}");
    }
    let (_, v) = get("?since=-5").await;
    assert_eq!(v["error"]["code"], "invalid_field");
    assert!(v["error"]["message"].as_str().unwrap().contains("since"), "{v}");
}

#[tokio::test]
async fn the_dashboard_page_is_served_with_a_strict_policy_and_holds_no_secret() {
    let app = TestApp::start().await;
    let r = app.http.get(app.url("/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let html = r.text().await.unwrap();
    assert!(html.contains("/_weir/static/dashboard.js"));
    assert!(!html.contains(ADMIN_KEY));
    let js = app.http.get(app.url("/_weir/static/dashboard.js")).send().await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    assert!(js.text().await.unwrap().contains("/api/v1/stats"));
}

/// `weir serve` with no admin key configured; returns the child and its stdout lines.
fn zero_config_serve(data: &std::path::Path) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) {
    use std::io::BufRead;
    let mut child = Command::new(weir_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_remove("WEIR_ADMIN_KEY")
        .env("WEIR_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

#[test]
fn zero_config_first_start_generates_and_persists_secrets_and_sigterm_is_graceful() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, mut lines) = zero_config_serve(&data);
    let first = lines.next().unwrap().unwrap();
    let key = first.strip_prefix("weir: generated admin key ").expect("admin key printed at first start").to_string();
    let second = lines.next().unwrap().unwrap();
    assert!(second.contains(&data.join("admin.key").display().to_string()), "says where it is stored: {second}");
    assert_eq!(std::fs::read_to_string(data.join("admin.key")).unwrap().trim(), key);
    assert!(lines.next().unwrap().unwrap().starts_with("weir: listening on http://"));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success(), "SIGTERM exits cleanly");

    // Second start: no new key printed, same key kept.
    let (mut child, mut lines) = zero_config_serve(&data);
    assert!(lines.next().unwrap().unwrap().starts_with("weir: listening on"), "key is printed only once");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(data.join("admin.key")).unwrap().trim(), key);
}

#[test]
fn invalid_configuration_names_the_field() {
    let out = Command::new(weir_bin())
        .args(["serve", "--listen", "not-an-address", "--data-dir", "/tmp/unused-weir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");
    let out = Command::new(weir_bin()).args(["serve"]).env("WEIR_TOKEN_TTL_SECONDS", "0").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_ttl_seconds"));
    let out = Command::new(weir_bin()).args(["serve"]).env("WEIR_LIMITS_TURN_MS", "0").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.turn_ms"));
    let out = Command::new(weir_bin()).args(["serve"]).env("WEIR_LIMITS_LINE_WAIT_MS", "600000").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.line_wait_ms"));
    let out = Command::new(weir_bin()).args(["serve"]).env("WEIR_TLS_CA_FILE", "/nonexistent/ca.pem").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls_ca_file") && err.contains("/nonexistent/ca.pem"), "{err}");
}

fn cli(base: &str, args: &[&str]) -> std::process::Output {
    Command::new(weir_bin()).args(args).args(["--server", base]).env("WEIR_ADMIN_KEY", ADMIN_KEY).output().unwrap()
}

#[test]
fn cli_drives_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::serve(dir.path(), &[]);
    let base = server.base.as_str();
    let out = cli(base, &["room", "create", "launch", "--origin", "https://o.example", "--rate", "120", "--name", "Launch"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID") && table.contains("launch") && table.contains("120"), "{table}");

    let out = cli(base, &["room", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["rooms"][0]["id"], "launch");

    let out = cli(base, &["room", "set", "launch", "--state", "paused", "--json"]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"], "paused");
    let out = cli(base, &["room", "show", "launch", "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["rate_per_minute"], 120.0);

    // Policies through the CLI.
    let out = cli(base, &[
        "room", "set", "launch", "--max-active-users", "50", "--abandon-after-seconds", "90", "--pow-difficulty", "4",
        "--safety-net", "true", "--per-ip-entries-per-minute", "10",
        "--adaptive", r#"{"probe_url":"http://127.0.0.1:9/health","target_latency_ms":300,"min_per_minute":10,"max_per_minute":500}"#,
        "--bypass", r#"{"cidrs":["10.0.0.0/8"]}"#,
        "--webhooks", r#"[{"url":"http://127.0.0.1:9/hook","secret":"sixteen-chars-ok","event_types":["state_changed"]}]"#, "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let room: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((room["max_active_users"].as_u64(), room["pow_difficulty"].as_u64(), room["safety_net"].as_bool()), (Some(50), Some(4), Some(true)));
    assert_eq!(room["adaptive"]["max_per_minute"], 500.0);
    assert_eq!(room["webhooks"][0]["event_types"], json!(["state_changed"]));
    let out = cli(base, &["room", "show", "launch"]);
    let details = String::from_utf8_lossy(&out.stdout);
    assert!(details.contains("stats.active_users") && details.contains("stats.live_waiters"), "{details}");
    let out = cli(base, &["room", "set", "launch", "--adaptive", "null", "--bypass", "null", "--webhooks", "[]", "--json"]);
    let room: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(room.get("adaptive").is_none() && room.get("bypass").is_none() && room.get("webhooks").is_none());

    // The dashboard's data as tables, and whole with --json.
    let out = cli(base, &["stats"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables = String::from_utf8_lossy(&out.stdout);
    assert!(tables.starts_with("ROOM") && tables.contains("launch") && tables.contains("top talkers, last 60 s"), "{tables}");
    let out = cli(base, &["stats", "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["rooms"][0]["id"], "launch");
    assert!(stats["history"]["t"].is_array());

    // Failing calls print the server's message and exit non-zero.
    let out = cli(base, &["room", "create", "launch", "--origin", "https://o.example", "--rate", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = cli(base, &["room", "set", "launch", "--rate=-3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rate_per_minute"));
    let out = Command::new(weir_bin()).args(["room", "list", "--server", base]).env("WEIR_ADMIN_KEY", "wrong-key-wrong-key").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin key"));

    let out = cli(base, &["keys", "rotate"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("new signing key"));
    let out = cli(base, &["room", "delete", "launch"]);
    assert!(out.status.success());
    let out = cli(base, &["room", "show", "launch"]);
    assert!(!out.status.success());
}

/// Sends a request head declaring a 10 GB body and no body, and reads the answer.
async fn declare_huge_body(app: &TestApp, method: &str, path: &str, bearer: Option<&str>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let auth = bearer.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
    let head = format!("{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{auth}content-length: 10000000000\r\nconnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // Answered before the (never sent) body, well within the request timeout.
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await.expect("answered at once").unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_body_declared_too_large_is_refused_before_it_is_sent() {
    let app = TestApp::start().await;
    let creds = rt::create_app(&app, json!({})).await;
    // The app's body limit is decided before the signature (which covers the body) is checked.
    let pusher = format!("/apps/{}/events", creds.id);
    for (method, path, bearer) in [
        ("POST", "/api/v1/rooms".to_string(), Some(ADMIN_KEY)),
        ("POST", "/api/v1/apps".to_string(), Some(ADMIN_KEY)),
        ("POST", "/api/v1/verify".to_string(), None),
        ("POST", pusher, None),
    ] {
        let (status, body) = declare_huge_body(&app, method, &path, bearer).await;
        assert_eq!(status, 413, "{path}");
        assert_eq!(body["error"]["code"], "payload_too_large", "{path}: {body}");
    }
    // The admin key is still checked first.
    assert_eq!(declare_huge_body(&app, "POST", "/api/v1/rooms", None).await.0, 401);
}

#[tokio::test]
async fn wrong_methods_and_undecodable_paths_get_the_json_error() {
    let app = TestApp::start().await;
    let creds = rt::create_app(&app, json!({})).await;
    let cases = [
        (reqwest::Method::POST, "/healthz".to_string(), 405, "method_not_allowed"),
        (reqwest::Method::PUT, "/api/v1/rooms".to_string(), 405, "method_not_allowed"),
        (reqwest::Method::GET, "/app/%FF?protocol=7".to_string(), 400, "bad_request"),
        (reqwest::Method::GET, format!("/apps/{}/channels/%FF", creds.id), 400, "bad_request"),
        (reqwest::Method::POST, "/users/%FF/terminate_connections".to_string(), 400, "bad_request"),
        (reqwest::Method::POST, "/r/%FF/socket".to_string(), 400, "bad_request"),
    ];
    for (method, path, status, code) in cases {
        let r = app.http.request(method.clone(), app.url(&path)).bearer_auth(ADMIN_KEY).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
    }
}

/// hyper answers what it cannot parse before weir's code runs; those answers get the JSON body
/// too, on a fresh connection and after a served request on the same one.
#[tokio::test]
async fn requests_hyper_cannot_parse_get_the_json_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start().await;
    let many_headers: String = (0..200).map(|i| format!("x-{i}: y\r\n")).collect();
    let cases = [
        (format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n"), 431, "headers_too_large"),
        (format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)), 414, "uri_too_long"),
        ("NOT HTTP\r\n\r\n".to_string(), 400, "bad_request"),
        ("GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nNOT HTTP\r\n\r\n".to_string(), 400, "bad_request"),
    ];
    for (request, status, code) in cases {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await.expect("answered and closed").unwrap();
        let text = String::from_utf8_lossy(&raw);
        // The last answer on the connection is the refusal.
        let last = &text[text.rfind("HTTP/1.1 ").unwrap()..];
        assert!(last.starts_with(&format!("HTTP/1.1 {status} ")), "{last}");
        let (head, body) = last.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_the_client_s_timeout_408_not_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::builder().config(|c| c.limits.request_timeout_ms = 300).start().await;
    for (path, auth) in [("/api/v1/verify", String::new()), ("/api/v1/rooms", format!("authorization: Bearer {ADMIN_KEY}\r\n"))] {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{auth}content-length: 100\r\n\r\n{{\"token\":");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await.expect("answered at the timeout").unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(text.contains("\"request_timeout\""), "{path}: {text}");
    }
}
