//! The cluster scenario: what spreading the realtime load over two weir nodes through one Redis
//! costs, against one node, on the same core. `n` subscribers on one channel, half on each node,
//! events published to the first node through the HTTP API as fast as the fan-out's window
//! allows; the other node gets each event over the Redis bus. Both nodes and the Redis run on the
//! server's core, so the cluster has the single node's CPU and the ratio is the bus's overhead
//! (on separate machines each node would have a core of its own). The two set-ups take turns, the
//! second pass in reverse order, as the fan-out's servers do. No goal: a figure to be honest about.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fanout::{fanout_one, merged_json, FanoutRun, Target};
use crate::pusher::App;
use crate::scenarios::{admin, call, create_app, not_measured, Ctx};
use crate::servers::{self, Server};

pub async fn cluster(ctx: &mut Ctx) -> Value {
    let n = ctx.params.fanout_subs.iter().copied().min().unwrap_or(1_000);
    if !servers::have_redis() {
        return not_measured("redis-server is not installed (apt-get install redis-server)");
    }
    let mut single = Vec::new();
    let mut clustered = Vec::new();
    let passes = ctx.params.fanout_passes;
    for pass in 0..passes {
        let order = if pass % 2 == 0 { [false, true] } else { [true, false] };
        for two_nodes in order {
            let what = if two_nodes { "two nodes and Redis" } else { "one node" };
            ctx.progress(&format!("cluster (pass {} of {passes}): {n} subscribers, {what}", pass + 1));
            let run = if two_nodes { cluster_turn(ctx, n).await } else { single_turn(ctx, n).await };
            let runs = if two_nodes { &mut clustered } else { &mut single };
            runs.push(run.map_err(|e| format!("pass {}: {e}", pass + 1)));
        }
    }
    let merged = |runs: Vec<Result<FanoutRun, String>>| match runs.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(runs) => merged_json(&runs, Err("no fixed-rate phase in this scenario".into())),
        Err(e) => not_measured(e),
    };
    json!({ "subscribers": n, "nodes": 2, "single": merged(single), "cluster": merged(clustered) })
}

async fn single_turn(ctx: &mut Ctx, n: usize) -> Result<FanoutRun, String> {
    let (server, _) = ctx.start_weir_configured("weir-single", &[])?;
    let app = create_app(&server, &ctx.admin_key).await?;
    let run = fanout_one(&Target::single(&server), &app, n, ctx.params.fanout_window, ctx.params.duration).await;
    server.stop(Duration::from_secs(3));
    run
}

async fn cluster_turn(ctx: &mut Ctx, n: usize) -> Result<FanoutRun, String> {
    let redis_dir = ctx.work.join("redis");
    let _ = std::fs::create_dir_all(&redis_dir);
    let redis = servers::start_redis(&ctx.pin, &ctx.work, &redis_dir)?;
    let url = format!("redis://{}", redis.addr);
    let env = [("WEIR_CLUSTER_REDIS_URL", url.as_str())];
    let (a, _) = ctx.start_weir_configured("weir-node-a", &env)?;
    let (b, _) = ctx.start_weir_configured("weir-node-b", &env)?;
    let run = async {
        for node in [&a, &b] {
            until(Duration::from_secs(15), "the node joins the cluster (/readyz 200)", || async {
                call(node.addr, "GET", "/readyz", &[], b"").await.is_ok_and(|r| r.status == 200)
            })
            .await?;
        }
        let app = create_app(&a, &ctx.admin_key).await?;
        known_to(&b, &ctx.admin_key, &app).await?;
        let target = Target { publish: a.addr, subscribe: vec![a.addr, b.addr], pids: vec![a.pid, b.pid, redis.pid] };
        fanout_one(&target, &app, n, ctx.params.fanout_window, ctx.params.duration).await
    }
    .await;
    for s in [&a, &b] {
        s.terminate();
    }
    for s in [a, b, redis] {
        s.stop(Duration::from_secs(3));
    }
    let _ = std::fs::remove_dir_all(Path::new(&redis_dir));
    run
}

/// Waits until the app created on one node is served by `node` too (apps travel on the bus).
async fn known_to(node: &Server, key: &str, app: &App) -> Result<(), String> {
    let path = format!("/api/v1/apps/{}", app.id);
    until(Duration::from_secs(10), "the second node knows the app", || async {
        admin(node.addr, key, "GET", &path, Value::Null).await.is_ok()
    })
    .await
}

async fn until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out after {limit:?} waiting until {what}"))
}
