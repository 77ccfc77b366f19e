//! Reading request cookies and writing `Set-Cookie` values with weir's attributes.

use axum::http::{header, HeaderMap};

/// The value of cookie `name`, if the request carries one. Bounded by the header size limit.
pub fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    find(headers, |k| k == name)
}

/// The value of the first cookie whose name satisfies `is_name` (lets a caller match a
/// composed name without building it).
pub fn find(headers: &HeaderMap, is_name: impl Fn(&str) -> bool) -> Option<&str> {
    std::str::from_utf8(find_bytes(headers, is_name)?).ok()
}

/// [`find`], as bytes: read on every status poll, so it scans with `memchr` and leaves checking
/// the value to its caller (a visitor cookie is checked byte by byte anyway).
pub fn find_bytes(headers: &HeaderMap, is_name: impl Fn(&str) -> bool) -> Option<&[u8]> {
    headers.get_all(header::COOKIE).iter().find_map(|line| {
        let mut rest = line.as_bytes();
        loop {
            let end = memchr::memchr(b';', rest).unwrap_or(rest.len());
            if let Some(value) = value_if_named(&rest[..end], &is_name) {
                return Some(value);
            }
            rest = rest.get(end + 1..)?;
        }
    })
}

/// The value of one `name=value` pair (surrounding spaces and quotes dropped) if its name fits.
fn value_if_named<'a>(pair: &'a [u8], is_name: &impl Fn(&str) -> bool) -> Option<&'a [u8]> {
    let eq = memchr::memchr(b'=', pair)?;
    let name = std::str::from_utf8(pair[..eq].trim_ascii()).ok()?;
    if !is_name(name) {
        return None;
    }
    let value = pair[eq + 1..].trim_ascii();
    Some(value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value))
}

/// An HttpOnly, SameSite=Lax cookie for the whole host; `Secure` when weir is served over https.
pub fn set(name: &str, value: &str, max_age_s: u64, secure: bool) -> String {
    set_with(&[name], value.len(), |out| out.push_str(value), max_age_s, secure)
}

/// [`set`], the name given in parts and the value written in place by `value` (at most
/// `value_len` bytes): a visitor's cookie is one allocation, not one per part.
pub fn set_with(name: &[&str], value_len: usize, value: impl FnOnce(&mut String), max_age_s: u64, secure: bool) -> String {
    let name_len: usize = name.iter().map(|p| p.len()).sum();
    let mut cookie = String::with_capacity(name_len + value_len + 64);
    for part in name {
        cookie.push_str(part);
    }
    cookie.push('=');
    value(&mut cookie);
    for part in ["; Path=/; Max-Age=", itoa::Buffer::new().format(max_age_s), "; HttpOnly; SameSite=Lax"] {
        cookie.push_str(part);
    }
    if secure {
        cookie.push_str("; Secure");
    }
    cookie
}

/// Whether the client prefers JSON (mobile apps, scripts) over the HTML page.
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_headers(lines: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(header::COOKIE, axum::http::HeaderValue::from_bytes(line).unwrap());
        }
        headers
    }

    #[test]
    fn finds_cookies_across_pairs_and_headers() {
        let h = cookie_headers(&[b"a=1; b = 2 ;c=\"3\"", b"junk; d=4;e", b"f=\xc3\xa9"]);
        for (name, want) in [("a", Some("1")), ("b", Some("2")), ("c", Some("3")), ("d", Some("4")), ("e", None), ("f", Some("\u{e9}")), ("x", None)] {
            assert_eq!(get(&h, name), want, "{name}");
        }
        assert_eq!(find(&h, |n| n.starts_with('d')), Some("4"));
        assert_eq!(get(&cookie_headers(&[b"a=1;"]), "a"), Some("1"));
        assert_eq!(get(&cookie_headers(&[b"a="]), "a"), Some(""));
        assert_eq!(get(&HeaderMap::new(), "a"), None);
    }

    #[test]
    fn a_value_that_is_not_utf8_is_absent() {
        assert_eq!(get(&cookie_headers(&[b"a=\xff; a=2"]), "a"), None, "the first cookie of a name is the one");
        assert_eq!(find_bytes(&cookie_headers(&[b"a=\xff; a=2"]), |n| n == "a"), Some(&b"\xff"[..]));
        assert_eq!(get(&cookie_headers(&[b"\xff=1"]), "a"), None);
    }

    #[test]
    fn set_cookie_attributes() {
        assert_eq!(set("weir_v_a", "1.2.x", 604_800, false), "weir_v_a=1.2.x; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax");
        assert_eq!(set("t", "v", 0, true), "t=v; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure");
    }
}
