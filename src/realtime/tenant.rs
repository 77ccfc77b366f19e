//! One running app: its settings, connections, signed-in users, channels (subscribers, presence,
//! history, cache) and the fan-out of events to subscribers.
//!
//! Fan-out holds the app's channel lock while it queues one shared frame to each subscriber's
//! bounded outbox ([`Conn::send`]): each push is an uncontended lock and a reference count (and a
//! wake-up if the outbox was empty), never an await, and holding the lock keeps every
//! subscriber's view in serial order (a resume replays exactly what a live subscriber would have
//! seen). A full outbox closes that subscriber (slow consumer), never the publisher. Webhook events leave through `webhook` queues that never block either.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use indexmap::IndexMap;
use parking_lot::{Mutex, RwLock};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::app::AppSpec;
use crate::cluster::Cluster;
use crate::ops::talkers::Talkers;
use super::connection::Conn;
use super::history::History;
use super::presence::Presence;
use super::protocol::{self, code, ChannelKind, ChannelType};
use super::subscription_count::{self, Told};
use super::watchlist::{self, Users};
use super::webhook::{self, WebhookTargets};

/// Channels an app may keep in memory without subscribers (for history). Bounds what a
/// publisher spraying random channel names can make the server remember.
const MAX_IDLE_CHANNELS: usize = 100_000;
/// Memory one app may spend on history rings and cache-channel frames together. Over it, new
/// events are delivered live but not kept (resumes across them fail with `weir:resume_failed`,
/// cache channels answer `pusher:cache_miss`), so a publisher cannot grow memory without bound:
/// 100 000 channels × 100 events × 10 KB would otherwise be 100 GB.
pub const MAX_HISTORY_BYTES: usize = 64 * 1024 * 1024;
/// How long a `cache-` channel's last event stays replayable (Pusher: 30 minutes).
const CACHE_TTL: Duration = Duration::from_secs(30 * 60);

/// Per-app metric handles, resolved once (never a label lookup on the hot path).
pub struct AppMetrics {
    pub connections: metrics::Gauge,
    pub subscriptions: metrics::Gauge,
    pub messages_in: metrics::Counter,
    pub messages_out: metrics::Counter,
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
    pub slow_consumers: metrics::Counter,
    pub publishes: metrics::Counter,
    pub history_bytes: metrics::Gauge,
    /// Users signed in on this node, and the connections among theirs that watch someone.
    pub signed_in_users: metrics::Gauge,
    pub watching_connections: metrics::Gauge,
    /// Channels whose changed subscription count waits for the end of its interval.
    pub counts_due: metrics::Gauge,
}

impl AppMetrics {
    fn new(app: &str) -> Self {
        let a = app.to_string();
        Self {
            connections: metrics::gauge!("weir_realtime_connections", "app" => a.clone()),
            subscriptions: metrics::gauge!("weir_realtime_subscriptions", "app" => a.clone()),
            messages_in: metrics::counter!("weir_realtime_messages_in_total", "app" => a.clone()),
            messages_out: metrics::counter!("weir_realtime_messages_out_total", "app" => a.clone()),
            bytes_in: metrics::counter!("weir_realtime_bytes_in_total", "app" => a.clone()),
            bytes_out: metrics::counter!("weir_realtime_bytes_out_total", "app" => a.clone()),
            slow_consumers: metrics::counter!("weir_realtime_slow_consumer_disconnects_total", "app" => a.clone()),
            publishes: metrics::counter!("weir_realtime_publishes_total", "app" => a.clone()),
            history_bytes: metrics::gauge!("weir_realtime_history_bytes", "app" => a.clone()),
            signed_in_users: metrics::gauge!("weir_realtime_signed_in_users", "app" => a.clone()),
            watching_connections: metrics::gauge!("weir_realtime_watching_connections", "app" => a.clone()),
            counts_due: metrics::gauge!("weir_realtime_subscription_counts_due", "app" => a),
        }
    }
}

struct Subscriber {
    conn: Arc<Conn>,
    /// The presence user this subscription counts for.
    user_id: Option<String>,
}

/// An app's channels and the bytes their history and cache frames hold.
#[derive(Default)]
struct Channels {
    map: HashMap<String, Channel>,
    bytes: usize,
    /// Other nodes' subscriber counts (apps with `subscription_count`).
    remote_counts: subscription_count::Remote,
    /// Channels whose changed count waits for the end of its interval.
    counts_due: HashSet<String>,
}

/// A channel's subscribers in the order they subscribed (unsubscribing moves the newest into
/// the gap). Fan-out walks them in this order, which is roughly the order their connections'
/// state was allocated in, and so the order their sockets become readable to the client: a
/// hash order sent both sides jumping across memory for every frame (`BENCHMARKS.md`, round nine).
type Subscribers = IndexMap<u64, Subscriber, foldhash::fast::RandomState>;

struct Channel {
    ty: ChannelType,
    subscribers: Subscribers,
    presence: Presence,
    history: History,
    cache: Option<(Instant, Utf8Bytes)>,
    last_active: Instant,
    told: Told,
}

/// A presence member joining with a subscription.
pub struct Member {
    pub user_id: String,
    pub info: Value,
}

/// Why a subscription was refused after its auth succeeded.
pub enum SubscribeError {
    PresenceFull(usize),
}

/// An occupied channel as one node sees it: what the HTTP API's channel queries merge across
/// nodes ([`merge_reports`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChannelReport {
    pub name: String,
    pub subscriptions: usize,
    /// A presence channel's user ids (a user connected to two nodes counts once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

/// Which channels a query asks about.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "by", content = "value", rename_all = "snake_case")]
pub enum ChannelFilter {
    Prefix(String),
    Name(String),
}

/// Joins reports of the same channels from several nodes, sorted by name.
pub fn merge_reports(reports: Vec<ChannelReport>) -> Vec<ChannelReport> {
    let mut merged: std::collections::BTreeMap<String, ChannelReport> = std::collections::BTreeMap::new();
    for r in reports {
        match merged.get_mut(&r.name) {
            None => {
                merged.insert(r.name.clone(), r);
            }
            Some(m) => {
                m.subscriptions += r.subscriptions;
                if let Some(users) = r.users {
                    let all = m.users.get_or_insert_with(Vec::new);
                    all.extend(users);
                    all.sort_unstable();
                    all.dedup();
                }
            }
        }
    }
    merged.into_values().collect()
}

pub struct Tenant {
    spec: RwLock<Arc<AppSpec>>,
    /// weir's internal app: not listed or managed through the admin API.
    pub internal: bool,
    channels: Mutex<Channels>,
    /// Keyed by connection id: the socket id contains it, and a `u64` key spares every
    /// connection a copy of its socket id.
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    users: Mutex<Users>,
    conn_count: AtomicUsize,
    publish_bucket: Mutex<Bucket>,
    webhooks: RwLock<WebhookTargets>,
    pub metrics: AppMetrics,
    serials: Arc<AtomicU64>,
    /// With a cluster, client events go to every node through it.
    cluster: Option<Arc<Cluster>>,
    /// Messages delivered to this node's subscribers so far (the dashboard's rates).
    delivered: AtomicU64,
    talkers: Arc<Talkers>,
}

impl Tenant {
    pub fn new(
        spec: AppSpec,
        internal: bool,
        serials: Arc<AtomicU64>,
        hooks: &webhook::Deliverer,
        cluster: Option<Arc<Cluster>>,
        talkers: Arc<Talkers>,
    ) -> Arc<Self> {
        let spec = Arc::new(spec);
        let metrics = AppMetrics::new(&spec.id);
        let webhooks = hooks.targets_for(&spec);
        Arc::new(Self {
            publish_bucket: Mutex::new(Bucket::new(spec.max_publish_per_second)),
            spec: RwLock::new(spec),
            internal,
            channels: Mutex::new(Channels::default()),
            conns: Mutex::new(HashMap::new()),
            users: Mutex::new(Users::default()),
            conn_count: AtomicUsize::new(0),
            webhooks: RwLock::new(webhooks),
            metrics,
            serials,
            // weir's internal app (the waiting rooms' updates) stays on its node.
            cluster: cluster.filter(|_| !internal),
            delivered: AtomicU64::new(0),
            talkers,
        })
    }

    pub fn spec(&self) -> Arc<AppSpec> {
        self.spec.read().clone()
    }

    /// Applies new settings; connections of a disabled app are closed.
    pub fn update(&self, spec: AppSpec, hooks: &webhook::Deliverer) {
        let enabled = spec.enabled;
        *self.publish_bucket.lock() = Bucket::new(spec.max_publish_per_second);
        *self.webhooks.write() = hooks.targets_for(&spec);
        *self.spec.write() = Arc::new(spec);
        if !enabled {
            self.close_all(code::APP_DISABLED, "app disabled");
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conn_count.load(Ordering::Relaxed)
    }

    /// Messages delivered to this node's subscribers since start.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Registers a connection unless the app is at its connection limit.
    pub fn add_conn(&self, conn: &Arc<Conn>, max: u32) -> bool {
        let mut conns = self.conns.lock();
        if max > 0 && conns.len() >= max as usize {
            return false;
        }
        conns.insert(conn.id, conn.clone());
        self.conn_count.store(conns.len(), Ordering::Relaxed);
        self.metrics.connections.increment(1.0);
        true
    }

    /// Forgets a connection: unsubscribes it everywhere and signs it out (`user_id`).
    pub fn remove_conn(&self, conn: &Arc<Conn>, channels: impl IntoIterator<Item = String>, user_id: Option<&str>) {
        for channel in channels {
            self.unsubscribe(conn, &channel);
        }
        if let Some(user) = user_id {
            let spec = self.spec();
            let users = &mut *self.users.lock();
            let out = users.sign_out(conn, user);
            if let (true, Some(cluster)) = (out.last_here, &self.cluster) {
                cluster.user_online(&spec.id, user, false);
            }
            if out.went_offline && spec.watchlist_events {
                users.tell_watchers(user, false);
            }
            self.user_gauges(users);
        }
        let mut conns = self.conns.lock();
        if conns.remove(&conn.id).is_some() {
            self.metrics.connections.decrement(1.0);
        }
        self.conn_count.store(conns.len(), Ordering::Relaxed);
    }

    pub fn conn_id_of(&self, socket_id: &str) -> Option<u64> {
        let id = Conn::id_in(socket_id)?;
        self.conns.lock().get(&id).filter(|c| c.socket_id == socket_id).map(|c| c.id)
    }

    /// Signs `conn` in as `user_id`. With watchlist events on, it is told which users of its
    /// `watchlist` are online, and the watchers of `user_id` hear that they came online.
    pub fn sign_in(&self, conn: &Arc<Conn>, user_id: &str, watchlist: Vec<String>) {
        let spec = self.spec();
        let watchlist = if spec.watchlist_events { watchlist } else { Vec::new() };
        let users = &mut *self.users.lock();
        let signed = users.sign_in(conn, user_id, watchlist);
        if let (true, Some(cluster)) = (signed.first_here, &self.cluster) {
            cluster.user_online(&spec.id, user_id, true);
        }
        if !signed.watched_online.is_empty() {
            conn.send(&watchlist::frame(true, &signed.watched_online));
        }
        if signed.came_online && spec.watchlist_events {
            users.tell_watchers(user_id, true);
        }
        self.user_gauges(users);
    }

    fn user_gauges(&self, users: &Users) {
        let (signed_in, watching) = users.sizes();
        self.metrics.signed_in_users.set(signed_in as f64);
        self.metrics.watching_connections.set(watching as f64);
    }

    /// A user signed in on another node (`online`), or their last connection there ended.
    pub fn remote_user(&self, user_id: &str, online: bool, node: &str) {
        let users = &mut *self.users.lock();
        if let Some(now) = users.remote(user_id, online, node) {
            if self.spec().watchlist_events {
                users.tell_watchers(user_id, now);
            }
        }
    }

    /// The users signed in on this node, for a node that joins late.
    pub fn local_users(&self) -> Vec<String> {
        self.users.lock().local()
    }

    /// Closes every connection of a signed-in user (`terminate_connections`).
    pub fn terminate_user(&self, user_id: &str) -> usize {
        let conns = self.users.lock().connections(user_id);
        for c in &conns {
            c.close(code::UNAUTHORIZED, "connection terminated by the server");
        }
        conns.len()
    }

    pub fn close_all(&self, close_code: u16, reason: &str) {
        let conns: Vec<Arc<Conn>> = self.conns.lock().values().cloned().collect();
        for c in conns {
            c.close(close_code, reason);
        }
    }

    /// Subscribes `conn` and queues, in order: `subscription_succeeded` (with the channel's
    /// current serial), then either the resumed events and `weir:resume_succeeded` /
    /// `weir:resume_failed`, or for a cache channel its last event / `pusher:cache_miss`.
    pub fn subscribe(
        &self,
        conn: &Arc<Conn>,
        name: &str,
        ty: ChannelType,
        member: Option<Member>,
        resume_from: Option<u64>,
    ) -> Result<(), SubscribeError> {
        let spec = self.spec();
        let now = Instant::now();
        let mut hooks: Vec<Value> = Vec::new();
        {
            let mut guard = self.channels.lock();
            let Channels { map, bytes, .. } = &mut *guard;
            let serials = &self.serials;
            let ch = map.entry(name.to_string()).or_insert_with(|| Channel::new(ty.clone(), serials.load(Ordering::SeqCst), now));
            if let Some(m) = &member {
                if !ch.presence.contains(&m.user_id) && ch.presence.len() >= spec.max_presence_members {
                    return Err(SubscribeError::PresenceFull(spec.max_presence_members));
                }
            }
            if ch.subscribers.is_empty() {
                hooks.push(json!({ "name": "channel_occupied", "channel": name }));
            }
            let user_id = member.as_ref().map(|m| m.user_id.clone());
            if ch.subscribers.insert(conn.id, Subscriber { conn: conn.clone(), user_id }).is_none() {
                self.metrics.subscriptions.increment(1.0);
            }
            ch.last_active = now;
            let succeeded_data = match &member {
                Some(m) => {
                    if ch.presence.add(&m.user_id, m.info.clone()) {
                        if let Some(cluster) = &self.cluster {
                            cluster.member_changed(&spec.id, name, &m.user_id, Some(&m.info));
                        }
                        // A user already present through another node has been announced.
                        if !ch.presence.elsewhere(&m.user_id) {
                            let added = member_frame(name, &m.user_id, Some(&m.info));
                            for (id, sub) in &ch.subscribers {
                                if *id != conn.id {
                                    sub.conn.send(&added);
                                }
                            }
                            hooks.push(json!({ "name": "member_added", "channel": name, "user_id": m.user_id }));
                        }
                    }
                    ch.presence.snapshot().to_string()
                }
                None => "{}".to_string(),
            };
            let serial = ch.history.last_serial();
            conn.send(&protocol::frame(
                "pusher_internal:subscription_succeeded",
                Some(name),
                protocol::Data::Str(&succeeded_data),
                None,
                Some(serial),
            ));
            let held = ch.held_bytes();
            ch.history.expire(now, Duration::from_secs(spec.history_ttl_s));
            *bytes = bytes.saturating_sub(held - ch.held_bytes());
            self.metrics.history_bytes.set(*bytes as f64);
            if let Some(from) = resume_from {
                match ch.history.since(from) {
                    Ok(frames) => {
                        let mut count = 0u64;
                        for f in frames {
                            conn.send(f);
                            count += 1;
                        }
                        conn.send(&protocol::json_string_event(
                            "weir:resume_succeeded",
                            Some(name),
                            &json!({ "resume_from": from, "replayed": count, "serial": serial }),
                        ));
                    }
                    Err(too_old) => {
                        conn.send(&protocol::json_string_event(
                            "weir:resume_failed",
                            Some(name),
                            &json!({ "resume_from": from, "earliest": too_old.earliest, "serial": serial,
                                     "reason": "history no longer reaches back to resume_from" }),
                        ));
                    }
                }
            } else if ch.ty.cache {
                match &ch.cache {
                    Some((at, frame)) if now.saturating_duration_since(*at) < CACHE_TTL => {
                        conn.send(frame);
                    }
                    _ => {
                        conn.send(&protocol::json_string_event("pusher:cache_miss", Some(name), &json!({})));
                        hooks.push(json!({ "name": "cache_miss", "channel": name }));
                    }
                }
            }
            if spec.subscription_count && subscription_count::counted(&ch.ty) {
                ch.told.local_change();
                // Told now, the new subscriber hears the count with the others; else alone.
                if !self.count_changed(&spec, name, &mut guard, now, false, &mut hooks) {
                    let total = guard.map.get(name).map_or(0, |c| c.subscribers.len()) + guard.remote_counts.total(name);
                    conn.send(&subscription_count::frame(name, total));
                }
            }
        }
        self.webhook_all(hooks);
        Ok(())
    }

    /// Removes `conn` from `name`, announcing a presence departure and a vacated channel.
    pub fn unsubscribe(&self, conn: &Arc<Conn>, name: &str) {
        let mut hooks = Vec::new();
        {
            let spec = self.spec();
            let now = Instant::now();
            let mut channels = self.channels.lock();
            let Some(ch) = channels.map.get_mut(name) else { return };
            let Some(sub) = ch.subscribers.swap_remove(&conn.id) else { return };
            self.metrics.subscriptions.decrement(1.0);
            ch.last_active = now;
            if let Some(user) = sub.user_id {
                if ch.presence.remove(&user) {
                    if let Some(cluster) = &self.cluster {
                        cluster.member_changed(&self.spec().id, name, &user, None);
                    }
                    if !ch.presence.elsewhere(&user) {
                        let removed = member_frame(name, &user, None);
                        for s in ch.subscribers.values() {
                            s.conn.send(&removed);
                        }
                        hooks.push(json!({ "name": "member_removed", "channel": name, "user_id": user }));
                    }
                }
            }
            let vacated = ch.subscribers.is_empty();
            if spec.subscription_count && subscription_count::counted(&ch.ty) {
                ch.told.local_change();
                // A vacated channel may be forgotten below: the cluster hears of it now.
                self.count_changed(&spec, name, &mut channels, now, vacated, &mut hooks);
            }
            if vacated {
                hooks.push(json!({ "name": "channel_vacated", "channel": name }));
                let ch = channels.map.get(name);
                if ch.is_some_and(|ch| ch.history.is_empty() && ch.cache.is_none() && ch.presence.is_empty()) && spec.history_len == 0 {
                    channels.map.remove(name);
                }
            }
        }
        self.webhook_all(hooks);
    }

    /// `name`'s subscribers changed here or on another node (with the channel lock held): tells
    /// the count now, or, if it was told less than an interval ago and not `now_anyway`, marks
    /// the channel due. Returns whether it was told now.
    fn count_changed(&self, spec: &AppSpec, name: &str, channels: &mut Channels, now: Instant, now_anyway: bool, hooks: &mut Vec<Value>) -> bool {
        let Channels { map, remote_counts, counts_due, .. } = channels;
        let Some(ch) = map.get_mut(name) else { return false };
        if ch.told.recently(now) && !now_anyway {
            counts_due.insert(name.to_string());
            self.metrics.counts_due.set(counts_due.len() as f64);
            return false;
        }
        if counts_due.remove(name) {
            self.metrics.counts_due.set(counts_due.len() as f64);
        }
        self.tell_count(&spec.id, name, ch, remote_counts.total(name), now, hooks);
        true
    }

    fn tell_count(&self, app: &str, name: &str, ch: &mut Channel, remote: usize, now: Instant, hooks: &mut Vec<Value>) {
        let telling = ch.told.tell(ch.subscribers.len(), remote, now);
        if let (Some(count), Some(cluster)) = (telling.announce, &self.cluster) {
            cluster.count_changed(app, name, count);
        }
        if let Some(total) = telling.send {
            let frame = subscription_count::frame(name, total);
            for sub in ch.subscribers.values() {
                sub.conn.send(&frame);
            }
        }
        if let Some(total) = telling.webhook {
            hooks.push(json!({ "name": "subscription_count", "channel": name, "subscription_count": total }));
        }
    }

    /// Tells the counts whose interval has ended (called a few times a second).
    pub fn tell_due_counts(&self) {
        let mut hooks = Vec::new();
        {
            let mut guard = self.channels.lock();
            if guard.counts_due.is_empty() {
                return;
            }
            let spec = self.spec();
            let now = Instant::now();
            let Channels { map, remote_counts, counts_due, .. } = &mut *guard;
            counts_due.retain(|name| {
                let Some(ch) = map.get_mut(name) else { return false };
                if !spec.subscription_count {
                    return false;
                }
                if ch.told.due_at().is_some_and(|at| at > now) {
                    return true;
                }
                self.tell_count(&spec.id, name, ch, remote_counts.total(name), now, &mut hooks);
                false
            });
            self.metrics.counts_due.set(counts_due.len() as f64);
        }
        self.webhook_all(hooks);
    }

    /// Another node now has `count` subscribers on `name`.
    pub fn remote_count(&self, name: &str, count: usize, node: &str) {
        let spec = self.spec();
        let mut hooks = Vec::new();
        let mut guard = self.channels.lock();
        if guard.remote_counts.set(name, node, count, MAX_IDLE_CHANNELS) && spec.subscription_count {
            self.count_changed(&spec, name, &mut guard, Instant::now(), false, &mut hooks);
        }
        drop(guard);
        self.webhook_all(hooks);
    }

    /// This node's subscriber count of each counted channel it has subscribers on, for a node
    /// that joins late.
    pub fn local_counts(&self) -> Vec<(String, usize)> {
        if !self.spec().subscription_count {
            return Vec::new();
        }
        let guard = self.channels.lock();
        guard
            .map
            .iter()
            .filter(|(_, ch)| !ch.subscribers.is_empty() && subscription_count::counted(&ch.ty))
            .map(|(name, ch)| (name.clone(), ch.subscribers.len()))
            .collect()
    }

    /// Publishes one event: serializes it once with a fresh serial, records it in the
    /// channel's history (and cache), and queues it to every subscriber except `exclude`.
    /// Returns the number of recipients.
    pub fn publish(&self, name: &str, event: &str, data: &str, exclude: Option<u64>, user_id: Option<&str>) -> usize {
        self.fan_out(name, event, data, exclude, user_id, None)
    }

    /// [`publish`](Self::publish) of an event the cluster numbered `serial` (the same on every
    /// node); later local serials stay above it.
    pub fn deliver(&self, name: &str, event: &str, data: &str, exclude: Option<u64>, user_id: Option<&str>, serial: u64) -> usize {
        self.fan_out(name, event, data, exclude, user_id, Some(serial))
    }

    /// A client event from `conn`: to this node's subscribers, or through the cluster to every
    /// node's.
    pub fn publish_client_event(&self, conn: &Conn, name: &str, event: &str, data: &str, user_id: Option<&str>) {
        match &self.cluster {
            Some(cluster) => cluster.publish_client_event(&self.spec().id, name, event, data, user_id, &conn.socket_id),
            None => {
                self.publish(name, event, data, Some(conn.id), user_id);
            }
        }
    }

    fn fan_out(&self, name: &str, event: &str, data: &str, exclude: Option<u64>, user_id: Option<&str>, serial: Option<u64>) -> usize {
        let spec = self.spec();
        let now = Instant::now();
        let mut guard = self.channels.lock();
        let Channels { map, bytes, .. } = &mut *guard;
        if !map.contains_key(name) {
            let Ok(ty) = ChannelType::parse(name) else { return 0 };
            if (spec.history_len == 0 && !ty.cache) || map.len() >= MAX_IDLE_CHANNELS {
                self.talkers.event(&spec.id, name, 0);
                self.metrics.publishes.increment(1);
                return 0;
            }
            let floor = self.serials.load(Ordering::SeqCst);
            map.insert(name.to_string(), Channel::new(ty, floor, now));
        }
        let Some(ch) = map.get_mut(name) else { return 0 };
        let serial = match serial {
            Some(s) => {
                self.serials.fetch_max(s, Ordering::SeqCst);
                s
            }
            None => self.serials.fetch_add(1, Ordering::SeqCst) + 1,
        };
        let frame = protocol::channel_event(event, name, data, user_id, Some(serial));
        let held = ch.held_bytes();
        let len = frame.as_str().len();
        let over_budget = *bytes + len * (1 + usize::from(ch.ty.cache)) > MAX_HISTORY_BYTES;
        if over_budget {
            ch.history.skip(serial);
        } else {
            ch.history.push(serial, now, frame.clone(), spec.history_len);
        }
        if ch.ty.cache {
            ch.cache = (!over_budget).then(|| (now, frame.clone()));
        }
        *bytes = (*bytes + ch.held_bytes()).saturating_sub(held);
        self.metrics.history_bytes.set(*bytes as f64);
        ch.last_active = now;
        let mut sent = 0usize;
        for (id, sub) in &ch.subscribers {
            if Some(*id) != exclude && sub.conn.send(&frame) {
                sent += 1;
            }
        }
        drop(guard);
        self.delivered.fetch_add(sent as u64, Ordering::Relaxed);
        self.talkers.event(&spec.id, name, sent);
        self.metrics.publishes.increment(1);
        self.metrics.messages_out.increment(sent as u64);
        self.metrics.bytes_out.increment((sent * frame.as_str().len()) as u64);
        sent
    }

    /// A presence change another node announced: `info` when `user_id` joined `name` there,
    /// `None` when they left. This node's subscribers hear of a user's first arrival in the
    /// cluster and of their last departure, as they would on one node.
    pub fn remote_member(&self, name: &str, user_id: &str, info: Option<Value>, node: &str) {
        let max = self.spec().max_presence_members;
        let mut guard = self.channels.lock();
        let map = &mut guard.map;
        if info.is_some() && !map.contains_key(name) {
            let Ok(ty) = ChannelType::parse(name) else { return };
            if ty.kind != ChannelKind::Presence || map.len() >= MAX_IDLE_CHANNELS {
                return;
            }
            map.insert(name.to_string(), Channel::new(ty, self.serials.load(Ordering::SeqCst), Instant::now()));
        }
        let Some(ch) = map.get_mut(name) else { return };
        let changed = match &info {
            // The same bound as a local subscription: a channel's member list stays bounded.
            Some(_) if !ch.presence.contains(user_id) && ch.presence.len() >= max => false,
            Some(i) => ch.presence.add_remote(user_id, i.clone(), node),
            None => ch.presence.remove_remote(user_id, node),
        };
        if changed {
            let frame = member_frame(name, user_id, info.as_ref());
            for sub in ch.subscribers.values() {
                sub.conn.send(&frame);
            }
        }
    }

    /// Forgets the members of `node`, announcing the users it took away; `webhooks`: also send
    /// their `member_removed` webhooks (the node is gone and cannot).
    pub fn forget_node(&self, node: &str, webhooks: bool) {
        let mut hooks = Vec::new();
        {
            let users = &mut *self.users.lock();
            let watchlist_events = self.spec().watchlist_events;
            for user in users.forget_node(node) {
                if watchlist_events {
                    users.tell_watchers(&user, false);
                }
            }
        }
        {
            let spec = self.spec();
            let mut guard = self.channels.lock();
            let now = Instant::now();
            for name in guard.remote_counts.forget_node(node) {
                if spec.subscription_count {
                    // Remote changes make no webhook here: dropped.
                    self.count_changed(&spec, &name, &mut guard, now, false, &mut Vec::new());
                }
            }
            for (name, ch) in guard.map.iter_mut() {
                for user in ch.presence.forget_node(node) {
                    let frame = member_frame(name, &user, None);
                    for sub in ch.subscribers.values() {
                        sub.conn.send(&frame);
                    }
                    if webhooks {
                        hooks.push(json!({ "name": "member_removed", "channel": name, "user_id": user }));
                    }
                }
            }
        }
        self.webhook_all(hooks);
    }

    /// This node's presence members as (channel, user id, info), for a node that joins late.
    pub fn local_members(&self) -> Vec<(String, String, Value)> {
        let guard = self.channels.lock();
        guard
            .map
            .iter()
            .flat_map(|(name, ch)| ch.presence.local().map(move |(u, i)| (name.clone(), u.clone(), i.clone())))
            .collect()
    }

    /// Takes `n` publishes from the app's rate budget; `Err(seconds)` to wait when over it.
    pub fn take_publish_budget(&self, n: u32) -> Result<(), u64> {
        self.publish_bucket.lock().take(n, Instant::now())
    }

    /// This node's occupied channels that match `filter`.
    pub fn reports(&self, filter: &ChannelFilter) -> Vec<ChannelReport> {
        let channels = self.channels.lock();
        let report = |(name, ch): (&String, &Channel)| ch.report(name);
        match filter {
            ChannelFilter::Prefix(prefix) => channels
                .map
                .iter()
                .filter(|(name, ch)| !ch.subscribers.is_empty() && name.starts_with(prefix.as_str()))
                .map(report)
                .collect(),
            ChannelFilter::Name(name) => channels
                .map
                .get_key_value(name)
                .filter(|(_, ch)| !ch.subscribers.is_empty())
                .map(report)
                .into_iter()
                .collect(),
        }
    }

    /// Live numbers for the admin API: connections, occupied channels, subscriptions, history bytes.
    pub fn stats(&self) -> Value {
        let guard = self.channels.lock();
        let occupied = guard.map.values().filter(|c| !c.subscribers.is_empty()).count();
        let subscriptions: usize = guard.map.values().map(|c| c.subscribers.len()).sum();
        json!({
            "connections": self.connection_count(),
            "occupied_channels": occupied,
            "subscriptions": subscriptions,
            "history_bytes": guard.bytes,
        })
    }

    /// Expires history and cache entries and forgets channels with nothing left to serve.
    pub fn sweep(&self) {
        let spec = self.spec();
        let now = Instant::now();
        let ttl = Duration::from_secs(spec.history_ttl_s);
        let mut guard = self.channels.lock();
        let Channels { map, bytes, .. } = &mut *guard;
        map.retain(|_, ch| {
            let held = ch.held_bytes();
            ch.history.expire(now, ttl);
            if ch.cache.as_ref().is_some_and(|(at, _)| now.saturating_duration_since(*at) >= CACHE_TTL) {
                ch.cache = None;
            }
            *bytes = bytes.saturating_sub(held - ch.held_bytes());
            // An empty channel is kept for one history TTL after its last activity, so a client
            // that saw its current serial can still resume from it.
            !ch.subscribers.is_empty()
                || !ch.presence.is_empty()
                || !ch.history.is_empty()
                || ch.cache.is_some()
                || now.saturating_duration_since(ch.last_active) < ttl
        });
        self.metrics.history_bytes.set(*bytes as f64);
    }

    /// Queues webhook events (never blocks; drops are counted by the queue).
    pub fn webhook_all(&self, events: Vec<Value>) {
        if events.is_empty() {
            return;
        }
        let targets = self.webhooks.read();
        for e in events {
            targets.enqueue(e);
        }
    }

    pub fn webhook(&self, event: Value) {
        self.webhooks.read().enqueue(event);
    }
}

impl Channel {
    fn new(ty: ChannelType, floor: u64, now: Instant) -> Self {
        Self {
            ty,
            subscribers: Subscribers::default(),
            presence: Presence::default(),
            history: History::new(floor),
            cache: None,
            last_active: now,
            told: Told::default(),
        }
    }

    /// Bytes held by this channel's history and cache frame.
    fn held_bytes(&self) -> usize {
        self.history.bytes() + self.cache.as_ref().map_or(0, |(_, f)| f.as_str().len())
    }

    fn report(&self, name: &str) -> ChannelReport {
        ChannelReport {
            name: name.to_string(),
            subscriptions: self.subscribers.len(),
            users: (self.ty.kind == ChannelKind::Presence).then(|| self.presence.ids().cloned().collect()),
        }
    }
}

/// `pusher_internal:member_added` (with `info`) or `member_removed` (without).
fn member_frame(name: &str, user_id: &str, info: Option<&Value>) -> Utf8Bytes {
    match info {
        Some(info) => protocol::json_string_event("pusher_internal:member_added", Some(name), &json!({ "user_id": user_id, "user_info": info })),
        None => protocol::json_string_event("pusher_internal:member_removed", Some(name), &json!({ "user_id": user_id })),
    }
}

/// A token bucket: `rate` per second, burst of one second's worth; rate 0 means unlimited.
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: u32) -> Self {
        Self { rate: rate as f64, tokens: rate as f64, last: Instant::now() }
    }

    pub fn take(&mut self, n: u32, now: Instant) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        let need = n as f64;
        if self.tokens >= need {
            self.tokens -= need;
            Ok(())
        } else {
            Err(((need - self.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn history_memory_is_bounded_per_app() {
        let hooks = webhook::Deliverer::new(tokio_util::sync::CancellationToken::new());
        let spec = AppSpec::new("1".into(), "k".into(), "secret-secret".into());
        let t = Tenant::new(spec, false, Arc::new(AtomicU64::new(0)), &hooks, None, Arc::default());
        let data = "x".repeat(10_000);
        // 80 channels × 100 events × 10 KB = 80 MB of history wanted; the budget is 64 MB.
        for i in 0..8_000 {
            t.publish(&format!("c{}", i % 80), "e", &data, None, None);
        }
        let guard = t.channels.lock();
        let sum: usize = guard.map.values().map(Channel::held_bytes).sum();
        assert_eq!(sum, guard.bytes);
        assert!(guard.bytes <= MAX_HISTORY_BYTES && guard.bytes > MAX_HISTORY_BYTES / 2, "{}", guard.bytes);
    }
}
