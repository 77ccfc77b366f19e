//! The admission loop: every [`TICK`] it advances each admitting room's serving counter,
//! persists all changed counters in one durable store call, and only then publishes them in
//! memory (so a status answer never reports an admission a crash could undo).
//!
//! A scheduled room whose start has passed is switched to `open` here, durably.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::model::RoomState;
use super::{Room, Rooms};
use crate::realtime::Realtime;

/// 100 ms: ten small steps a second keep admission smooth while costing nothing when idle.
pub const TICK: Duration = Duration::from_millis(100);

pub fn spawn(rooms: Arc<Rooms>, realtime: Arc<Realtime>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let elapsed = now - last;
            last = now;
            if let Err(e) = tick(&rooms, &realtime, elapsed).await {
                tracing::warn!(error = %e, "admission tick failed; will retry");
            }
        }
    });
}

/// One admission step for every room.
pub async fn tick(rooms: &Rooms, realtime: &Realtime, elapsed: Duration) -> Result<(), crate::error::ApiError> {
    let now_ms = rooms.clock.now_ms();
    let mut planned: Vec<(Arc<Room>, u64)> = Vec::new();
    for room in rooms.all() {
        let spec = room.spec();
        if spec.state == RoomState::Scheduled && room.effective_state(now_ms) == RoomState::Open {
            let mut opened = (*spec).clone();
            opened.state = RoomState::Open;
            rooms.update(&room, opened).await?;
            publish_state(realtime, &room);
        }
        let serving = room.serving();
        let target = {
            let mut admission = room.admission.lock();
            match room.effective_state(now_ms) {
                RoomState::Open => admission.advance(serving, room.last_ticket(), spec.rate_per_minute, elapsed),
                _ => {
                    admission.hold();
                    serving
                }
            }
        };
        metrics::gauge!("weir_room_queue_length", "room" => room.id.clone())
            .set(room.last_ticket().saturating_sub(serving) as f64);
        if target > serving {
            planned.push((room, target));
        }
    }
    if planned.is_empty() {
        return Ok(());
    }
    let updates: Vec<(String, u64)> = planned.iter().map(|(r, t)| (r.id.clone(), *t)).collect();
    let stored = rooms.store.advance_serving(&updates).await?;
    let now_s = now_ms.div_euclid(1000);
    for ((room, _), serving) in planned.iter().zip(stored) {
        let before = room.serving.fetch_max(serving, Ordering::AcqRel);
        let admitted = serving.saturating_sub(before);
        if admitted > 0 {
            room.admitted_window.lock().add(now_s, admitted);
            metrics::counter!("weir_room_admitted_total", "room" => room.id.clone()).increment(admitted);
            publish_counter(realtime, room);
        }
    }
    Ok(())
}

/// Channel on weir's internal realtime app carrying a room's live counters.
pub fn room_channel(room: &str) -> String {
    format!("room-{room}")
}

fn publish_counter(realtime: &Realtime, room: &Room) {
    let spec = room.spec();
    let data = serde_json::json!({
        "serving": room.serving(),
        "last_ticket": room.last_ticket(),
        "rate_per_minute": spec.rate_per_minute,
    });
    realtime.publish_internal(&room_channel(&room.id), "weir:counter", &data.to_string());
}

pub fn publish_state(realtime: &Realtime, room: &Room) {
    let spec = room.spec();
    let data = serde_json::json!({"state": spec.state, "starts_at": spec.starts_at});
    realtime.publish_internal(&room_channel(&room.id), "weir:state", &data.to_string());
}
