//! The visitor cookie: which room, which ticket, which visitor — signed with HMAC-SHA256 so a
//! visitor cannot move itself forward. A cookie that fails any check is simply ignored (the
//! visitor is treated as new), never an error.
//!
//! Format of `weir_v_{room}`: `{generation}.{ticket}.{visitor}.{deep link, base64url}.{mac}`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;
use std::sync::Arc;

/// Longest deep link kept (`?to=`); longer ones are dropped rather than stored in a cookie.
pub const MAX_DEEP_LINK: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitorCookie {
    /// The room's generation (its creation time) when the ticket was issued.
    pub generation: i64,
    pub ticket: u64,
    /// 16 random bytes, hex (shared: a remembered cookie hands out clones on every poll).
    pub visitor: Arc<str>,
    /// Relative path on the origin the visitor asked for.
    pub deep_link: Option<String>,
}

pub struct CookieSigner {
    key: hmac::Key,
}

/// A visitor cookie is named this followed by the room's id.
pub const COOKIE_PREFIX: &str = "weir_v_";

/// The raw visitor cookie for `room` in a request (read on every status poll: no name built).
pub fn cookie_in<'a>(headers: &'a axum::http::HeaderMap, room: &str) -> Option<&'a [u8]> {
    crate::web::cookies::find_bytes(headers, |name| name.strip_prefix(COOKIE_PREFIX) == Some(room))
}

impl CookieSigner {
    pub fn new(secret: &[u8; 32]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// The MAC covers `{room}|` followed by every field of the cookie value before the MAC.
    fn mac(&self, room: &str, fields: &str) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(room.as_bytes());
        ctx.update(b"|");
        ctx.update(fields.as_bytes());
        ctx.sign()
    }

    pub fn encode(&self, room: &str, cookie: &VisitorCookie) -> String {
        let mut value = String::with_capacity(Self::longest(cookie));
        self.encode_into(room, cookie, &mut value);
        value
    }

    /// The longest value [`encode`](Self::encode) can make of `cookie`: two 20-digit numbers,
    /// the 32-digit id, the link's base64 and the 43-character MAC, with their dots.
    pub fn longest(cookie: &VisitorCookie) -> usize {
        124 + cookie.deep_link.as_deref().map_or(0, str::len).div_ceil(3) * 4
    }

    /// [`encode`](Self::encode), appended to `out` (a `Set-Cookie` header being written).
    pub fn encode_into(&self, room: &str, cookie: &VisitorCookie, out: &mut String) {
        let link = cookie.deep_link.as_deref().unwrap_or("");
        let start = out.len();
        let value = out;
        let mut number = itoa::Buffer::new();
        value.push_str(number.format(cookie.generation));
        value.push('.');
        value.push_str(number.format(cookie.ticket));
        value.push('.');
        value.push_str(&cookie.visitor);
        value.push('.');
        B64.encode_string(link, value);
        let mac = self.mac(room, &value[start..]);
        value.push('.');
        B64.encode_string(mac.as_ref(), value);
    }

    pub fn decode(&self, room: &str, value: &str) -> Option<VisitorCookie> {
        let (fields, mac) = split(value.as_bytes())?;
        self.check(room, std::str::from_utf8(fields).ok()?, &decode_mac(mac)?)
    }

    /// [`decode`](Self::decode), remembering cookies already checked in `seen` (one per room):
    /// a waiting visitor presents the same cookie on every poll. A remembered cookie is found by
    /// its fields, the part its holder can read anyway, and its MAC is still compared in constant
    /// time, so the cache can neither accept a forged MAC nor leak a real one through timing.
    pub fn decode_remembered(&self, room: &str, value: &[u8], seen: &CheckedCookies) -> Option<VisitorCookie> {
        let (fields, mac) = split(value)?;
        if let Some(known) = seen.0.read().get(fields) {
            // The MAC of given fields is unique, and so is its unpadded base64 (the decoder
            // refuses non-canonical trailing bits): any other text is a forgery.
            return bool::from(MacText::of(mac).matches(&known.mac)).then(|| known.cookie.clone());
        }
        let cookie = self.check(room, std::str::from_utf8(fields).ok()?, &decode_mac(mac)?)?;
        let mut seen = seen.0.write();
        if seen.len() >= CHECKED_COOKIES_PER_ROOM {
            seen.clear();
        }
        seen.insert(fields.into(), Checked { mac: MacText::of(mac), cookie: cookie.clone() });
        Some(cookie)
    }

    /// The cookie in `fields` if `tag` is their MAC for `room`.
    fn check(&self, room: &str, fields: &str, tag: &[u8; 32]) -> Option<VisitorCookie> {
        let expected = self.mac(room, fields);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_ref(), &tag[..])) {
            return None;
        }
        let mut parts = fields.split('.');
        let (generation, ticket, visitor, link) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || visitor.len() != 32 || !visitor.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let link = if link.is_empty() { None } else { Some(String::from_utf8(B64.decode(link).ok()?).ok()?) };
        Some(VisitorCookie {
            generation: generation.parse().ok()?,
            ticket: ticket.parse().ok()?,
            visitor: visitor.into(),
            deep_link: link.filter(|l| !l.is_empty()),
        })
    }
}

/// Characters of a MAC in a cookie: 32 bytes in unpadded base64.
const MAC_CHARS: usize = 43;

/// A cookie value's fields and the text of its MAC, if it has that shape (and a sane length).
/// The MAC has a fixed length, so no scan is needed to find where it starts.
fn split(value: &[u8]) -> Option<(&[u8], &[u8])> {
    if value.len() > 2 * MAX_DEEP_LINK + 200 {
        return None;
    }
    let (fields, dot_mac) = value.split_at_checked(value.len().checked_sub(MAC_CHARS + 1)?)?;
    Some((fields, dot_mac.strip_prefix(b".")?))
}

/// A MAC's text as words, compared in constant time a word at a time (`subtle` compares
/// slices byte by byte, ten times the work for the 43 bytes every status poll checks).
#[derive(Clone, Copy)]
struct MacText([u64; MAC_CHARS.div_ceil(8)]);

impl MacText {
    fn of(text: &[u8]) -> Self {
        let mut words = [0u64; MAC_CHARS.div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(text.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(bytes);
        }
        Self(words)
    }

    /// Every word is compared whatever the others hold: no early exit to time.
    fn matches(&self, other: &Self) -> subtle::Choice {
        let difference = self.0.iter().zip(&other.0).fold(0u64, |acc, (a, b)| acc | (a ^ b));
        subtle::ConstantTimeEq::ct_eq(&difference, &0)
    }
}

/// The 32 bytes of a MAC's text.
fn decode_mac(mac: &[u8]) -> Option<[u8; 32]> {
    let mut tag = [0u8; 33];
    if B64.decode_slice(mac, &mut tag).ok()? != 32 {
        return None;
    }
    let mut exact = [0u8; 32];
    exact.copy_from_slice(&tag[..32]);
    Some(exact)
}

/// Cookies remembered as checked, per room; beyond this the room's set starts over (a few
/// hundred bytes each: about 2 MiB per room at most).
const CHECKED_COOKIES_PER_ROOM: usize = 8 * 1024;

/// A room's cookies whose MAC has been checked, by their fields (see
/// [`CookieSigner::decode_remembered`]).
#[derive(Default)]
pub struct CheckedCookies(parking_lot::RwLock<crate::fast_map::FastMap<Box<[u8]>, Checked>>);

/// A remembered cookie: the text of the MAC it was accepted with and what it says.
struct Checked {
    mac: MacText,
    cookie: VisitorCookie,
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

/// A new visitor's id: 16 random bytes in hex (what cookies and tokens carry).
pub fn new_visitor_id() -> Arc<str> {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex_id(bytes)
}

/// `bytes` as 32 lowercase hex digits.
fn hex_id(bytes: [u8; 16]) -> Arc<str> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (pair, b) in hex.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
    }
    std::str::from_utf8(&hex).expect("hex digits are ASCII").into()
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
    fn the_longest_cookie_fits_the_first_allocation() {
        let s = CookieSigner::new(&[7; 32]);
        for link in [None, Some("/p".to_string()), Some("/x".repeat(150))] {
            let len = link.as_ref().map_or(0, String::len);
            let c = VisitorCookie { generation: i64::MIN, ticket: u64::MAX, visitor: new_visitor_id(), deep_link: link };
            let v = s.encode("sale", &c);
            assert_eq!(v.capacity(), 124 + len.div_ceil(3) * 4, "no reallocation for {len}-byte links");
            assert_eq!(CookieSigner::longest(&c), v.capacity());
            assert_eq!(s.decode("sale", &v), Some(c));
        }
    }

    #[test]
    fn visitor_ids_are_32_lowercase_hex_digits_and_differ() {
        let (a, b) = (new_visitor_id(), new_visitor_id());
        assert_ne!(a, b);
        let bytes = [0x00, 0x1f, 0xa0, 0xff, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 0xbe];
        assert_eq!(hex::encode(bytes), &*hex_id(bytes), "the hex is of the bytes");
        for id in [a, b] {
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{id}");
        }
    }

    #[test]
    fn remembered_cookies_are_still_checked() {
        let s = CookieSigner::new(&[7; 32]);
        let seen = CheckedCookies::default();
        let c = VisitorCookie { generation: 42, ticket: 9, visitor: new_visitor_id(), deep_link: None };
        let v = s.encode("sale", &c);
        for _ in 0..2 {
            assert_eq!(s.decode_remembered("sale", v.as_bytes(), &seen), Some(c.clone()), "first checked, then remembered");
        }
        // Same fields, another MAC: refused although the fields are remembered.
        let (fields, _) = v.rsplit_once('.').unwrap();
        let forged = format!("{fields}.{}", B64.encode([0u8; 32]));
        assert_eq!(s.decode_remembered("sale", forged.as_bytes(), &seen), None);
        // The real MAC's text with its last character changed (the same bytes but for the
        // trailing bits, or other bytes): refused too.
        for last in ['A', 'B', 'w', '-'] {
            let mut altered = v[..v.len() - 1].to_string();
            altered.push(last);
            if altered != v {
                assert_eq!(s.decode_remembered("sale", altered.as_bytes(), &seen), None, "{altered}");
                assert_eq!(s.decode("sale", &altered), None, "{altered}");
            }
        }
        assert_eq!(s.decode_remembered("sale", b"junk", &seen), None);
        assert_eq!(s.decode_remembered("sale", &v.as_bytes()[1..], &seen), None, "a value cut short");
        // A cookie of another room never enters this room's set.
        let other = s.encode("other", &c);
        assert_eq!(s.decode_remembered("sale", other.as_bytes(), &seen), None);
        assert_eq!(seen.0.read().len(), 1);
    }

    #[test]
    fn mac_texts_match_only_when_every_byte_does() {
        let text = B64.encode([9u8; 32]);
        let mac = MacText::of(text.as_bytes());
        assert!(bool::from(mac.matches(&MacText::of(text.as_bytes()))));
        for i in 0..MAC_CHARS {
            let mut other = text.clone().into_bytes();
            other[i] ^= 1;
            assert!(!bool::from(mac.matches(&MacText::of(&other))), "byte {i} differs");
        }
    }

    #[test]
    fn the_remembered_set_is_bounded() {
        let s = CookieSigner::new(&[7; 32]);
        let seen = CheckedCookies::default();
        for ticket in 1..=(CHECKED_COOKIES_PER_ROOM as u64 + 10) {
            let c = VisitorCookie { generation: 1, ticket, visitor: "0".repeat(32).into(), deep_link: None };
            assert!(s.decode_remembered("r", s.encode("r", &c).as_bytes(), &seen).is_some());
            assert!(seen.0.read().len() <= CHECKED_COOKIES_PER_ROOM);
        }
    }

    #[test]
    fn deep_links() {
        assert_eq!(safe_deep_link("/a/b?c=d"), Some("/a/b?c=d".into()));
        for bad in ["https://evil", "//evil.com", "/\\evil.com", "evil", "/a\nb", ""] {
            assert_eq!(safe_deep_link(bad), None, "{bad:?}");
        }
    }
}
