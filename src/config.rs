//! Configuration: one [`Config`], built from defaults, then an optional TOML file, then `WEIR_*`
//! environment variables, then command-line flags (later sources win). A value of the wrong type
//! stops loading at that field; then [`Config::validate`] reports every range and cross-field
//! problem at once, by field name, before a port is bound.
//!
//! Environment variables map onto fields by upper-casing the field path and joining with `_`:
//! `WEIR_LISTEN`, `WEIR_DATA_DIR`, `WEIR_ADMIN_KEY`, `WEIR_PUBLIC_URL`, `WEIR_TOKEN_TTL_SECONDS`,
//! `WEIR_LOG_FORMAT`, `WEIR_LIMITS_MAX_IN_FLIGHT`, … (see [`ENV_FIELDS`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::realtime::AppSpec;

/// Every setting weir reads. Field docs name their environment variable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `WEIR_LISTEN`: the address the HTTP and WebSocket server binds.
    pub listen: SocketAddr,
    /// `WEIR_DATA_DIR`: where the embedded store and generated secrets live.
    pub data_dir: PathBuf,
    /// `WEIR_PUBLIC_URL`: the URL visitors reach weir at; the `iss` of admission tokens.
    /// Defaults to `http://{listen}`.
    pub public_url: Option<String>,
    /// `WEIR_ADMIN_KEY`: bearer key for `/api/v1`. Generated and persisted when unset.
    pub admin_key: Option<String>,
    /// `WEIR_TOKEN_TTL_SECONDS`: lifetime of admission tokens (default 30 minutes).
    pub token_ttl_seconds: u64,
    /// `WEIR_LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `WEIR_SHUTDOWN_GRACE_SECONDS`: how long shutdown waits for in-flight requests.
    pub shutdown_grace_seconds: u64,
    /// Resource bounds; see [`Limits`].
    pub limits: Limits,
    /// `WEIR_TRUSTED_PROXIES`: CIDR ranges of reverse proxies whose client-IP header is believed.
    pub trusted_proxies: Vec<String>,
    /// `WEIR_CLIENT_IP_HEADER`: the header trusted proxies put the client address in.
    pub client_ip_header: String,
    /// `WEIR_TLS_CA_FILE`: a PEM file of certificate authorities trusted for `https://` origins,
    /// probes and webhooks besides the built-in (Mozilla) roots, e.g. a private CA.
    pub tls_ca_file: Option<PathBuf>,
    /// Pusher apps defined in the file (apps created through the API live in the store).
    pub apps: Vec<AppSpec>,
    /// Several nodes sharing realtime traffic through Redis; see [`ClusterConfig`].
    pub cluster: ClusterConfig,
}

/// Several nodes sharing one Redis (`cluster`, `store::redis`): off unless `redis_url` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `WEIR_CLUSTER_REDIS_URL`: `redis://[user:password@]host:port[/db]` of the Redis (7.x);
    /// `rediss://` for Redis over TLS
    /// every node of the cluster uses.
    pub redis_url: Option<String>,
    /// `WEIR_CLUSTER_PREFIX`: the prefix of weir's Redis keys and channels, so that several
    /// clusters can share one Redis.
    pub prefix: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { redis_url: None, prefix: "weir".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Bounds on work accepted from clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// `WEIR_LIMITS_MAX_IN_FLIGHT`: concurrent requests per route group before new ones are shed
    /// with 503 (and the refused connection is not read again for the `Retry-After` second,
    /// `limits::backoff`). 256 keeps queueing inside the server to a few milliseconds on a
    /// small box while leaving group commit large batches.
    pub max_in_flight: usize,
    /// `WEIR_LIMITS_REQUEST_TIMEOUT_MS`: a request that takes longer is answered 503.
    pub request_timeout_ms: u64,
    /// `WEIR_LIMITS_ADMIN_BODY_BYTES`: largest admin API body (64 KiB: a room is a few hundred bytes).
    pub admin_body_bytes: usize,
    /// `WEIR_LIMITS_MAX_CONNECTIONS`: open TCP connections before new ones wait at accept.
    pub max_connections: usize,
    /// `WEIR_LIMITS_ACTIVE_CONNECTIONS`: when more connections have requests than this and the
    /// CPU is the bottleneck, this many are served at a time, in turns (`limits::turns`); 0 turns
    /// them off. 64 keeps their state in the caches on a small box.
    pub active_connections: usize,
    /// `WEIR_LIMITS_TURN_MS`: the longest turn while other connections wait for one.
    pub turn_ms: u64,
    /// `WEIR_LIMITS_LINE_WAIT_MS`: the longest wait in line for a turn. Turns shorten (down to
    /// 5 ms) as the line grows to keep it; a line too long even for those is not joined: the
    /// arriving request is refused (503, `Retry-After`). So accepted requests wait a bounded
    /// time however many connections there are; 0: no bound. 1 s keeps turns at 30 ms or more
    /// up to ~2,000 busy connections (shorter turns serve fewer requests per CPU-second,
    /// `BENCHMARKS.md`) and refuses only past ~12,800 with the default 64 turns.
    pub line_wait_ms: u64,
    /// `WEIR_LIMITS_HEADER_TIMEOUT_MS`: a connection whose request head is still arriving after
    /// one to two of these periods is closed (`limits::head_guard`), so clients trickling headers
    /// cannot hold the `max_connections` slots. Idle keep-alive connections are left open.
    pub header_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            request_timeout_ms: 10_000,
            admin_body_bytes: 64 * 1024,
            max_connections: 19_500,
            active_connections: 64,
            turn_ms: 50,
            line_wait_ms: 1_000,
            header_timeout_ms: 30_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./weir-data"),
            public_url: None,
            admin_key: None,
            token_ttl_seconds: 30 * 60,
            log_format: LogFormat::Text,
            shutdown_grace_seconds: 10,
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            client_ip_header: "x-forwarded-for".into(),
            tls_ca_file: None,
            apps: Vec::new(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// Environment variables weir reads, with the config path each one sets.
pub const ENV_FIELDS: &[(&str, &[&str])] = &[
    ("WEIR_LISTEN", &["listen"]),
    ("WEIR_DATA_DIR", &["data_dir"]),
    ("WEIR_PUBLIC_URL", &["public_url"]),
    ("WEIR_ADMIN_KEY", &["admin_key"]),
    ("WEIR_TOKEN_TTL_SECONDS", &["token_ttl_seconds"]),
    ("WEIR_LOG_FORMAT", &["log_format"]),
    ("WEIR_SHUTDOWN_GRACE_SECONDS", &["shutdown_grace_seconds"]),
    ("WEIR_CLIENT_IP_HEADER", &["client_ip_header"]),
    ("WEIR_TLS_CA_FILE", &["tls_ca_file"]),
    ("WEIR_LIMITS_MAX_IN_FLIGHT", &["limits", "max_in_flight"]),
    ("WEIR_LIMITS_REQUEST_TIMEOUT_MS", &["limits", "request_timeout_ms"]),
    ("WEIR_LIMITS_ADMIN_BODY_BYTES", &["limits", "admin_body_bytes"]),
    ("WEIR_LIMITS_MAX_CONNECTIONS", &["limits", "max_connections"]),
    ("WEIR_LIMITS_ACTIVE_CONNECTIONS", &["limits", "active_connections"]),
    ("WEIR_LIMITS_TURN_MS", &["limits", "turn_ms"]),
    ("WEIR_LIMITS_LINE_WAIT_MS", &["limits", "line_wait_ms"]),
    ("WEIR_LIMITS_HEADER_TIMEOUT_MS", &["limits", "header_timeout_ms"]),
    ("WEIR_CLUSTER_REDIS_URL", &["cluster", "redis_url"]),
    ("WEIR_CLUSTER_PREFIX", &["cluster", "prefix"]),
];

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub listen: Option<String>,
    pub data_dir: Option<String>,
}

/// Configuration could not be loaded; the message names every bad field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Builds the configuration from a file (if any), an environment and flags.
    /// `env` is a map rather than `std::env` so tests can feed it directly.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        flags: &Flags,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(vec![format!("config file {}: {e}", path.display())])
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    ConfigError(vec![format!("config file {}: {e}", path.display())])
                })?
            }
            None => toml::Table::new(),
        };
        for (var, path) in ENV_FIELDS {
            if let Some(raw) = env.get(*var) {
                set_path(&mut table, path, env_value(path, raw));
            }
        }
        if let Some(raw) = env.get("WEIR_TRUSTED_PROXIES") {
            let list = raw.split(',').map(|s| toml::Value::String(s.trim().to_string())).collect();
            set_path(&mut table, &["trusted_proxies"], toml::Value::Array(list));
        }
        if let Some(listen) = &flags.listen {
            set_path(&mut table, &["listen"], toml::Value::String(listen.clone()));
        }
        if let Some(dir) = &flags.data_dir {
            set_path(&mut table, &["data_dir"], toml::Value::String(dir.clone()));
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError(vec![format!("{}: {}", e.path(), e.inner().message().trim())]))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-field rules and ranges, reporting every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Some(url) = &self.public_url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => problems.push(format!(
                    "public_url: {url:?} is not an absolute http(s) URL"
                )),
            }
        }
        if let Some(key) = &self.admin_key {
            if key.len() < 16 {
                problems.push("admin_key: must be at least 16 characters".into());
            }
        }
        if self.token_ttl_seconds == 0 || self.token_ttl_seconds > 7 * 24 * 3600 {
            problems.push(format!(
                "token_ttl_seconds: {} is outside 1..=604800",
                self.token_ttl_seconds
            ));
        }
        if self.limits.max_in_flight == 0 {
            problems.push("limits.max_in_flight: must be at least 1".into());
        }
        if self.limits.max_connections == 0 {
            problems.push("limits.max_connections: must be at least 1".into());
        }
        if self.limits.turn_ms == 0 || self.limits.turn_ms > 10_000 {
            problems.push(format!("limits.turn_ms: {} is outside 1..=10000", self.limits.turn_ms));
        }
        if self.limits.line_wait_ms > 60_000 {
            problems.push(format!("limits.line_wait_ms: {} is outside 0..=60000", self.limits.line_wait_ms));
        }
        if self.limits.request_timeout_ms == 0 {
            problems.push("limits.request_timeout_ms: must be at least 1".into());
        }
        if self.limits.header_timeout_ms == 0 {
            problems.push("limits.header_timeout_ms: must be at least 1".into());
        }
        for c in &self.trusted_proxies {
            if crate::room::policy::abuse::Cidr::parse(c).is_none() {
                problems.push(format!("trusted_proxies: {c:?} is not a CIDR range"));
            }
        }
        if let Some(ca_file) = &self.tls_ca_file {
            if let Err(problem) = crate::outbound::check_ca_file(ca_file) {
                problems.push(problem);
            }
        }
        if let Some(url) = &self.cluster.redis_url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host_str().is_some_and(|h| !h.is_empty()) => {}
                _ => problems.push(format!("cluster.redis_url: {url:?} is not a redis:// (or rediss://, TLS) host:port URL")),
            }
        }
        let prefix = &self.cluster.prefix;
        if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            problems.push(format!("cluster.prefix: {prefix:?} must be 1-64 characters of [A-Za-z0-9._-]"));
        }
        for (i, app) in self.apps.iter().enumerate() {
            if let Err(e) = app.validate() {
                problems.push(format!("apps[{i}]: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    /// The public base URL without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.listen),
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().expect("config paths are non-empty");
    let mut cursor = table;
    for part in parents {
        let entry = cursor
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cursor = entry.as_table_mut().expect("just made a table");
    }
    cursor.insert(last.to_string(), value);
}

/// Environment values are strings; numeric fields (every `limits` field, the `_seconds` ones)
/// get numbers so serde sees the right type, and a non-number is passed as a string so the
/// error names the field. The string fields (an admin key, say) stay strings even when digits.
fn env_value(path: &[&str], raw: &str) -> toml::Value {
    let numeric = path.first() == Some(&"limits") || path.last().is_some_and(|f| f.ends_with("_seconds"));
    if numeric {
        if let Ok(n) = raw.trim().parse::<i64>() {
            return toml::Value::Integer(n);
        }
    }
    toml::Value::String(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Every numeric variable is read as a number (`WEIR_LIMITS_ACTIVE_CONNECTIONS` once was not).
    #[test]
    fn every_numeric_environment_variable_sets_its_field() {
        for (var, path) in ENV_FIELDS.iter().filter(|(_, p)| p[0] == "limits" || p[0].ends_with("_seconds")) {
            let loaded = Config::load(None, &env(&[(var, "7")]), &Flags::default());
            if let Err(e) = &loaded {
                assert!(!e.to_string().contains("invalid type"), "{var} ({path:?}) was not read as a number: {e}");
            }
        }
        let c = Config::load(None, &env(&[("WEIR_LIMITS_ACTIVE_CONNECTIONS", "16"), ("WEIR_LIMITS_LINE_WAIT_MS", "250")]), &Flags::default()).unwrap();
        assert_eq!((c.limits.active_connections, c.limits.line_wait_ms), (16, 250));
        let c = Config::load(None, &env(&[("WEIR_ADMIN_KEY", "12345678901234567890123456789012")]), &Flags::default()).unwrap();
        assert_eq!(c.admin_key.as_deref(), Some("12345678901234567890123456789012"), "a key of digits stays a string");
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, &env(&[]), &Flags::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./weir-data"));
        assert_eq!(c.token_ttl_seconds, 1800);
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weir.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1111\"\ndata_dir = \"/file\"\ntoken_ttl_seconds = 60\n").unwrap();
        let e = env(&[("WEIR_LISTEN", "127.0.0.1:2222"), ("WEIR_DATA_DIR", "/env")]);
        let flags = Flags { listen: Some("127.0.0.1:3333".into()), data_dir: None };
        let c = Config::load(Some(&file), &e, &flags).unwrap();
        assert_eq!(c.listen.port(), 3333);
        assert_eq!(c.data_dir, PathBuf::from("/env"));
        assert_eq!(c.token_ttl_seconds, 60);
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = env(&[("WEIR_TOKEN_TTL_SECONDS", "soon")]);
        let err = Config::load(None, &e, &Flags::default()).unwrap_err().to_string();
        assert!(err.contains("token_ttl_seconds"), "{err}");

        let e = env(&[("WEIR_LISTEN", "nowhere")]);
        let err = Config::load(None, &e, &Flags::default()).unwrap_err().to_string();
        assert!(err.contains("listen") || err.contains("socket address"), "{err}");

        let e = env(&[("WEIR_PUBLIC_URL", "ftp://x"), ("WEIR_ADMIN_KEY", "short")]);
        let err = Config::load(None, &e, &Flags::default()).unwrap_err().to_string();
        assert!(err.contains("public_url") && err.contains("admin_key"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weir.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:1\"\n").unwrap();
        let err = Config::load(Some(&file), &env(&[]), &Flags::default()).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }
}
