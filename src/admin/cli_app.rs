//! `weir app create|list|show|set|delete`: Pusher apps through the admin API
//! (`/api/v1/apps`), printed as a table or, with `--json`, as the server's JSON.
//!
//! Hooked into `admin::cli` as
//! `AdminCommand::App { common: Common, command: AppCommand }` → [`run_app`].

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Map, Value};

use super::cli::{print_table, AdminClient, CliError};

#[derive(Subcommand)]
pub enum AppCommand {
    /// Create an app; key and secret are generated unless given.
    Create {
        #[command(flatten)]
        fields: AppFields,
    },
    /// List apps.
    List,
    /// Show one app, credentials included.
    Show { id: String },
    /// Change an app's settings (id and key are fixed).
    Set {
        id: String,
        #[command(flatten)]
        fields: AppFields,
    },
    /// Delete an app; its connections are closed.
    Delete { id: String },
}

/// Settings shared by `create` and `set`; omitted flags leave a setting unchanged (or default).
#[derive(Args, Default)]
pub struct AppFields {
    /// Numeric id (create only; generated when omitted).
    #[arg(long)]
    id: Option<String>,
    /// App key (create only).
    #[arg(long)]
    key: Option<String>,
    /// App secret.
    #[arg(long)]
    secret: Option<String>,
    /// Enable or disable the app.
    #[arg(long)]
    enabled: Option<bool>,
    /// Allow client-* events on private and presence channels.
    #[arg(long)]
    client_events: Option<bool>,
    /// Concurrent connections (0 = unlimited).
    #[arg(long)]
    max_connections: Option<u32>,
    /// Largest event data in bytes.
    #[arg(long)]
    max_message_bytes: Option<usize>,
    #[arg(long)]
    max_channels_per_connection: Option<usize>,
    #[arg(long)]
    max_presence_members: Option<usize>,
    /// HTTP API events per second (0 = unlimited).
    #[arg(long)]
    max_publish_per_second: Option<u32>,
    /// Close connections not signed in within N seconds (0 = off).
    #[arg(long)]
    signin_within_s: Option<u64>,
    /// Send pusher:subscription_count events (public and private channels).
    #[arg(long)]
    subscription_count: Option<bool>,
    /// Send watchlist online/offline events to signed-in users.
    #[arg(long)]
    watchlist_events: Option<bool>,
    /// Webhook endpoint (repeatable; replaces the list). Use `URL` or `URL=type1,type2`.
    #[arg(long = "webhook")]
    webhooks: Vec<String>,
    /// Remove all webhooks.
    #[arg(long, conflicts_with = "webhooks")]
    no_webhooks: bool,
}

impl AppFields {
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("id", self.id.clone().map(Value::from));
        put("key", self.key.clone().map(Value::from));
        put("secret", self.secret.clone().map(Value::from));
        put("enabled", self.enabled.map(Value::from));
        put("client_events", self.client_events.map(Value::from));
        put("max_connections", self.max_connections.map(Value::from));
        put("max_message_bytes", self.max_message_bytes.map(Value::from));
        put("max_channels_per_connection", self.max_channels_per_connection.map(Value::from));
        put("max_presence_members", self.max_presence_members.map(Value::from));
        put("max_publish_per_second", self.max_publish_per_second.map(Value::from));
        put("signin_within_s", self.signin_within_s.map(Value::from));
        put("subscription_count", self.subscription_count.map(Value::from));
        put("watchlist_events", self.watchlist_events.map(Value::from));
        if self.no_webhooks {
            put("webhooks", Some(json!([])));
        } else if !self.webhooks.is_empty() {
            let hooks: Vec<Value> = self
                .webhooks
                .iter()
                .map(|w| match w.split_once('=') {
                    Some((url, types)) => json!({ "url": url, "event_types": types.split(',').filter(|t| !t.is_empty()).collect::<Vec<_>>() }),
                    None => json!({ "url": w }),
                })
                .collect();
            put("webhooks", Some(Value::Array(hooks)));
        }
        m
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_apps(apps: &[Value], with_secret: bool) {
    let rows: Vec<Vec<String>> = apps
        .iter()
        .map(|a| {
            let mut row = vec![cell(&a["id"]), cell(&a["key"])];
            if with_secret {
                row.push(cell(&a["secret"]));
            }
            row.extend([
                cell(&a["enabled"]),
                cell(&a["client_events"]),
                cell(&a["max_connections"]),
                a["webhooks"].as_array().map_or(0, Vec::len).to_string(),
            ]);
            row
        })
        .collect();
    let mut headers = vec!["id", "key"];
    if with_secret {
        headers.push("secret");
    }
    headers.extend(["enabled", "client events", "max conns", "webhooks"]);
    print_table(&headers, &rows);
}

/// Runs one `weir app …` command; returns the server's JSON for `--json`.
pub async fn run_app(client: &AdminClient, command: AppCommand) -> Result<Value, CliError> {
    let (out, with_secret) = match command {
        AppCommand::Create { fields } => (client.call(Method::POST, "/apps", Some(Value::Object(fields.to_json()))).await?, true),
        AppCommand::List => (client.call(Method::GET, "/apps", None).await?, false),
        AppCommand::Show { id } => (client.call(Method::GET, &format!("/apps/{id}"), None).await?, true),
        AppCommand::Set { id, fields } => {
            (client.call(Method::PATCH, &format!("/apps/{id}"), Some(Value::Object(fields.to_json()))).await?, false)
        }
        AppCommand::Delete { id } => {
            client.call(Method::DELETE, &format!("/apps/{id}"), None).await?;
            if !client.json_output() {
                println!("deleted app {id}");
            }
            return Ok(Value::Null);
        }
    };
    if !client.json_output() {
        match out.get("apps").and_then(Value::as_array) {
            Some(apps) => print_apps(apps, false),
            None => print_apps(std::slice::from_ref(&out), with_secret),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_settings() {
        let f = AppFields {
            client_events: Some(true),
            max_connections: Some(5),
            subscription_count: Some(true),
            webhooks: vec!["http://h/a".into(), "http://h/b=member_added,member_removed".into()],
            ..Default::default()
        };
        let j = Value::Object(f.to_json());
        assert_eq!(j["client_events"], true);
        assert_eq!(j["max_connections"], 5);
        assert_eq!(j["subscription_count"], true);
        assert!(j.get("watchlist_events").is_none(), "an unset flag changes nothing");
        assert_eq!(j["webhooks"][1]["event_types"], json!(["member_added", "member_removed"]));
        assert!(j.get("secret").is_none());
    }
}
