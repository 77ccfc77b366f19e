//! The `weir` admin CLI: `weir room …`, `weir app …`, `weir keys rotate`, each a call to the
//! admin API of a running server (`--server`, `WEIR_ADMIN_KEY`).

use clap::Subcommand;

#[derive(Subcommand)]
pub enum AdminCommand {}

pub fn main(cmd: AdminCommand) -> std::process::ExitCode {
    match cmd {}
}
