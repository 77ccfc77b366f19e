//! The admission loop: every [`TICK`] each room's engine plans a step (who goes in, who is
//! skipped); all steps are persisted in one durable store call, and only then committed in
//! memory and announced, so a status answer never reports an admission a crash could undo.
//!
//! Also here: the scheduled start (pre-queue shuffle persisted once, then `open`), the
//! periodic census of live waiters, and the adaptive-rate prober.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::model::RoomState;
use super::policy::adaptive::ProbeResult;
use super::policy::engine::{Inputs, Step};
use super::{Room, Rooms};
use crate::error::ApiError;
use crate::realtime::Realtime;
use crate::store::{order_key, AdmissionRecord, StoreError, Table};

/// 100 ms: ten small steps a second keep admission smooth. With no rooms at all the driver
/// parks instead.
pub const TICK: Duration = Duration::from_millis(100);
/// Ticks between censuses of the waiting line (2 s): the scan is O(waiting).
const CENSUS_EVERY: u64 = 20;
/// Waiting visitors a census scans per engine lock (~0.1 ms each).
const CENSUS_SLICE: u64 = 16 * 1024;
/// Counter broadcasts per room are coalesced to at most one per this many ticks (4 per second).
const PUBLISH_EVERY: u64 = 2;
/// Ticks between re-announcements of an unchanged counter (5 s), so a waiting page that
/// subscribed just after the last change (or missed it) catches up without polling.
const REPUBLISH_EVERY: u64 = 50;
/// Ticks between observations of the rooms for their webhooks (`notify`, 0.5 s).
const NOTIFY_EVERY: u64 = 5;

pub fn spawn(rooms: Arc<Rooms>, realtime: Arc<Realtime>, shutdown: CancellationToken) {
    let prober_rooms = rooms.clone();
    let prober_shutdown = shutdown.clone();
    let mut notifier = super::notify::Notifier::new(crate::realtime::webhook::Deliverer::new(shutdown.clone()));
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut n: u64 = 0;
        let mut announced = std::collections::HashMap::new();
        // The lease term the rooms were last reloaded for (cluster only).
        let mut term = 0;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if rooms.is_empty() {
                // Nothing to admit: park until a room is created, so an idle server
                // costs no CPU at all.
                tokio::select! {
                    _ = rooms.created.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
                interval.reset();
                last = Instant::now();
            }
            let now = Instant::now();
            let elapsed = now - last;
            last = now;
            if n % CENSUS_EVERY == 0 {
                census(&rooms, &realtime);
            }
            // Counters are announced below, not by `tick`: a change made on a tick between two
            // announcements must still go out (trailing edge), not wait for the next change.
            let stepped = match &rooms.sync {
                None => tick(&rooms, &realtime, elapsed).await,
                Some(sync) => cluster_tick(&rooms, &realtime, sync, &mut term, elapsed, n).await,
            };
            if let Err(e) = stepped {
                tracing::warn!(error = %e, "admission tick failed; will retry");
            }
            if n % PUBLISH_EVERY == 0 {
                announce(&rooms, &realtime, &mut announced, n % REPUBLISH_EVERY == 0);
            }
            if n % NOTIFY_EVERY == 0 {
                notify(&rooms, &mut notifier);
            }
            n += 1;
        }
    });
    tokio::spawn(prober(prober_rooms, prober_shutdown));
}

/// Observes every room with webhooks, on the node that admits (so each event is sent once).
fn notify(rooms: &Rooms, notifier: &mut super::notify::Notifier) {
    if rooms.sync.as_ref().is_some_and(|s| !s.leading()) {
        notifier.clear();
        return;
    }
    let now_ms = rooms.clock.now_ms();
    let mut watched = std::collections::HashSet::new();
    for room in rooms.all() {
        let spec = room.spec();
        if spec.webhooks.is_empty() {
            continue;
        }
        let queue_length = room.engine.lock().queue_length();
        notifier.observe(&room.id, &spec.webhooks, spec.state_at(now_ms), queue_length, room.rate_under(&spec), now_ms);
        watched.insert(room.id.clone());
    }
    notifier.retain(|id| watched.contains(id));
}

fn inputs(room: &Room, now_ms: i64, elapsed: Duration) -> Inputs {
    let spec = room.spec();
    Inputs {
        now_ms,
        elapsed,
        rate_per_minute: room.effective_rate(),
        admitting: room.effective_state(now_ms) == RoomState::Open,
        max_active_users: spec.max_active_users,
        session_seconds: spec.session_seconds,
        abandon_after_seconds: spec.abandon_after_seconds,
    }
}

/// Ticks between a follower's checks of the serving counter in the store (5 s): it follows the
/// leader's steps as they come, this only repairs one it missed.
const FOLLOWER_CHECK_EVERY: u64 = 50;

/// A tick of a cluster node: the lease holder steps every room (reloading them from the store
/// when its term begins); every node sends what its visitors showed (`sync`).
async fn cluster_tick(rooms: &Rooms, realtime: &Realtime, sync: &super::sync::RoomSync, term: &mut u64, elapsed: Duration, n: u64) -> Result<(), ApiError> {
    if n % (super::sync::SEEN_EVERY.as_millis() / TICK.as_millis()).max(1) as u64 == 0 {
        sync.send_seen(rooms);
    }
    if !sync.leading() {
        if n % FOLLOWER_CHECK_EVERY == 0 {
            for room in rooms.all() {
                let counters = rooms.store.counters(&room.id).await?;
                let mut engine = room.engine.lock();
                engine.note_last_ticket(counters.last_ticket, rooms.clock.now_ms());
                engine.follow_serving(counters.serving);
            }
        }
        return Ok(());
    }
    if sync.term() != *term {
        super::sync::reload_engines(rooms).await?;
        *term = sync.term();
    }
    for room in rooms.all() {
        super::sync::refresh_last_ticket(rooms, &room).await?;
    }
    tick(rooms, realtime, elapsed).await
}

/// One admission step for every room (broadcasts are left to `announce`, which coalesces them).
pub async fn tick(rooms: &Rooms, realtime: &Realtime, elapsed: Duration) -> Result<(), ApiError> {
    let now_ms = rooms.clock.now_ms();
    let mut planned: Vec<(Arc<Room>, tokio::sync::OwnedMutexGuard<()>, Inputs, Step)> = Vec::new();
    for room in rooms.all() {
        start_if_due(rooms, realtime, &room, now_ms).await?;
        let guard = room.stepping.clone().lock_owned().await;
        let input = inputs(&room, now_ms, elapsed);
        let step = room.engine.lock().plan(&input);
        metrics::gauge!("weir_room_queue_length", "room" => room.id.clone()).set(room.engine.lock().queue_length() as f64);
        if step.is_empty() {
            if rooms.sync.is_some() {
                room.unsent_elapsed_ms.fetch_add(input.elapsed.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            room.engine.lock().commit(step, &input);
        } else {
            planned.push((room, guard, input, step));
        }
    }
    if planned.is_empty() {
        return Ok(());
    }
    let records: Vec<AdmissionRecord> = planned
        .iter()
        .map(|(room, _, input, step)| {
            let sessions = room.engine.lock().sessions_after(step, input);
            AdmissionRecord {
                room: room.id.clone(),
                serving: step.serving,
                skipped: step.skipped.clone(),
                unskipped: step.readmitted.clone(),
                sessions: Some(sessions),
            }
        })
        .collect();
    if let Err(e) = rooms.record_admissions(&records).await {
        if matches!(e, StoreError::Fenced) {
            // Not an outage: another node leads now, and this one learns it at its next renewal.
            tracing::info!("admission lease lost: this tick's steps were not written");
            return Ok(());
        }
        return Err(e.into());
    }
    let now_s = now_ms.div_euclid(1000);
    for (room, _guard, input, step) in planned {
        let admitted = step.admissions() as u64;
        let skipped = step.skipped.len() as u64;
        if let Some(sync) = &rooms.sync {
            sync.step_committed(&room, &step, &input);
        }
        room.engine.lock().commit(step, &input);
        if admitted > 0 {
            room.record_admitted(now_s, admitted);
            metrics::counter!("weir_room_admitted_total", "room" => room.id.clone()).increment(admitted);
        }
        if skipped > 0 {
            metrics::counter!("weir_room_skipped_total", "room" => room.id.clone()).increment(skipped);
        }
    }
    Ok(())
}

/// Opens a scheduled room once its start has passed: the pre-queue is shuffled and persisted
/// exactly once (a restart finds the stored order and does not reshuffle), then the state.
async fn start_if_due(rooms: &Rooms, realtime: &Realtime, room: &Room, now_ms: i64) -> Result<(), ApiError> {
    let spec = room.spec();
    if spec.state != RoomState::Scheduled || room.effective_state(now_ms) != RoomState::Open {
        return Ok(());
    }
    let _guard = room.stepping.lock().await;
    let needs_order = { !room.engine.lock().has_order() && room.serving() == 0 };
    if needs_order && rooms.store.get(Table::Meta, &order_key(&room.id)).await?.is_none() {
        let order = room.engine.lock().shuffled_prequeue();
        if !order.is_empty() {
            let bytes: Vec<u8> = order.iter().flat_map(|t| t.to_le_bytes()).collect();
            rooms.store.put(Table::Meta, &order_key(&room.id), bytes).await?;
            room.engine.lock().install_order(order);
        }
    }
    let mut opened = (*spec).clone();
    opened.state = RoomState::Open;
    rooms.update(room, opened).await?;
    publish_state(realtime, room);
    Ok(())
}

fn census(rooms: &Rooms, realtime: &Realtime) {
    let now_ms = rooms.clock.now_ms();
    for room in rooms.all() {
        let spec = room.spec();
        let ranks = {
            let mut engine = room.engine.lock();
            engine.refresh_sockets(now_ms, |s| realtime.internal_socket_connected(s));
            metrics::gauge!("weir_room_watched_sockets", "room" => room.id.clone()).set(engine.watched_sockets() as f64);
            engine.waiting_ranks()
        };
        // A slice per lock: with a million waiting, the whole scan would stall this room's
        // entries and polls for milliseconds. The line moves between slices; the census is an
        // estimate for the ETA either way.
        let live = spec.abandon_after_seconds.map(|after| {
            (ranks.start..ranks.end)
                .step_by(CENSUS_SLICE as usize)
                .map(|from| room.engine.lock().live_among(from..(from + CENSUS_SLICE).min(ranks.end), now_ms, after))
                .sum()
        });
        let c = room.engine.lock().census_with(live);
        *room.census.lock() = c;
        metrics::gauge!("weir_room_live_waiters", "room" => room.id.clone()).set(c.live as f64);
        metrics::gauge!("weir_room_abandoned", "room" => room.id.clone()).set(c.abandoned as f64);
        let active = room.engine.lock().active_users(now_ms, spec.session_seconds);
        metrics::gauge!("weir_room_active_users", "room" => room.id.clone()).set(active as f64);
        metrics::gauge!("weir_room_target_per_minute", "room" => room.id.clone()).set(room.effective_rate());
        let stats = room.stats(now_ms);
        metrics::gauge!("weir_room_measured_per_minute", "room" => room.id.clone()).set(stats.measured_per_minute.unwrap_or(0.0));
        metrics::gauge!("weir_room_admitted_last_minute", "room" => room.id.clone()).set(stats.admitted_last_minute as f64);
        if let Some(eta) = stats.eta_last_ticket_seconds {
            metrics::gauge!("weir_room_eta_last_ticket_seconds", "room" => room.id.clone()).set(eta as f64);
        }
    }
}

/// Probes each adaptive room's origin every `interval_seconds` and feeds the controller.
async fn prober(rooms: Arc<Rooms>, shutdown: CancellationToken) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(crate::outbound::connector(None));
    let mut next_due: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut interval = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        while in_flight.try_join_next().is_some() {}
        let now = Instant::now();
        for room in rooms.all() {
            let Some(policy) = room.spec().adaptive.clone() else { continue };
            let due = next_due.entry(room.id.clone()).or_insert(now);
            if *due > now {
                continue;
            }
            *due = now + Duration::from_secs(policy.interval_seconds);
            let client = client.clone();
            in_flight.spawn(async move {
                let result = probe(&client, &policy.probe_url, probe_timeout(&policy)).await;
                let rate = room.adaptive.lock().as_mut().map(|c| c.on_probe(result, &policy));
                if let Some(rate) = rate {
                    metrics::gauge!("weir_room_adaptive_rate", "room" => room.id.clone()).set(rate);
                }
                if let ProbeResult::Ok { latency_ms, .. } = result {
                    metrics::gauge!("weir_room_probe_latency_seconds", "room" => room.id.clone()).set(latency_ms / 1000.0);
                }
            });
        }
        next_due.retain(|id, _| rooms.get(id).is_some());
    }
}

/// Four times the target latency, at least a second, at most the probe interval.
fn probe_timeout(policy: &super::policy::Adaptive) -> Duration {
    let ms = (policy.target_latency_ms * 4).max(1000).min(policy.interval_seconds * 1000);
    Duration::from_millis(ms)
}

async fn probe(
    client: &hyper_util::client::legacy::Client<crate::outbound::Connector, http_body_util::Empty<bytes::Bytes>>,
    url: &str,
    timeout: Duration,
) -> ProbeResult {
    let Ok(uri) = url.parse::<hyper::Uri>() else { return ProbeResult::Failed };
    let started = Instant::now();
    let request = async {
        let response = client.get(uri).await.ok()?;
        let status = response.status().as_u16();
        // Read the body so latency covers the whole answer.
        http_body_util::BodyExt::collect(response.into_body()).await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(timeout, request).await {
        Ok(Some(status)) => ProbeResult::Ok { latency_ms: started.elapsed().as_secs_f64() * 1000.0, status },
        _ => ProbeResult::Failed,
    }
}

/// Channel on weir's internal realtime app carrying a room's live counters.
pub fn room_channel(room: &str) -> String {
    format!("room-{room}")
}

/// Publishes each room's counter if it (or the effective rate) changed since the last
/// announcement, and, when `heartbeat`, every room a page may be waiting in. `last` holds one
/// entry per room.
fn announce(rooms: &Rooms, realtime: &Realtime, last: &mut std::collections::HashMap<String, (u64, f64)>, heartbeat: bool) {
    let all = rooms.all();
    last.retain(|id, _| all.iter().any(|r| &r.id == id));
    for room in all {
        let now = (room.serving(), room.effective_rate());
        let changed = last.insert(room.id.clone(), now).is_none_or(|before| before != now);
        let waiting = room.last_ticket() > 0 && matches!(room.spec().state, RoomState::Open | RoomState::Paused | RoomState::Scheduled);
        if (changed && now.0 > 0) || (heartbeat && waiting) {
            publish_counter(realtime, &room);
        }
    }
}

fn publish_counter(realtime: &Realtime, room: &Room) {
    let data = serde_json::json!({
        "serving": room.serving(),
        "last_ticket": room.last_ticket(),
        "rate_per_minute": room.effective_rate(),
    });
    realtime.publish_internal(&room_channel(&room.id), "weir:counter", &data.to_string());
}

pub fn publish_state(realtime: &Realtime, room: &Room) {
    let spec = room.spec();
    let data = serde_json::json!({"state": spec.state, "starts_at": spec.starts_at});
    realtime.publish_internal(&room_channel(&room.id), "weir:state", &data.to_string());
}
