//! The Portcullis example gateway: an axum reverse proxy with health-gated load balancing,
//! circuit-breaker fallback and admission control in front of your backends.
//!
//! Run it with the built-in demo (two backends inside the process, listens on 127.0.0.1:8080):
//!
//! ```text
//! cargo run --release --example gateway
//! ```
//!
//! or with your own config:
//!
//! ```text
//! cargo run --release --example gateway -- --config gateway.yml
//! cargo run --release --example gateway -- --config gateway.yml --check   # validate only
//! ```
//!
//! A bad config exits with status 2 and a message naming the file, the field and the line.
//!
//! `SIGHUP` re-reads the config file and applies it without dropping a request (as
//! `POST /balancer/reload` does); an invalid file is refused and the old config keeps
//! running. SIGINT and SIGTERM drain and stop.

/// The process's allocator: jemalloc with its background purging threads, which return the
/// memory a burst of connections freed to the system within seconds (glibc malloc kept all of
/// it: 9.9 -> 99 -> 99 MiB for 5,000 held connections; BENCHMARKS.md, "Memory after a burst").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bench;
mod demo;

use clap::{Parser, Subcommand};
use portcullis::gateway::config::{embedded_default, GatewayConfig};
use portcullis::gateway::server::ConnectionLimits;
use portcullis::gateway::{serve_sharded_watched, ConfigError, Gateway};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

#[derive(Parser, Debug)]
#[command(name = "gateway", version, about = "Portcullis example gateway")]
struct Cli {
    /// YAML config file (without it: the built-in demo with two in-process backends).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Validate the config and exit (0 valid, 2 invalid).
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Probe a live API for each endpoint's capacity and write the config back.
    Bench {
        /// Base URL of the live API (e.g. http://127.0.0.1:8000).
        #[arg(long)]
        base_url: String,
        /// Where to write the config with capacities filled in (default: print it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print machine-readable JSON results instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// The process's log filter without `log_level`: `RUST_LOG`, else `info`.
fn default_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The filter sits behind a reload handle, so a config reload can change `log_level`.
    let (filter, filter_handle) = reload::Layer::new(default_filter());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_writer(std::io::stderr),
        )
        .init();
    // The main runtime runs the background tasks (health checks, probes, Redis) and the
    // bench command; requests are served by `serve_sharded`'s per-core runtimes.
    let main_threads = match cli.command {
        Some(Command::Bench { .. }) => std::thread::available_parallelism().map_or(2, usize::from),
        None => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(main_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli, filter_handle))
}

async fn run(cli: Cli, filter: reload::Handle<EnvFilter, Registry>) -> ExitCode {
    if let Some(Command::Bench {
        base_url,
        out,
        json,
    }) = &cli.command
    {
        return bench::run(bench::BenchArgs {
            config: cli.config.clone(),
            base_url: base_url.clone(),
            out: out.clone(),
            json: *json,
        })
        .await;
    }
    let config = match load_config(cli.config.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("config OK");
        return ExitCode::SUCCESS;
    }
    // From here a SIGHUP reloads instead of killing the process (its default action).
    #[cfg(unix)]
    let sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let set_filter = move |level: Option<&str>| -> Result<(), String> {
        let next = match level {
            Some(l) => EnvFilter::try_new(l).map_err(|e| e.to_string())?,
            None => default_filter(),
        };
        filter.reload(next).map_err(|e| e.to_string())
    };
    if let Some(level) = &config.log_level {
        if let Err(e) = set_filter(Some(level)) {
            eprintln!("gateway: log_level: {e}");
            return ExitCode::from(2);
        }
    }
    let listen = config.listen_addr();
    let drain = config.drain_timeout;
    let upstreams: Vec<String> = config
        .balance
        .upstreams
        .iter()
        .map(|u| u.url.clone())
        .collect();
    let watched: Vec<String> = config.admission.endpoints.keys().cloned().collect();
    let gateway = match Gateway::build(config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    gateway.set_log_filter_hook(Arc::new(set_filter));
    if let Some(path) = &cli.config {
        gateway.set_config_file(path.clone());
    }
    #[cfg(unix)]
    let reloader = match sighup {
        Ok(signals) => Some(tokio::spawn(reload_on_sighup(
            signals,
            gateway.reload_handle(),
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: reload only through POST /balancer/reload");
            None
        }
    };
    let workers = gateway.config().worker_threads();
    let listeners = match portcullis::gateway::bind_reuseport(listen, workers) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gateway: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listen = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(listen);
    tracing::info!(%listen, workers, upstreams = ?upstreams, watched = ?watched, "portcullis gateway listening");
    if cli.config.is_none() {
        println!("Portcullis demo gateway on http://{listen} (two demo backends in-process). Try:");
        println!("  curl -s http://{listen}/hello");
        println!("  curl -s -X POST http://{listen}/work -d '{{\"input\": 1}}'");
        println!("  curl -s http://{listen}/balancer/stats");
        println!("  open http://{listen}/balancer/ui");
    }
    let health = Some(gateway.health().clone());
    let limits = ConnectionLimits::from_config(&gateway.config());
    let served = serve_sharded_watched(
        listeners,
        gateway.app(),
        shutdown_signal(),
        drain,
        health,
        limits,
    )
    .await;
    #[cfg(unix)]
    if let Some(task) = reloader {
        task.abort();
    }
    gateway.shutdown().await;
    match served {
        Ok(true) => {
            tracing::info!("drained; bye");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            tracing::warn!(?drain, "drain timeout passed with requests still in flight");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config and checks everything `Gateway::build` would refuse, so that `--check`
/// and a start refuse the same configs (exit 2).
async fn load_config(path: Option<&Path>) -> Result<GatewayConfig, ConfigError> {
    let config = read_config(path).await?;
    let file = path.unwrap_or(Path::new("<embedded>"));
    config
        .check_servable()
        .map_err(|e| ConfigError::from_field(file, e))?;
    Ok(config)
}

async fn read_config(path: Option<&Path>) -> Result<GatewayConfig, ConfigError> {
    match path {
        Some(p) => GatewayConfig::load(p),
        None => {
            let start = |name| async move {
                demo::start(name).await.map_err(|e| ConfigError {
                    file: "<embedded>".into(),
                    field: None,
                    line: None,
                    message: format!("cannot start the demo backend: {e}"),
                })
            };
            let ports = [start("demo-1").await?, start("demo-2").await?];
            GatewayConfig::from_yaml(&embedded_default(ports), Path::new("<embedded>"))
        }
    }
}

/// Reloads the config on every SIGHUP (one at a time; the outcome is logged by the
/// gateway). Runs until aborted.
#[cfg(unix)]
async fn reload_on_sighup(
    mut signals: tokio::signal::unix::Signal,
    reloads: portcullis::gateway::reload::ReloadHandle,
) {
    while signals.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        // Refusals are logged (naming the field) and counted by the gateway itself.
        let _ = reloads.reload_from_file().await;
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
