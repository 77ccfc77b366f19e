//! `weir stats`: what the dashboard shows, once, as tables: the rooms now, the apps now and the
//! top talkers of the last minute (`GET /api/v1/stats`; `--json` prints it whole, history
//! included).

use hyper::Method;
use serde_json::Value;

use super::cli::{cell, print_table, AdminClient, CliError};

pub async fn run_stats(client: &AdminClient) -> Result<Value, CliError> {
    let stats = client.call(Method::GET, "/stats", None).await?;
    if client.json_output() {
        return Ok(stats);
    }
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let rooms: Vec<Vec<String>> = list(&stats["rooms"])
        .iter()
        .map(|r| {
            vec![
                cell(&r["id"]),
                cell(&r["state"]),
                cell(&r["queue_length"]),
                cell(&r["live_waiters"]),
                format!("{} / {}", cell(&r["admitted_last_minute"]), cell(&r["target_per_minute"])),
                cell(&r["active_users"]),
                cell(&r["probe_latency_ms"]),
                cell(&r["eta_last_ticket_seconds"]),
            ]
        })
        .collect();
    print_table(&["room", "state", "queue", "live", "admitted/min / target", "active", "probe ms", "eta last s"], &rooms);
    println!();
    let apps: Vec<Vec<String>> = list(&stats["realtime"]["apps"])
        .iter()
        .map(|a| {
            let id = if a["internal"] == true { format!("{} (internal)", cell(&a["id"])) } else { cell(&a["id"]) };
            vec![id, cell(&a["connections"]), cell(&a["messages_per_second"])]
        })
        .collect();
    print_table(&["app", "connections", "messages/s"], &apps);
    let top = &stats["top"];
    println!("\ntop talkers, last {} s", cell(&top["window_seconds"]));
    let rows = |kind: &str, fields: &[&str]| -> Vec<Vec<String>> {
        list(&top[kind]).iter().map(|t| fields.iter().map(|f| cell(&t[*f])).collect()).collect()
    };
    print_table(&["app", "channel", "events"], &rows("channels", &["app", "channel", "count"]));
    println!();
    print_table(&["app", "messages"], &rows("apps", &["app", "count"]));
    println!();
    print_table(&["ip", "tickets+connections"], &rows("ips", &["ip", "count"]));
    Ok(Value::Null)
}
