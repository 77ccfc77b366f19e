//! Admission driver.
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use crate::realtime::Realtime;
use super::Rooms;
pub fn spawn(_rooms: Arc<Rooms>, _realtime: Arc<Realtime>, _shutdown: CancellationToken) {}
