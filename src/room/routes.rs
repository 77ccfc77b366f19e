//! Visitor routes: `GET /r/{room}` (entry and waiting page) and `GET /r/{room}/status` (JSON).

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::model::RoomState;
use super::visitor::{cookie_name, safe_deep_link};
use super::{Room, VisitorStatus};
use crate::error::ApiError;
use crate::http::AppState;
use crate::web::{cookies, pages};

/// Cookie lifetime for the visitor's ticket: a week covers any realistic queue.
const VISITOR_COOKIE_MAX_AGE_S: u64 = 7 * 24 * 3600;

pub fn routes() -> Router<AppState> {
    Router::new().route("/r/{room}", get(entry)).route("/r/{room}/status", get(status))
}

#[derive(Deserialize)]
struct EntryQuery {
    to: Option<String>,
}

async fn entry(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    query: Result<Query<EntryQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let json = cookies::wants_json(&headers);
    let Some(room) = state.rooms.get(&room_id) else {
        return no_such_room(json, &room_id, &headers);
    };
    let rooms = &state.rooms;
    let deep_link = query.ok().and_then(|Query(q)| q.to).and_then(|to| safe_deep_link(&to));
    let existing = rooms.recognise(&room, cookies::get(&headers, &cookie_name(&room.id)));
    let mut set_cookies = Vec::new();
    let cookie = match existing {
        Some(mut c) => {
            if deep_link.is_some() && deep_link != c.deep_link {
                c.deep_link = deep_link;
                set_cookies.push(visitor_cookie(&state, &room, &c));
            }
            Some(c)
        }
        None => match room.effective_state(state.clock.now_ms()) {
            RoomState::Closed => return closed(&state, json, &room, rooms.status(&room, None), &headers),
            RoomState::Passthrough => None,
            _ => match rooms.enter(&room, deep_link).await {
                Ok(c) => {
                    set_cookies.push(visitor_cookie(&state, &room, &c));
                    Some(c)
                }
                Err(e) => return e.into_response(),
            },
        },
    };
    let status = rooms.status(&room, cookie.as_ref());
    respond(&state, json, &room, status, set_cookies, &headers)
}

async fn status(State(state): State<AppState>, Path(room_id): Path<String>, headers: HeaderMap) -> Response {
    let Some(room) = state.rooms.get(&room_id) else {
        return ApiError::not_found(format!("no room {room_id:?}")).into_response();
    };
    let cookie = state.rooms.recognise(&room, cookies::get(&headers, &cookie_name(&room.id)));
    if cookie.is_none() && room.effective_state(state.clock.now_ms()) != RoomState::Passthrough {
        return ApiError::unauthorized(format!("no ticket for this room: enter at /r/{room_id} first")).into_response();
    }
    let status = state.rooms.status(&room, cookie.as_ref());
    respond(&state, true, &room, status, Vec::new(), &headers)
}

fn visitor_cookie(state: &AppState, room: &Room, c: &super::visitor::VisitorCookie) -> String {
    let value = state.rooms.cookies.encode(&room.id, c);
    cookies::set(&cookie_name(&room.id), &value, VISITOR_COOKIE_MAX_AGE_S, secure(state))
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
        let mut r = Json(&status).into_response();
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    } else if let Some(url) = &status.redirect_url {
        // 302 with a small "continue" page as its body, for clients that do not follow.
        let mut r = page(state, room, &status, headers, StatusCode::FOUND);
        if let Ok(v) = HeaderValue::from_str(url) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    } else {
        page(state, room, &status, headers, StatusCode::OK)
    };
    for c in set_cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

fn page(state: &AppState, room: &Room, status: &VisitorStatus, headers: &HeaderMap, code: StatusCode) -> Response {
    let spec = room.spec();
    pages::RoomPage { spec: &spec, status, serving: room.serving(), now_ms: state.clock.now_ms(), headers }.render(code)
}

fn closed(state: &AppState, json: bool, room: &Room, status: VisitorStatus, headers: &HeaderMap) -> Response {
    if json {
        Json(status).into_response()
    } else {
        page(state, room, &status, headers, StatusCode::OK)
    }
}

fn no_such_room(json: bool, room_id: &str, headers: &HeaderMap) -> Response {
    if json {
        ApiError::not_found(format!("no room {room_id:?}")).into_response()
    } else {
        pages::error_page_for(StatusCode::NOT_FOUND, headers, |t| t.not_found_title, |t| t.not_found_text)
    }
}
