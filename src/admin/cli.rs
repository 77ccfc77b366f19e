//! The `weir` admin CLI: `weir room …`, `weir keys rotate` (and `weir app …`, `weir stats`), each one call to
//! the admin API of a running server. Human-readable tables by default, `--json` for scripts;
//! a failing call prints the server's error message and exits non-zero.

use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

/// Options every admin command shares.
#[derive(Args, Clone)]
pub struct Common {
    /// Base URL of the weir server.
    #[arg(long, global = true, env = "WEIR_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Admin key (prefer the WEIR_ADMIN_KEY environment variable: flags show up in `ps`).
    #[arg(long, global = true, env = "WEIR_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Manage waiting rooms.
    Room {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: RoomCommand,
    },
    /// Manage Pusher apps (realtime tenants).
    App {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: crate::admin::cli_app::AppCommand,
    },
    /// Manage admission-token signing keys.
    Keys {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Show every room and app now and the top talkers of the last minute (the dashboard's data).
    Stats {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
pub struct RoomFields {
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Origin URL visitors are sent to once admitted.
    #[arg(long)]
    origin: Option<String>,
    /// Visitors admitted per minute.
    #[arg(long = "rate")]
    rate_per_minute: Option<f64>,
    /// scheduled | open | paused | passthrough | closed
    #[arg(long)]
    state: Option<String>,
    /// Start of a scheduled room (RFC 3339).
    #[arg(long)]
    starts_at: Option<String>,
    /// At most this many admitted visitors active at once.
    #[arg(long)]
    max_active_users: Option<u64>,
    /// Session length after the last activity, seconds.
    #[arg(long)]
    session_seconds: Option<u64>,
    /// Skip waiting visitors unseen this long, seconds.
    #[arg(long)]
    abandon_after_seconds: Option<u64>,
    /// Queue only when traffic exceeds the policy (true/false).
    #[arg(long)]
    safety_net: Option<bool>,
    /// New tickets per client IP per minute.
    #[arg(long)]
    per_ip_entries_per_minute: Option<u32>,
    /// Proof-of-work difficulty in leading zero bits (0 = off).
    #[arg(long)]
    pow_difficulty: Option<u8>,
    /// Adaptive policy as JSON, e.g. '{"probe_url":"http://origin/health","target_latency_ms":300,"min_per_minute":60,"max_per_minute":1200}', or null.
    #[arg(long, value_parser = parse_json)]
    adaptive: Option<Value>,
    /// Bypass rules as JSON, e.g. '{"cidrs":["10.0.0.0/8"],"header_value":"…"}', or null.
    #[arg(long, value_parser = parse_json)]
    bypass: Option<Value>,
    /// Webhooks as JSON, e.g. `[{"url":"https://ops.example/weir","secret":"at-least-16-chars"}]`, or `[]` to remove them.
    #[arg(long, value_parser = parse_json)]
    webhooks: Option<Value>,
}

fn parse_json(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

impl RoomFields {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("name", self.name.clone().map(Value::from));
        put("origin", self.origin.clone().map(Value::from));
        put("rate_per_minute", self.rate_per_minute.map(Value::from));
        put("state", self.state.clone().map(Value::from));
        put("starts_at", self.starts_at.clone().map(Value::from));
        put("max_active_users", self.max_active_users.map(Value::from));
        put("session_seconds", self.session_seconds.map(Value::from));
        put("abandon_after_seconds", self.abandon_after_seconds.map(Value::from));
        put("safety_net", self.safety_net.map(Value::from));
        put("per_ip_entries_per_minute", self.per_ip_entries_per_minute.map(Value::from));
        put("pow_difficulty", self.pow_difficulty.map(Value::from));
        put("adaptive", self.adaptive.clone());
        put("bypass", self.bypass.clone());
        put("webhooks", self.webhooks.clone());
        m
    }
}

#[derive(Subcommand)]
pub enum RoomCommand {
    /// Create a room.
    Create {
        id: String,
        #[command(flatten)]
        fields: RoomFields,
    },
    /// List rooms with their live statistics.
    List,
    /// Show one room.
    Show { id: String },
    /// Change a room (only the given fields).
    Set {
        id: String,
        #[command(flatten)]
        fields: RoomFields,
    },
    /// Delete a room and its queue.
    Delete { id: String },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Generate a new signing key; previous keys stay in the JWKS so issued tokens keep verifying.
    Rotate,
}

/// A failed admin call: the message is what the user sees.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

/// A minimal JSON client for the admin API.
pub struct AdminClient {
    common: Common,
    client: Client<crate::outbound::Connector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(common: Common) -> Self {
        // An admin URL behind a private CA: the server's own setting, read from its variable.
        if let Some(ca_file) = std::env::var_os("WEIR_TLS_CA_FILE") {
            if let Err(e) = crate::outbound::configure(Some(std::path::Path::new(&ca_file))) {
                eprintln!("weir: {e}");
            }
        }
        Self { common, client: Client::builder(TokioExecutor::new()).build(crate::outbound::connector(None)) }
    }

    pub fn json_output(&self) -> bool {
        self.common.json
    }

    /// Sends one request; returns the JSON body of a 2xx answer (Null for 204), or the server's
    /// error message.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        let key = self.common.admin_key.as_deref().ok_or_else(|| {
            CliError("no admin key: set WEIR_ADMIN_KEY (printed at first start, stored in <data dir>/admin.key)".into())
        })?;
        let url = format!("{}/api/v1{path}", self.common.server.trim_end_matches('/'));
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| CliError(format!("bad request for {url}: {e}")))?;
        let response = tokio::time::timeout(std::time::Duration::from_secs(30), self.client.request(request))
            .await
            .map_err(|_| CliError(format!("{url}: no answer within 30 s")))?
            .map_err(|e| CliError(format!("cannot reach {url}: {e}")))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError(format!("{url}: {e}")))?
            .to_bytes();
        let value: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
        if status.is_success() {
            Ok(value)
        } else {
            let message = value["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            Err(CliError(format!("{} ({})", message, status.as_u16())))
        }
    }
}

/// Prints rows as an aligned table.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_rooms(rooms: &[Value]) {
    let rows: Vec<Vec<String>> = rooms
        .iter()
        .map(|r| {
            vec![
                cell(&r["id"]),
                cell(&r["state"]),
                cell(&r["rate_per_minute"]),
                cell(&r["stats"]["queue_length"]),
                cell(&r["stats"]["serving"]),
                cell(&r["stats"]["last_ticket"]),
                cell(&r["stats"]["admitted_last_minute"]),
                cell(&r["origin"]),
            ]
        })
        .collect();
    print_table(&["id", "state", "rate/min", "queue", "serving", "last ticket", "admitted/min", "origin"], &rows);
}

/// One room in full: its settings, then its live statistics.
fn print_details(room: &Value) {
    let mut rows: Vec<Vec<String>> = Vec::new();
    if let Some(fields) = room.as_object() {
        for (k, v) in fields.iter().filter(|(k, _)| *k != "stats") {
            rows.push(vec![k.clone(), cell(v)]);
        }
    }
    if let Some(stats) = room["stats"].as_object() {
        for (k, v) in stats {
            rows.push(vec![format!("stats.{k}"), cell(v)]);
        }
    }
    print_table(&["field", "value"], &rows);
}

async fn run_room(client: &AdminClient, command: RoomCommand) -> Result<Value, CliError> {
    let out = match command {
        RoomCommand::Create { id, fields } => {
            let mut body = fields.to_json();
            body.insert("id".into(), json!(id));
            client.call(Method::POST, "/rooms", Some(Value::Object(body))).await?
        }
        RoomCommand::List => client.call(Method::GET, "/rooms", None).await?,
        RoomCommand::Show { id } => {
            let room = client.call(Method::GET, &format!("/rooms/{id}"), None).await?;
            if !client.json_output() {
                print_details(&room);
            }
            return Ok(room);
        }
        RoomCommand::Set { id, fields } => {
            client.call(Method::PATCH, &format!("/rooms/{id}"), Some(Value::Object(fields.to_json()))).await?
        }
        RoomCommand::Delete { id } => {
            client.call(Method::DELETE, &format!("/rooms/{id}"), None).await?;
            if !client.json_output() {
                println!("deleted room {id}");
            }
            return Ok(Value::Null);
        }
    };
    if !client.json_output() {
        match out.get("rooms").and_then(Value::as_array) {
            Some(rooms) => print_rooms(rooms),
            None => print_rooms(std::slice::from_ref(&out)),
        }
    }
    Ok(out)
}

async fn run(command: AdminCommand) -> Result<(), CliError> {
    let (client, out) = match command {
        AdminCommand::Room { common, command } => {
            let client = AdminClient::new(common);
            let out = run_room(&client, command).await?;
            (client, out)
        }
        AdminCommand::App { common, command } => {
            let client = AdminClient::new(common);
            let out = crate::admin::cli_app::run_app(&client, command).await?;
            (client, out)
        }
        AdminCommand::Stats { common } => {
            let client = AdminClient::new(common);
            let out = crate::admin::cli_stats::run_stats(&client).await?;
            (client, out)
        }
        AdminCommand::Keys { common, command: KeysCommand::Rotate } => {
            let client = AdminClient::new(common);
            let out = client.call(Method::POST, "/keys/rotate", None).await?;
            if !client.json_output() {
                println!("new signing key: {}", cell(&out["kid"]));
            }
            (client, out)
        }
    };
    if client.json_output() && !out.is_null() {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    Ok(())
}

pub fn main(command: AdminCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e}");
            ExitCode::FAILURE
        }
    }
}
