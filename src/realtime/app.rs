//! Pusher apps (tenants): credentials and per-app settings, as written in the config file
//! (`[[apps]]`), created through the admin API, and persisted in the store (`Table::Apps`).
//!
//! Every setting has a serde default so older files keep parsing; `validate()` names the first
//! bad field. The running state of an app lives in `tenant`.

use serde::{Deserialize, Serialize};

/// An app as written in the config file or created through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// Numeric id as a string (some SDKs require digits).
    pub id: String,
    pub key: String,
    pub secret: String,
    /// A disabled app refuses connections (4003) and API calls (403).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Whether clients may send `client-*` events on private and presence channels. Off by
    /// default, as on Pusher.
    #[serde(default)]
    pub client_events: bool,
    /// Concurrent WebSocket connections (0 = unlimited); over it a new connection gets 4004.
    #[serde(default)]
    pub max_connections: u32,
    /// Largest event `data` in bytes, from the API or a client (Pusher: 10 KB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Channels one connection may be subscribed to at once.
    #[serde(default = "default_max_channels")]
    pub max_channels_per_connection: usize,
    /// Distinct users in one presence channel (Pusher: 100).
    #[serde(default = "default_max_presence_members")]
    pub max_presence_members: usize,
    /// HTTP API publishes per second, each event counted (0 = unlimited); over it the API answers
    /// 429 with `Retry-After`. The burst equals one second's worth.
    #[serde(default)]
    pub max_publish_per_second: u32,
    /// Close connections that have not signed in (`pusher:signin`) within this many seconds with
    /// 4009 (0 = off).
    #[serde(default)]
    pub signin_within_s: u64,
    /// Seconds without a message before the server pings; announced to clients (Pusher: 120).
    #[serde(default = "default_activity_timeout")]
    pub activity_timeout_s: u64,
    /// Seconds to wait for the pong before closing with 4201 (Pusher: 30).
    #[serde(default = "default_pong_timeout")]
    pub pong_timeout_s: u64,
    /// Frames queued for one connection before it counts as a slow consumer and is closed with
    /// 4200. 256 frames of 10 KB bound a connection to ~2.5 MB beyond the socket's own buffers.
    #[serde(default = "default_outbound_queue")]
    pub outbound_queue_frames: usize,
    /// Events kept per channel for resume (weir's history extension).
    #[serde(default = "default_history_len")]
    pub history_len: usize,
    /// Seconds events stay resumable.
    #[serde(default = "default_history_ttl")]
    pub history_ttl_s: u64,
    /// Tell the subscribers of a public or private channel how many connections are subscribed
    /// to it (`pusher_internal:subscription_count`, pusher-js's `pusher:subscription_count`)
    /// whenever that number changes, at most once a second per channel; also the
    /// `subscription_count` webhook. Off by default, as on Pusher.
    #[serde(default)]
    pub subscription_count: bool,
    /// Tell signed-in users when the users in their sign-in's `watchlist` come online or go
    /// offline (`pusher_internal:watchlist_events`). Nothing is sent to a user whose sign-in
    /// carries no watchlist.
    #[serde(default = "yes")]
    pub watchlist_events: bool,
    #[serde(default)]
    pub webhooks: Vec<WebhookSpec>,
}

/// A webhook endpoint. `event_types` empty means all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub url: String,
    #[serde(default)]
    pub event_types: Vec<String>,
}

/// Webhook event names, as Pusher spells them.
pub const WEBHOOK_EVENT_TYPES: &[&str] =
    &["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss", "subscription_count"];

fn yes() -> bool {
    true
}
fn default_max_message_bytes() -> usize {
    10 * 1024
}
fn default_max_channels() -> usize {
    100
}
fn default_max_presence_members() -> usize {
    100
}
fn default_activity_timeout() -> u64 {
    120
}
fn default_pong_timeout() -> u64 {
    30
}
fn default_outbound_queue() -> usize {
    256
}
fn default_history_len() -> usize {
    100
}
fn default_history_ttl() -> u64 {
    300
}

impl AppSpec {
    /// A new app with default settings.
    pub fn new(id: String, key: String, secret: String) -> Self {
        serde_json::from_value(serde_json::json!({ "id": id, "key": key, "secret": secret }))
            .expect("an AppSpec with only credentials deserializes with defaults")
    }

    /// Checks the fields; the message names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() || self.id.len() > 20 || !self.id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("id: {:?} must be 1-20 digits", self.id));
        }
        if self.key.is_empty() || self.key.len() > 64 || !self.key.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err("key: must be 1-64 printable characters without ':'".into());
        }
        if self.secret.len() < 8 || self.secret.len() > 128 {
            return Err("secret: must be 8-128 bytes".into());
        }
        if !(1..=1024 * 1024).contains(&self.max_message_bytes) {
            return Err("max_message_bytes: must be 1..=1048576".into());
        }
        if !(1..=10_000).contains(&self.max_channels_per_connection) {
            return Err("max_channels_per_connection: must be 1..=10000".into());
        }
        if !(1..=100_000).contains(&self.max_presence_members) {
            return Err("max_presence_members: must be 1..=100000".into());
        }
        if self.signin_within_s > 3600 {
            return Err("signin_within_s: must be 0..=3600".into());
        }
        if !(1..=3600).contains(&self.activity_timeout_s) {
            return Err("activity_timeout_s: must be 1..=3600".into());
        }
        if !(1..=600).contains(&self.pong_timeout_s) {
            return Err("pong_timeout_s: must be 1..=600".into());
        }
        if !(1..=65_536).contains(&self.outbound_queue_frames) {
            return Err("outbound_queue_frames: must be 1..=65536".into());
        }
        if self.history_len > 10_000 {
            return Err("history_len: must be 0..=10000".into());
        }
        if self.history_ttl_s > 86_400 {
            return Err("history_ttl_s: must be 0..=86400".into());
        }
        if self.webhooks.len() > 10 {
            return Err("webhooks: at most 10".into());
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if !super::webhook::is_endpoint_url(&w.url) {
                return Err(format!("webhooks[{i}].url: {:?} is not an absolute http(s) URL", w.url));
            }
            if let Some(bad) = w.event_types.iter().find(|t| !WEBHOOK_EVENT_TYPES.contains(&t.as_str())) {
                return Err(format!("webhooks[{i}].event_types: unknown type {bad:?} (known: {})", WEBHOOK_EVENT_TYPES.join(", ")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_files_parse_with_defaults() {
        let spec: AppSpec = toml::from_str("id = \"1\"\nkey = \"k\"\nsecret = \"secret-secret\"\n").unwrap();
        assert!(spec.enabled);
        assert_eq!(spec.max_message_bytes, 10240);
        assert_eq!(spec.max_presence_members, 100);
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn validate_names_the_field() {
        let mut spec = AppSpec::new("1".into(), "k".into(), "secret-secret".into());
        spec.max_message_bytes = 0;
        assert!(spec.validate().unwrap_err().starts_with("max_message_bytes"));
        spec.max_message_bytes = 10;
        spec.webhooks.push(WebhookSpec { url: "http://x/h".into(), event_types: vec!["nope".into()] });
        assert!(spec.validate().unwrap_err().starts_with("webhooks[0].event_types"));
    }
}
