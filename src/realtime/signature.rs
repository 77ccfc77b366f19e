//! Pusher's signatures, all HMAC-SHA256 with the app secret, hex-encoded, compared in constant
//! time: channel authorization (`socket_id:channel[:channel_data]`), user authentication
//! (`socket_id::user::user_data`), HTTP API request signing, and webhook bodies.
//!
//! What happens on failure (which error to send) is the caller's business; this module only
//! says which part failed.

use md5::{Digest, Md5};
use ring::hmac;

/// How far `auth_timestamp` may be from now, in seconds (Pusher: 600).
pub const MAX_CLOCK_SKEW_S: i64 = 600;

pub fn hmac_hex(secret: &str, message: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(hmac::sign(&key, message.as_bytes()).as_ref())
}

/// Constant-time check of a hex signature (case-insensitive hex is not accepted: SDKs send lowercase).
pub fn verify_hex(secret: &str, message: &str, presented: &str) -> bool {
    let expected = hmac_hex(secret, message);
    subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), presented.as_bytes()).into()
}

/// The `auth` value an app's auth endpoint returns for a private or presence channel.
pub fn channel_auth(key: &str, secret: &str, socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    format!("{key}:{}", hmac_hex(secret, &channel_auth_message(socket_id, channel, channel_data)))
}

fn channel_auth_message(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    match channel_data {
        Some(d) => format!("{socket_id}:{channel}:{d}"),
        None => format!("{socket_id}:{channel}"),
    }
}

/// The `auth` value for `pusher:signin`.
pub fn user_auth(key: &str, secret: &str, socket_id: &str, user_data: &str) -> String {
    format!("{key}:{}", hmac_hex(secret, &format!("{socket_id}::user::{user_data}")))
}

/// Checks `key:signature`; the error says which half is wrong.
fn check_key_sig(key: &str, secret: &str, message: &str, auth: &str) -> Result<(), &'static str> {
    let Some((presented_key, sig)) = auth.split_once(':') else {
        return Err("auth must be \"key:signature\"");
    };
    if presented_key != key {
        return Err("auth key does not match the app key");
    }
    if !verify_hex(secret, message, sig) {
        return Err("invalid signature");
    }
    Ok(())
}

pub fn check_channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> Result<(), &'static str> {
    check_key_sig(key, secret, &channel_auth_message(socket_id, channel, channel_data), auth)
}

pub fn check_user_auth(key: &str, secret: &str, socket_id: &str, user_data: &str, auth: &str) -> Result<(), &'static str> {
    check_key_sig(key, secret, &format!("{socket_id}::user::{user_data}"), auth)
}

pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

/// Pusher's string to sign for an HTTP API request: method, path and the sorted query
/// (`auth_signature` excluded, values as decoded, keys lowercased), joined by newlines.
pub fn api_string_to_sign(method: &str, path: &str, params: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}\n{}\n{}", method.to_ascii_uppercase(), path, query.join("&"))
}

/// Why a signed HTTP API request was refused; the message names the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    #[error("auth_key: missing")]
    MissingKey,
    #[error("auth_key: not this app's key")]
    WrongKey,
    #[error("auth_timestamp: missing or not a number")]
    BadTimestamp,
    #[error("auth_timestamp: more than 600 s from the server's time ({0} s off); check the clock")]
    StaleTimestamp(i64),
    #[error("auth_version: must be 1.0")]
    BadVersion,
    #[error("body_md5: missing (required when there is a body)")]
    MissingBodyMd5,
    #[error("body_md5: does not match the body")]
    WrongBodyMd5,
    #[error("auth_signature: missing")]
    MissingSignature,
    #[error("auth_signature: invalid signature")]
    WrongSignature,
}

/// Verifies a signed HTTP API request. `params` are the decoded query pairs.
pub fn verify_api_request(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: &[u8],
    now_s: i64,
) -> Result<(), ApiAuthError> {
    let get = |name: &str| params.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    match get("auth_key") {
        None => return Err(ApiAuthError::MissingKey),
        Some(k) if k != key => return Err(ApiAuthError::WrongKey),
        Some(_) => {}
    }
    let ts: i64 = get("auth_timestamp").and_then(|t| t.parse().ok()).ok_or(ApiAuthError::BadTimestamp)?;
    let skew = now_s.saturating_sub(ts);
    if skew.abs() > MAX_CLOCK_SKEW_S {
        return Err(ApiAuthError::StaleTimestamp(skew));
    }
    if get("auth_version") != Some("1.0") {
        return Err(ApiAuthError::BadVersion);
    }
    match get("body_md5") {
        // Tolerated on GET (the Python SDK sends the md5 of an empty body).
        Some(md5) if md5 != body_md5(body) => return Err(ApiAuthError::WrongBodyMd5),
        None if !body.is_empty() => return Err(ApiAuthError::MissingBodyMd5),
        _ => {}
    }
    let sig = get("auth_signature").ok_or(ApiAuthError::MissingSignature)?;
    if !verify_hex(secret, &api_string_to_sign(method, path, params), sig) {
        return Err(ApiAuthError::WrongSignature);
    }
    Ok(())
}

/// Builds a signed query string for an HTTP API request (used by tests and the CLI).
pub fn sign_api_query(key: &str, secret: &str, method: &str, path: &str, extra: &[(&str, &str)], body: &[u8], now_s: i64) -> String {
    let mut params: Vec<(String, String)> = vec![
        ("auth_key".into(), key.into()),
        ("auth_timestamp".into(), now_s.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    if !body.is_empty() {
        params.push(("body_md5".into(), body_md5(body)));
    }
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let sig = hmac_hex(secret, &api_string_to_sign(method, path, &params));
    params.push(("auth_signature".into(), sig));
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden vectors from the Pusher docs (channels/library_auth_reference/auth-signatures and
    // rest-api "Worked authentication example").
    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

    #[test]
    fn private_channel_vector() {
        assert_eq!(
            channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let auth = channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None);
        assert!(check_channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None, &auth).is_ok());
        assert!(check_channel_auth(KEY, SECRET, "1234.1235", "private-foobar", None, &auth).is_err());
    }

    #[test]
    fn presence_channel_signs_channel_data() {
        // Same construction as the private vector with ":channel_data" appended (docs' formula).
        let data = "{\"user_id\":10,\"user_info\":{\"name\":\"Mr. Channels\"}}";
        let auth = channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", Some(data));
        assert_eq!(auth, format!("{KEY}:{}", hmac_hex(SECRET, &format!("1234.1234:presence-foobar:{data}"))));
        assert!(check_channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", Some(data), &auth).is_ok());
        assert!(check_channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", Some("{}"), &auth).is_err());
    }

    #[test]
    fn http_api_vector() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let params: Vec<(String, String)> = [
            ("auth_key", KEY),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let sts = api_string_to_sign("POST", "/apps/3/events", &params);
        assert_eq!(
            sts,
            "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f"
        );
        assert_eq!(hmac_hex(SECRET, &sts), "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c");
        let mut signed = params.clone();
        signed.push(("auth_signature".into(), "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c".into()));
        assert_eq!(verify_api_request(KEY, SECRET, "POST", "/apps/3/events", &signed, body, 1353088179 + 10), Ok(()));
        assert_eq!(
            verify_api_request(KEY, SECRET, "POST", "/apps/3/events", &signed, body, 1353088179 + 601),
            Err(ApiAuthError::StaleTimestamp(601))
        );
        assert_eq!(
            verify_api_request(KEY, SECRET, "POST", "/apps/3/events", &signed, b"{}", 1353088179),
            Err(ApiAuthError::WrongBodyMd5)
        );
        assert_eq!(
            verify_api_request(KEY, "wrong-secret", "POST", "/apps/3/events", &signed, body, 1353088179),
            Err(ApiAuthError::WrongSignature)
        );
    }

    #[test]
    fn signed_query_round_trips() {
        let q = sign_api_query(KEY, SECRET, "GET", "/apps/3/channels", &[("filter_by_prefix", "presence-"), ("info", "user_count")], b"", 100);
        let params: Vec<(String, String)> = url::form_urlencoded::parse(q.as_bytes()).into_owned().collect();
        assert_eq!(verify_api_request(KEY, SECRET, "GET", "/apps/3/channels", &params, b"", 100), Ok(()));
    }

    #[test]
    fn user_auth_round_trips() {
        let auth = user_auth(KEY, SECRET, "1.1", "{\"id\":\"u\"}");
        assert!(check_user_auth(KEY, SECRET, "1.1", "{\"id\":\"u\"}", &auth).is_ok());
        assert!(check_user_auth(KEY, SECRET, "1.1", "{\"id\":\"v\"}", &auth).is_err());
    }
}
