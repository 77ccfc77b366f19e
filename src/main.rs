//! `weir`: parse arguments, load configuration, then serve or run an admin command.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use weir::config::{Config, Flags, LogFormat};

// Every request allocates dozens of small, short-lived objects (headers, extensions, futures);
// mimalloc's thread-local free lists make those markedly cheaper than glibc's malloc
// (BENCHMARKS.md has the before/after figures). Built with `no_thp`: transparent huge pages
// under its arenas took idle RSS from 13 to 31 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weir", version, about = "Surge gateway: waiting rooms + Pusher-protocol realtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory for the embedded store and secrets (default ./weir-data).
        #[arg(long)]
        data_dir: Option<String>,
    },
    #[command(flatten)]
    Admin(weir::admin::cli::AdminCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen, data_dir } => serve(config, Flags { listen, data_dir }),
        Command::Admin(cmd) => weir::admin::cli::main(cmd),
    }
}

fn serve(file: Option<PathBuf>, flags: Flags) -> std::process::ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match Config::load(file.as_deref(), &env, &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weir: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    // The store's writer commits a batch when a worker goes idle (see `store::pacing`).
    let parked = weir::store::pacing::install();
    let unparked = parked.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .on_thread_park(move || parked.worker_parked())
        .on_thread_unpark(move || unparked.worker_unparked())
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        weir::ops::shutdown::cancel_on_signal(shutdown.clone());
        let data_dir = config.data_dir.clone();
        // A signal during start-up (before the server loop watches the token) still stops us.
        let server = tokio::select! {
            server = weir::Server::start(config, weir::clock::system(), shutdown.clone()) => server?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        if let Some(key) = &server.generated_admin_key {
            println!(
                "weir: generated admin key {key}\nweir: stored in {} (shown only this once; set WEIR_ADMIN_KEY to choose your own)",
                data_dir.join("admin.key").display()
            );
        }
        println!("weir: listening on http://{}", server.local_addr());
        tracing::info!(addr = %server.local_addr(), "ready");
        server.run().await?;
        Ok(())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
