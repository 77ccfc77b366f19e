//! Administration: the `/api/v1` JSON API guarded by the admin bearer key, and the CLI
//! (`weir room|app|keys …`) that drives it over HTTP.

pub mod auth;
pub mod rooms;
pub mod cli;
pub mod cli_app;
pub mod cli_stats;
