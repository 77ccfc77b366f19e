//! Reading request cookies and writing `Set-Cookie` values with weir's attributes.

use axum::http::{header, HeaderMap};

/// The value of cookie `name`, if the request carries one. Bounded by the header size limit.
pub fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    find(headers, |k| k == name)
}

/// The value of the first cookie whose name satisfies `is_name` (lets a caller match a
/// composed name without building it).
pub fn find(headers: &HeaderMap, is_name: impl Fn(&str) -> bool) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| is_name(k))
        .map(|(_, v)| v.trim_matches('"'))
}

/// An HttpOnly, SameSite=Lax cookie for the whole host; `Secure` when weir is served over https.
pub fn set(name: &str, value: &str, max_age_s: u64, secure: bool) -> String {
    let mut cookie = String::with_capacity(name.len() + value.len() + 64);
    for part in [name, "=", value, "; Path=/; Max-Age=", itoa::Buffer::new().format(max_age_s), "; HttpOnly; SameSite=Lax"] {
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

    #[test]
    fn set_cookie_attributes() {
        assert_eq!(set("weir_v_a", "1.2.x", 604_800, false), "weir_v_a=1.2.x; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax");
        assert_eq!(set("t", "v", 0, true), "t=v; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure");
    }
}
