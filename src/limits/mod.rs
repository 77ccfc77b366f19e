//! Bounds on work: load shedding per route group, request timeouts, body limits, connections
//! held open by slow request heads.

pub mod backoff;
pub mod head_guard;
pub mod shed;
pub mod turns;
