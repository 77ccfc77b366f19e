//! The Pusher Channels protocol v7 wire format: close/error codes (mapped here and only here),
//! outgoing frames, incoming messages, and channel/event name rules.
//!
//! Frames are serialized once into [`Utf8Bytes`], which clone as a shared handle, so fan-out
//! never re-encodes per recipient. Everything that interprets the frames lives elsewhere
//! (`connection` for the socket, `tenant` for channels).

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

/// Close and `pusher:error` codes. 4000-4099: do not reconnect; 4100-4199: reconnect after a
/// back-off; 4200-4299: reconnect now; 4300-4399: other errors (the connection stays open).
/// Codes marked "weir" are ours where Pusher documents none; clients treat them as generic errors.
pub mod code {
    pub const APP_NOT_FOUND: u16 = 4001;
    pub const APP_DISABLED: u16 = 4003;
    pub const OVER_CONNECTION_QUOTA: u16 = 4004;
    pub const INVALID_VERSION_FORMAT: u16 = 4006;
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    pub const NO_PROTOCOL: u16 = 4008;
    /// Unauthorized: sign-in deadline missed, bad sign-in, bad channel auth.
    pub const UNAUTHORIZED: u16 = 4009;
    pub const OVER_CAPACITY: u16 = 4100;
    /// Generic "reconnect now": shutdown, slow consumer, app settings changed.
    pub const RECONNECT: u16 = 4200;
    pub const PONG_TIMEOUT: u16 = 4201;
    /// weir: malformed JSON, missing or unknown event.
    pub const INVALID_MESSAGE: u16 = 4300;
    /// Client event rate limit exceeded (Pusher's code).
    pub const CLIENT_EVENT_RATE_LIMIT: u16 = 4301;
    /// weir: client event refused (disabled for the app, wrong channel type, not subscribed).
    pub const CLIENT_EVENT_REJECTED: u16 = 4302;
    /// weir: an inbound message over the app's size limit; the message is dropped.
    pub const MESSAGE_TOO_LARGE: u16 = 4303;
}

/// Protocol versions accepted in `?protocol=`. pusher-js sends 7; 5 and 6 use the same frames.
pub const MIN_PROTOCOL: u32 = 5;
pub const MAX_PROTOCOL: u32 = 7;

/// Pusher's limit on channel name length.
pub const MAX_CHANNEL_NAME: usize = 164;
/// Pusher's limit on event name length.
pub const MAX_EVENT_NAME: usize = 200;

/// What a channel name means. Parsed once at the edge; the rest of the code matches on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    PrivateEncrypted,
    Presence,
    /// `#server-to-user-{user id}`: only that signed-in user may subscribe.
    ServerToUser(String),
}

/// A validated channel name's kind plus whether it is a `cache-` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelType {
    pub kind: ChannelKind,
    pub cache: bool,
}

impl ChannelType {
    /// Validates `name` as Pusher does (1-164 of `A-Za-z0-9_-=@,.;`, `#` only in
    /// `#server-to-user-`) and classifies it.
    pub fn parse(name: &str) -> Result<ChannelType, String> {
        if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
            return Err(format!("channel name must be 1-{MAX_CHANNEL_NAME} characters"));
        }
        if let Some(user) = name.strip_prefix("#server-to-user-") {
            if user.is_empty() || !user.bytes().all(valid_name_byte) {
                return Err(format!("invalid channel name {name:?}"));
            }
            return Ok(ChannelType { kind: ChannelKind::ServerToUser(user.to_string()), cache: false });
        }
        if !name.bytes().all(valid_name_byte) {
            return Err(format!("invalid channel name {name:?}: allowed characters are A-Z a-z 0-9 _ - = @ , . ;"));
        }
        let (kind, rest) = if let Some(rest) = name.strip_prefix("private-encrypted-") {
            (ChannelKind::PrivateEncrypted, rest)
        } else if let Some(rest) = name.strip_prefix("private-") {
            (ChannelKind::Private, rest)
        } else if let Some(rest) = name.strip_prefix("presence-") {
            (ChannelKind::Presence, rest)
        } else {
            (ChannelKind::Public, name)
        };
        Ok(ChannelType { kind, cache: rest.starts_with("cache-") })
    }

    /// Whether subscribing needs a signature from the app's auth endpoint.
    pub fn needs_auth(&self) -> bool {
        matches!(self.kind, ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence)
    }
}

fn valid_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'@' | b',' | b'.' | b';')
}

/// Validates an event name (1-200 bytes).
pub fn validate_event_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_EVENT_NAME {
        return Err(format!("event name must be 1-{MAX_EVENT_NAME} characters"));
    }
    // The protocol's own events: a published `pusher_internal:member_added` would tell clients
    // of a member who never joined.
    if name.starts_with("pusher:") || name.starts_with("pusher_internal:") {
        return Err("event names starting with pusher: or pusher_internal: are reserved for the protocol".into());
    }
    Ok(())
}

/// `data` in an outgoing frame: a string (channel events carry it exactly as published) or
/// a JSON object (`pusher:error`, as Pusher sends it).
#[derive(Serialize)]
#[serde(untagged)]
pub enum Data<'a> {
    Str(&'a str),
    Json(&'a serde_json::Value),
}

#[derive(Serialize)]
struct Envelope<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    data: Data<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    /// weir's history extension; standard clients ignore unknown fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<u64>,
}

/// One serialized frame, shareable between recipients.
pub fn frame(event: &str, channel: Option<&str>, data: Data<'_>, user_id: Option<&str>, serial: Option<u64>) -> Utf8Bytes {
    let envelope = Envelope { event, channel, data, user_id, serial };
    let text = serde_json::to_string(&envelope).expect("serializing strings and JSON values cannot fail");
    Utf8Bytes::from(text)
}

/// A channel event as clients receive it.
pub fn channel_event(event: &str, channel: &str, data: &str, user_id: Option<&str>, serial: Option<u64>) -> Utf8Bytes {
    frame(event, Some(channel), Data::Str(data), user_id, serial)
}

/// A protocol event whose `data` is a JSON document encoded as a string, as Pusher sends
/// `connection_established`, `subscription_succeeded`, `member_added`, ….
pub fn json_string_event(event: &str, channel: Option<&str>, data: &serde_json::Value) -> Utf8Bytes {
    let inner = data.to_string();
    frame(event, channel, Data::Str(&inner), None, None)
}

pub fn connection_established(socket_id: &str, activity_timeout_s: u64) -> Utf8Bytes {
    json_string_event(
        "pusher:connection_established",
        None,
        &serde_json::json!({ "socket_id": socket_id, "activity_timeout": activity_timeout_s }),
    )
}

/// `pusher:error` with `{code, message}` as an object, as Pusher sends it.
pub fn error(code: u16, message: &str) -> Utf8Bytes {
    let data = serde_json::json!({ "code": code, "message": message });
    frame("pusher:error", None, Data::Json(&data), None, None)
}

/// `pusher:subscription_error` on a channel. `kind` is Pusher's `type` (`AuthError`, …);
/// `status` is an HTTP-like status, as pusher-js expects.
pub fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> Utf8Bytes {
    let data = serde_json::json!({ "type": kind, "error": message, "status": status });
    frame("pusher:subscription_error", Some(channel), Data::Json(&data), None, None)
}

pub fn ping() -> Utf8Bytes {
    frame("pusher:ping", None, Data::Str("{}"), None, None)
}

pub fn pong() -> Utf8Bytes {
    frame("pusher:pong", None, Data::Str("{}"), None, None)
}

/// A message from a client. `data` is kept as JSON: pusher-js sends objects, some clients send
/// the same object encoded as a string ([`Incoming::data_object`] accepts both).
#[derive(Debug, Deserialize)]
pub struct Incoming {
    pub event: String,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Incoming {
    pub fn parse(text: &str) -> Result<Incoming, String> {
        serde_json::from_str(text).map_err(|e| format!("malformed message: {e}"))
    }

    /// `data` as an object, decoding it first when a client sent it as a JSON string.
    pub fn data_object(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        match &self.data {
            serde_json::Value::Object(m) => Some(m.clone()),
            serde_json::Value::String(s) => match serde_json::from_str(s) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                _ => None,
            },
            _ => None,
        }
    }

    /// `data` as the string other clients receive: strings as is, anything else encoded.
    pub fn data_string(&self) -> String {
        match &self.data {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_kinds() {
        let p = |n: &str| ChannelType::parse(n).unwrap();
        assert_eq!(p("my-channel").kind, ChannelKind::Public);
        assert_eq!(p("private-a").kind, ChannelKind::Private);
        assert_eq!(p("private-encrypted-a").kind, ChannelKind::PrivateEncrypted);
        assert_eq!(p("presence-a").kind, ChannelKind::Presence);
        assert!(p("cache-a").cache && p("private-cache-a").cache && p("presence-cache-a").cache);
        assert!(p("private-encrypted-cache-a").cache);
        assert!(!p("private-a").cache);
        assert_eq!(p("#server-to-user-42").kind, ChannelKind::ServerToUser("42".into()));
        assert!(ChannelType::parse("").is_err());
        assert!(ChannelType::parse("a b").is_err());
        assert!(ChannelType::parse("#other").is_err());
        assert!(ChannelType::parse(&"a".repeat(165)).is_err());
        assert!(ChannelType::parse(&"a".repeat(164)).is_ok());
    }

    #[test]
    fn frames_carry_string_data() {
        let f = connection_established("1.2", 120);
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["event"], "pusher:connection_established");
        let inner: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(inner["socket_id"], "1.2");
        let e: serde_json::Value = serde_json::from_str(error(4001, "x").as_str()).unwrap();
        assert_eq!(e["data"]["code"], 4001);
        let c: serde_json::Value = serde_json::from_str(channel_event("e", "c", "{\"a\":1}", None, Some(7)).as_str()).unwrap();
        assert_eq!(c["data"], "{\"a\":1}");
        assert_eq!(c["serial"], 7);
    }
}
