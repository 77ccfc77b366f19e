//! Operations and the command line: health, readiness, metrics, zero-config first start,
//! graceful SIGTERM, invalid configuration, and the admin CLI against a live server.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::process::Command;

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
        "--bypass", r#"{"cidrs":["10.0.0.0/8"]}"#, "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let room: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((room["max_active_users"].as_u64(), room["pow_difficulty"].as_u64(), room["safety_net"].as_bool()), (Some(50), Some(4), Some(true)));
    assert_eq!(room["adaptive"]["max_per_minute"], 500.0);
    let out = cli(base, &["room", "show", "launch"]);
    let details = String::from_utf8_lossy(&out.stdout);
    assert!(details.contains("stats.active_users") && details.contains("stats.live_waiters"), "{details}");
    let out = cli(base, &["room", "set", "launch", "--adaptive", "null", "--bypass", "null", "--json"]);
    let room: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(room.get("adaptive").is_none() && room.get("bypass").is_none());

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
