//! Admission policies beyond a fixed rate: active-user caps, adaptive rate, abandonment-aware
//! admission, the scheduled pre-queue shuffle, safety net ([`engine`], [`adaptive`]), and
//! abuse resistance: bypass, per-IP entry limits, proof-of-work ([`abuse`], [`pow`]).
//!
//! Everything here is arithmetic on explicit inputs (`now`, elapsed time, probe results); the
//! driver and routes feed it and persist what it decides.

pub mod abuse;
pub mod adaptive;
pub mod engine;
pub mod pow;

use serde::{Deserialize, Serialize};

use super::model::RoomSpec;
use crate::error::ApiError;

/// `adaptive` room field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adaptive {
    /// URL weir probes with a GET (its origin's health endpoint).
    pub probe_url: String,
    #[serde(default = "default_interval")]
    pub interval_seconds: u64,
    /// Latency above this (or an error/timeout) counts as trouble.
    pub target_latency_ms: u64,
    pub min_per_minute: f64,
    pub max_per_minute: f64,
}

fn default_interval() -> u64 {
    5
}

/// `bypass` room field: who skips the queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bypass {
    /// CIDR ranges (`10.0.0.0/8`, `2001:db8::/32`, or single addresses).
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Secret value of the `X-Weir-Bypass` request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_value: Option<String>,
}

/// Longest absence before a waiting visitor is skipped: a week, like the longest session.
pub const MAX_ABANDON_AFTER_SECONDS: u64 = 7 * 24 * 3600;

/// Highest proof-of-work difficulty (leading zero bits): ~16 M hashes, seconds in a browser.
pub const MAX_POW_DIFFICULTY: u8 = 24;

pub fn validate(spec: &RoomSpec) -> Result<(), ApiError> {
    if spec.max_active_users == Some(0) {
        return Err(ApiError::invalid_field("max_active_users", "must be at least 1 (omit it for no cap)"));
    }
    if !(1..=7 * 24 * 3600).contains(&spec.session_seconds) {
        return Err(ApiError::invalid_field("session_seconds", "must be between 1 and 604800"));
    }
    if let Some(a) = &spec.adaptive {
        match url::Url::parse(&a.probe_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => return Err(ApiError::invalid_field("adaptive.probe_url", "must be an absolute http(s) URL")),
        }
        if !(1..=3600).contains(&a.interval_seconds) {
            return Err(ApiError::invalid_field("adaptive.interval_seconds", "must be between 1 and 3600"));
        }
        if !(1..=60_000).contains(&a.target_latency_ms) {
            return Err(ApiError::invalid_field("adaptive.target_latency_ms", "must be between 1 and 60000"));
        }
        let valid = |v: f64| v.is_finite() && (0.0..=super::model::MAX_RATE_PER_MINUTE).contains(&v);
        if !valid(a.min_per_minute) || !valid(a.max_per_minute) || a.min_per_minute > a.max_per_minute {
            return Err(ApiError::invalid_field("adaptive.min_per_minute", "min and max must satisfy 0 <= min <= max"));
        }
    }
    if spec.abandon_after_seconds.is_some_and(|s| !(1..=MAX_ABANDON_AFTER_SECONDS).contains(&s)) {
        return Err(ApiError::invalid_field(
            "abandon_after_seconds",
            format!("must be between 1 and {MAX_ABANDON_AFTER_SECONDS} (omit it to never skip)"),
        ));
    }
    if let Some(b) = &spec.bypass {
        if b.cidrs.len() > 256 {
            return Err(ApiError::invalid_field("bypass.cidrs", "at most 256 ranges"));
        }
        for c in &b.cidrs {
            abuse::Cidr::parse(c).ok_or_else(|| ApiError::invalid_field("bypass.cidrs", format!("{c:?} is not a CIDR range")))?;
        }
        if b.header_value.as_ref().is_some_and(|v| v.len() < 16 || v.len() > 256) {
            return Err(ApiError::invalid_field("bypass.header_value", "must be 16-256 characters"));
        }
    }
    if spec.per_ip_entries_per_minute == Some(0) {
        return Err(ApiError::invalid_field("per_ip_entries_per_minute", "must be at least 1 (omit it for no limit)"));
    }
    if spec.pow_difficulty > MAX_POW_DIFFICULTY {
        return Err(ApiError::invalid_field("pow_difficulty", format!("must be 0-{MAX_POW_DIFFICULTY}")));
    }
    Ok(())
}
