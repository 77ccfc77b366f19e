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
        return no_such_room(json, &room_id);
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
            RoomState::Closed => return closed(json, &room, rooms.status(&room, None)),
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
    respond(&state, json, &room, status, set_cookies)
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
    respond(&state, true, &room, status, Vec::new())
}

fn visitor_cookie(state: &AppState, room: &Room, c: &super::visitor::VisitorCookie) -> String {
    let value = state.rooms.cookies.encode(&room.id, c);
    cookies::set(&cookie_name(&room.id), &value, VISITOR_COOKIE_MAX_AGE_S, secure(state))
}

fn secure(state: &AppState) -> bool {
    state.rooms.public_url.starts_with("https://")
}

fn respond(state: &AppState, json: bool, room: &Room, status: VisitorStatus, mut set_cookies: Vec<String>) -> Response {
    if let Some(token) = &status.token {
        set_cookies.push(cookies::set("weir_token", token, state.config.token_ttl_seconds, secure(state)));
    }
    let mut response = if json {
        let mut r = Json(&status).into_response();
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    } else if let Some(url) = &status.redirect_url {
        let mut r = StatusCode::FOUND.into_response();
        if let Ok(v) = HeaderValue::from_str(url) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    } else {
        page(state, room, &status)
    };
    for c in set_cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

fn page(state: &AppState, room: &Room, status: &VisitorStatus) -> Response {
    let position = status.position.unwrap_or(0);
    let eta = status.eta_seconds;
    // Refresh often enough to see progress, rarely enough not to load the server:
    // a quarter of the wait, between 5 and 30 seconds.
    let refresh_seconds = eta.map(|e| (e / 4).clamp(5, 30)).unwrap_or(15);
    let ticket = status.ticket.unwrap_or(0);
    let progress = if ticket > 0 { (100 - position.saturating_mul(100) / ticket).min(100) } else { 0 };
    match status.state {
        RoomState::Scheduled => {
            let remaining_s = room
                .spec()
                .starts_at_ms()
                .map(|t| ((t - state.clock.now_ms()).max(0) / 1000) as u64)
                .unwrap_or(0);
            pages::render(
                StatusCode::OK,
                "scheduled.html",
                minijinja::context! {
                    name => status.name, starts_at => status.starts_at,
                    countdown_text => duration_text(remaining_s),
                    refresh_seconds => remaining_s.clamp(1, 30),
                },
            )
        }
        RoomState::Paused => pages::render(
            StatusCode::OK,
            "paused.html",
            minijinja::context! { name => status.name, position, refresh_seconds => 15 },
        ),
        RoomState::Closed => pages::render(StatusCode::OK, "closed.html", minijinja::context! { name => status.name }),
        _ => pages::render(
            StatusCode::OK,
            "waiting.html",
            minijinja::context! {
                name => status.name, position, ticket, eta_seconds => eta,
                eta_text => eta.map(duration_text), progress, refresh_seconds,
            },
        ),
    }
}

fn closed(json: bool, room: &Room, status: VisitorStatus) -> Response {
    if json {
        Json(status).into_response()
    } else {
        pages::render(StatusCode::OK, "closed.html", minijinja::context! { name => room.spec().name.clone() })
    }
}

fn no_such_room(json: bool, room_id: &str) -> Response {
    if json {
        ApiError::not_found(format!("no room {room_id:?}")).into_response()
    } else {
        pages::error_page(StatusCode::NOT_FOUND, "No such waiting room", "Check the link you followed.")
    }
}

/// "about 3 minutes", "less than a minute", "about 2 hours".
pub fn duration_text(seconds: u64) -> String {
    match seconds {
        0..=59 => "less than a minute".to_string(),
        60..=5399 => {
            let m = (seconds + 30) / 60;
            format!("about {m} minute{}", if m == 1 { "" } else { "s" })
        }
        _ => {
            let h = (seconds + 1800) / 3600;
            format!("about {h} hour{}", if h == 1 { "" } else { "s" })
        }
    }
}
