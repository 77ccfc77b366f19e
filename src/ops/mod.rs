//! Operating weir: Prometheus metrics, health and readiness, graceful shutdown, the live
//! dashboard and its top talkers.

pub mod dashboard;
pub mod health;
pub mod metrics;
pub mod shutdown;
pub mod talkers;
