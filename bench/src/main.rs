//! `weir-bench`: the load client, baselines and report writer behind BENCHMARKS.md.
//!
//! - `hello`: the bare hyper HTTP/1.1 baseline server.
//! - `run`: starts each server pinned to one core (`taskset`), drives the scenarios of issue 5
//!   from this process (pin it to the other core), writes raw JSON, SVG charts and the table in
//!   BENCHMARKS.md. Every server it starts is stopped when it ends, or dies with it.
//! - `report`: redraws the table and charts from a raw JSON file.
//! - `ws-hold`: a helper process holding idle WebSockets (one process is capped at 20,000 files).
//!
//! Layout: [`client`] raw HTTP/1.1 keep-alive client; [`load`] closed/open loops; [`pace`] the
//! open loop's precise slot clock; [`hist`]
//! latency histogram; [`ws`] a lean client WebSocket; [`pusher`] signing and Pusher clients;
//! [`servers`] process control; [`scenarios`] the measurements; [`report`] table and charts;
//! [`sys`] CPU and memory.

mod client;
mod cluster;
mod fanout;
mod hello;
mod hist;
mod load;
mod pace;
mod probe;
mod pusher;
mod report;
mod scenarios;
mod servers;
mod sys;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "weir-bench", about = "Load client and baselines for weir's BENCHMARKS.md")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bare hyper HTTP/1.1 server answering a small body: the HTTP baseline.
    Hello {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Run scenarios and write results (normally called by bench/run).
    Run(Box<RunArgs>),
    /// Rewrite BENCHMARKS.md and the charts from a raw results file.
    Report {
        results: PathBuf,
        #[arg(long, default_value = "BENCHMARKS.md")]
        doc: PathBuf,
    },
    /// Hold idle Pusher WebSocket connections (helper for `connections`).
    WsHold {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        key: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        src: Option<std::net::IpAddr>,
        #[arg(long, default_value_t = 300)]
        hold_secs: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenarios to run (default: all): entry status verify fanout cluster connections queue-scale overload startup
    scenarios: Vec<String>,
    /// Tiny counts, finishes in under a minute; asserts nothing about speed.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    weir: PathBuf,
    #[arg(long)]
    sockudo: Option<PathBuf>,
    /// Path of soketi's bin/server.js.
    #[arg(long)]
    soketi: Option<PathBuf>,
    #[arg(long, default_value = "node")]
    node: PathBuf,
    /// Core the servers are pinned to (none: no pinning).
    #[arg(long)]
    server_core: Option<usize>,
    /// Core this client is pinned to (for the report; bench/run applies it).
    #[arg(long)]
    client_core: Option<usize>,
    #[arg(long, default_value = "bench/results")]
    results_dir: PathBuf,
    #[arg(long, default_value = "BENCHMARKS.md")]
    doc: PathBuf,
    /// Scratch directory for data dirs and logs.
    #[arg(long)]
    work: Option<PathBuf>,
    #[arg(long, default_value = "")]
    stamp: String,
    #[arg(long, default_value = "")]
    date: String,
    #[arg(long, default_value = "bench/run")]
    command: String,
    #[arg(long, default_value = "")]
    commit: String,
    /// Do not rewrite BENCHMARKS.md (raw JSON and charts are still written).
    #[arg(long)]
    no_doc: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Hello { listen } => match hello::main(&listen) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir-bench hello: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Cmd::WsHold { addr, key, count, src, hold_secs } => {
            pusher::hold_main(addr, &key, count, src, Duration::from_secs(hold_secs));
            std::process::ExitCode::SUCCESS
        }
        Cmd::Report { results, doc } => match report_from(&results, &doc) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir-bench report: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Cmd::Run(args) => run(*args),
    }
}

fn report_from(results: &std::path::Path, doc: &std::path::Path) -> Result<(), String> {
    let raw = std::fs::read_to_string(results).map_err(|e| format!("{}: {e}", results.display()))?;
    let res: Value = serde_json::from_str(&raw).map_err(|e| e.to_string())?;
    let dir = results.parent().unwrap_or(std::path::Path::new("."));
    report::charts(&res, dir).map_err(|e| e.to_string())?;
    let old = std::fs::read_to_string(doc).unwrap_or_default();
    let section = report::table(&res, &results.display().to_string());
    std::fs::write(doc, report::splice(&old, &section)).map_err(|e| e.to_string())?;
    Ok(())
}

fn run(args: RunArgs) -> std::process::ExitCode {
    let nofile = sys::raise_nofile();
    let selected: Vec<String> = if args.scenarios.is_empty() {
        scenarios::ALL.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    for s in &selected {
        if !scenarios::ALL.contains(&s.as_str()) {
            eprintln!("weir-bench: unknown scenario {s:?}; known: {}", scenarios::ALL.join(" "));
            return std::process::ExitCode::from(2);
        }
    }
    let work = args.work.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("weir-bench-{}", std::process::id())));
    let _ = std::fs::create_dir_all(&work);
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("weir-bench"));
    let mut peers = Vec::new();
    if args.sockudo.as_ref().is_some_and(|p| p.exists()) {
        peers.push("sockudo");
    }
    if args.soketi.as_ref().is_some_and(|p| p.exists()) {
        peers.push("soketi");
    }
    let bins = servers::Bins {
        weir: args.weir.clone(),
        bench: exe,
        sockudo: args.sockudo.clone().filter(|p| p.exists()),
        soketi: args.soketi.clone().filter(|p| p.exists()),
        node: args.node.clone(),
    };
    let params = scenarios::Params::new(args.quick);
    let mut ctx = scenarios::Ctx::new(bins, servers::Pinning { server_core: args.server_core }, work.clone(), params, peers.clone());
    let rt_servers = 1 + peers.len();
    ctx.steps = selected
        .iter()
        .map(|s| match s.as_str() {
            // With the polling client's turns beside the goal's, unless every loop polls.
            "entry" => 2 + usize::from(!load::client_spins()),
            "status" => 1,
            // The peak before and after, the curve, the 3× load, bare hyper, the refusal probe.
            "overload" => 5 + scenarios::CURVE.len(),
            "verify" => 2,
            // Each turn's start and subscriber counts, then the fixed-rate phase per count.
            "fanout" => ctx.params.fanout_passes * rt_servers * (1 + ctx.params.fanout_subs.len()) + ctx.params.fanout_subs.len(),
            "cluster" => 2 * ctx.params.fanout_passes,
            "connections" => rt_servers,
            "queue-scale" => 2,
            "startup" => ctx.params.startup_runs,
            _ => 1,
        })
        .sum();
    eprintln!(
        "weir-bench: {} scenario(s){}; peers: {}; open-files limit {nofile}; scratch {}",
        selected.len(),
        if args.quick { " (quick)" } else { "" },
        if peers.is_empty() { "none installed".to_string() } else { peers.join(", ") },
        work.display()
    );

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    let mut out = serde_json::Map::new();
    local.block_on(&rt, async {
        let want = |s: &str| selected.iter().any(|x| x == s);
        if want("entry") || want("status") || want("verify") {
            out.insert("hello".into(), scenarios::hello_baseline(&mut ctx).await);
        }
        let mut capacity = None;
        if want("entry") {
            let v = scenarios::entry(&mut ctx).await;
            capacity = v["ok_per_sec"].as_f64();
            out.insert("entry".into(), json!({ "weir": v }));
        }
        if want("status") {
            out.insert("status".into(), json!({ "weir": scenarios::status(&mut ctx).await }));
        }
        if want("verify") {
            out.insert("verify".into(), json!({ "weir": scenarios::verify(&mut ctx).await }));
        }
        if want("overload") {
            out.insert("overload".into(), scenarios::overload(&mut ctx, capacity).await);
        }
        ctx.stop_all();
        if want("startup") {
            out.insert("startup".into(), scenarios::startup(&mut ctx).await);
        }
        if want("fanout") {
            out.insert("fanout".into(), fanout::fanout(&mut ctx).await);
        }
        if want("cluster") {
            out.insert("cluster".into(), cluster::cluster(&mut ctx).await);
        }
        if want("connections") {
            out.insert("connections".into(), scenarios::connections(&mut ctx).await);
        }
        if want("queue-scale") {
            out.insert("queue-scale".into(), scenarios::queue_scale(&mut ctx).await);
        }
    });
    ctx.stop_all();
    scenarios::flush();

    let peer_status: Value = ["sockudo", "soketi"]
        .iter()
        .map(|p| (p.to_string(), json!(if peers.contains(p) { "measured" } else { "not installed: not measured" })))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let res = json!({
        "meta": {
            "date": args.date,
            "command": args.command,
            "commit": args.commit,
            "quick": args.quick,
            "nproc": sys::nproc_all(),
            "cpu_model": sys::cpu_model(),
            "server_core": args.server_core,
            "client_core": args.client_core,
            "peers": peer_status,
            "scenarios": selected,
            "seconds": ctx.t0.elapsed().as_secs_f64(),
        },
        "scenarios": Value::Object(out),
    });
    let _ = std::fs::create_dir_all(&args.results_dir);
    let stamp = if args.stamp.is_empty() { format!("run-{}", std::process::id()) } else { args.stamp.clone() };
    let file = args.results_dir.join(format!("{stamp}.json"));
    let text = serde_json::to_string_pretty(&res).expect("json");
    if let Err(e) = std::fs::write(&file, &text) {
        eprintln!("weir-bench: cannot write {}: {e}", file.display());
        return std::process::ExitCode::FAILURE;
    }
    if let Err(e) = report::charts(&res, &args.results_dir) {
        eprintln!("weir-bench: charts: {e}");
    }
    if !args.no_doc {
        let old = std::fs::read_to_string(&args.doc).unwrap_or_default();
        let section = report::table(&res, &file.display().to_string());
        if let Err(e) = std::fs::write(&args.doc, report::splice(&old, &section)) {
            eprintln!("weir-bench: cannot write {}: {e}", args.doc.display());
        }
        println!("{section}");
    }
    eprintln!("weir-bench: raw results in {}", file.display());
    let _ = std::fs::remove_dir_all(&work);
    std::process::ExitCode::SUCCESS
}
