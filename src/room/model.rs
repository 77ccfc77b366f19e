//! A room's definition as the admin API creates and patches it, validated at the edge so the
//! rest of weir only ever sees well-formed rooms. Stored as JSON in `Table::Rooms`.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::branding::Branding;
use super::notify::RoomWebhook;
use crate::error::ApiError;
pub use crate::room::policy::{Adaptive, Bypass};

/// Highest admission rate accepted (visitors per minute); far above what one origin serves,
/// low enough that the fractional arithmetic stays exact.
pub const MAX_RATE_PER_MINUTE: f64 = 10_000_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomState {
    /// Countdown page until `starts_at`; entrants get tickets, nobody is admitted before it.
    Scheduled,
    Open,
    /// Nobody admitted; everybody keeps their place.
    Paused,
    /// Every entrant goes straight to the origin with a token.
    Passthrough,
    /// "Sold out / ended": no new tickets.
    Closed,
}

impl RoomState {
    pub fn as_str(self) -> &'static str {
        match self {
            RoomState::Scheduled => "scheduled",
            RoomState::Open => "open",
            RoomState::Paused => "paused",
            RoomState::Passthrough => "passthrough",
            RoomState::Closed => "closed",
        }
    }
}

/// How admitted visitors reach the origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomMode {
    /// Sent to the origin with a token; the origin (or its proxy) checks it.
    #[default]
    Redirect,
    /// weir proxies `/p/{room}/...` to the origin for visitors holding a valid token.
    Proxy,
}

/// A stored room definition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoomSpec {
    pub id: String,
    pub name: String,
    pub origin: String,
    pub rate_per_minute: f64,
    pub state: RoomState,
    /// RFC 3339 start of a scheduled room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
    /// Creation time (ms since epoch). Also the room's generation: visitor cookies carry it so
    /// a cookie from a deleted room of the same id is not honoured by its successor.
    pub created_at_ms: i64,
    /// Page look (issue 6).
    #[serde(default)]
    pub branding: Branding,
    /// `redirect` (default) or `proxy` (issue 6).
    #[serde(default)]
    pub mode: RoomMode,
    /// At most this many admitted visitors active at once (see `session_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active_users: Option<u64>,
    /// An admitted visitor stays active this long after its last seen activity.
    #[serde(default = "default_session_seconds")]
    pub session_seconds: u64,
    /// Rate follows origin health, within [min, max].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<Adaptive>,
    /// Waiting visitors unseen this long are skipped when their turn comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandon_after_seconds: Option<u64>,
    /// Queue only while arrivals or active users exceed the policy.
    #[serde(default)]
    pub safety_net: bool,
    /// Who skips the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypass: Option<Bypass>,
    /// New tickets per client IP per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_ip_entries_per_minute: Option<u32>,
    /// Leading zero bits of the proof-of-work a new visitor must find (0 = off).
    #[serde(default)]
    pub pow_difficulty: u8,
    /// Endpoints told when the room starts or stops queueing or changes state (`room::notify`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<RoomWebhook>,
}

/// `POST /api/v1/rooms` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRoom {
    pub id: String,
    pub name: Option<String>,
    pub origin: String,
    pub rate_per_minute: f64,
    pub state: Option<RoomState>,
    pub starts_at: Option<String>,
    #[serde(default)]
    pub branding: Branding,
    #[serde(default)]
    pub mode: RoomMode,
    pub max_active_users: Option<u64>,
    pub session_seconds: Option<u64>,
    pub adaptive: Option<Adaptive>,
    pub abandon_after_seconds: Option<u64>,
    pub safety_net: Option<bool>,
    pub bypass: Option<Bypass>,
    pub per_ip_entries_per_minute: Option<u32>,
    pub pow_difficulty: Option<u8>,
    #[serde(default)]
    pub webhooks: Vec<RoomWebhook>,
}

/// `PATCH /api/v1/rooms/{id}` body: every field optional; `starts_at: null` clears it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomPatch {
    pub name: Option<String>,
    pub origin: Option<String>,
    pub rate_per_minute: Option<f64>,
    pub state: Option<RoomState>,
    #[serde(default, deserialize_with = "double_option")]
    pub starts_at: Option<Option<String>>,
    /// Replaces the branding (a stored custom template is kept).
    pub branding: Option<Branding>,
    pub mode: Option<RoomMode>,
    #[serde(default, deserialize_with = "double_option")]
    pub max_active_users: Option<Option<u64>>,
    pub session_seconds: Option<u64>,
    #[serde(default, deserialize_with = "double_option")]
    pub adaptive: Option<Option<Adaptive>>,
    #[serde(default, deserialize_with = "double_option")]
    pub abandon_after_seconds: Option<Option<u64>>,
    pub safety_net: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    pub bypass: Option<Option<Bypass>>,
    #[serde(default, deserialize_with = "double_option")]
    pub per_ip_entries_per_minute: Option<Option<u32>>,
    pub pow_difficulty: Option<u8>,
    /// Replaces the room's webhooks (`[]` removes them).
    pub webhooks: Option<Vec<RoomWebhook>>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn double_option<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn default_session_seconds() -> u64 {
    600
}

pub fn validate_room_id(id: &str) -> Result<(), ApiError> {
    let bytes = id.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field("id", "must match [a-z0-9][a-z0-9-]{0,63}"))
    }
}

fn validate_origin(origin: &str) -> Result<(), ApiError> {
    match url::Url::parse(origin) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(ApiError::invalid_field("origin", "must be an absolute http(s) URL")),
    }
}

fn validate_rate(rate: f64) -> Result<(), ApiError> {
    if rate.is_finite() && (0.0..=MAX_RATE_PER_MINUTE).contains(&rate) {
        Ok(())
    } else {
        Err(ApiError::invalid_field("rate_per_minute", format!("must be between 0 and {MAX_RATE_PER_MINUTE}")))
    }
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    // Control characters and bidirectional overrides would let a name show as something else
    // on the waiting page, the dashboard and the CLI's tables.
    let hidden = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if name.trim().is_empty() || name.chars().count() > 200 {
        Err(ApiError::invalid_field("name", "must be 1-200 characters"))
    } else if name.chars().any(hidden) {
        Err(ApiError::invalid_field("name", "must not contain control characters or bidirectional overrides"))
    } else {
        Ok(())
    }
}

/// Parses an RFC 3339 time into milliseconds since the epoch.
pub fn parse_time_ms(field: &str, value: &str) -> Result<i64, ApiError> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| ApiError::invalid_field(field, "must be an RFC 3339 time such as 2026-12-24T10:00:00Z"))
}

pub fn format_time_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

impl RoomSpec {
    pub fn create(input: NewRoom, now_ms: i64) -> Result<RoomSpec, ApiError> {
        validate_room_id(&input.id)?;
        let spec = RoomSpec {
            name: input.name.unwrap_or_else(|| input.id.clone()),
            id: input.id,
            origin: input.origin,
            rate_per_minute: input.rate_per_minute,
            state: input.state.unwrap_or(if input.starts_at.is_some() { RoomState::Scheduled } else { RoomState::Open }),
            starts_at: input.starts_at,
            created_at_ms: now_ms,
            branding: input.branding,
            mode: input.mode,
            max_active_users: input.max_active_users,
            session_seconds: input.session_seconds.unwrap_or_else(default_session_seconds),
            adaptive: input.adaptive,
            abandon_after_seconds: input.abandon_after_seconds,
            safety_net: input.safety_net.unwrap_or(false),
            bypass: input.bypass,
            per_ip_entries_per_minute: input.per_ip_entries_per_minute,
            pow_difficulty: input.pow_difficulty.unwrap_or(0),
            webhooks: input.webhooks,
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn apply(&self, patch: RoomPatch) -> Result<RoomSpec, ApiError> {
        let mut next = self.clone();
        if let Some(v) = patch.name {
            next.name = v;
        }
        if let Some(v) = patch.origin {
            next.origin = v;
        }
        if let Some(v) = patch.rate_per_minute {
            next.rate_per_minute = v;
        }
        if let Some(v) = patch.starts_at {
            next.starts_at = v;
        }
        if let Some(v) = patch.state {
            next.state = v;
        }
        if let Some(v) = patch.branding {
            next.branding = self.branding.patched(v);
        }
        if let Some(v) = patch.mode {
            next.mode = v;
        }
        if let Some(v) = patch.max_active_users {
            next.max_active_users = v;
        }
        if let Some(v) = patch.session_seconds {
            next.session_seconds = v;
        }
        if let Some(v) = patch.adaptive {
            next.adaptive = v;
        }
        if let Some(v) = patch.abandon_after_seconds {
            next.abandon_after_seconds = v;
        }
        if let Some(v) = patch.safety_net {
            next.safety_net = v;
        }
        if let Some(v) = patch.bypass {
            next.bypass = v;
        }
        if let Some(v) = patch.per_ip_entries_per_minute {
            next.per_ip_entries_per_minute = v;
        }
        if let Some(v) = patch.pow_difficulty {
            next.pow_difficulty = v;
        }
        if let Some(v) = patch.webhooks {
            next.webhooks = v;
        }
        next.validate()?;
        Ok(next)
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        validate_room_id(&self.id)?;
        validate_name(&self.name)?;
        validate_origin(&self.origin)?;
        validate_rate(self.rate_per_minute)?;
        if let Some(s) = &self.starts_at {
            parse_time_ms("starts_at", s)?;
        }
        crate::room::policy::validate(self)?;
        if self.state == RoomState::Scheduled && self.starts_at.is_none() {
            return Err(ApiError::invalid_field("starts_at", "is required when state is scheduled"));
        }
        self.branding.validate()?;
        super::notify::validate(&self.webhooks)?;
        Ok(())
    }

    /// The state in force at `now_ms`: a scheduled room whose start has passed is open.
    pub fn state_at(&self, now_ms: i64) -> RoomState {
        match self.state {
            RoomState::Scheduled if self.starts_at_ms().is_some_and(|t| now_ms >= t) => RoomState::Open,
            s => s,
        }
    }

    pub fn starts_at_ms(&self) -> Option<i64> {
        self.starts_at.as_deref().and_then(|s| parse_time_ms("starts_at", s).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids() {
        for ok in ["a", "0", "summer-sale", &"a".repeat(64)] {
            assert!(validate_room_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a b", &"a".repeat(65), "é"] {
            assert!(validate_room_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_validates_each_field() {
        let base = || NewRoom {
            id: "r".into(),
            name: None,
            origin: "https://shop.example".into(),
            rate_per_minute: 60.0,
            state: None,
            starts_at: None,
            max_active_users: None,
            session_seconds: None,
            adaptive: None,
            abandon_after_seconds: None,
            safety_net: None,
            bypass: None,
            per_ip_entries_per_minute: None,
            pow_difficulty: None,
            branding: Default::default(),
            mode: Default::default(),
            webhooks: Vec::new(),
        };
        assert!(RoomSpec::create(base(), 0).is_ok());
        let e = RoomSpec::create(NewRoom { origin: "/relative".into(), ..base() }, 0).unwrap_err();
        assert!(e.message.starts_with("origin"));
        let e = RoomSpec::create(NewRoom { rate_per_minute: -1.0, ..base() }, 0).unwrap_err();
        assert!(e.message.starts_with("rate_per_minute"));
        let e = RoomSpec::create(NewRoom { state: Some(RoomState::Scheduled), ..base() }, 0).unwrap_err();
        assert!(e.message.starts_with("starts_at"));
        let e = RoomSpec::create(NewRoom { starts_at: Some("tomorrow".into()), ..base() }, 0).unwrap_err();
        assert!(e.message.starts_with("starts_at"));
        let s = RoomSpec::create(NewRoom { starts_at: Some("2030-01-01T00:00:00Z".into()), ..base() }, 0).unwrap();
        assert_eq!(s.state, RoomState::Scheduled);
        assert_eq!(s.starts_at_ms(), Some(1_893_456_000_000));
    }
}
