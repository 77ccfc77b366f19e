//! Reverse-proxy mode (`mode: "proxy"`): weir itself sits in front of the origin.
//!
//! Routing is by path prefix: `/p/{room}/{rest}` is forwarded to `{origin}/{rest}` (the origin
//! URL's own path, if any, is kept in front of `rest`). A request passes when it carries a
//! token valid for that room, in the `weir_token` cookie or the `weir_token` query parameter
//! (the admission redirect; answered with a 302 that sets the cookie and drops the parameter,
//! so the token does not linger in URLs). Everyone else is sent to `/r/{room}?to=/{rest}`.
//!
//! Forwarding streams both bodies (nothing is buffered), drops hop-by-hop headers, adds
//! `X-Forwarded-For/-Host/-Proto/-Prefix` and `X-Weir-Visitor/-Ticket`, passes WebSocket
//! upgrades through, bounds in-flight origin requests ([`MAX_IN_FLIGHT`], over it: 503 with
//! `Retry-After`) and time to first response byte ([`RESPONSE_TIMEOUT`]). An unreachable or
//! slow origin gets a clear 502/504 page, never a hang. Plain-HTTP origins only: TLS ends at
//! weir (checked when the room is saved).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Semaphore;

use crate::http::AppState;
use crate::room::model::RoomMode;
use crate::web::{cookies, pages};

/// Concurrent origin requests (until their response body ends) across all proxied rooms:
/// enough for a busy origin, few enough that a stuck origin cannot eat every socket.
pub const MAX_IN_FLIGHT: usize = 512;
/// Connecting to the origin: it is on the local network, 5 s means it is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From sending the request to the origin's response headers.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle keep-alive connections to an origin are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(60);

struct Proxy {
    client: Client<crate::outbound::Connector, Body>,
    permits: Arc<Semaphore>,
}

static PROXY: LazyLock<Proxy> = LazyLock::new(|| {
    let connector = crate::outbound::connector(Some(CONNECT_TIMEOUT));
    let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).pool_max_idle_per_host(64).build(connector);
    Proxy { client, permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)) }
});

pub fn routes() -> Router<AppState> {
    Router::new().route("/p/{room}", any(proxy)).route("/p/{room}/", any(proxy)).route("/p/{room}/{*rest}", any(proxy))
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .take(32)
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

fn redirect(location: &str, set_cookie: Option<String>) -> Response {
    let mut r = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `rest` (starting with `/`) and the query without `weir_token`, plus that token if present.
fn split_target(uri: &Uri, room: &str) -> (String, String, Option<String>) {
    let path = uri.path();
    let rest = path.strip_prefix("/p/").and_then(|p| p.strip_prefix(room)).unwrap_or("");
    let rest = if rest.is_empty() { "/".to_string() } else { rest.to_string() };
    let mut token = None;
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    if let Some(q) = uri.query() {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            if k == "weir_token" {
                token = Some(v.into_owned());
            } else {
                kept.append_pair(&k, &v);
                any = true;
            }
        }
    }
    let query = if any { kept.finish() } else { String::new() };
    (rest, query, token)
}

fn with_query(path: &str, query: &str) -> String {
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    }
}

fn failure(status: StatusCode, headers: &HeaderMap, retry_after: Option<u64>) -> Response {
    let mut r = pages::error_page_for(status, headers, |t| t.unavailable_title, |t| t.unavailable_text);
    if let Some(s) = retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

async fn proxy(State(state): State<AppState>, mut req: Request) -> Response {
    // Come past a line of connections too long to join (`limits::turns`): refused before any work.
    if let Some(peer) = req.extensions().get::<crate::limits::backoff::Peer>().filter(|p| p.backoff.take_past_line()) {
        peer.backoff.hold_after_refusal(Duration::from_secs(1));
        outcome(ProxyOutcome::Shed);
        return failure(StatusCode::SERVICE_UNAVAILABLE, req.headers(), Some(1));
    }
    let path = req.uri().path();
    let room_id = path.strip_prefix("/p/").unwrap_or("").split('/').next().unwrap_or("").to_string();
    let room = match state.rooms.get(&room_id) {
        Some(r) if r.spec().mode == RoomMode::Proxy => r,
        _ => return pages::error_page_for(StatusCode::NOT_FOUND, req.headers(), |t| t.not_found_title, |t| t.not_found_text),
    };
    let spec = room.spec();
    let (rest, query, query_token) = split_target(req.uri(), &room_id);
    let secure = state.rooms.public_url.starts_with("https://");

    // The admission redirect carries the token in the URL: verify, set the cookie, drop it.
    if let Some(token) = query_token {
        return match state.rooms.keys.verify(&token, Some(&room_id)) {
            Ok(_) => redirect(
                &with_query(&format!("/p/{room_id}{rest}"), &query),
                Some(cookies::set("weir_token", &token, state.config.token_ttl_seconds, secure)),
            ),
            Err(_) => to_room(&room_id, &rest, &query),
        };
    }
    let claims = match cookies::get(req.headers(), "weir_token").map(|t| state.rooms.keys.verify(t, Some(&room_id))) {
        Some(Ok(c)) => {
            // A proxied request is activity: it keeps the visitor's session (and slot) alive.
            state.rooms.activity(&room, c.ticket);
            c
        }
        _ => {
            outcome(ProxyOutcome::Refused);
            return to_room(&room_id, &rest, &query);
        }
    };

    let Ok(permit) = PROXY.permits.clone().try_acquire_owned() else {
        outcome(ProxyOutcome::Shed);
        return failure(StatusCode::SERVICE_UNAVAILABLE, req.headers(), Some(1));
    };

    // Target URI: the origin's scheme and authority, its path prefix, then `rest`.
    let Ok(origin) = url::Url::parse(&spec.origin) else {
        return failure(StatusCode::BAD_GATEWAY, req.headers(), None);
    };
    let base = origin.path().trim_end_matches('/');
    let authority = match origin.port() {
        Some(p) => format!("{}:{p}", origin.host_str().unwrap_or("")),
        None => origin.host_str().unwrap_or("").to_string(),
    };
    let target = format!("{}://{authority}{}", origin.scheme(), with_query(&format!("{base}{rest}"), &query));
    let Ok(target) = target.parse::<Uri>() else {
        return failure(StatusCode::BAD_GATEWAY, req.headers(), None);
    };

    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let peer = req.extensions().get::<crate::limits::backoff::Peer>().map(|p| p.addr.ip());
    let (mut parts, body) = req.into_parts();
    let original_host = parts.headers.get(header::HOST).cloned();
    let upgrade_proto = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    let h = &mut parts.headers;
    if let Some(p) = upgrade_proto {
        h.insert(header::UPGRADE, p);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if let Ok(v) = HeaderValue::from_str(&authority) {
        h.insert(header::HOST, v);
    }
    if let Some(ip) = peer {
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
    }
    if let Some(host) = original_host {
        h.insert("x-forwarded-host", host);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(if secure { "https" } else { "http" }));
    if let Ok(v) = HeaderValue::from_str(&format!("/p/{room_id}")) {
        h.insert("x-forwarded-prefix", v);
    }
    if let Ok(v) = HeaderValue::from_str(&claims.sub) {
        h.insert(super::X_WEIR_VISITOR, v);
    }
    h.insert(super::X_WEIR_TICKET, HeaderValue::from(claims.ticket));
    parts.uri = target;
    parts.version = axum::http::Version::HTTP_11;
    let outbound = Request::from_parts(parts, body);
    let headers_for_errors = HeaderMap::new();

    let response = match tokio::time::timeout(RESPONSE_TIMEOUT, PROXY.client.request(outbound)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(room = %room_id, error = %e, "origin unreachable");
            outcome(ProxyOutcome::BadGateway);
            return failure(StatusCode::BAD_GATEWAY, &headers_for_errors, Some(5));
        }
        Err(_) => {
            tracing::warn!(room = %room_id, timeout = ?RESPONSE_TIMEOUT, "origin too slow");
            outcome(ProxyOutcome::Timeout);
            return failure(StatusCode::GATEWAY_TIMEOUT, &headers_for_errors, Some(5));
        }
    };
    outcome(ProxyOutcome::Forwarded);

    let mut response = response;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // WebSocket (or other) upgrade: splice the two upgraded connections together.
        let origin_upgrade = hyper::upgrade::on(&mut response);
        let (parts, _) = response.into_parts();
        if let Some(client_upgrade) = client_upgrade {
            tokio::spawn(async move {
                let (client, origin) = match tokio::join!(client_upgrade, origin_upgrade) {
                    (Ok(c), Ok(o)) => (c, o),
                    _ => return,
                };
                let (mut c, mut o) = (TokioIo::new(client), TokioIo::new(origin));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut o).await;
            });
        }
        drop(permit);
        let mut r = Response::from_parts(parts, Body::empty());
        *r.version_mut() = axum::http::Version::HTTP_11;
        return r;
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The permit lives as long as the response body streams.
    let body = body.map_frame(move |frame| {
        let _held = &permit;
        frame
    });
    Response::from_parts(parts, Body::new(body))
}

fn to_room(room: &str, rest: &str, query: &str) -> Response {
    let to = with_query(rest, query);
    let mut location = format!("/r/{room}");
    if to != "/" && to.len() <= crate::room::visitor::MAX_DEEP_LINK {
        location.push_str("?to=");
        location.push_str(&url::form_urlencoded::byte_serialize(to.as_bytes()).collect::<String>());
    }
    redirect(&location, None)
}

/// What became of a proxied request (`weir_proxy_requests_total{result}`).
#[derive(Clone, Copy)]
enum ProxyOutcome {
    Refused,
    Shed,
    BadGateway,
    Timeout,
    Forwarded,
}

/// Counts `result`, with the counters resolved once: every proxied request passes here.
fn outcome(result: ProxyOutcome) {
    static COUNTERS: LazyLock<[metrics::Counter; 5]> = LazyLock::new(|| {
        ["refused", "shed", "bad_gateway", "timeout", "forwarded"].map(|r| metrics::counter!("weir_proxy_requests_total", "result" => r))
    });
    COUNTERS[result as usize].increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let uri: Uri = "/p/sale/a/b?x=1&weir_token=T&y=2".parse().unwrap();
        assert_eq!(split_target(&uri, "sale"), ("/a/b".into(), "x=1&y=2".into(), Some("T".into())));
        let uri: Uri = "/p/sale".parse().unwrap();
        assert_eq!(split_target(&uri, "sale"), ("/".into(), "".into(), None));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
