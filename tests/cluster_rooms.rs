//! Waiting rooms across nodes: two weir nodes in this process share one real `redis-server`
//! (store, admission lease, room messages). Every node serves every visitor request; one
//! node at a time admits.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;
#[path = "support/realtime.rs"]
mod rt;
#[path = "support/redis.rs"]
mod redis;

use std::time::Duration;

use redis::Redis;
use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, TestApp, Visitor};
use weir::clock::ManualClock;

const ORIGIN: &str = "http://127.0.0.1:9/shop";
const WAIT: Duration = Duration::from_secs(10);

async fn node(redis: &Redis, clock: Option<&ManualClock>) -> TestApp {
    // Every node of a cluster is reached at one public URL (the tokens' issuer).
    let mut builder = TestApp::builder().config(|c| {
        c.cluster.redis_url = Some(redis.url());
        c.public_url = Some("http://weir.test".into());
    });
    if let Some(clock) = clock {
        builder = builder.manual_clock(clock.clone());
    }
    let app = builder.start().await;
    app.ready().await;
    app
}

/// A fresh Redis and two nodes on it.
async fn two_nodes() -> (Redis, TestApp, TestApp) {
    let redis = Redis::start();
    let (a, b) = (node(&redis, None).await, node(&redis, None).await);
    (redis, a, b)
}

async fn is_leader(app: &TestApp) -> bool {
    let v: Value = app.http.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    v["leader"] == true
}

/// The two nodes, leader first, once one of them holds the lease.
async fn by_role<'a>(a: &'a TestApp, b: &'a TestApp) -> (&'a TestApp, &'a TestApp) {
    eventually(WAIT, || async {
        match (is_leader(a).await, is_leader(b).await) {
            (true, false) => Some((a, b)),
            (false, true) => Some((b, a)),
            _ => None,
        }
    })
    .await
}

async fn patch(app: &TestApp, room: &str, body: Value) {
    let r = app.admin(Method::PATCH, &format!("/rooms/{room}")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "patch {body}");
}

/// A visitor of `app` who later asks another node (its cookies go along).
fn on(visitor: &Visitor, app: &TestApp) -> Visitor {
    Visitor { base: app.base.clone(), ..visitor.clone() }
}

/// Waits until `app` knows room `id`.
async fn knows_room(app: &TestApp, id: &str) {
    eventually(WAIT, || async {
        let r = app.admin(Method::GET, &format!("/rooms/{id}")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn tickets_positions_and_admissions_are_the_same_on_every_node() {
    let (_redis, a, b) = two_nodes().await;
    let (leader, follower) = by_role(&a, &b).await;
    follower.create_room(json!({"id": "drop", "origin": ORIGIN, "rate_per_minute": 600, "state": "paused"})).await;
    knows_room(leader, "drop").await;

    // Tickets are issued in arrival order whichever node a visitor reaches.
    let mut visitors = Vec::new();
    for (i, app) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut v = app.visitor();
        let s = v.enter("drop").await;
        assert_eq!(s["ticket"], i as u64 + 1);
        visitors.push(v);
    }
    // Each node answers for every visitor, from the cookie another node set.
    for (i, v) in visitors.iter().enumerate() {
        for app in [&a, &b] {
            let s = on(v, app).status("drop").await;
            assert_eq!((s["ticket"].as_u64(), s["position"].as_u64()), (Some(i as u64 + 1), Some(i as u64)), "{s}");
        }
    }
    // Opened on the follower; the leader admits; every node tells the visitors so.
    patch(follower, "drop", json!({"state": "open"})).await;
    for v in &visitors {
        on(v, follower).wait_admitted("drop", WAIT).await;
    }
    let last = on(&visitors[3], leader).wait_admitted("drop", WAIT).await;
    // The admission token one node issued verifies on the other (shared signing keys).
    let token = support::token_from_redirect(last["redirect_url"].as_str().unwrap());
    let r = follower.http.post(follower.url("/api/v1/verify")).json(&json!({"token": token, "room": "drop"})).send().await.unwrap();
    let verdict: Value = r.json().await.unwrap();
    assert_eq!(verdict["valid"], true, "{verdict}");
    for app in [&a, &b] {
        let stats = eventually(WAIT, || async {
            let s = app.room("drop").await["stats"].clone();
            (s["serving"] == 4).then_some(s)
        })
        .await;
        assert_eq!((stats["last_ticket"].as_u64(), stats["queue_length"].as_u64()), (Some(4), Some(0)));
        // The follower counts the admissions from the leader's steps, as the leader does.
        assert_eq!(stats["admitted_last_minute"], 4, "{stats}");
    }
}

#[tokio::test]
async fn when_the_leader_stops_another_node_takes_over_admission() {
    let (_redis, a, b) = two_nodes().await;
    let leader_is_a = by_role(&a, &b).await.0.addr == a.addr;
    let (leader, follower) = if leader_is_a { (a, b) } else { (b, a) };
    leader.create_room(json!({"id": "relay", "origin": ORIGIN, "rate_per_minute": 600})).await;
    knows_room(&follower, "relay").await;
    let mut first = follower.visitor();
    first.enter("relay").await;
    first.wait_admitted("relay", WAIT).await;

    leader.stop().await;
    eventually(WAIT, || async { is_leader(&follower).await.then_some(()) }).await;
    let mut second = follower.visitor();
    assert_eq!(second.enter("relay").await["ticket"], 2, "numbering continues");
    second.wait_admitted("relay", WAIT).await;
}

#[tokio::test]
async fn a_session_ended_on_a_follower_frees_its_slot() {
    let (_redis, a, b) = two_nodes().await;
    let (leader, follower) = by_role(&a, &b).await;
    leader.create_room(json!({"id": "cap", "origin": ORIGIN, "rate_per_minute": 6000, "max_active_users": 1})).await;
    knows_room(follower, "cap").await;
    let mut first = follower.visitor();
    first.enter("cap").await;
    let admitted = first.wait_admitted("cap", WAIT).await;
    let mut second = follower.visitor();
    second.enter("cap").await;
    assert_eq!(second.status("cap").await["admitted"], false, "the cap holds the second visitor");

    let token = support::token_from_redirect(admitted["redirect_url"].as_str().unwrap());
    let r = follower.http.post(follower.url("/api/v1/sessions/end")).json(&json!({"token": token})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    second.wait_admitted("cap", WAIT).await;
}

#[tokio::test]
async fn visitors_seen_only_by_a_follower_are_not_skipped_as_gone() {
    let clock = ManualClock::at(1_900_000_000_000);
    let redis = Redis::start();
    let (a, b) = (node(&redis, Some(&clock)).await, node(&redis, Some(&clock)).await);
    let (leader, follower) = by_role(&a, &b).await;
    leader.create_room(json!({"id": "ab", "origin": ORIGIN, "rate_per_minute": 0, "abandon_after_seconds": 60})).await;
    knows_room(follower, "ab").await;
    let mut gone = follower.visitor();
    gone.enter("ab").await;
    let mut here = follower.visitor();
    here.enter("ab").await;
    // The leader reads new tickets from the store each tick (they count as seen on entry).
    eventually(WAIT, || async { (leader.room("ab").await["stats"]["last_ticket"] == 2).then_some(()) }).await;
    clock.advance_ms(120_000);
    here.status("ab").await; // seen by the follower alone
    // The leader counts it live once the follower's batch of visitors seen has reached it.
    eventually(WAIT, || async {
        let s = leader.room("ab").await["stats"].clone();
        (s["live_waiters"] == 1).then_some(())
    })
    .await;
    patch(follower, "ab", json!({"rate_per_minute": 600000})).await;
    here.wait_admitted("ab", WAIT).await;
    let stats = eventually(WAIT, || async {
        let s = leader.room("ab").await["stats"].clone();
        (s["serving"] == 2).then_some(s)
    })
    .await;
    assert_eq!(stats["abandoned"], 1, "the visitor nobody saw was skipped: {stats}");
    assert_eq!(gone.status("ab").await["admitted"], false);
}

#[tokio::test]
async fn a_rotated_key_and_a_deleted_room_reach_every_node() {
    let (_redis, a, b) = two_nodes().await;
    let r = a.admin(Method::POST, "/keys/rotate").send().await.unwrap();
    let kid = r.json::<Value>().await.unwrap()["kid"].as_str().unwrap().to_string();
    eventually(WAIT, || async {
        let jwks: Value = b.http.get(b.url("/.well-known/jwks.json")).send().await.ok()?.json().await.ok()?;
        jwks["keys"].as_array()?.iter().any(|k| k["kid"] == kid.as_str()).then_some(())
    })
    .await;

    a.create_room(json!({"id": "gone", "origin": ORIGIN, "rate_per_minute": 60})).await;
    knows_room(&b, "gone").await;
    assert_eq!(b.admin(Method::DELETE, "/rooms/gone").send().await.unwrap().status(), 204);
    eventually(WAIT, || async {
        let r = a.admin(Method::GET, "/rooms/gone").send().await.ok()?;
        (r.status() == 404).then_some(())
    })
    .await;
    assert_eq!(a.visitor().get("/r/gone", true).await.status(), 404);
}

/// `weir serve` processes of one cluster, so that one can be killed with SIGKILL.
fn process_node(redis: &Redis, dir: &tempfile::TempDir) -> support::Binary {
    let url = redis.url();
    support::Binary::serve(dir.path(), &[("WEIR_CLUSTER_REDIS_URL", url.as_str()), ("WEIR_PUBLIC_URL", "http://weir.test")])
}

/// `/readyz` of a node once it is ready. A node is ready as soon as it receives the bus, which
/// can be a moment before its first heartbeat has taken the lease.
async fn ready_as(http: &reqwest::Client, base: &str) -> Value {
    eventually(WAIT, || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    http.get(format!("{base}/readyz")).send().await.unwrap().json().await.unwrap()
}

/// Waits until the node at `base` holds the admission lease.
async fn leads(http: &reqwest::Client, base: &str) {
    eventually(WAIT, || async {
        let v: Value = http.get(format!("{base}/readyz")).send().await.ok()?.json().await.ok()?;
        (v["leader"] == true).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_killed_leader_is_replaced_and_its_presence_members_leave() {
    let redis = Redis::start();
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = support::no_redirect_client();
    let first = process_node(&redis, &dir1);
    ready_as(&http, &first.base).await;
    leads(&http, &first.base).await;
    let second = process_node(&redis, &dir2);
    assert_eq!(ready_as(&http, &second.base).await["leader"], false);
    let admin = |base: &str, method: Method, path: &str| http.request(method, format!("{base}/api/v1{path}")).bearer_auth(support::ADMIN_KEY);

    // An app created through one node's admin API serves on the other.
    let (hook_url, hooks) = rt::webhook_receiver(0).await;
    let settings = json!({"webhooks": [{"url": hook_url, "event_types": ["member_removed"]}]});
    let app: Value = admin(&second.base, Method::POST, "/apps").json(&settings).send().await.unwrap().json().await.unwrap();
    let creds = rt::Creds {
        id: app["id"].as_str().unwrap().into(),
        key: app["key"].as_str().unwrap().into(),
        secret: app["secret"].as_str().unwrap().into(),
    };
    eventually(WAIT, || async {
        let r = admin(&first.base, Method::GET, &format!("/apps/{}", creds.id)).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let mut doomed = rt::Ws::connect_to(first.addr, &creds.key).await;
    doomed.subscribe_presence(&creds, "presence-hall", "doomed").await;
    let mut watcher = rt::Ws::connect_to(second.addr, &creds.key).await;
    let sub = watcher.subscribe_presence(&creds, "presence-hall", "watcher").await;
    // The other node's member is in the list, or announced as soon as its news arrives.
    if rt::data(&sub)["presence"]["count"] == 1 {
        let added = watcher.recv_event("pusher_internal:member_added").await;
        assert_eq!(rt::data(&added)["user_id"], "doomed");
    } else {
        assert_eq!(rt::data(&sub)["presence"]["count"], 2);
    }

    let r = admin(&second.base, Method::POST, "/rooms").json(&json!({"id": "relay", "origin": ORIGIN, "rate_per_minute": 600})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let mut before = Visitor { base: second.base.clone(), cookies: Vec::new(), http: http.clone() };
    before.enter("relay").await;
    before.wait_admitted("relay", WAIT).await;

    first.kill9();
    // No goodbye from the killed node: its heartbeat and its lease run out.
    let gone = watcher.recv_event("pusher_internal:member_removed").await;
    assert_eq!(rt::data(&gone)["user_id"], "doomed");
    // The killed node could not send the webhook; the node that took over did, once.
    let removed = eventually(WAIT, || async {
        let bodies: Vec<Value> = hooks.lock().iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect();
        let events: Vec<Value> = bodies.iter().flat_map(|b| b["events"].as_array().cloned().unwrap_or_default()).collect();
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(removed, [json!({"name": "member_removed", "channel": "presence-hall", "user_id": "doomed"})]);
    leads(&http, &second.base).await;
    let mut after = Visitor { base: second.base.clone(), cookies: Vec::new(), http: http.clone() };
    assert_eq!(after.enter("relay").await["ticket"], 2);
    after.wait_admitted("relay", WAIT).await;
}

#[tokio::test]
async fn without_redis_a_new_visitor_is_told_to_retry_and_a_waiting_one_is_still_answered() {
    let redis = Redis::start();
    let a = node(&redis, None).await;
    a.create_room(json!({"id": "down", "origin": ORIGIN, "rate_per_minute": 0})).await;
    let mut first = a.visitor();
    assert_eq!(first.enter("down").await["ticket"], 1);
    redis.stop();

    let r = a.visitor().get("/r/down", true).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    // A visitor who already holds a ticket is still answered from memory.
    assert_eq!(first.status("down").await["position"], 0);
    assert_eq!(a.http.get(a.url("/readyz")).send().await.unwrap().status(), 503);
}

/// `weir_cluster_fenced_admissions_total` on `app`'s `/metrics`.
async fn fenced_batches(app: &TestApp) -> u64 {
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix("weir_cluster_fenced_admissions_total ")).map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test]
async fn a_leader_whose_lease_was_taken_admits_nobody_even_before_it_notices() {
    let redis = Redis::start();
    let leader = node(&redis, None).await;
    eventually(WAIT, || async { is_leader(&leader).await.then_some(()) }).await;
    leader.create_room(json!({"id": "fenced", "origin": ORIGIN, "rate_per_minute": 600})).await;
    for _ in 0..100 {
        leader.visitor().enter("fenced").await;
    }
    let mut c = ::redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let serving = async |c: &mut ::redis::aio::MultiplexedConnection| {
        ::redis::cmd("HGET").arg("weir:q:fenced").arg("serving").query_async::<Option<u64>>(c).await.unwrap().unwrap_or(0)
    };
    eventually(WAIT, || async { (serving(&mut c.clone()).await > 0).then_some(()) }).await;

    // Right after a renewal, another holder takes the lease (as if this node had stalled past
    // it): the node still counts itself the leader until its next renewal, ~1 s away, and
    // keeps stepping its rooms, 10 admissions a second.
    eventually(WAIT, || async {
        let ttl: i64 = ::redis::cmd("PTTL").arg("weir:lease:rooms").query_async(&mut c.clone()).await.unwrap();
        (ttl > 2_900).then_some(())
    })
    .await;
    ::redis::cmd("SET").arg("weir:lease:rooms").arg("intruder").arg("PX").arg(60_000).query_async::<()>(&mut c).await.unwrap();
    let before = serving(&mut c).await;
    eventually(WAIT, || async { (!is_leader(&leader).await).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(serving(&mut c).await, before, "no admission written once the lease was taken");
    assert!(fenced_batches(&leader).await > 0, "the node did try to admit, and was refused");
    let stats = leader.room("fenced").await["stats"].clone();
    assert_eq!(stats["serving"].as_u64(), Some(before), "nor counted in memory: {stats}");

    // The lease given back, the node takes it again and admission goes on from the store.
    ::redis::cmd("DEL").arg("weir:lease:rooms").query_async::<()>(&mut c).await.unwrap();
    eventually(WAIT, || async { (serving(&mut c.clone()).await > before).then_some(()) }).await;
}

/// A room's webhooks come from the node that admits, so two nodes send each event once.
#[tokio::test]
async fn room_webhooks_are_sent_once_by_the_node_that_admits() {
    let clock = ManualClock::at(1_900_000_000_000);
    let redis = Redis::start();
    let (a, b) = (node(&redis, Some(&clock)).await, node(&redis, Some(&clock)).await);
    let (leader, follower) = by_role(&a, &b).await;
    let (url, hooks) = rt::webhook_receiver(0).await;
    let room = json!({"id": "told", "origin": ORIGIN, "rate_per_minute": 0, "webhooks": [{"url": url, "secret": "sixteen-chars-ok"}]});
    let r = follower.admin(Method::POST, "/rooms").json(&room).send().await.unwrap();
    assert_eq!(r.status(), 201);
    knows_room(leader, "told").await;
    follower.visitor().enter("told").await;
    let events = |hooks: &rt::Hooks| -> Vec<String> {
        hooks
            .lock()
            .iter()
            .flat_map(|(_, body)| {
                let v: Value = serde_json::from_str(body).unwrap();
                v["events"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect::<Vec<_>>()
            })
            .collect()
    };
    eventually(WAIT, || async {
        if !events(&hooks).is_empty() {
            return Some(());
        }
        clock.advance_ms(1_000);
        tokio::time::sleep(Duration::from_millis(200)).await;
        None
    })
    .await;
    // Both nodes observe the room for another two seconds: nothing more is sent.
    for _ in 0..10 {
        clock.advance_ms(1_000);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(events(&hooks), ["queueing_started"]);
}
