//! Operating weir: Prometheus metrics, health and readiness, graceful shutdown.

pub mod health;
pub mod metrics;
pub mod shutdown;
