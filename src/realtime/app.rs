//! Pusher apps (tenants): credentials and per-app limits.

use serde::{Deserialize, Serialize};

/// An app as written in the config file or created through the admin API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSpec {
    /// Numeric id as a string (some SDKs require digits).
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl AppSpec {
    /// Checks the fields; the message names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() || self.id.len() > 20 || !self.id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("id: {:?} must be 1-20 digits", self.id));
        }
        if self.key.is_empty() || self.key.len() > 64 {
            return Err("key: must be 1-64 characters".into());
        }
        if self.secret.len() < 8 || self.secret.len() > 128 {
            return Err("secret: must be 8-128 characters".into());
        }
        Ok(())
    }
}
