//! Bounds on work: load shedding per route group, request timeouts, body limits.

pub mod backoff;
pub mod shed;
