//! Visitor routes: `GET /r/{room}` (entry and waiting page) and `GET /r/{room}/status` (JSON).

use std::net::IpAddr;

use crate::limits::backoff::Peer;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::model::{RoomSpec, RoomState};
use super::policy::abuse;
use super::visitor::{cookie_in, safe_deep_link, VisitorCookie};
use super::{Room, VisitorStatus};
use crate::error::{ApiError, ApiPath};
use crate::http::AppState;
use crate::web::{cookies, pages};

/// Cookie lifetime for the visitor's ticket: a week covers any realistic queue.
const VISITOR_COOKIE_MAX_AGE_S: u64 = 7 * 24 * 3600;

/// The waiting page (HTML, worth compressing).
pub fn page_routes() -> Router<AppState> {
    Router::new().route("/r/{room}", get(entry))
}

/// The page's small JSON calls.
pub fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/r/{room}/status", get(status))
        .route("/r/{room}/socket", axum::routing::post(register_socket))
}

#[derive(Deserialize)]
struct EntryQuery {
    to: Option<String>,
    /// `challenge:solution` of the proof-of-work, when the room asks for one.
    pow: Option<String>,
}

async fn entry(
    State(state): State<AppState>,
    ApiPath(room_id): ApiPath<String>,
    query: Result<Query<EntryQuery>, axum::extract::rejection::QueryRejection>,
    request: axum::extract::Request,
) -> Response {
    enter(&state, &room_id, query.ok().map(|Query(q)| q), peer_ip(&request), request.headers()).await
}

/// `GET /r/{room}` answered in front of the router (`http::HotRoute`): the same as the routed
/// `entry`, and compressed as the router's layer would.
pub fn entry_answer(state: AppState, room_id: Box<str>, peer_ip: IpAddr, request: axum::extract::Request) -> crate::http::LaterAnswer {
    Box::pin(async move {
        // Most entries have no query: skip the deserializer for them.
        let query = request.uri().query().and_then(|_| Query::<EntryQuery>::try_from_uri(request.uri()).ok()).map(|Query(q)| q);
        let headers = request.headers();
        let response = enter(&state, &room_id, query, peer_ip, headers).await;
        crate::http::compress_text(response, headers).await
    })
}

/// `serve` gives every request its peer; without one (a router served some other way) the
/// per-IP limit sees the unspecified address.
fn peer_ip(request: &axum::extract::Request) -> IpAddr {
    request.extensions().get::<Peer>().map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |p| p.addr.ip())
}

async fn enter(state: &AppState, room_id: &str, query: Option<EntryQuery>, peer_ip: IpAddr, headers: &HeaderMap) -> Response {
    let json = cookies::wants_json(headers);
    let Some(room) = state.rooms.get(room_id) else {
        return no_such_room(json, room_id, headers);
    };
    let rooms = &state.rooms;
    // One clock read for the whole request (entry is the hottest route there is).
    let now_ms = state.clock.now_ms();
    let (to, pow) = query.map(|q| (q.to, q.pow)).unwrap_or_default();
    let deep_link = to.and_then(|to| safe_deep_link(&to));
    let existing = rooms.recognise(&room, cookie_in(headers, &room.id));
    // At most the visitor's cookie and the admission token.
    let mut set_cookies = Vec::with_capacity(2);
    let cookie = match existing {
        Some(mut c) => {
            if deep_link.is_some() && deep_link != c.deep_link {
                c.deep_link = deep_link;
                set_cookies.push(visitor_cookie(state, &room, &c));
            }
            Some(c)
        }
        None => {
            let spec = room.spec();
            match spec.state_at(now_ms) {
                RoomState::Closed => return closed(json, &room, rooms.status_at(&room, None, now_ms), headers),
                RoomState::Passthrough => None,
                _ => {
                    let ip = abuse::client_ip(peer_ip, headers, &rooms.trusted_proxies, &rooms.client_ip_header);
                    state.dashboard.talkers.ip(ip);
                    let arrival = Arrival { spec, ip, headers, deep_link, pow: pow.as_deref(), json, now_ms };
                    match admit_new_visitor(state, &room, arrival).await {
                        Ok(NewVisitor::Bypass(response)) | Err(response) => return response,
                        Ok(NewVisitor::Ticket(c)) => {
                            set_cookies.push(visitor_cookie(state, &room, &c));
                            Some(c)
                        }
                    }
                }
            }
        }
    };
    let status = rooms.status_at(&room, cookie.as_ref(), now_ms);
    respond(state, json, &room, status, set_cookies, headers)
}

enum NewVisitor {
    Ticket(VisitorCookie),
    /// Skips the queue: the redirect to the origin.
    Bypass(Response),
}

/// A visitor without a ticket, as the entry request describes them.
struct Arrival<'a> {
    /// The room's spec as the request found it (read once).
    spec: Arc<RoomSpec>,
    ip: IpAddr,
    headers: &'a HeaderMap,
    deep_link: Option<String>,
    pow: Option<&'a str>,
    json: bool,
    now_ms: i64,
}

/// The gate before a new ticket: bypass rules, proof-of-work, the per-IP limit; then the
/// durable ticket and, in a safety-net room with no queue, immediate admission.
async fn admit_new_visitor(state: &AppState, room: &Arc<Room>, arrival: Arrival<'_>) -> Result<NewVisitor, Response> {
    let Arrival { spec, ip, headers, deep_link, pow, json, now_ms } = arrival;
    let rooms = &state.rooms;
    if spec.bypass.as_ref().is_some_and(|b| abuse::bypasses(b, ip, headers)) {
        metrics::counter!("weir_room_bypassed_total", "room" => room.id.clone()).increment(1);
        let mut status = rooms.status_at(room, None, now_ms);
        let (token, url) = rooms.token_redirect(room, &super::visitor::new_visitor_id(), 0, deep_link.as_deref());
        (status.admitted, status.token, status.redirect_url, status.position) = (true, token, url, None);
        return Ok(NewVisitor::Bypass(respond(state, json, room, status, Vec::new(), headers)));
    }
    if spec.pow_difficulty > 0 {
        let verdict = pow.map(|p| rooms.pow.verify(&room.id, spec.pow_difficulty, p, now_ms / 1000));
        if let Some(Ok(())) = verdict {
            metrics::counter!("weir_room_pow_total", "room" => room.id.clone(), "result" => "ok").increment(1);
        } else {
            if let Some(Err(e)) = verdict {
                metrics::counter!("weir_room_pow_total", "room" => room.id.clone(), "result" => e.as_str()).increment(1);
            }
            let challenge = rooms.pow.challenge(&room.id, spec.pow_difficulty, now_ms / 1000);
            let reason = verdict.and_then(|v| v.err()).map(|e| e.as_str());
            return Err(pow_challenge(json, room, &challenge, spec.pow_difficulty, reason, deep_link.as_deref()));
        }
    }
    if let Some(limit) = spec.per_ip_entries_per_minute {
        if let Err(retry_after) = room.per_ip.check(ip, now_ms / 1000, limit) {
            metrics::counter!("weir_room_per_ip_refused_total", "room" => room.id.clone()).increment(1);
            return Err(too_many_entries(json, retry_after));
        }
    }
    let cookie = rooms.enter(room, deep_link, now_ms).await.map_err(IntoResponse::into_response)?;
    if spec.safety_net && spec.state_at(now_ms) == RoomState::Open {
        // Boxed: its future (a lock, a durable write) would otherwise sit in every entry's
        // future, which is allocated and moved for each new visitor; few rooms are safety nets.
        Box::pin(rooms.admit_if_within_policy(room, cookie.ticket)).await.map_err(IntoResponse::into_response)?;
    }
    Ok(NewVisitor::Ticket(cookie))
}

fn pow_challenge(json: bool, room: &Room, challenge: &str, difficulty: u8, reason: Option<&str>, to: Option<&str>) -> Response {
    if json {
        let body = serde_json::json!({
            "error": {"code": "pow_required", "message": match reason {
                Some(r) => format!("proof of work refused ({r}); solve the new challenge"),
                None => "solve the proof-of-work challenge, then retry with ?pow=<challenge>:<solution>".to_string(),
            }},
            "pow": {"challenge": challenge, "difficulty": difficulty, "algorithm": "sha256-leading-zero-bits"},
        });
        return (StatusCode::PRECONDITION_REQUIRED, Json(body)).into_response();
    }
    pages::render(
        StatusCode::OK,
        "pow.html",
        minijinja::context! { name => room.spec().name.clone(), room => room.id.clone(), challenge, difficulty, to },
    )
}

fn too_many_entries(json: bool, retry_after: u64) -> Response {
    let message = "Too many new visitors from your network right now. Please try again in a minute.";
    let mut response = if json {
        ApiError::too_many_requests(message, retry_after).into_response()
    } else {
        pages::error_page(StatusCode::TOO_MANY_REQUESTS, "Please wait a moment", message)
    };
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
    response
}

async fn status(State(state): State<AppState>, ApiPath(room_id): ApiPath<String>, request: axum::extract::Request) -> Response {
    status_answer(&state, &room_id, &request)
}

/// `GET /r/{room}/status` (also served in front of the router, `http::HotRoute`).
pub fn status_answer(state: &AppState, room_id: &str, request: &axum::extract::Request) -> Response {
    let headers = request.headers();
    let Some(room) = state.rooms.get(room_id) else {
        return ApiError::not_found(format!("no room {room_id:?}")).into_response();
    };
    let cookie = state.rooms.recognise(&room, cookie_in(headers, &room.id));
    if cookie.is_none() && room.effective_state(state.clock.now_ms()) != RoomState::Passthrough {
        return ApiError::unauthorized(format!("no ticket for this room: enter at /r/{room_id} first")).into_response();
    }
    let status = state.rooms.status(&room, cookie.as_ref());
    respond(state, true, &room, status, Vec::new(), headers)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketRegistration {
    socket_id: String,
}

/// `POST /r/{room}/socket {socket_id}`: the waiting page says which realtime connection is
/// its own, so an open socket keeps the visitor counted as present (abandonment) without any
/// polling. The socket must be connected to weir's internal app.
async fn register_socket(
    State(state): State<AppState>,
    ApiPath(room_id): ApiPath<String>,
    headers: HeaderMap,
    crate::error::ApiJson(body): crate::error::ApiJson<SocketRegistration>,
) -> Result<StatusCode, ApiError> {
    let room = state.rooms.require(&room_id)?;
    let cookie = state
        .rooms
        .recognise(&room, cookie_in(&headers, &room.id))
        .ok_or_else(|| ApiError::unauthorized(format!("no ticket for this room: enter at /r/{room_id} first")))?;
    let id = &body.socket_id;
    let well_formed = id.len() <= 41
        && id.split_once('.').is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()));
    if !well_formed {
        return Err(ApiError::invalid_field("socket_id", "must look like 123.456"));
    }
    if !state.realtime.internal_socket_connected(id) {
        return Err(ApiError::invalid_field("socket_id", "is not a connection to this server's internal app"));
    }
    room.engine.lock().watch_socket(cookie.ticket, body.socket_id, state.clock.now_ms());
    Ok(StatusCode::NO_CONTENT)
}

fn visitor_cookie(state: &AppState, room: &Room, c: &super::visitor::VisitorCookie) -> String {
    let name = [super::visitor::COOKIE_PREFIX, room.id.as_str()];
    let encode = |out: &mut String| state.rooms.cookies.encode_into(&room.id, c, out);
    let longest = super::visitor::CookieSigner::longest(c);
    cookies::set_with(&name, longest, encode, VISITOR_COOKIE_MAX_AGE_S, secure(state))
}

fn secure(state: &AppState) -> bool {
    state.rooms.public_url.starts_with("https://")
}

fn respond(
    state: &AppState,
    json: bool,
    room: &Room,
    status: VisitorStatus,
    mut set_cookies: Vec<String>,
    headers: &HeaderMap,
) -> Response {
    if let Some(token) = &status.token {
        set_cookies.push(cookies::set("weir_token", token, state.config.token_ttl_seconds, secure(state)));
    }
    let mut response = if json {
        // Built by hand: every status poll lands here, and `IntoResponse` for a byte body
        // first inserts a content type only to have it replaced.
        let mut response = Response::new(axum::body::Body::from(status.to_json()));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    } else if let Some(url) = &status.redirect_url {
        // 302 with a small "continue" page as its body, for clients that do not follow.
        let mut r = page(room, &status, headers, StatusCode::FOUND);
        if let Ok(v) = HeaderValue::from_str(url) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    } else {
        page(room, &status, headers, StatusCode::OK)
    };
    for c in set_cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

fn page(room: &Room, status: &VisitorStatus, headers: &HeaderMap, code: StatusCode) -> Response {
    let spec = room.spec();
    // The page computes its position from its rank (place in line) and the serving counter.
    let (rank, serving) = {
        let engine = room.engine.lock();
        (status.ticket.map(|t| engine.rank(t)).unwrap_or(0), engine.serving())
    };
    pages::RoomPage { spec: &spec, status, rank, serving, now_ms: status.now_ms, headers }.render(code)
}

fn closed(json: bool, room: &Room, status: VisitorStatus, headers: &HeaderMap) -> Response {
    if json {
        Json(status).into_response()
    } else {
        page(room, &status, headers, StatusCode::OK)
    }
}

fn no_such_room(json: bool, room_id: &str, headers: &HeaderMap) -> Response {
    if json {
        ApiError::not_found(format!("no room {room_id:?}")).into_response()
    } else {
        pages::error_page_for(StatusCode::NOT_FOUND, headers, |t| t.not_found_title, |t| t.not_found_text)
    }
}
