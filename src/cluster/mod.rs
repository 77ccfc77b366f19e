//! Several weir nodes through one Redis (`cluster.redis_url`): the bus between them.
//!
//! Every event published on any node (HTTP API or client event) goes to one Redis pub/sub
//! channel, and every node, the publisher's included, fans it out to its own subscribers. A Lua
//! script numbers and publishes an event in one step, so every node sees the same events in the
//! same order under the same serials: history and resume work on whichever node a client
//! reconnects to. Channel queries ask every live node (each writes a heartbeat into a sorted
//! set) and merge the answers; terminating a user's connections reaches every node.
//!
//! Presence members are announced to every node as they join and leave one; a node that
//! (re)joins the bus asks the others to announce theirs again, and the members of a node whose
//! heartbeat stops are dropped (their `member_removed` sent) within a few seconds.
//!
//! What stays per node: the channel webhooks `channel_occupied` and `channel_vacated`, publish
//! rate limits and weir's internal app.
//!
//! `wire` holds the messages' format, `queries` the channel queries awaiting answers, `lease`
//! the admission lease the waiting rooms' leader holds (`room::sync`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::realtime::tenant::{ChannelFilter, ChannelReport};
use crate::realtime::Realtime;
use wire::{decode, encode, Message, PUBLISH_SCRIPT};

mod lease;
mod queries;
mod wire;

/// Longest wait for any one Redis call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a node renews its heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose heartbeat is older than this is gone: not waited for, its presence members
/// dropped. A second longer than the lease, so that a leader that died has been replaced by then
/// and the new one sends the webhooks of the members the dead one took away.
const NODE_TTL_MS: i64 = lease::LEASE_MS + 1_000;
/// Client events waiting for their publish; more are dropped (and counted).
const OUTBOX_CAPACITY: usize = 4_096;
/// The longest wait before a lost subscription is tried again.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("node {0} did not answer the channel query in time")]
    NoAnswer(String),
    #[error("too many channel queries in flight")]
    Busy,
}

struct Metrics {
    published: metrics::Counter,
    received: metrics::Counter,
    dropped: metrics::Counter,
    outbox_depth: metrics::Gauge,
    connected: metrics::Gauge,
    reconnects: metrics::Counter,
}

/// What the bus hands the waiting rooms (`room::sync`).
pub enum RoomEvent<'a> {
    /// A message from another node.
    Message(&'a str),
    /// This node (re)joined the bus: whatever was sent meanwhile is lost.
    Rejoined,
}

/// Receives the waiting rooms' events.
pub type RoomHandler = Box<dyn Fn(RoomEvent<'_>) + Send + Sync>;

/// A message waiting in the outbox: an event to number, or a message published as it is.
enum Outgoing {
    Event(String),
    Plain(String),
}

pub struct Cluster {
    node: String,
    prefix: String,
    bus: String,
    nodes_key: String,
    serial_key: String,
    client: redis::Client,
    commands: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    script: redis::Script,
    outbox: mpsc::Sender<Outgoing>,
    outbox_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Nodes whose presence members this node holds: forgotten when their heartbeat stops.
    known_nodes: Mutex<HashSet<String>>,
    /// The waiting rooms' admission lease, as far as this node holds it.
    lease: lease::Lease,
    room_handler: Mutex<Option<RoomHandler>>,
    queries: queries::Queries,
    subscribed: AtomicBool,
    metrics: Metrics,
}

impl Cluster {
    /// A node's handle on the bus; nothing connects until [`start`](Self::start).
    pub fn new(redis_url: &str, prefix: &str) -> Result<Arc<Self>, ClusterError> {
        let client = crate::outbound::redis_client(redis_url)?;
        let node = hex::encode(rand::random::<[u8; 8]>());
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX_CAPACITY);
        let counter = |reason: &'static str| metrics::counter!("weir_cluster_messages_total", "kind" => reason);
        Ok(Arc::new(Self {
            bus: format!("{prefix}:rt"),
            nodes_key: format!("{prefix}:nodes"),
            serial_key: format!("{prefix}:serial"),
            prefix: prefix.into(),
            node,
            client,
            commands: tokio::sync::Mutex::new(None),
            script: redis::Script::new(PUBLISH_SCRIPT),
            outbox,
            outbox_rx: Mutex::new(Some(outbox_rx)),
            known_nodes: Mutex::new(HashSet::new()),
            lease: lease::Lease::new(prefix),
            room_handler: Mutex::new(None),
            queries: queries::Queries::new(),
            subscribed: AtomicBool::new(false),
            metrics: Metrics {
                published: counter("published"),
                received: counter("received"),
                dropped: metrics::counter!("weir_cluster_dropped_total"),
                outbox_depth: metrics::gauge!("weir_cluster_outbox_depth"),
                connected: metrics::gauge!("weir_cluster_connected"),
                reconnects: metrics::counter!("weir_cluster_reconnects_total"),
            },
        }))
    }

    /// This node's id on the bus.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether this node currently receives the bus: while it does not, events published
    /// elsewhere do not reach its clients (`/readyz` says so).
    pub fn is_connected(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Whether this node drives the waiting rooms' admission now (holds the lease).
    pub fn is_leader(&self) -> bool {
        self.lease.is_held()
    }

    /// What this node's admission writes are fenced with: they land only while it holds the
    /// lease in Redis, whatever its own clock believes.
    pub fn admission_fence(&self) -> crate::store::Fence<'_> {
        crate::store::Fence { key: self.lease.key(), holder: &self.node }
    }

    /// How many times this node has taken the lease (a new term starts from the store).
    pub fn term(&self) -> u64 {
        self.lease.term()
    }

    /// Where waiting-room messages from other nodes go.
    pub fn on_room_message(&self, handler: RoomHandler) {
        *self.room_handler.lock() = Some(handler);
    }

    /// Has the other nodes reload app `id` from the store (created, changed or deleted here).
    pub fn app_changed(&self, id: &str) {
        let message = Message::App { node: self.node.clone(), id: id.into() };
        self.enqueue(Outgoing::Plain(format!("0 {}", encode(&message))));
    }

    /// Sends a waiting-room message to every other node, in order with this node's others.
    pub fn send_room_message(&self, body: String) {
        let message = Message::Room { node: self.node.clone(), body };
        self.enqueue(Outgoing::Plain(format!("0 {}", encode(&message))));
    }

    /// Starts the subscriber, the client-event publisher and the heartbeat; they stop when
    /// `shutdown` is cancelled (the heartbeat is then withdrawn).
    pub fn start(self: &Arc<Self>, realtime: Weak<Realtime>, shutdown: CancellationToken) {
        tokio::spawn(self.clone().subscribe_loop(realtime.clone(), shutdown.clone()));
        if let Some(rx) = self.outbox_rx.lock().take() {
            tokio::spawn(self.clone().publish_loop(rx, shutdown.clone()));
        }
        tokio::spawn(self.clone().heartbeat_loop(realtime, shutdown));
    }

    /// Publishes an event to `channels` on every node and returns once Redis has taken it.
    pub async fn publish_event(
        &self,
        app: &str,
        channels: &[String],
        event: &str,
        data: &str,
        except: Option<&str>,
    ) -> Result<(), ClusterError> {
        let message = Message::Event {
            app: app.into(),
            channels: channels.to_vec(),
            event: event.into(),
            data: data.into(),
            user_id: None,
            except: except.map(Into::into),
        };
        self.run_script(&encode(&message), channels.len()).await
    }

    /// Queues a client event for every node without waiting (the sender's connection must not
    /// block on Redis); when the queue is full the event is dropped and counted.
    pub fn publish_client_event(&self, app: &str, channel: &str, event: &str, data: &str, user_id: Option<&str>, except: &str) {
        let message = Message::Event {
            app: app.into(),
            channels: vec![channel.into()],
            event: event.into(),
            data: data.into(),
            user_id: user_id.map(Into::into),
            except: Some(except.into()),
        };
        self.enqueue(Outgoing::Event(encode(&message)));
    }

    /// Announces that `user_id` joined (`info`) or left (`None`) a presence channel here.
    pub fn member_changed(&self, app: &str, channel: &str, user_id: &str, info: Option<&serde_json::Value>) {
        let message = Message::Member {
            node: self.node.clone(),
            app: app.into(),
            channel: channel.into(),
            user_id: user_id.into(),
            info: info.cloned(),
        };
        self.enqueue(Outgoing::Plain(format!("0 {}", encode(&message))));
    }

    /// Announces that `user_id` signed in here (`online`) or that their last connection here ended.
    pub fn user_online(&self, app: &str, user_id: &str, online: bool) {
        let message = Message::Online { node: self.node.clone(), app: app.into(), user_id: user_id.into(), online };
        self.enqueue(Outgoing::Plain(format!("0 {}", encode(&message))));
    }

    /// Announces how many of this node's connections are subscribed to `channel`.
    pub fn count_changed(&self, app: &str, channel: &str, count: usize) {
        let message = Message::Count { node: self.node.clone(), app: app.into(), channel: channel.into(), count };
        self.enqueue(Outgoing::Plain(format!("0 {}", encode(&message))));
    }

    /// Queues a message without waiting; when the queue is full it is dropped and counted.
    fn enqueue(&self, message: Outgoing) {
        match self.outbox.try_send(message) {
            Ok(()) => self.metrics.outbox_depth.increment(1.0),
            Err(_) => {
                self.metrics.dropped.increment(1);
                tracing::warn!("cluster outbox full: a client event or presence change was dropped");
            }
        }
    }

    /// Closes a signed-in user's connections on every node.
    pub async fn terminate_user(&self, app: &str, user_id: &str) -> Result<(), ClusterError> {
        let message = Message::Terminate { app: app.into(), user_id: user_id.into() };
        self.publish_raw(&self.bus, format!("0 {}", encode(&message))).await
    }

    /// The channels matching `filter` on every live node: `local` is this node's own answer.
    /// Fails when a node that was alive did not answer within a second.
    pub async fn query(&self, app: &str, filter: ChannelFilter, local: Vec<ChannelReport>) -> Result<Vec<ChannelReport>, ClusterError> {
        let mut others = self.live_nodes().await?;
        others.remove(&self.node);
        if others.is_empty() {
            return Ok(local);
        }
        let asked = self.queries.ask(others, local)?;
        let message = Message::Query { from: self.node.clone(), id: asked.id, app: app.into(), filter };
        if let Err(e) = self.publish_raw(&self.bus, format!("0 {}", encode(&message))).await {
            self.queries.cancel(asked.id);
            return Err(e);
        }
        self.queries.answers(asked).await
    }

    /// Nodes whose heartbeat is recent, this one included.
    async fn live_nodes(&self) -> Result<HashSet<String>, ClusterError> {
        let since = now_ms() - NODE_TTL_MS;
        let cmd = redis::cmd("ZRANGEBYSCORE").arg(&self.nodes_key).arg(since).arg("+inf").to_owned();
        let nodes: Vec<String> = self.retried(|mut c| { let cmd = &cmd; async move { cmd.query_async(&mut c).await } }).await?;
        Ok(nodes.into_iter().collect())
    }

    async fn run_script(&self, message: &str, n: usize) -> Result<(), ClusterError> {
        let floor = now_ms().max(0).saturating_mul(1000);
        let mut invocation = self.script.key(&self.serial_key);
        invocation.key(&self.bus).arg(message).arg(floor).arg(n);
        let invocation = &invocation;
        let _: String = self.retried(|mut c| async move { invocation.invoke_async(&mut c).await }).await?;
        self.metrics.published.increment(1);
        Ok(())
    }

    async fn publish_raw(&self, channel: &str, payload: String) -> Result<(), ClusterError> {
        let cmd = redis::cmd("PUBLISH").arg(channel).arg(payload).to_owned();
        let _: i64 = self.retried(|mut c| { let cmd = &cmd; async move { cmd.query_async(&mut c).await } }).await?;
        self.metrics.published.increment(1);
        Ok(())
    }

    /// [`timed`](Self::timed) on the command connection, tried once more on a fresh connection
    /// when the first found its connection dropped (Redis restarted since the last call): such a
    /// call never reached Redis, so trying it again cannot do anything twice.
    async fn retried<T, F, Fut>(&self, call: F) -> Result<T, ClusterError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match self.timed(call(self.commands().await?)).await {
            Err(ClusterError::Redis(e)) if e.is_connection_dropped() => self.timed(call(self.commands().await?)).await,
            other => other,
        }
    }

    /// The shared command connection, opened on first use and after a failure.
    async fn commands(&self) -> Result<MultiplexedConnection, ClusterError> {
        let mut slot = self.commands.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        // Every call has this module's timeout (`timed`); redis-rs's own, shorter one is off.
        let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(CALL_TIMEOUT)).set_response_timeout(None);
        let c = tokio::time::timeout(CALL_TIMEOUT, self.client.get_multiplexed_async_connection_with_config(&config))
            .await
            .map_err(|_| ClusterError::Timeout(CALL_TIMEOUT))??;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs one call with the call timeout; a failure drops the command connection, so the
    /// next call opens a fresh one.
    async fn timed<T>(&self, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, ClusterError> {
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => ClusterError::Redis(e),
            Err(_) => ClusterError::Timeout(CALL_TIMEOUT),
        };
        *self.commands.lock().await = None;
        Err(result)
    }

    async fn subscribe_loop(self: Arc<Self>, realtime: Weak<Realtime>, shutdown: CancellationToken) {
        let mut wait = Duration::from_millis(50);
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(&[self.bus.clone(), self.replies_of(&self.node)]).await {
                    Ok(()) => {
                        wait = Duration::from_millis(50);
                        self.set_subscribed(true);
                        // What other nodes' members did while this node was away is unknown:
                        // start over from their announcements.
                        if let Some(rt) = realtime.upgrade() {
                            self.forget_nodes(&rt, self.known_nodes.lock().drain().collect(), false);
                        }
                        self.enqueue(Outgoing::Plain(format!("0 {}", encode(&Message::Sync { node: self.node.clone() }))));
                        if let Some(handler) = &*self.room_handler.lock() {
                            handler(RoomEvent::Rejoined);
                        }
                        let mut messages = pubsub.into_on_message();
                        loop {
                            let message = tokio::select! {
                                m = messages.next() => m,
                                () = shutdown.cancelled() => {
                                    self.set_subscribed(false);
                                    return;
                                }
                            };
                            let Some(message) = message else { break };
                            let Some(rt) = realtime.upgrade() else { return };
                            self.metrics.received.increment(1);
                            self.receive(&rt, message.get_payload_bytes());
                        }
                        self.set_subscribed(false);
                        tracing::warn!("cluster: lost the Redis subscription; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "cluster: cannot subscribe"),
                },
                Err(e) => tracing::warn!(error = %e, "cluster: cannot reach Redis"),
            }
            self.metrics.reconnects.increment(1);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            wait = (wait * 2).min(MAX_RECONNECT_WAIT);
        }
    }

    fn set_subscribed(&self, on: bool) {
        self.subscribed.store(on, Ordering::Release);
        self.metrics.connected.set(if on { 1.0 } else { 0.0 });
    }

    /// Handles one message from the bus.
    fn receive(self: &Arc<Self>, rt: &Arc<Realtime>, payload: &[u8]) {
        let Some((serial, message)) = decode(payload) else {
            tracing::warn!("cluster: unreadable message on the bus; ignored");
            return;
        };
        match message {
            Message::Event { app, channels, event, data, user_id, except } => {
                let Some(tenant) = rt.tenant_by_id(&app) else { return };
                let except = except.as_deref().and_then(|s| tenant.conn_id_of(s));
                for (i, channel) in channels.iter().enumerate() {
                    tenant.deliver(channel, &event, &data, except, user_id.as_deref(), serial + i as u64);
                }
            }
            Message::Member { node, app, channel, user_id, info } => {
                if let Some(tenant) = self.tenant_of_other(rt, &node, &app) {
                    tenant.remote_member(&channel, &user_id, info, &node);
                }
            }
            Message::Online { node, app, user_id, online } => {
                if let Some(tenant) = self.tenant_of_other(rt, &node, &app) {
                    tenant.remote_user(&user_id, online, &node);
                }
            }
            Message::Count { node, app, channel, count } => {
                if let Some(tenant) = self.tenant_of_other(rt, &node, &app) {
                    tenant.remote_count(&channel, count, &node);
                }
            }
            Message::Sync { node } => {
                if node != self.node {
                    self.announce_members(rt);
                }
            }
            Message::App { node, id } => {
                if node != self.node {
                    let rt = rt.clone();
                    tokio::spawn(async move {
                        if let Err(e) = rt.reload_app(&id).await {
                            tracing::warn!(app = %id, error = %e, "cluster: an app changed elsewhere was not reloaded");
                        }
                    });
                }
            }
            Message::Room { node, body } => {
                if node != self.node {
                    if let Some(handler) = &*self.room_handler.lock() {
                        handler(RoomEvent::Message(&body));
                    }
                }
            }
            Message::Terminate { app, user_id } => {
                if let Some(tenant) = rt.tenant_by_id(&app) {
                    tenant.terminate_user(&user_id);
                }
            }
            Message::Query { from, id, app, filter } => {
                if from == self.node {
                    return;
                }
                let channels = rt.tenant_by_id(&app).map(|t| t.reports(&filter)).unwrap_or_default();
                let reply = format!("0 {}", encode(&Message::Reply { node: self.node.clone(), id, channels }));
                let this = self.clone();
                tokio::spawn(async move {
                    let to = this.replies_of(&from);
                    if let Err(e) = this.publish_raw(&to, reply).await {
                        tracing::warn!(error = %e, "cluster: cannot answer a channel query");
                    }
                });
            }
            Message::Reply { node, id, channels } => self.queries.answer(id, &node, channels),
        }
    }

    /// App `app` of this node, for a message about another `node`'s connections (which is then
    /// known to be alive); `None` for this node's own messages.
    fn tenant_of_other(&self, rt: &Realtime, node: &str, app: &str) -> Option<Arc<crate::realtime::tenant::Tenant>> {
        if node == self.node {
            return None;
        }
        self.known_nodes.lock().insert(node.to_string());
        rt.tenant_by_id(app)
    }

    /// Announces every presence member, signed-in user and subscription count of this node
    /// again (a node asked, having just joined).
    fn announce_members(&self, rt: &Realtime) {
        for tenant in rt.all_tenants().into_iter().filter(|t| !t.internal) {
            let app = tenant.spec().id.clone();
            for (channel, user, info) in tenant.local_members() {
                self.member_changed(&app, &channel, &user, Some(&info));
            }
            for user in tenant.local_users() {
                self.user_online(&app, &user, true);
            }
            for (channel, count) in tenant.local_counts() {
                self.count_changed(&app, &channel, count);
            }
        }
    }

    /// Forgets the presence members of `nodes`. `gone`: their heartbeat stopped, so they cannot
    /// send the `member_removed` webhooks; the leader (one node, so each goes once) does.
    fn forget_nodes(&self, rt: &Realtime, nodes: Vec<String>, gone: bool) {
        let webhooks = gone && self.is_leader();
        for node in nodes {
            for tenant in rt.all_tenants() {
                tenant.forget_node(&node, webhooks);
            }
        }
    }

    fn replies_of(&self, node: &str) -> String {
        format!("{}:rt:{node}", self.prefix)
    }

    /// Publishes queued client events in order, one at a time.
    async fn publish_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
        loop {
            let message = tokio::select! {
                m = rx.recv() => m,
                () = shutdown.cancelled() => return,
            };
            let Some(message) = message else { return };
            self.metrics.outbox_depth.decrement(1.0);
            let sent = match message {
                Outgoing::Event(m) => self.run_script(&m, 1).await,
                Outgoing::Plain(m) => self.publish_raw(&self.bus, m).await,
            };
            if let Err(e) = sent {
                self.metrics.dropped.increment(1);
                tracing::warn!(error = %e, "cluster: a client event or presence change was not published");
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, realtime: Weak<Realtime>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let now = now_ms();
            let beat = async {
                let mut c = self.commands().await?;
                let mut pipe = redis::pipe();
                pipe.cmd("ZADD").arg(&self.nodes_key).arg(now).arg(&self.node).ignore();
                pipe.cmd("ZREMRANGEBYSCORE").arg(&self.nodes_key).arg("-inf").arg(now - 60_000).ignore();
                self.timed(pipe.query_async::<()>(&mut c)).await?;
                self.timed(self.lease.renew(&mut c, &self.node)).await
            };
            match beat.await {
                Ok(held) => self.lease.renewed(held, now, &self.node),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: heartbeat failed");
                    continue;
                }
            }
            // Members of nodes that stopped beating (crashed, or cut off from Redis) leave.
            let Ok(live) = self.live_nodes().await else { continue };
            let dead: Vec<String> = {
                let mut known = self.known_nodes.lock();
                let dead = known.iter().filter(|n| !live.contains(*n)).cloned().collect();
                known.retain(|n| live.contains(n));
                dead
            };
            if let Some(rt) = realtime.upgrade() {
                self.forget_nodes(&rt, dead, true);
            }
        }
        // Leaving: the others stop waiting for this node's answers at once, and the next leader
        // need not wait for the lease to lapse.
        self.lease.give_up();
        if let Ok(mut c) = self.commands().await {
            let _ = self.timed(redis::cmd("ZREM").arg(&self.nodes_key).arg(&self.node).query_async::<i64>(&mut c)).await;
            let _ = self.timed(self.lease.release(&mut c, &self.node)).await;
        }
    }

}

fn now_ms() -> i64 {
    crate::clock::Clock::now_ms(&crate::clock::SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::redis_server::Redis;

    #[tokio::test]
    async fn the_first_publish_after_a_redis_restart_succeeds() {
        let redis = Redis::start();
        let cluster = Cluster::new(&redis.url(), "test").unwrap();
        cluster.publish_event("1", &["c".into()], "e", "{}", None).await.unwrap();
        let port = redis.stop();
        let _redis = Redis::start_on(port);
        // The command connection died with the old process: the publish finds it dropped and
        // goes out on a fresh one instead of answering 503.
        cluster.publish_event("1", &["c".into()], "e", "{}", None).await.unwrap();
    }
}
