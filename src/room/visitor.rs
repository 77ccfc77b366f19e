//! The visitor cookie: which room, which ticket, which visitor — signed with HMAC-SHA256 so a
//! visitor cannot move itself forward. A cookie that fails any check is simply ignored (the
//! visitor is treated as new), never an error.
//!
//! Format of `weir_v_{room}`: `{generation}.{ticket}.{visitor}.{deep link, base64url}.{mac}`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;

/// Longest deep link kept (`?to=`); longer ones are dropped rather than stored in a cookie.
pub const MAX_DEEP_LINK: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitorCookie {
    /// The room's generation (its creation time) when the ticket was issued.
    pub generation: i64,
    pub ticket: u64,
    /// 16 random bytes, hex.
    pub visitor: String,
    /// Relative path on the origin the visitor asked for.
    pub deep_link: Option<String>,
}

pub struct CookieSigner {
    key: hmac::Key,
}

pub fn cookie_name(room: &str) -> String {
    format!("weir_v_{room}")
}

impl CookieSigner {
    pub fn new(secret: &[u8; 32]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    fn payload(room: &str, c: &VisitorCookie, link: &str) -> String {
        format!("{room}|{}.{}.{}.{link}", c.generation, c.ticket, c.visitor)
    }

    pub fn encode(&self, room: &str, cookie: &VisitorCookie) -> String {
        let link = B64.encode(cookie.deep_link.as_deref().unwrap_or(""));
        let mac = hmac::sign(&self.key, Self::payload(room, cookie, &link).as_bytes());
        format!("{}.{}.{}.{link}.{}", cookie.generation, cookie.ticket, cookie.visitor, B64.encode(mac.as_ref()))
    }

    pub fn decode(&self, room: &str, value: &str) -> Option<VisitorCookie> {
        if value.len() > 2 * MAX_DEEP_LINK + 200 {
            return None;
        }
        let mut parts = value.split('.');
        let (generation, ticket, visitor, link, mac) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || visitor.len() != 32 || !visitor.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let cookie = VisitorCookie {
            generation: generation.parse().ok()?,
            ticket: ticket.parse().ok()?,
            visitor: visitor.to_string(),
            deep_link: None,
        };
        let mac = B64.decode(mac).ok()?;
        hmac::verify(&self.key, Self::payload(room, &cookie, link).as_bytes(), &mac).ok()?;
        let link = String::from_utf8(B64.decode(link).ok()?).ok()?;
        Some(VisitorCookie { deep_link: (!link.is_empty()).then_some(link), ..cookie })
    }
}

/// Accepts only a path on the origin: starts with one `/`, no scheme or host, no backslash or
/// control characters (which browsers may normalise into `//evil`).
pub fn safe_deep_link(to: &str) -> Option<String> {
    let ok = to.starts_with('/')
        && !to.starts_with("//")
        && to.len() <= MAX_DEEP_LINK
        && !to.chars().any(|c| c == '\\' || c.is_control());
    ok.then(|| to.to_string())
}

pub fn new_visitor_id() -> String {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let s = CookieSigner::new(&[7; 32]);
        let c = VisitorCookie { generation: 42, ticket: 9, visitor: new_visitor_id(), deep_link: Some("/cart?x=1".into()) };
        let v = s.encode("sale", &c);
        assert_eq!(s.decode("sale", &v), Some(c.clone()));
        assert_eq!(s.decode("other", &v), None, "a cookie is bound to its room");
        let forged = v.replacen(".9.", ".1.", 1);
        assert_eq!(s.decode("sale", &forged), None);
        assert_eq!(CookieSigner::new(&[8; 32]).decode("sale", &v), None);
        assert_eq!(s.decode("sale", "junk"), None);
        assert_eq!(s.decode("sale", ""), None);
    }

    #[test]
    fn deep_links() {
        assert_eq!(safe_deep_link("/a/b?c=d"), Some("/a/b?c=d".into()));
        for bad in ["https://evil", "//evil.com", "/\\evil.com", "evil", "/a\nb", ""] {
            assert_eq!(safe_deep_link(bad), None, "{bad:?}");
        }
    }
}
