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
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Path=/; Max-Age={max_age_s}; HttpOnly; SameSite=Lax{secure}")
}

/// Whether the client prefers JSON (mobile apps, scripts) over the HTML page.
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/html"))
}
