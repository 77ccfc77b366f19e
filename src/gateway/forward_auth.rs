//! `GET /auth/{room}` for reverse proxies. The token is read from, in order:
//! `Authorization: Bearer`, the `weir_token` cookie, or `weir_token` in the original URI
//! (`X-Original-URI` from nginx, `X-Forwarded-Uri` from Traefik/Caddy).
//! 204 when valid for that room, 401 otherwise (an unknown room is also 401: proxies treat
//! anything but 2xx/401/403 as a server error). `?redirect=1` turns 401 into a 302 to the room
//! for proxies that pass the auth response through.

use axum::extract::{Request, State};
use std::borrow::Cow;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ApiPath};
use crate::http::AppState;
use crate::web::cookies;
use super::{X_WEIR_TICKET, X_WEIR_VISITOR};

fn token_from(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(Cow::Borrowed(t.trim()));
    }
    if let Some(t) = cookies::get(headers, "weir_token") {
        return Some(Cow::Borrowed(t));
    }
    [X_ORIGINAL_URI, X_FORWARDED_URI].iter().find_map(|name| {
        let uri = headers.get(name)?.to_str().ok()?;
        let query = uri.split_once('?')?.1;
        url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "weir_token").map(|(_, v)| v)
    })
}

// Named once: a header name given as a string is parsed and validated on every use.
const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");

/// `weir_forward_auth_total` by result, resolved once: this is a per-request path.
fn outcome_counter(allowed: bool) -> &'static metrics::Counter {
    static COUNTERS: std::sync::OnceLock<[metrics::Counter; 2]> = std::sync::OnceLock::new();
    let [allowed_c, refused_c] = COUNTERS.get_or_init(|| {
        [
            metrics::counter!("weir_forward_auth_total", "result" => "allowed"),
            metrics::counter!("weir_forward_auth_total", "result" => "refused"),
        ]
    });
    if allowed {
        allowed_c
    } else {
        refused_c
    }
}

pub async fn check(
    State(state): State<AppState>,
    ApiPath(room): ApiPath<String>,
    request: axum::extract::Request,
) -> Response {
    answer(&state, &room, &request)
}

/// The forward-auth answer for `room` (also served in front of the router, `http::HotRoute`).
pub fn answer(state: &AppState, room: &str, request: &Request) -> Response {
    let (query, headers) = (request.uri().query(), request.headers());
    let redirect = query.is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "redirect" && (v == "1" || v == "true"))
    });
    let outcome = match (state.rooms.get(room), token_from(headers)) {
        (None, _) => Err("unknown room".to_string()),
        (Some(_), None) => Err("no admission token".to_string()),
        (Some(r), Some(token)) => {
            let verdict = state.rooms.keys.verify(&token, Some(room)).map_err(|r| format!("token refused: {}", r.as_str()));
            if let Ok(claims) = &verdict {
                // A checked request is activity: it keeps the visitor's session (and slot) alive.
                state.rooms.activity(&r, claims.ticket);
            }
            verdict
        }
    };
    match outcome {
        Ok(claims) => {
            outcome_counter(true).increment(1);
            let mut r = StatusCode::NO_CONTENT.into_response();
            if let Ok(v) = HeaderValue::from_str(&claims.sub) {
                r.headers_mut().insert(X_WEIR_VISITOR, v);
            }
            r.headers_mut().insert(X_WEIR_TICKET, HeaderValue::from(claims.ticket));
            r
        }
        Err(message) => {
            outcome_counter(false).increment(1);
            if redirect && crate::room::model::validate_room_id(room).is_ok() {
                let location = format!("{}/r/{room}", state.rooms.public_url);
                let mut r = StatusCode::FOUND.into_response();
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r
            } else {
                ApiError::unauthorized(message).into_response()
            }
        }
    }
}
