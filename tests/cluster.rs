//! Realtime across nodes: two (or three) weir nodes in this process share one real
//! `redis-server` (Debian package `redis-server`, which `scripts/test` installs), started on an
//! ephemeral loopback port for each test and stopped with it.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
#[path = "support/realtime.rs"]
mod rt;
#[path = "support/redis.rs"]
mod redis;
#[path = "support/tls.rs"]
mod tls;

use std::time::Duration;

use redis::Redis;

use rt::{data, Api, Creds, Ws};
use serde_json::{json, Value};
use support::{eventually, TestApp};
use weir::realtime::AppSpec;

fn creds() -> Creds {
    Creds { id: "4242".into(), key: "cluster-key".into(), secret: "cluster-secret".into() }
}

/// A node of the cluster on `redis`, with the app of [`creds`] (client events on).
async fn node(redis: &Redis) -> TestApp {
    node_trusting(redis, None).await
}

/// [`node`], trusting the certificate authorities of `ca_file` (for a Redis over TLS).
async fn node_trusting(redis: &Redis, ca_file: Option<std::path::PathBuf>) -> TestApp {
    node_with(redis, ca_file, |_| {}).await
}

/// [`node`], with `ca_file` trusted and the app's settings changed by `set`.
async fn node_with(redis: &Redis, ca_file: Option<std::path::PathBuf>, set: impl FnOnce(&mut AppSpec)) -> TestApp {
    let c = creds();
    let mut spec = AppSpec::new(c.id, c.key, c.secret);
    spec.client_events = true;
    set(&mut spec);
    let app = TestApp::builder()
        .config(|config| {
            config.cluster.redis_url = Some(redis.url());
            config.tls_ca_file = ca_file;
            config.apps = vec![spec];
        })
        .start()
        .await;
    app.ready().await;
    app
}

/// A fresh Redis and two nodes on it.
async fn two_nodes() -> (Redis, TestApp, TestApp) {
    let redis = Redis::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    (redis, a, b)
}

/// Waits until every node of `nodes` answers channel queries for all of them: each sees the
/// others' heartbeats and subscriptions.
async fn joined(nodes: &[&TestApp], channel: &str, subscriptions: usize) {
    for n in nodes {
        let api = Api::new(n, &creds());
        eventually(Duration::from_secs(10), || async {
            let r = api.get(&format!("/apps/{}/channels/{channel}", creds().id), &[("info", "subscription_count")]).await;
            let v: Value = r.json().await.ok()?;
            (v["subscription_count"] == subscriptions).then_some(())
        })
        .await;
    }
}

fn serial(v: &Value) -> u64 {
    v["serial"].as_u64().unwrap_or_else(|| panic!("no serial in {v}"))
}

#[tokio::test]
async fn events_published_on_any_node_reach_every_node_in_one_order_under_one_serial() {
    let (_redis, a, b) = two_nodes().await;
    let mut on_a = Ws::connect(&a, &creds().key).await;
    let mut on_b = Ws::connect(&b, &creds().key).await;
    on_a.subscribe("orders").await;
    on_b.subscribe("orders").await;
    joined(&[&a, &b], "orders", 2).await;
    let apis = [Api::new(&a, &creds()), Api::new(&b, &creds())];
    for i in 0..20 {
        apis[i % 2].trigger("orders", "placed", &i.to_string()).await;
    }
    let mut seen = Vec::new();
    for ws in [&mut on_a, &mut on_b] {
        let mut events = Vec::new();
        for _ in 0..20 {
            let e = ws.recv_event("placed").await;
            events.push((serial(&e), e["data"].as_str().unwrap().to_string()));
        }
        assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "serials increase: {events:?}");
        seen.push(events);
    }
    assert_eq!(seen[0], seen[1], "both nodes' clients saw the same events, serials and order");
    let sent: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(seen[0].iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(), sent);

    // `socket_id` excludes its connection on whichever node it is.
    apis[1].trigger_except("orders", "placed", "not-to-a", &on_a.socket_id).await;
    assert_eq!(on_b.recv_event("placed").await["data"], "not-to-a");
    on_a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn client_events_cross_nodes_and_skip_their_sender() {
    let (_redis, a, b) = two_nodes().await;
    let c = creds();
    let mut on_a = Ws::connect(&a, &c.key).await;
    let mut on_b = Ws::connect(&b, &c.key).await;
    assert_eq!(on_a.subscribe_private(&c, "private-chat").await["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(on_b.subscribe_private(&c, "private-chat").await["event"], "pusher_internal:subscription_succeeded");
    joined(&[&a, &b], "private-chat", 2).await;
    on_a.send(json!({"event": "client-typing", "channel": "private-chat", "data": {"who": "a"}})).await;
    let got = on_b.recv_event("client-typing").await;
    assert_eq!(data(&got), json!({"who": "a"}));
    on_a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn channel_queries_count_every_node_and_a_user_once() {
    let (_redis, a, b) = two_nodes().await;
    let c = creds();
    let mut u1_a = Ws::connect(&a, &c.key).await;
    let mut u2_b = Ws::connect(&b, &c.key).await;
    let mut u1_b = Ws::connect(&b, &c.key).await;
    for (ws, user) in [(&mut u1_a, "u1"), (&mut u2_b, "u2"), (&mut u1_b, "u1")] {
        assert_eq!(ws.subscribe_presence(&c, "presence-lobby", user).await["event"], "pusher_internal:subscription_succeeded");
    }
    let mut only_b = Ws::connect(&b, &c.key).await;
    only_b.subscribe("news").await;
    joined(&[&a, &b], "presence-lobby", 3).await;

    let api = Api::new(&a, &c);
    let v: Value = api.get(&format!("/apps/{}/channels/presence-lobby/users", c.id), &[]).await.json().await.unwrap();
    assert_eq!(v, json!({"users": [{"id": "u1"}, {"id": "u2"}]}));
    let v: Value = api
        .get(&format!("/apps/{}/channels", c.id), &[("filter_by_prefix", "presence-"), ("info", "user_count,subscription_count")])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"channels": {"presence-lobby": {"user_count": 2, "subscription_count": 3}}}));
    let v: Value = api.get(&format!("/apps/{}/channels/news", c.id), &[("info", "subscription_count")]).await.json().await.unwrap();
    assert_eq!(v, json!({"occupied": true, "subscription_count": 1}), "occupied by node B's client alone");
    let v: Value = api.get(&format!("/apps/{}/channels", c.id), &[]).await.json().await.unwrap();
    assert_eq!(v, json!({"channels": {"news": {}, "presence-lobby": {}}}));
}

#[tokio::test]
async fn terminating_a_user_closes_their_connections_on_every_node() {
    let (_redis, a, b) = two_nodes().await;
    let c = creds();
    let mut on_b = Ws::connect(&b, &c.key).await;
    assert_eq!(on_b.signin(&c, "u9").await["event"], "pusher:signin_success");
    let r = Api::new(&a, &c).post(&format!("/apps/{}/users/u9/terminate_connections", c.id), &json!({})).await;
    assert_eq!(r.status(), 200);
    let (code, _) = on_b.expect_close().await;
    assert_eq!(code, Some(4009));
}

#[tokio::test]
async fn a_client_resumes_on_another_node_from_the_serial_it_saw() {
    let (_redis, a, b) = two_nodes().await;
    let c = creds();
    let api = Api::new(&a, &c);
    let mut on_a = Ws::connect(&a, &c.key).await;
    on_a.subscribe("train").await;
    api.trigger("train", "tick", "0").await;
    let last = serial(&on_a.recv_event("tick").await);
    drop(on_a); // into the tunnel; out of it on the other node
    for i in 1..4 {
        api.trigger("train", "tick", &i.to_string()).await;
    }
    let mut on_b = Ws::connect(&b, &c.key).await;
    eventually(Duration::from_secs(5), || async {
        let v: Value = Api::new(&b, &c).get(&format!("/apps/{}/channels/train", c.id), &[]).await.json().await.ok()?;
        (v["occupied"] == false).then_some(())
    })
    .await;
    on_b.send(json!({"event": "pusher:subscribe", "data": {"channel": "train", "resume_from": last}})).await;
    assert_eq!(on_b.recv().await["event"], "pusher_internal:subscription_succeeded");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(on_b.recv().await["data"].as_str().unwrap().to_string());
    }
    assert_eq!(got, ["1", "2", "3"]);
    assert_eq!(on_b.recv().await["event"], "weir:resume_succeeded");
}

#[tokio::test]
async fn without_redis_a_publish_is_refused_clearly_and_the_node_is_not_ready_until_it_returns() {
    let redis = Redis::start();
    let a = node(&redis).await;
    let c = creds();
    let api = Api::new(&a, &c);
    let port = redis.stop();

    let r = api.post(&format!("/apps/{}/events", c.id), &json!({"name": "e", "channels": ["x"], "data": "lost?"})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    eventually(Duration::from_secs(5), || async {
        let r = a.http.get(a.url("/readyz")).send().await.ok()?;
        let v: Value = r.json().await.ok()?;
        (v["cluster"] == false && v["ready"] == false).then_some(())
    })
    .await;

    let _redis = Redis::start_on(port);
    a.ready().await;
    let mut ws = Ws::connect(&a, &c.key).await;
    ws.subscribe("x").await;
    api.trigger("x", "e", "back").await;
    assert_eq!(ws.recv_event("e").await["data"], "back");

    // That Redis came back empty: the node gave it its signing keys again, so a node started now
    // verifies the tokens the first one signs.
    let jwks = |app: &TestApp| {
        let url = app.url("/.well-known/jwks.json");
        let http = app.http.clone();
        async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap()["keys"].clone() }
    };
    let before = jwks(&a).await;
    let b = node(&_redis).await;
    assert_eq!(jwks(&b).await, before);
}

fn presence_ids(sub: &Value) -> Vec<String> {
    let mut ids: Vec<String> = data(sub)["presence"]["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn presence_members_are_announced_across_nodes_once_per_user() {
    let (_redis, a, b) = two_nodes().await;
    let c = creds();
    let mut watcher = Ws::connect(&a, &c.key).await;
    watcher.subscribe_presence(&c, "presence-room", "w").await;
    joined(&[&a, &b], "presence-room", 1).await;

    let mut u2_b = Ws::connect(&b, &c.key).await;
    let sub = u2_b.subscribe_presence(&c, "presence-room", "u2").await;
    let mut ids = presence_ids(&sub);
    if ids == ["u2"] {
        // Node A's news of `w` was still on its way: it arrives as an addition.
        ids.push(data(&u2_b.recv_event("pusher_internal:member_added").await)["user_id"].as_str().unwrap().into());
    }
    assert_eq!(ids, ["u2", "w"], "the list holds the other node's member");
    let added = watcher.recv_event("pusher_internal:member_added").await;
    assert_eq!(data(&added)["user_id"], "u2");
    assert_eq!(data(&added)["user_info"], json!({"name": "name-u2"}));

    // The same user on a second node is no news; leaving one of two nodes neither.
    let mut u2_a = Ws::connect(&a, &c.key).await;
    u2_a.subscribe_presence(&c, "presence-room", "u2").await;
    drop(u2_b);
    watcher.expect_silence(Duration::from_millis(500)).await;
    drop(u2_a);
    let removed = watcher.recv_event("pusher_internal:member_removed").await;
    assert_eq!(data(&removed)["user_id"], "u2");
}

#[tokio::test]
async fn a_late_node_learns_the_members_and_a_stopped_node_takes_its_members_away() {
    let redis = Redis::start();
    let a = node(&redis).await;
    let c = creds();
    let mut u1 = Ws::connect(&a, &c.key).await;
    u1.subscribe_presence(&c, "presence-room", "u1").await;

    let b = node(&redis).await;
    let ids = eventually(Duration::from_secs(10), || async {
        let mut late = Ws::connect(&b, &c.key).await;
        let ids = presence_ids(&late.subscribe_presence(&c, "presence-room", "u2").await);
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert_eq!(ids, ["u1", "u2"], "node B heard of node A's member when it joined");
    let mut u2 = Ws::connect(&b, &c.key).await;
    u2.subscribe_presence(&c, "presence-room", "u2").await;
    let added = u1.recv_event("pusher_internal:member_added").await;
    assert_eq!(data(&added)["user_id"], "u2");

    b.stop().await;
    let removed = u1.recv_event("pusher_internal:member_removed").await;
    assert_eq!(data(&removed)["user_id"], "u2");
}

/// A Redis that speaks only TLS (`rediss://`, its CA given as `tls_ca_file`) carries the cluster
/// as a plain one does: events cross nodes, and channel queries count both nodes.
#[tokio::test]
async fn nodes_share_a_redis_that_speaks_only_tls() {
    let ca = tls::TestCa::new();
    let redis = Redis::start_tls(&ca.cert_file, &ca.key_file);
    assert!(redis.url().starts_with("rediss://"));
    let a = node_trusting(&redis, Some(ca.ca_file.clone())).await;
    let b = node_trusting(&redis, Some(ca.ca_file.clone())).await;
    let mut on_b = Ws::connect(&b, &creds().key).await;
    on_b.subscribe("secure").await;
    joined(&[&a, &b], "secure", 1).await;
    Api::new(&a, &creds()).trigger("secure", "sealed", "\"over tls\"").await;
    let event = on_b.recv_event("sealed").await;
    assert_eq!(data(&event), json!("over tls"));
}

/// A node that joins late learns who is signed in elsewhere (watchlists) and how many subscribe
/// elsewhere (subscription counts); when a node stops, its users go offline and its subscribers
/// leave the counts.
#[tokio::test]
async fn a_late_node_learns_signed_in_users_and_counts_and_a_stopped_node_takes_them_away() {
    let redis = Redis::start();
    let counting = |spec: &mut AppSpec| spec.subscription_count = true;
    let a = node_with(&redis, None, counting).await;
    let c = creds();
    let mut bob = Ws::connect(&a, &c.key).await;
    assert_eq!(bob.signin(&c, "bob").await["event"], "pusher:signin_success");
    let mut x = Ws::connect(&a, &c.key).await;
    x.subscribe("counted").await;

    let b = node_with(&redis, None, counting).await;
    let mut ann = eventually(Duration::from_secs(10), || async {
        let mut ann = Ws::connect(&b, &c.key).await;
        assert_eq!(ann.signin_as(&c, &json!({"id": "ann", "watchlist": ["bob"]})).await["event"], "pusher:signin_success");
        let first = ann.try_recv(Duration::from_millis(300)).await?;
        assert_eq!(first["event"], "pusher_internal:watchlist_events");
        assert_eq!(data(&first), json!({"events": [{"name": "online", "user_ids": ["bob"]}]}));
        Some(ann)
    })
    .await;
    let mut y = Ws::connect(&b, &c.key).await;
    y.subscribe("counted").await;
    let total = |v: &Value| data(v)["subscription_count"].as_u64().unwrap();
    while total(&y.recv_event("pusher_internal:subscription_count").await) != 2 {}

    a.stop().await;
    let gone = ann.recv_event("pusher_internal:watchlist_events").await;
    assert_eq!(data(&gone), json!({"events": [{"name": "offline", "user_ids": ["bob"]}]}));
    while total(&y.recv_event("pusher_internal:subscription_count").await) != 1 {}
}
