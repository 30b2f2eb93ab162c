//! `portcullis-loadbench`: the Portcullis example gateway side by side with nginx and HAProxy,
//! on the same machine, in the same run.
//!
//! ```text
//! cargo run --release -p portcullis-loadbench -- --smoke          # ~2 s per target, CI
//! cargo run --release -p portcullis-loadbench -- --write          # full run → BENCHMARKS.md
//! cargo run --release -p portcullis-loadbench -- --duration 5 --connections 64 --modes gateway,nginx
//! ```
//!
//! It starts two test backends (hyper, `200 ok` at once, keep-alive) in a separate process, then
//! the gateway in each of its modes (pure proxy, admission, p2c, Redis storage), nginx and
//! HAProxy in front of them with equivalent settings (see `targets.rs`), and drives each with
//! `wrk --latency` at every connection count for a fixed duration, alternating the targets
//! round after round (A B A B) so machine drift affects all of them alike. It reports req/s,
//! p50, p99 and max latency, the proxy's CPU seconds per 10k requests (utime + stime of its
//! process tree, and each of the two), the upstream connections it opened per 10k requests
//! (counted by the backends), its peak RSS, and the ratios gateway ÷ nginx and gateway ÷
//! HAProxy. The `hyper-bare` target (`bare.rs`) is the smallest hyper server plus hyper-util
//! client proxy: the cost of the hyper stack alone.
//! The `gateway-access-log` target is the pure proxy with the JSON access log on.
//! After the rounds, a constant-rate run (`rate.rs`: oha at one fixed rate for every target,
//! 70 % of nginx's req/s by default, latency corrected for coordinated omission) reports
//! p50, p99 and p99.9 under the same offered load (`--rate auto|off|N`; off with `--smoke`).
//!
//! Everything binds 127.0.0.1; every process it starts is stopped by pid when the harness ends,
//! panics or gets SIGINT/SIGTERM; every wait is bounded.
#![forbid(unsafe_code)]

mod backend;
mod bare;
mod procfs;
mod procs;
mod rate;
mod report;
mod targets;
mod wrk;

use clap::{Parser, Subcommand};
use procs::{Proc, TempDir};
use report::Run;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use targets::{Mode, BENCH_PATH};

#[derive(Parser, Debug)]
#[command(
    name = "portcullis-loadbench",
    about = "Load benchmark: the Portcullis gateway side by side with nginx and HAProxy (wrk)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Quick check: ~2 s per target at -c64, one round; exits non-zero if any target fails to
    /// serve 200s. Never writes BENCHMARKS.md.
    #[arg(long)]
    smoke: bool,
    /// Seconds per wrk run (default 8; 2 with --smoke).
    #[arg(long)]
    duration: Option<u64>,
    /// Rounds; each round runs every target once per connection count (default 3; 1 with --smoke).
    #[arg(long)]
    rounds: Option<u32>,
    /// wrk connection counts, comma separated (default 64,256; 64 with --smoke).
    #[arg(long, value_delimiter = ',')]
    connections: Option<Vec<u32>>,
    /// Targets, comma separated (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    modes: Option<Vec<Mode>>,
    /// Seconds of unrecorded wrk warm-up per target before the rounds (default 1).
    #[arg(long)]
    warmup: Option<u64>,
    /// Fixed latency of the test backends' answers, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    backend_latency_ms: f64,
    /// Worker threads of the backend process.
    #[arg(long, default_value_t = 2)]
    backend_threads: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: u32,
    /// Write the results into BENCHMARKS.md at the repo root (never with --smoke).
    #[arg(long)]
    write: bool,
    /// Use this gateway binary instead of `cargo build --release --example gateway`.
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Do not run cargo; use the already built target/release/examples/gateway.
    #[arg(long)]
    no_build: bool,
    /// A note to add under the table (repeatable), e.g. which layers are wired at this commit.
    #[arg(long)]
    note: Vec<String>,
    /// Stop measuring (and fail) after this many minutes in total.
    #[arg(long, default_value_t = 15.0)]
    max_minutes: f64,
    /// The constant-rate latency run after the rounds (oha, latency corrected for coordinated
    /// omission): `auto` offers 70 % of nginx's req/s at the first connection count, a number
    /// offers that many req/s, `off` skips it (default `auto`; `off` with --smoke).
    #[arg(long)]
    rate: Option<String>,
    /// Seconds of the constant-rate run per target.
    #[arg(long, default_value_t = 10)]
    rate_duration: u64,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// (internal) Run the test backends; prints `PORTS p1 p2` and serves until stdin closes.
    #[command(hide = true)]
    Backend {
        /// Number of backends.
        #[arg(long, default_value_t = 2)]
        count: usize,
        /// Fixed answer latency, milliseconds.
        #[arg(long, default_value_t = 0.0)]
        latency_ms: f64,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// (internal) Run the `hyper-bare` proxy on 127.0.0.1:PORT until stdin closes.
    #[command(hide = true)]
    HyperBare {
        /// Port to listen on.
        #[arg(long)]
        port: u16,
        /// Backend ports, comma separated.
        #[arg(long, value_delimiter = ',')]
        backends: Vec<u16>,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

/// The resolved plan of a run.
#[derive(Debug, Clone)]
struct Plan {
    smoke: bool,
    duration: u64,
    rounds: u32,
    connections: Vec<u32>,
    modes: Vec<Mode>,
    warmup: u64,
    rate: RatePlan,
}

/// Whether and at what rate the constant-rate run goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RatePlan {
    Off,
    /// [`rate::DEFAULT_SHARE`] of nginx's req/s in this run.
    Auto,
    /// This many requests per second.
    Fixed(f64),
}

impl RatePlan {
    fn parse(s: Option<&str>, smoke: bool) -> Result<Self, String> {
        match s {
            None if smoke => Ok(Self::Off),
            None | Some("auto") => Ok(Self::Auto),
            Some("off") => Ok(Self::Off),
            Some(n) => match n.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 1.0 => Ok(Self::Fixed(v)),
                _ => Err(format!(
                    "--rate {n}: expected auto, off or a rate ≥ 1 req/s"
                )),
            },
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Sub::Backend {
            count,
            latency_ms,
            threads,
        }) => return backend::run(*count, ms(*latency_ms), *threads),
        Some(Sub::HyperBare {
            port,
            backends,
            threads,
        }) => return bare::run(*port, backends.clone(), *threads),
        None => {}
    }
    procs::install_signal_handler();
    match bench(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(if v.is_finite() && v > 0.0 { v } else { 0.0 } / 1000.0)
}

fn plan(cli: &Cli) -> Result<Plan, String> {
    let smoke = cli.smoke;
    let mut connections =
        cli.connections
            .clone()
            .unwrap_or_else(|| if smoke { vec![64] } else { vec![64, 256] });
    connections.retain(|&c| c > 0);
    connections.dedup();
    let mut modes = cli.modes.clone().unwrap_or_else(|| Mode::ALL.to_vec());
    // Keep the canonical order (it is the alternation order) and drop duplicates.
    modes = Mode::ALL
        .iter()
        .copied()
        .filter(|m| modes.contains(m))
        .collect();
    Ok(Plan {
        smoke,
        duration: cli.duration.unwrap_or(if smoke { 2 } else { 8 }).max(1),
        rounds: cli.rounds.unwrap_or(if smoke { 1 } else { 3 }).max(1),
        connections,
        modes,
        warmup: cli.warmup.unwrap_or(1),
        rate: RatePlan::parse(cli.rate.as_deref(), smoke)?,
    })
}

/// A running target.
#[derive(Debug)]
struct Target {
    mode: Mode,
    port: u16,
    proc: Proc,
    peak_rss_kib: u64,
}

impl Target {
    /// The pids of the target's process tree and the URL to load, or why it cannot be
    /// loaded (it exited).
    fn load_point(&mut self) -> Result<(Vec<u32>, String), String> {
        if let Some(status) = self.proc.exited() {
            return Err(format!(
                "the target exited ({status}): {}",
                self.proc.log_tail(5)
            ));
        }
        let pids = procfs::tree(self.proc.pid());
        Ok((pids, format!("http://127.0.0.1:{}{BENCH_PATH}", self.port)))
    }

    fn sample_rss(&mut self, pids: &[u32]) {
        self.peak_rss_kib = self.peak_rss_kib.max(procfs::rss_kib(pids));
    }
}

fn bench(cli: &Cli) -> Result<ExitCode, String> {
    let started = Instant::now();
    let plan = plan(cli)?;
    if plan.modes.is_empty() || plan.connections.is_empty() {
        return Err("nothing to measure (empty --modes or --connections)".into());
    }
    let budget = Duration::from_secs_f64(cli.max_minutes.max(0.5) * 60.0);
    let root = workspace_root();
    let per_run = plan.duration as usize;
    let runs_total = plan.modes.len() * plan.connections.len() * plan.rounds as usize;
    println!(
        "loadbench: {} targets × {:?} connections × {} rounds × {} s (+{} s warm-up each) ≈ {} s of load",
        plan.modes.len(),
        plan.connections,
        plan.rounds,
        plan.duration,
        plan.warmup,
        runs_total * per_run + plan.modes.len() * plan.warmup as usize
    );

    // Tools.
    let wrk =
        ensure_tool("wrk", "wrk").ok_or("wrk is not installed and apt-get could not install it")?;
    let mut notes: Vec<String> = cli.note.clone();
    let mut redis_used = true;
    let mut failed: Vec<String> = Vec::new();
    let mut tools: BTreeMap<Mode, PathBuf> = BTreeMap::new();
    for (mode, bin, pkg) in [
        (Mode::Nginx, "nginx", "nginx"),
        (Mode::Haproxy, "haproxy", "haproxy"),
        (Mode::GatewayRedis, "redis-server", "redis-server"),
    ] {
        if plan.modes.contains(&mode) {
            match ensure_tool(bin, pkg) {
                Some(p) => {
                    tools.insert(mode, p);
                }
                None => {
                    let msg = format!(
                        "{}: skipped — `{bin}` is missing and apt-get could not install it",
                        mode.label()
                    );
                    println!("{msg}");
                    notes.push(msg);
                }
            }
        }
    }
    let gateway_bin = if plan.modes.iter().any(|m| m.is_gateway()) {
        Some(gateway_binary(cli, &root)?)
    } else {
        None
    };

    let tmp = TempDir::new().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let dir = tmp.path().to_path_buf();

    // Backends, in their own process.
    let (_backend, backend_ports) = start_backends(cli, &dir)?;
    println!("loadbench: backends on 127.0.0.1:{backend_ports:?}");

    // Redis, when needed.
    let mut redis: Option<(Proc, u16)> = None;
    if let Some(redis_bin) = tools.get(&Mode::GatewayRedis) {
        match start_redis(redis_bin, &dir) {
            Ok(r) => redis = Some(r),
            Err(e) => {
                let msg = format!("gateway-redis: skipped — cannot start redis-server: {e}");
                println!("{msg}");
                notes.push(msg);
            }
        }
    }

    // Targets.
    let mut targets: Vec<Target> = Vec::new();
    for &mode in &plan.modes {
        let started = match mode {
            Mode::Nginx | Mode::Haproxy => match tools.get(&mode) {
                Some(bin) => start_proxy(mode, bin, &dir, &backend_ports),
                None => continue,
            },
            Mode::HyperBare => start_bare(&dir, &backend_ports),
            Mode::GatewayRedis => match (&redis, &gateway_bin) {
                (Some((_, rp)), Some(bin)) => {
                    start_gateway(mode, bin, &dir, &backend_ports, Some(*rp))
                }
                _ => continue,
            },
            _ => match &gateway_bin {
                Some(bin) => start_gateway(mode, bin, &dir, &backend_ports, None),
                None => continue,
            },
        };
        match started {
            Ok(t) => {
                println!(
                    "loadbench: {} on 127.0.0.1:{} (pid {})",
                    mode.label(),
                    t.port,
                    t.proc.pid()
                );
                targets.push(t);
            }
            Err(StartError::Rejected(why)) if mode == Mode::GatewayRedis => {
                let msg = format!(
                    "gateway-redis: skipped — the gateway rejected the Redis storage config (not wired yet?): {why}"
                );
                println!("{msg}");
                notes.push(msg);
            }
            Err(e) => {
                let msg = format!("{}: FAILED to start — {e}", mode.label());
                println!("{msg}");
                failed.push(msg);
            }
        }
    }
    if targets.is_empty() {
        return Err("no target started".into());
    }

    let clk = procfs::clk_tck() as f64;
    // Warm-up: fill the connection pools, fault the pages in.
    if plan.warmup > 0 {
        let c = plan.connections.iter().copied().max().unwrap_or(64);
        for t in &mut targets {
            if let Err(e) = drive(
                t,
                &wrk,
                c,
                plan.warmup,
                cli.wrk_threads,
                &dir,
                clk,
                backend_ports[0],
            ) {
                let msg = format!("{}: warm-up failed — {e}", t.mode.label());
                println!("{msg}");
                failed.push(msg);
            }
        }
    }

    // The measured rounds: every round runs the targets in the same order (A B A B ...).
    let mut runs: Vec<Run> = Vec::new();
    let mut incomplete = false;
    'rounds: for round in 1..=plan.rounds {
        for &c in &plan.connections {
            for t in &mut targets {
                if started.elapsed() > budget {
                    let msg = format!(
                        "time budget of {:.1} min exhausted: results are partial",
                        cli.max_minutes
                    );
                    println!("loadbench: {msg}");
                    failed.push(msg);
                    incomplete = true;
                    break 'rounds;
                }
                match drive(
                    t,
                    &wrk,
                    c,
                    plan.duration,
                    cli.wrk_threads,
                    &dir,
                    clk,
                    backend_ports[0],
                ) {
                    Ok(run) => {
                        let w = &run.wrk;
                        let per_10k = |v: f64| v / (w.requests.max(1) as f64) * 10_000.0;
                        println!(
                            "[round {round}/{}] c{c:<4} {:<18} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.1} ms  cpu {:.3} s/10k (user {:.3}, sys {:.3})  upstream conns {}  rss {:.1} MiB{}",
                            plan.rounds,
                            t.mode.label(),
                            w.rps,
                            w.p50_ms,
                            w.p99_ms,
                            w.max_ms,
                            per_10k(run.cpu_s),
                            per_10k(run.user_s),
                            per_10k(run.cpu_s - run.user_s),
                            run.upstream_conns.map_or("?".into(), |n| n.to_string()),
                            t.peak_rss_kib as f64 / 1024.0,
                            if w.non_2xx + w.socket_errors > 0 {
                                format!("  ({} non-2xx, {} socket errors)", w.non_2xx, w.socket_errors)
                            } else {
                                String::new()
                            }
                        );
                        if w.requests == 0 || w.non_2xx > 0 || w.socket_errors > w.requests / 100 {
                            failed.push(format!(
                                "{} c{c}: {} requests, {} non-2xx, {} socket errors",
                                t.mode.label(),
                                w.requests,
                                w.non_2xx,
                                w.socket_errors
                            ));
                        }
                        runs.push(run);
                    }
                    Err(e) => {
                        let msg = format!("{} c{c}: {e}", t.mode.label());
                        println!("loadbench: {msg}");
                        failed.push(msg);
                    }
                }
            }
        }
    }

    // The constant-rate run, at one rate for every target.
    let mut rate_runs: Vec<rate::RateRun> = Vec::new();
    if !incomplete {
        if let Some(offered) = offered_rate(plan.rate, &runs, &plan) {
            match rate::find_or_install(&root) {
                Ok(oha) => {
                    for t in &mut targets {
                        match drive_rate(t, &oha, offered, &plan, cli.rate_duration, &dir, clk) {
                            Ok(r) => {
                                println!(
                                    "[rate {offered:.0} req/s] {:<18} answered {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p99.9 {:>7.2} ms{}",
                                    t.mode.label(),
                                    r.oha.rps,
                                    r.oha.p50_ms,
                                    r.oha.p99_ms,
                                    r.oha.p999_ms,
                                    if r.oha.bad > 0 { format!("  ({} failed)", r.oha.bad) } else { String::new() }
                                );
                                if r.oha.requests == 0 || r.oha.bad > r.oha.requests / 100 {
                                    failed.push(format!(
                                        "{} at {offered:.0} req/s: {} answers, {} failed",
                                        t.mode.label(),
                                        r.oha.requests,
                                        r.oha.bad
                                    ));
                                }
                                rate_runs.push(r);
                            }
                            Err(e) => {
                                let msg = format!("{} at {offered:.0} req/s: {e}", t.mode.label());
                                println!("loadbench: {msg}");
                                failed.push(msg);
                            }
                        }
                    }
                }
                Err(e) => {
                    let msg = format!("constant-rate run skipped: {e}");
                    println!("loadbench: {msg}");
                    notes.push(msg);
                }
            }
        }
    }

    // After the load: peak RSS (VmHWM of the main process), liveness, Redis use.
    let mut peak: BTreeMap<Mode, u64> = BTreeMap::new();
    for t in &mut targets {
        let hwm = procfs::status_kib(t.proc.pid(), "VmHWM").unwrap_or(0);
        peak.insert(t.mode, t.peak_rss_kib.max(hwm));
        if let Some(status) = t.proc.exited() {
            failed.push(format!(
                "{} exited during the benchmark ({status}): {}",
                t.mode.label(),
                t.proc.log_tail(5)
            ));
        }
    }
    if let Some((_, rp)) = &redis {
        if targets.iter().any(|t| t.mode == Mode::GatewayRedis) {
            match redis_commands(*rp) {
                Some(n) if n < 100 => {
                    redis_used = false;
                    let msg = format!(
                        "gateway-redis: redis-server processed only {n} commands during the run — the gateway accepts `storage: {{type: redis}}` but does not use Redis yet, so this row measures memory-mode admission"
                    );
                    println!("{msg}");
                    notes.push(msg);
                }
                Some(n) => notes.push(format!(
                    "gateway-redis: redis-server processed {n} commands"
                )),
                None => {
                    notes.push("gateway-redis: could not read redis-server's command count".into())
                }
            }
        }
    }
    // Stop everything now (the guards would do it on drop too).
    for t in &mut targets {
        t.proc.stop();
    }
    drop(redis);

    let rows = report::aggregate(&runs, &peak);
    let checks = report::check_targets(&rows, redis_used);
    let table = report::table(&rows);
    let mut targets_md = report::targets_markdown(&checks);
    let rate_md = (!rate_runs.is_empty()).then(|| rate::table(&rate_runs));
    targets_md.push_str(&rate::target_line(&rate_runs).unwrap_or_default());
    println!("\n{table}\nTargets at -c64:\n{targets_md}");
    if let Some(t) = &rate_md {
        println!("\nAt a constant rate (oha, latency corrected):\n{t}");
    }
    for n in &notes {
        println!("note: {n}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("loadbench: done in {elapsed:.0} s");

    if !failed.is_empty() {
        println!("\nFAILURES:");
        for f in &failed {
            println!("  {f}");
        }
    }
    if cli.write {
        if plan.smoke {
            println!("loadbench: --smoke never writes BENCHMARKS.md");
        } else if incomplete || !failed.is_empty() {
            println!("loadbench: not writing BENCHMARKS.md: the run had failures");
        } else {
            let section = section_markdown(
                cli,
                &plan,
                &table,
                rate_md.as_deref(),
                &targets_md,
                &notes,
                &root,
                elapsed,
            );
            let path = root.join("BENCHMARKS.md");
            report::write_section(&path, &section)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("loadbench: wrote the results into {}", path.display());
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One wrk run against `t`, measuring the target's CPU and sampling its RSS meanwhile; the
/// backends (any of them answers, on `backend_port`) count the upstream connections.
#[allow(clippy::too_many_arguments)]
fn drive(
    t: &mut Target,
    wrk: &Path,
    conns: u32,
    secs: u64,
    threads: u32,
    dir: &Path,
    clk: f64,
    backend_port: u16,
) -> Result<Run, String> {
    let (pids, url) = t.load_point()?;
    let mut cmd = Command::new(wrk);
    cmd.arg("-t")
        .arg(threads.clamp(1, conns).to_string())
        .arg("-c")
        .arg(conns.to_string())
        .arg("-d")
        .arg(format!("{secs}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("--latency")
        .arg(&url);
    let accepted0 = backends_accepted(backend_port);
    let cpu0 = procfs::cpu_ticks(&pids);
    let mut w = Proc::spawn("wrk", &mut cmd, dir).map_err(|e| format!("cannot run wrk: {e}"))?;
    let status = wait_sampling(t, &pids, &mut w, secs)?;
    let cpu1 = procfs::cpu_ticks(&pids);
    let accepted1 = backends_accepted(backend_port);
    t.sample_rss(&pids);
    let out = std::fs::read_to_string(dir.join("wrk.log")).unwrap_or_default();
    if !status.success() {
        return Err(format!("wrk failed ({status}): {}", out.trim()));
    }
    let parsed = wrk::parse(&out)?;
    Ok(Run {
        mode: t.mode,
        conns,
        wrk: parsed,
        cpu_s: cpu1.1.saturating_sub(cpu0.1) as f64 / clk,
        user_s: cpu1.0.saturating_sub(cpu0.0) as f64 / clk,
        // The second read's own connection is counted too.
        upstream_conns: accepted0
            .zip(accepted1)
            .map(|(a, b)| b.saturating_sub(a).saturating_sub(1)),
    })
}

/// Waits for the load tool `load`, due to end after `secs`, sampling the target's RSS every
/// 100 ms; stops it (an error) when it runs 20 s over.
fn wait_sampling(
    t: &mut Target,
    pids: &[u32],
    load: &mut Proc,
    secs: u64,
) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + Duration::from_secs(secs + 20);
    loop {
        if let Some(s) = load.exited() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            load.stop();
            return Err(format!("{} did not finish in time", load.name()));
        }
        t.sample_rss(pids);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rate of the constant-rate run: fixed, or [`rate::DEFAULT_SHARE`] of nginx's mean
/// req/s at the first connection count (of the slowest target's when nginx did not run).
fn offered_rate(rate_plan: RatePlan, runs: &[Run], plan: &Plan) -> Option<f64> {
    let conns = *plan.connections.first()?;
    let mean = |mode: Mode| {
        let rps: Vec<f64> = runs
            .iter()
            .filter(|r| r.mode == mode && r.conns == conns)
            .map(|r| r.wrk.rps)
            .collect();
        (!rps.is_empty()).then(|| rps.iter().sum::<f64>() / rps.len() as f64)
    };
    match rate_plan {
        RatePlan::Off => None,
        RatePlan::Fixed(v) => Some(v),
        RatePlan::Auto => mean(Mode::Nginx)
            .or_else(|| {
                plan.modes
                    .iter()
                    .filter_map(|&m| mean(m))
                    .min_by(f64::total_cmp)
            })
            .map(rate::auto_rate),
    }
}

/// One constant-rate oha run against `t` at `offered` req/s, measuring the target's CPU.
fn drive_rate(
    t: &mut Target,
    oha: &Path,
    offered: f64,
    plan: &Plan,
    secs: u64,
    dir: &Path,
    clk: f64,
) -> Result<rate::RateRun, String> {
    let (pids, url) = t.load_point()?;
    let conns = plan.connections.first().copied().unwrap_or(64);
    let json_path = dir.join("oha.json");
    let json = std::fs::File::create(&json_path).map_err(|e| format!("oha.json: {e}"))?;
    let log = dir.join("oha.log");
    let err = std::fs::File::create(&log).map_err(|e| format!("oha.log: {e}"))?;
    let mut cmd = Command::new(oha);
    cmd.args(rate::args(&url, offered, conns, secs))
        .stdin(Stdio::null())
        .stdout(json)
        .stderr(err);
    let cpu0 = procfs::cpu_ticks(&pids);
    let mut o = Proc::spawn_with("oha", &mut cmd, log.clone())
        .map_err(|e| format!("cannot run oha: {e}"))?;
    let status = wait_sampling(t, &pids, &mut o, secs)?;
    let cpu1 = procfs::cpu_ticks(&pids);
    if !status.success() {
        let why = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(format!("oha failed ({status}): {}", why.trim()));
    }
    let out = std::fs::read_to_string(&json_path).unwrap_or_default();
    Ok(rate::RateRun {
        mode: t.mode,
        rate: offered,
        oha: rate::parse(&out)?,
        cpu_s: cpu1.1.saturating_sub(cpu0.1) as f64 / clk,
    })
}

/// Connections the backends accepted so far.
fn backends_accepted(port: u16) -> Option<u64> {
    http_body(port, backend::ACCEPTED_PATH)?.trim().parse().ok()
}

/// Starts the `hyper-bare` proxy (this binary's `hyper-bare` subcommand).
fn start_bare(dir: &Path, backends: &[u16]) -> Result<Target, StartError> {
    let port = free_port().map_err(StartError::Other)?;
    let exe = std::env::current_exe()
        .map_err(|e| StartError::Other(format!("cannot find my own binary: {e}")))?;
    let list: Vec<String> = backends.iter().map(u16::to_string).collect();
    let mut cmd = Command::new(exe);
    cmd.arg("hyper-bare")
        .arg("--port")
        .arg(port.to_string())
        .arg("--backends")
        .arg(list.join(","))
        .arg("--threads")
        .arg("2");
    // Its stdin stays open while the harness lives: it exits when the pipe closes.
    let log = dir.join("hyper-bare.log");
    let out = std::fs::File::create(&log).map_err(|e| StartError::Other(e.to_string()))?;
    let err = out
        .try_clone()
        .map_err(|e| StartError::Other(e.to_string()))?;
    cmd.stdin(Stdio::piped()).stdout(out).stderr(err);
    let proc = Proc::spawn_with(Mode::HyperBare.label(), &mut cmd, log)
        .map_err(|e| StartError::Other(format!("cannot run hyper-bare: {e}")))?;
    wait_ready(Mode::HyperBare, port, proc)
}

/// Why a target did not start.
#[derive(Debug)]
enum StartError {
    /// It exited at once (a rejected config, typically), with this output.
    Rejected(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Rejected(s) => write!(f, "exited at start: {s}"),
            StartError::Other(s) => f.write_str(s),
        }
    }
}

fn start_gateway(
    mode: Mode,
    bin: &Path,
    dir: &Path,
    backends: &[u16],
    redis: Option<u16>,
) -> Result<Target, StartError> {
    let port = free_port().map_err(StartError::Other)?;
    let cfg = dir.join(format!("{}.yml", mode.label()));
    let mut yaml = targets::gateway_yaml(mode, port, backends, redis);
    if mode == Mode::GatewayAccessLog {
        let log = dir.join("gateway-access.log");
        yaml.push_str(&format!(
            "access_log: {{enable: true, format: json, path: \"{}\"}}\n",
            log.display()
        ));
    }
    std::fs::write(&cfg, yaml)
        .map_err(|e| StartError::Other(format!("cannot write {}: {e}", cfg.display())))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&cfg)
        .env("TOKIO_WORKER_THREADS", "2")
        .env_remove("RUST_LOG");
    let proc = Proc::spawn(mode.label(), &mut cmd, dir)
        .map_err(|e| StartError::Other(format!("cannot run {}: {e}", bin.display())))?;
    wait_ready(mode, port, proc)
}

fn start_proxy(mode: Mode, bin: &Path, dir: &Path, backends: &[u16]) -> Result<Target, StartError> {
    let port = free_port().map_err(StartError::Other)?;
    let mut cmd = Command::new(bin);
    match mode {
        Mode::Nginx => {
            let cfg = dir.join("nginx.conf");
            std::fs::write(&cfg, targets::nginx_conf(dir, port, backends))
                .map_err(|e| StartError::Other(format!("cannot write nginx.conf: {e}")))?;
            cmd.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("nginx-error.log"))
                .arg("-c")
                .arg(&cfg);
        }
        _ => {
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, targets::haproxy_cfg(port, backends))
                .map_err(|e| StartError::Other(format!("cannot write haproxy.cfg: {e}")))?;
            cmd.arg("-db").arg("-f").arg(&cfg);
        }
    }
    let proc = Proc::spawn(mode.label(), &mut cmd, dir)
        .map_err(|e| StartError::Other(format!("cannot run {}: {e}", bin.display())))?;
    wait_ready(mode, port, proc)
}

/// Waits (up to 20 s) until `GET /bench` through the target answers 200.
fn wait_ready(mode: Mode, port: u16, mut proc: Proc) -> Result<Target, StartError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = proc.exited() {
            return Err(StartError::Rejected(format!(
                "{status}: {}",
                proc.log_tail(5)
            )));
        }
        if http_status(port, BENCH_PATH) == Some(200) {
            return Ok(Target {
                mode,
                port,
                proc,
                peak_rss_kib: 0,
            });
        }
        if Instant::now() > deadline {
            return Err(StartError::Other(format!(
                "no 200 on 127.0.0.1:{port}{BENCH_PATH} within 20 s: {}",
                proc.log_tail(5)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_backends(cli: &Cli, dir: &Path) -> Result<(Proc, Vec<u16>), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let log = dir.join("backends.log");
    let err = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("backend")
        .arg("--count")
        .arg("2")
        .arg("--latency-ms")
        .arg(cli.backend_latency_ms.to_string())
        .arg("--threads")
        .arg(cli.backend_threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err);
    let mut proc = Proc::spawn_with("backends", &mut cmd, log)
        .map_err(|e| format!("cannot start the backends: {e}"))?;
    let stdout = proc
        .child_mut()
        .stdout
        .take()
        .ok_or("backend stdout not captured")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
        format!(
            "the backends did not report their ports: {}",
            proc.log_tail(5)
        )
    })?;
    let ports: Vec<u16> = line
        .strip_prefix("PORTS ")
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if ports.len() != 2 {
        return Err(format!("unexpected backend output `{}`", line.trim()));
    }
    for &p in &ports {
        if http_status(p, BENCH_PATH) != Some(200) {
            return Err(format!("backend 127.0.0.1:{p} does not answer 200"));
        }
    }
    Ok((proc, ports))
}

fn start_redis(bin: &Path, dir: &Path) -> Result<(Proc, u16), String> {
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir);
    let mut proc = Proc::spawn("redis", &mut cmd, dir).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = proc.exited() {
            return Err(format!("redis-server exited ({s}): {}", proc.log_tail(5)));
        }
        if redis_ping(port) {
            println!(
                "loadbench: redis-server on 127.0.0.1:{port} (pid {})",
                proc.pid()
            );
            return Ok((proc, port));
        }
        if Instant::now() > deadline {
            return Err("redis-server did not answer PING within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connect(port: u16) -> Option<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(s)
}

/// The status code of `GET path` on 127.0.0.1:`port` (one connection, bounded by timeouts).
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = connect(port)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut buf[got..]).ok()?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = std::str::from_utf8(&buf[..got]).ok()?;
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The body of `GET path` (read to the end; the server closes the connection).
fn http_body(port: u16, path: &str) -> Option<String> {
    let mut s = connect(port)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

fn redis_ping(port: u16) -> bool {
    let Some(mut s) = connect(port) else {
        return false;
    };
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .map(|n| buf[..n].starts_with(b"+PONG"))
            .unwrap_or(false)
}

/// `total_commands_processed` of redis-server's `INFO stats`.
fn redis_commands(port: u16) -> Option<u64> {
    let mut s = connect(port)?;
    s.write_all(b"INFO stats\r\n").ok()?;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
        {
            if text.contains("total_commands_processed:") && text.ends_with("\r\n") {
                return v.trim().parse().ok();
            }
        }
    }
    None
}

/// An ephemeral 127.0.0.1 port, free at the time of the call.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    here.canonicalize().unwrap_or(here)
}

/// `name` on PATH or in the sbin directories (nginx and haproxy live in /usr/sbin).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds `bin`, installing Debian package `pkg` with apt-get when it is missing (bounded).
fn ensure_tool(bin: &str, pkg: &str) -> Option<PathBuf> {
    if let Some(p) = find_tool(bin) {
        return Some(p);
    }
    println!("loadbench: `{bin}` missing; installing the `{pkg}` package with apt-get");
    let run = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let Ok(mut child) = cmd.stdin(Stdio::null()).spawn() else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return s.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    };
    let _ = run(&["update", "-qq"]);
    run(&["install", "-y", "-qq", "--no-install-recommends", pkg]);
    find_tool(bin)
}

/// The gateway binary: `--gateway-bin`, or the release example (built unless `--no-build`).
fn gateway_binary(cli: &Cli, root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = &cli.gateway_bin {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("--gateway-bin {} does not exist", p.display()))
        };
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let default = target_dir.join("release/examples/gateway");
    if cli.no_build {
        return if default.is_file() {
            Ok(default)
        } else {
            Err(format!(
                "{} is missing (drop --no-build to build it)",
                default.display()
            ))
        };
    }
    println!("loadbench: cargo build --release --example gateway");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--example",
            "gateway",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let stdout = child.stdout.take().ok_or("cargo stdout not captured")?;
    let reader = std::thread::spawn(move || {
        let mut exe = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["reason"] == "compiler-artifact" && v["target"]["name"] == "gateway" {
                    if let Some(e) = v["executable"].as_str() {
                        exe = Some(PathBuf::from(e));
                    }
                }
            }
        }
        exe
    });
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("building the gateway took over 30 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let exe = reader.join().ok().flatten();
    if !status.success() {
        return Err("`cargo build --release --example gateway` failed".into());
    }
    exe.or_else(|| default.is_file().then_some(default))
        .ok_or_else(|| "cargo built the gateway but reported no executable".into())
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    let Some(bin) = find_tool(cmd) else {
        return "?".into();
    };
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
            t.push_str(&String::from_utf8_lossy(&o.stderr));
            tidy_version(t.lines().next().unwrap_or("?"))
        })
        .unwrap_or_else(|| "?".into())
}

/// `nginx version: nginx/1.22.1` → `nginx/1.22.1`; drops HAProxy's date and URL and wrk's
/// copyright.
fn tidy_version(line: &str) -> String {
    let line = line.trim();
    let line = line.strip_prefix("nginx version: ").unwrap_or(line);
    let line = line.split(" Copyright").next().unwrap_or(line);
    let line = line.split(" - ").next().unwrap_or(line);
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["HAProxy", "version", v, ..] => format!("HAProxy {v}"),
        _ => line.trim().to_string(),
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| procfs::parse_status_kib(&t, "MemTotal"))
        .map(|k| format!("{:.0} GiB", k as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "? GiB".into());
    format!("{cores} cores ({model}), {mem}")
}

fn git_commit(root: &Path) -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let sha = out(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let dirty = out(&["status", "--porcelain", "--", "src", "examples", "crates"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{sha} (with uncommitted changes)")
    } else {
        sha
    }
}

#[allow(clippy::too_many_arguments)]
fn section_markdown(
    cli: &Cli,
    plan: &Plan,
    table: &str,
    rate_table: Option<&str>,
    targets_md: &str,
    notes: &[String],
    root: &Path,
    elapsed: f64,
) -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = format!(
        "cargo run --release -p portcullis-loadbench --{}{}",
        if args.is_empty() { "" } else { " " },
        args.join(" ")
    );
    let mut s = String::new();
    s.push_str("## Gateway load benchmark (portcullis-loadbench)\n\n");
    s.push_str(&format!(
        "Measured {} on {}, commit {}; {} · {} · {}.\n\n",
        report::utc_now(),
        machine(),
        git_commit(root),
        first_line("nginx", &["-v"]),
        first_line("haproxy", &["-v"]),
        first_line("wrk", &["--version"]),
    ));
    s.push_str(&format!("```text\n{command}\n```\n\n"));
    s.push_str(&format!(
        "Two test backends (hyper, `200 ok` at once{}, keep-alive) run in their own process; each \
         target proxies `GET {BENCH_PATH}` to both with equivalent settings (round robin except \
         `gateway-p2c`, keep-alive upstream pools, passive failure detection, access logs off \
         (on in `gateway-access-log`), 2 workers/threads; configs in \
         `benches/loadbench/src/targets.rs`). wrk -t{} runs {} s per \
         target and connection count, {} round(s) alternating the targets (A B A B …), after a {} s \
         warm-up each; {:.0} s in total. CPU is utime + stime of the proxy's process tree (nginx \
         master + workers) from `/proc`, divided per 10k requests; peak RSS is the largest sampled \
         VmRSS sum of the tree (or the main process's VmHWM). wrk, the backends and the proxy share \
         the same {} cores, so compare ratios within this run, not absolute numbers across machines.\n\n",
        if cli.backend_latency_ms > 0.0 {
            format!(" after {} ms", cli.backend_latency_ms)
        } else {
            String::new()
        },
        cli.wrk_threads,
        plan.duration,
        plan.rounds,
        plan.warmup,
        elapsed,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    ));
    s.push_str(table);
    if let Some(t) = rate_table {
        s.push_str(&format!(
            "\nAt one constant rate for every target (oha `-q RATE --latency-correction`, \
             -c{}, {} s each, after the rounds; latency from each request's scheduled start, so \
             queueing is counted):\n\n",
            plan.connections.first().copied().unwrap_or(64),
            cli.rate_duration
        ));
        s.push_str(t);
    }
    s.push_str("\nThe issue's targets, at -c64:\n\n");
    s.push_str(targets_md);
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            s.push_str(&format!("- Note: {n}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines_are_tidied() {
        assert_eq!(tidy_version("nginx version: nginx/1.22.1"), "nginx/1.22.1");
        assert_eq!(
            tidy_version("HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"),
            "HAProxy 2.6.12-1+deb12u4"
        );
        assert_eq!(
            tidy_version("wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"),
            "wrk debian/4.1.0-3+b2 [epoll]"
        );
    }

    #[test]
    fn smoke_plan_is_short() {
        let cli = Cli::parse_from(["portcullis-loadbench", "--smoke"]);
        let p = plan(&cli).unwrap();
        assert_eq!(
            (p.duration, p.rounds, p.connections.clone(), p.rate),
            (2, 1, vec![64], RatePlan::Off)
        );
        assert_eq!(p.modes.len(), Mode::ALL.len());
        let cli = Cli::parse_from([
            "portcullis-loadbench",
            "--modes",
            "nginx,gateway,nginx",
            "--connections",
            "64,256",
        ]);
        let p = plan(&cli).unwrap();
        assert_eq!(p.modes, vec![Mode::Gateway, Mode::Nginx]);
        assert_eq!((p.duration, p.rounds, p.connections), (8, 3, vec![64, 256]));
        assert_eq!(p.rate, RatePlan::Auto);
        let rate = |v: &str| RatePlan::parse(Some(v), false);
        assert_eq!(rate("off"), Ok(RatePlan::Off));
        assert_eq!(rate("15000"), Ok(RatePlan::Fixed(15000.0)));
        assert!(rate("fast").unwrap_err().contains("--rate fast"));
        assert!(rate("0").is_err());
    }
}
