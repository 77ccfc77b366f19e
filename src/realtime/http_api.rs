//! The Pusher HTTP API under `/apps/{app_id}/`, signed as Pusher signs it: trigger events
//! (one event to up to 100 channels, or batches of up to 10), query channels and presence users,
//! and terminate a user's connections. Success bodies look like Pusher's (`{}` after a trigger);
//! failures use weir's JSON error shape with Pusher's statuses (401 names the failing auth part,
//! 400, 403 disabled app, 404 unknown app, 413, 429 with `Retry-After`).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, OriginalUri, Path, State};
use axum::http::Method;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::protocol::{self, ChannelKind, ChannelType};
use super::signature;
use super::tenant::{ChannelFilter, ChannelReport, Tenant};
use crate::error::{ApiError, ApiPath};
use crate::http::AppState;

/// Channels one trigger may address (Pusher: 100).
pub const MAX_TRIGGER_CHANNELS: usize = 100;
/// Events one batch may carry (Pusher: 10).
pub const MAX_BATCH_EVENTS: usize = 10;

/// Looks up the app, reads the body (bounded by the app's limits) and checks the signature.
async fn authorize(
    state: &AppState,
    app_id: &str,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<(Arc<Tenant>, Bytes), ApiError> {
    let tenant = state
        .realtime
        .tenant_by_id(app_id)
        .ok_or_else(|| ApiError::not_found(format!("unknown app {app_id:?}")))?;
    let spec = tenant.spec();
    // A full batch: 10 events of max size, each escaped (×2 worst case for JSON in JSON),
    // plus channel lists. Anything larger cannot be valid.
    let limit = spec.max_message_bytes * MAX_BATCH_EVENTS * 2 + 64 * 1024;
    if crate::limits::body::declared_over(headers, limit) {
        return Err(crate::limits::body::too_large(limit));
    }
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| crate::limits::body::too_large(limit))?;
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    signature::verify_api_request(&spec.key, &spec.secret, method.as_str(), uri.path(), &params, &body, state.clock.now_secs())
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    if !spec.enabled {
        return Err(ApiError::forbidden("app is disabled"));
    }
    Ok((tenant, body))
}

/// A signed HTTP API request: its app (named by the `{app_id}` path segment or, on the
/// prefix-less SDK path, by `auth_key`), verified by `authorize`, and its bounded body.
/// Every HTTP API handler takes this as its last argument.
pub struct Signed {
    pub tenant: Arc<Tenant>,
    pub body: Bytes,
    pub uri: axum::http::Uri,
}

impl axum::extract::FromRequest<AppState> for Signed {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &AppState) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        let uri = parts.extensions.get::<OriginalUri>().map_or_else(|| parts.uri.clone(), |o| o.0.clone());
        let Path(params) = Path::<std::collections::HashMap<String, String>>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let app_id = match params.get("app_id") {
            Some(id) => id.clone(),
            None => {
                let key = query_param(&uri, "auth_key").ok_or_else(|| ApiError::unauthorized("auth_key: missing"))?;
                match state.realtime.tenant_by_key(&key) {
                    Some(t) if !t.internal => t.spec().id.clone(),
                    _ => return Err(ApiError::unauthorized("auth_key: no app has this key")),
                }
            }
        };
        let (tenant, body) = authorize(state, &app_id, &parts.method, &uri, &parts.headers, body).await?;
        Ok(Signed { tenant, body, uri })
    }
}

fn query_param(uri: &axum::http::Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[derive(Deserialize)]
struct TriggerBody {
    name: String,
    data: Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
struct BatchBody {
    batch: Vec<TriggerBody>,
}

/// A trigger after validation.
struct Event {
    name: String,
    data: String,
    channels: Vec<String>,
    socket_id: Option<String>,
    info: Info,
}

#[derive(Default, Clone, Copy)]
struct Info {
    user_count: bool,
    subscription_count: bool,
}

fn parse_info(raw: Option<&str>) -> Result<Info, ApiError> {
    let mut info = Info::default();
    for attr in raw.unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match attr {
            "user_count" => info.user_count = true,
            "subscription_count" => info.subscription_count = true,
            other => return Err(ApiError::invalid_field("info", format!("unknown attribute {other:?}"))),
        }
    }
    Ok(info)
}

fn validate_socket_id(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn validate(body: TriggerBody, max_data: usize, max_channels: usize) -> Result<Event, ApiError> {
    protocol::validate_event_name(&body.name).map_err(|e| ApiError::invalid_field("name", e))?;
    let channels = match (body.channels, body.channel) {
        (Some(c), None) => c,
        (None, Some(c)) => vec![c],
        (Some(mut c), Some(one)) => {
            c.push(one);
            c
        }
        (None, None) => return Err(ApiError::invalid_field("channels", "missing")),
    };
    if channels.is_empty() || channels.len() > max_channels {
        return Err(ApiError::invalid_field("channels", format!("must list 1-{max_channels} channels")));
    }
    for c in &channels {
        ChannelType::parse(c).map_err(|e| ApiError::invalid_field("channels", e))?;
    }
    let data = match body.data {
        Value::String(s) => s,
        other => other.to_string(),
    };
    if data.len() > max_data {
        return Err(ApiError::payload_too_large(format!(
            "data: {} bytes is over the app's limit of {max_data} bytes",
            data.len()
        )));
    }
    if let Some(s) = &body.socket_id {
        if !validate_socket_id(s) {
            return Err(ApiError::invalid_field("socket_id", "must look like 1234.5678"));
        }
    }
    let info = parse_info(body.info.as_deref())?;
    Ok(Event { name: body.name, data, channels, socket_id: body.socket_id, info })
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

async fn publish(state: &AppState, tenant: &Tenant, event: &Event) -> Result<(), ApiError> {
    state.realtime.publish(tenant, &event.channels, &event.name, &event.data, event.socket_id.as_deref()).await
}

/// The `info` attributes asked for, of one channel's merged report (`None`: not occupied).
fn info_of(report: Option<&ChannelReport>, info: Info) -> Map<String, Value> {
    let mut v = Map::new();
    if info.user_count {
        v.insert("user_count".into(), json!(report.and_then(|r| r.users.as_ref()).map_or(0, Vec::len)));
    }
    if info.subscription_count {
        v.insert("subscription_count".into(), json!(report.map_or(0, |r| r.subscriptions)));
    }
    v
}

/// One channel's report, merged across the nodes of a cluster.
async fn report(state: &AppState, tenant: &Tenant, channel: &str) -> Result<Option<ChannelReport>, ApiError> {
    let reports = state.realtime.channel_reports(tenant, ChannelFilter::Name(channel.into())).await?;
    Ok(reports.into_iter().next())
}

fn take_budget(tenant: &Tenant, n: usize) -> Result<(), ApiError> {
    tenant
        .take_publish_budget(n as u32)
        .map_err(|wait| ApiError::too_many_requests("over the app's publish rate limit", wait))
}

/// `POST /apps/{app_id}/events`
pub async fn trigger(
    State(state): State<AppState>,
    Signed { tenant, body, .. }: Signed,
) -> Result<Json<Value>, ApiError> {
    let spec = tenant.spec();
    let event = validate(parse_body(&body)?, spec.max_message_bytes, MAX_TRIGGER_CHANNELS)?;
    if event.info.user_count && event.channels.iter().any(|c| !c.starts_with("presence-")) {
        return Err(ApiError::invalid_field("info", "user_count is only available for presence channels"));
    }
    take_budget(&tenant, event.channels.len())?;
    publish(&state, &tenant, &event).await?;
    if !event.info.user_count && !event.info.subscription_count {
        return Ok(Json(json!({})));
    }
    let mut channels = Map::new();
    for c in &event.channels {
        let r = report(&state, &tenant, c).await?;
        channels.insert(c.clone(), Value::Object(info_of(r.as_ref(), event.info)));
    }
    Ok(Json(json!({ "channels": channels })))
}

/// `POST /apps/{app_id}/batch_events`
pub async fn batch(
    State(state): State<AppState>,
    Signed { tenant, body, .. }: Signed,
) -> Result<Json<Value>, ApiError> {
    let spec = tenant.spec();
    let parsed: BatchBody = parse_body(&body)?;
    if parsed.batch.is_empty() || parsed.batch.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::invalid_field("batch", format!("must hold 1-{MAX_BATCH_EVENTS} events")));
    }
    let events = parsed
        .batch
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            validate(b, spec.max_message_bytes, 1).map_err(|mut e| {
                e.message = format!("batch[{i}].{}", e.message);
                e
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    take_budget(&tenant, events.len())?;
    for e in &events {
        publish(&state, &tenant, e).await?;
    }
    if events.iter().all(|e| !e.info.user_count && !e.info.subscription_count) {
        return Ok(Json(json!({})));
    }
    let mut infos = Vec::with_capacity(events.len());
    for e in &events {
        let r = report(&state, &tenant, &e.channels[0]).await?;
        infos.push(Value::Object(info_of(r.as_ref(), e.info)));
    }
    Ok(Json(json!({ "batch": infos })))
}

/// `GET /apps/{app_id}/channels?filter_by_prefix=&info=user_count,subscription_count`
pub async fn channels(
    State(state): State<AppState>,
    Signed { tenant, uri, .. }: Signed,
) -> Result<Json<Value>, ApiError> {
    let prefix = query_param(&uri, "filter_by_prefix").unwrap_or_default();
    let info = parse_info(query_param(&uri, "info").as_deref())?;
    if info.user_count && !prefix.starts_with("presence-") {
        return Err(ApiError::invalid_field("info", "user_count needs filter_by_prefix=presence-"));
    }
    let reports = state.realtime.channel_reports(&tenant, ChannelFilter::Prefix(prefix)).await?;
    let out: Map<String, Value> = reports.iter().map(|r| (r.name.clone(), Value::Object(info_of(Some(r), info)))).collect();
    Ok(Json(json!({ "channels": out })))
}

/// `GET /apps/{app_id}/channels/{channel}?info=user_count,subscription_count`
pub async fn channel(
    State(state): State<AppState>,
    ApiPath((_app_id, channel)): ApiPath<(String, String)>,
    Signed { tenant, uri, .. }: Signed,
) -> Result<Json<Value>, ApiError> {
    let ty = ChannelType::parse(&channel).map_err(|e| ApiError::invalid_field("channel", e))?;
    let info = parse_info(query_param(&uri, "info").as_deref())?;
    if info.user_count && ty.kind != ChannelKind::Presence {
        return Err(ApiError::invalid_field("info", "user_count is only available for presence channels"));
    }
    let r = report(&state, &tenant, &channel).await?;
    let mut v = Map::new();
    v.insert("occupied".into(), json!(r.is_some()));
    v.extend(info_of(r.as_ref(), info));
    Ok(Json(Value::Object(v)))
}

/// `GET /apps/{app_id}/channels/{channel}/users` (presence channels only)
pub async fn users(
    State(state): State<AppState>,
    ApiPath((_app_id, channel)): ApiPath<(String, String)>,
    Signed { tenant, .. }: Signed,
) -> Result<Json<Value>, ApiError> {
    let ty = ChannelType::parse(&channel).map_err(|e| ApiError::invalid_field("channel", e))?;
    if ty.kind != ChannelKind::Presence {
        return Err(ApiError::invalid_field("channel", "users are only listed for presence channels"));
    }
    let r = report(&state, &tenant, &channel).await?;
    let users: Vec<Value> = r.and_then(|r| r.users).unwrap_or_default().into_iter().map(|id| json!({ "id": id })).collect();
    Ok(Json(json!({ "users": users })))
}

/// `POST /apps/{app_id}/users/{user_id}/terminate_connections`
pub async fn terminate(
    State(state): State<AppState>,
    ApiPath((_app_id, user_id)): ApiPath<(String, String)>,
    Signed { tenant, .. }: Signed,
) -> Result<Json<Value>, ApiError> {
    state.realtime.terminate_user(&tenant, &user_id).await?;
    Ok(Json(json!({})))
}

/// `POST /users/{user_id}/terminate_connections` (no `/apps/{id}` prefix): the path the PyPI
/// `pusher` SDK (3.3.x) uses for `terminate_user_connections()`. The app is found by `auth_key`;
/// the request is verified exactly as on the documented path.
pub async fn terminate_by_key(
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
    Signed { tenant, .. }: Signed,
) -> Result<Json<Value>, ApiError> {
    state.realtime.terminate_user(&tenant, &user_id).await?;
    Ok(Json(json!({})))
}
