//! `/api/v1/apps`: create, list, show, change and delete Pusher apps (behind the admin key,
//! checked by `admin::auth` where the routes are mounted). API-created apps are persisted in
//! the store (`Table::Apps`, JSON `AppSpec`); apps from the config file are shown but read-only.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::app::AppSpec;
use super::tenant::Tenant;
use super::{Realtime, INTERNAL_APP_KEY};
use crate::error::{ApiBytes, ApiError, ApiPath};
use crate::http::AppState;
use crate::store::{StoreError, Table};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/apps", get(list).post(create))
        .route("/apps/{id}", get(show).patch(patch).delete(delete))
}

/// The request's JSON object; an `id` given as a number (Pusher's app ids are digits) is taken
/// as its string.
fn parse_object(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) => {
            if let Some(Value::Number(n)) = m.get("id") {
                let id = n.to_string();
                m.insert("id".into(), Value::String(id));
            }
            Ok(m)
        }
        Ok(_) => Err(ApiError::bad_request("body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("invalid JSON: {e}"))),
    }
}

fn to_spec(v: Value) -> Result<AppSpec, ApiError> {
    let spec: AppSpec = serde_json::from_value(v).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", e.to_string()))?;
    spec.validate().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", e))?;
    Ok(spec)
}

fn random_hex(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}

/// `POST /api/v1/apps` with optional settings (and optionally `id`, `key`, `secret`).
/// 201 with the whole app, credentials included.
async fn create(State(state): State<AppState>, ApiBytes(body): ApiBytes) -> Result<Response, ApiError> {
    let mut obj = parse_object(&body)?;
    let rt = &state.realtime;
    if !obj.contains_key("id") {
        let id = loop {
            let candidate = rand::random_range(100_000u32..1_000_000_000).to_string();
            if rt.tenant_by_id(&candidate).is_none() {
                break candidate;
            }
        };
        obj.insert("id".into(), Value::String(id));
    }
    obj.entry("key").or_insert_with(|| Value::String(random_hex(10)));
    obj.entry("secret").or_insert_with(|| Value::String(random_hex(10)));
    let spec = to_spec(Value::Object(obj))?;
    rt.create_app(spec.clone()).await?;
    Ok((StatusCode::CREATED, Json(spec)).into_response())
}

/// An app's settings plus `source` (`config` or `api`) and live `stats`.
fn describe(rt: &Realtime, t: &Tenant) -> Value {
    let spec = t.spec();
    let mut v = serde_json::to_value(&*spec).unwrap_or_else(|_| json!({}));
    v["source"] = json!(if rt.config_ids.contains(&spec.id) { "config" } else { "api" });
    v["stats"] = t.stats();
    v
}

/// `GET /api/v1/apps` → `{"apps": [...]}` ordered by id, each with `source` and `stats`.
async fn list(State(state): State<AppState>) -> Json<Value> {
    let rt = &state.realtime;
    let mut tenants: Vec<Arc<Tenant>> = rt.registry.read().by_id.values().cloned().collect();
    tenants.sort_by_key(|t| {
        let id = t.spec().id.clone();
        (id.len(), id)
    });
    let apps: Vec<Value> = tenants.iter().map(|t| describe(rt, t)).collect();
    Json(json!({ "apps": apps }))
}

fn find(rt: &Realtime, id: &str) -> Result<Arc<Tenant>, ApiError> {
    rt.tenant_by_id(id).ok_or_else(|| ApiError::not_found(format!("no app with id {id:?}")))
}

async fn show(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let t = find(&state.realtime, &id)?;
    Ok(Json(describe(&state.realtime, &t)))
}

/// `PATCH /api/v1/apps/{id}`: changes the given settings (and `secret`); `id` and `key` are fixed.
async fn patch(State(state): State<AppState>, ApiPath(id): ApiPath<String>, ApiBytes(body): ApiBytes) -> Result<Json<AppSpec>, ApiError> {
    let changes = parse_object(&body)?;
    let rt = &state.realtime;
    let _guard = rt.admin_lock.lock().await;
    let tenant = find(rt, &id)?;
    if rt.config_ids.contains(&id) {
        return Err(ApiError::conflict(format!("app {id} is defined in the config file; change it there")));
    }
    let current = tenant.spec();
    let mut merged = serde_json::to_value(&*current).map_err(|e| ApiError::internal(e.to_string()))?;
    for (k, v) in changes {
        if k == "source" || k == "stats" {
            continue; // read-only fields of GET, tolerated when a client sends them back
        }
        let unchanged = merged.get(&k) == Some(&v);
        if (k == "id" || k == "key") && !unchanged {
            return Err(ApiError::invalid_field(&k, "cannot be changed; create a new app instead"));
        }
        merged[k.as_str()] = v;
    }
    let spec = to_spec(merged)?;
    let raw = serde_json::to_vec(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
    rt.store.put(Table::Apps, &id, raw).await?;
    tenant.update(spec.clone(), &rt.hooks);
    rt.announce_app(&id);
    Ok(Json(spec))
}

/// `DELETE /api/v1/apps/{id}`: 204; its connections are closed with 4001.
async fn delete(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<StatusCode, ApiError> {
    let rt = &state.realtime;
    let _guard = rt.admin_lock.lock().await;
    let tenant = find(rt, &id)?;
    if rt.config_ids.contains(&id) {
        return Err(ApiError::conflict(format!("app {id} is defined in the config file; remove it there")));
    }
    rt.store.delete(Table::Apps, &id).await?;
    {
        let mut reg = rt.registry.write();
        reg.by_id.remove(&id);
        reg.by_key.remove(&tenant.spec().key);
    }
    tenant.close_all(super::protocol::code::APP_NOT_FOUND, "app deleted");
    rt.announce_app(&id);
    Ok(StatusCode::NO_CONTENT)
}

impl Realtime {
    /// Persists and registers a new app; 409 when its id or key is taken.
    pub async fn create_app(&self, spec: AppSpec) -> Result<(), ApiError> {
        let _guard = self.admin_lock.lock().await;
        if spec.key == INTERNAL_APP_KEY {
            return Err(ApiError::conflict(format!("key {INTERNAL_APP_KEY:?} is reserved for weir's internal app")));
        }
        {
            let reg = self.registry.read();
            if reg.by_id.contains_key(&spec.id) {
                return Err(ApiError::conflict(format!("an app with id {} exists", spec.id)));
            }
            if reg.by_key.contains_key(&spec.key) {
                return Err(ApiError::conflict("an app with this key exists"));
            }
        }
        let raw = serde_json::to_vec(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        if !self.store.insert_new(Table::Apps, &spec.id, raw).await? {
            return Err(ApiError::conflict(format!("an app with id {} exists", spec.id)));
        }
        self.register(spec.clone());
        self.announce_app(&spec.id);
        Ok(())
    }

    fn register(&self, spec: AppSpec) {
        let t = Tenant::new(spec.clone(), false, self.serials.clone(), &self.hooks, self.cluster.clone(), self.talkers.clone());
        let mut reg = self.registry.write();
        reg.by_id.insert(spec.id.clone(), t.clone());
        reg.by_key.insert(spec.key, t);
    }

    fn announce_app(&self, id: &str) {
        if let Some(cluster) = &self.cluster {
            cluster.app_changed(id);
        }
    }

    /// Brings this node's copy of app `id` in line with the store (another node of the cluster
    /// created, changed or deleted it). Apps of the config file are left as they are.
    pub(crate) async fn reload_app(&self, id: &str) -> Result<(), StoreError> {
        let _guard = self.admin_lock.lock().await;
        if self.config_ids.contains(id) {
            return Ok(());
        }
        let stored = match self.store.get(Table::Apps, id).await? {
            Some(raw) => Some(serde_json::from_slice::<AppSpec>(&raw).map_err(|e| StoreError::Corrupt(format!("app {id}: {e}")))?),
            None => None,
        };
        let current = self.tenant_by_id(id);
        match (stored, current) {
            (Some(spec), Some(tenant)) if tenant.spec().key == spec.key => tenant.update(spec, &self.hooks),
            (stored, current) => {
                if let Some(tenant) = current {
                    let mut reg = self.registry.write();
                    reg.by_id.remove(id);
                    reg.by_key.remove(&tenant.spec().key);
                    drop(reg);
                    tenant.close_all(super::protocol::code::APP_NOT_FOUND, "app deleted");
                }
                if let Some(spec) = stored.filter(|s| self.tenant_by_key(&s.key).is_none()) {
                    self.register(spec);
                }
            }
        }
        Ok(())
    }
}
