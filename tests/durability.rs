//! Crash safety with the real binary: `kill -9` with entries in flight, restart on the same
//! data directory, repeated. Every acknowledged ticket, cookie, admission and token survives;
//! no ticket is issued twice.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::{no_redirect_client, Binary, Visitor, ADMIN_KEY};

const ENV: &[(&str, &str)] = &[("WEIR_PUBLIC_URL", "http://weir.test")];

async fn admin(base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut r = no_redirect_client().request(method, format!("{base}/api/v1{path}")).bearer_auth(ADMIN_KEY);
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap()
}

fn visitor(base: &str) -> Visitor {
    Visitor { base: base.to_string(), cookies: Vec::new(), http: no_redirect_client() }
}

#[tokio::test]
async fn acknowledged_state_survives_repeated_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::serve(dir.path(), ENV);
    let r = admin(&server.base, reqwest::Method::POST, "/rooms", Some(json!({"id": "d", "origin": "https://o.example", "rate_per_minute": 0}))).await;
    assert_eq!(r.status(), 201);
    // ticket → the visitor holding it (its cookie jar).
    let mut acknowledged: HashMap<u64, Visitor> = HashMap::new();
    // tickets we saw admitted, with their token.
    let mut admitted: HashMap<u64, String> = HashMap::new();
    let mut server = Some(server);

    for round in 0..4 {
        let base = server.as_ref().unwrap().base.clone();
        // Admit a little during this round so the serving counter moves too.
        admin(&base, reqwest::Method::PATCH, "/rooms/d", Some(json!({"rate_per_minute": 3000}))).await;
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let base = base.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for _ in 0..1000 {
                    let mut v = visitor(&base);
                    let r = v.http.get(format!("{base}/r/d")).header("accept", "application/json").send().await;
                    let Ok(r) = r else { break };
                    let cookies: Vec<String> = r.headers().get_all("set-cookie").iter().map(|c| c.to_str().unwrap().to_string()).collect();
                    let Ok(body) = r.json::<Value>().await else { break };
                    for c in cookies {
                        let (k, val) = c.split(';').next().unwrap().split_once('=').unwrap();
                        v.cookies.push((k.to_string(), val.to_string()));
                    }
                    acked.push((body["ticket"].as_u64().unwrap(), v));
                }
                acked
            }));
        }
        // Let entries flow, sample some admissions, then crash mid-flight.
        tokio::time::sleep(Duration::from_millis(300 + 100 * round)).await;
        // The earliest tickets are the ones admitted first (first come, first served); a random
        // sample of thousands could miss the few dozen admitted so far.
        let mut earliest: Vec<u64> = acknowledged.keys().copied().filter(|t| !admitted.contains_key(t)).collect();
        earliest.sort_unstable();
        let mut probe_tasks = Vec::new();
        for t in earliest.into_iter().take(20) {
            let mut v = acknowledged[&t].clone();
            // Visitors from earlier rounds still name the server they entered through.
            v.base = base.clone();
            probe_tasks.push(tokio::spawn(async move {
                let r = v.get("/r/d/status", true).await;
                let s: Value = r.json().await.ok()?;
                (s["admitted"] == true).then(|| (t, support::token_from_redirect(s["redirect_url"].as_str().unwrap())))
            }));
        }
        for p in probe_tasks {
            if let Some((t, token)) = p.await.expect("a probe of a live server") {
                admitted.insert(t, token);
            }
        }
        server.take().unwrap().kill9();
        for t in tasks {
            for (ticket, v) in t.await.unwrap() {
                assert!(acknowledged.insert(ticket, v).is_none(), "ticket {ticket} issued twice (round {round})");
            }
        }

        let restarted = Binary::serve(dir.path(), ENV);
        let base = restarted.base.clone();
        admin(&base, reqwest::Method::PATCH, "/rooms/d", Some(json!({"rate_per_minute": 0}))).await;
        let stats = admin(&base, reqwest::Method::GET, "/rooms/d", None).await.json::<Value>().await.unwrap()["stats"].clone();
        let max_acked = *acknowledged.keys().max().unwrap();
        assert!(stats["last_ticket"].as_u64().unwrap() >= max_acked, "round {round}: lost tickets: {stats} < {max_acked}");
        // A sample of acknowledged visitors (all on the last round) keep their ticket.
        let sample: Vec<u64> = if round == 3 { acknowledged.keys().copied().collect() } else { acknowledged.keys().copied().take(50).collect() };
        for t in sample {
            let v = acknowledged.get_mut(&t).unwrap();
            v.base = base.clone();
            let s = v.status("d").await;
            assert_eq!(s["ticket"].as_u64(), Some(t), "round {round}: visitor lost ticket {t}");
        }
        for (t, token) in &admitted {
            let v = acknowledged.get_mut(t).unwrap();
            v.base = base.clone();
            assert_eq!(v.status("d").await["admitted"], true, "round {round}: admission of {t} undone by the crash");
            let verdict: Value = no_redirect_client().post(format!("{base}/api/v1/verify")).json(&json!({"token": token})).send().await.unwrap().json().await.unwrap();
            assert_eq!(verdict["valid"], true, "token from before the crash: {verdict}");
        }
        // New visitors continue after the highest acknowledged ticket.
        let mut newcomer = visitor(&base);
        let fresh = newcomer.enter("d").await;
        assert!(fresh["ticket"].as_u64().unwrap() > max_acked);
        acknowledged.insert(fresh["ticket"].as_u64().unwrap(), newcomer);
        server = Some(restarted);
    }
    assert!(acknowledged.len() > 100, "the test exercised enough entries: {}", acknowledged.len());
    assert!(!admitted.is_empty(), "some admissions were checked across crashes");
}
