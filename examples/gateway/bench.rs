//! `gateway bench`: probes a live API from outside for each watched endpoint's capacity and
//! writes the config back with `capacity` filled in.
//!
//! ```text
//! cargo run --release --example gateway -- bench --config gateway.yml --base-url http://127.0.0.1:8000
//! cargo run --release --example gateway -- bench --config gateway.yml --base-url http://127.0.0.1:8000 --out gateway.probed.yml
//! cargo run --release --example gateway -- bench --config gateway.yml --base-url http://127.0.0.1:8000 --json
//! ```
//!
//! Endpoints are probed one after the other with [`portcullis_probe::Prober`] (the probe
//! settings and `upstream_timeout` come from the config), so at most `max_probe_concurrency`
//! requests are ever in flight. stdout carries only data (the updated YAML, or the `--json`
//! document); progress, the per-endpoint tables, warnings and errors go to stderr.
//!
//! The config is written back by editing its text, so comments and the layout of other fields
//! survive: `capacity` is replaced or inserted inside each endpoint's flow mapping
//! (`/work: {method: POST, capacity: 8}`) or block mapping. When the layout is one the editor
//! does not handle, the file is rewritten from its parsed form instead (comments are lost; a
//! header comment says so). Either way the result is loaded back with
//! [`GatewayConfig::from_yaml`] and [`GatewayConfig::load`] and must equal the original config
//! with the probed capacities, or nothing is written.
//!
//! Exit status: 0 done; 2 bad config or arguments, an endpoint that fails at concurrency 1, or
//! an unreachable backend; 1 the result cannot be written or does not load back; 130 Ctrl-C
//! (nothing written). `docs/bench.md` documents the command for users.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use portcullis::gateway::config::{EndpointConfig, GatewayConfig};
use portcullis_probe::{
    LevelMeasurement, Phase, ProbeBound, ProbeError, ProbeEvent, ProbeReport, ProbeTarget, Prober,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Exit status when Ctrl-C stopped the bench (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

/// The `bench` subcommand's arguments.
#[derive(Debug, Clone)]
pub(crate) struct BenchArgs {
    /// `--config FILE` (required).
    pub(crate) config: Option<PathBuf>,
    /// `--base-url URL` of the live API.
    pub(crate) base_url: String,
    /// `--out FILE`; without it the updated YAML goes to stdout (unless `json`).
    pub(crate) out: Option<PathBuf>,
    /// `--json`: one JSON document on stdout instead of the table.
    pub(crate) json: bool,
}

/// Runs `bench` to completion or until Ctrl-C.
pub(crate) async fn run(args: BenchArgs) -> ExitCode {
    let progress = Progress::new();
    // Dropping the bench future on Ctrl-C drops every in-flight probe request (the prober is
    // cancel-safe), and nothing is written before the probes are done.
    let result = tokio::select! {
        biased;
        _ = interrupted() => None,
        r = bench(&args, &progress) => Some(r),
    };
    match result {
        None => {
            progress.clear();
            eprintln!("gateway bench: interrupted; nothing written");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(f)) => {
            if !f.message.is_empty() {
                eprintln!("gateway bench: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

/// Resolves on Ctrl-C; never when the signal cannot be watched (then Ctrl-C just kills).
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Writes `text` to stdout; a closed stdout (`bench ... | head`) is an error, not a panic.
fn emit(text: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::output(format!("cannot write to stdout: {e}")))
}

/// Why `bench` stopped without success.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Bad input or an endpoint that cannot be probed: exit 2.
    fn input(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    /// The result cannot be written: exit 1.
    fn output(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

/// How one endpoint's probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum EndpointStatus {
    /// A capacity was found.
    Ok,
    /// The probe aborted (concurrency 1 failed, or the target is invalid).
    Failed,
    /// Not probed: an earlier endpoint showed the backend is unreachable.
    Skipped,
}

/// One endpoint in the results.
#[derive(Debug, Clone, Serialize)]
struct EndpointResult {
    /// The watched path (the key under `endpoints`).
    path: String,
    /// `METHOD url` probed.
    target: String,
    status: EndpointStatus,
    /// The capacity found (`max_concurrency`), when `status` is `ok`.
    capacity: Option<usize>,
    /// The `capacity` the config had before.
    previous_capacity: Option<usize>,
    /// The passing level with the best requests/s.
    best_rps_level: Option<usize>,
    /// Requests/s at `best_rps_level`.
    best_rps: Option<f64>,
    /// What bound `capacity`: `errors`, `latency` or `max_concurrency`.
    bound: Option<ProbeBound>,
    /// `true` when latency, not errors, bound the capacity.
    latency_bound: bool,
    /// Human warnings (latency-bound result, result capped by `max_probe_concurrency`).
    warnings: Vec<String>,
    /// Why the probe failed or was skipped.
    error: Option<String>,
    /// Set when concurrency 1 saw nothing but connection errors: the backend is down.
    #[serde(skip)]
    unreachable: Option<String>,
    /// Outcome histogram of concurrency 1 when it failed (`{"503": 2}`).
    first_level_outcomes: Option<BTreeMap<String, usize>>,
    /// The full probe report (every level measured), when `status` is `ok`.
    report: Option<ProbeReport>,
}

/// The `--json` document.
#[derive(Debug, Serialize)]
struct BenchOutput<'a> {
    config: String,
    base_url: &'a str,
    /// `true` when every endpoint got a capacity.
    ok: bool,
    endpoints: &'a [EndpointResult],
    /// Where the config was written (`--out`), if it was.
    written: Option<String>,
    /// `edited` (comments and layout kept) or `rewritten` (clean rewrite), once written.
    yaml_layout: Option<YamlLayout>,
    /// The updated YAML when it was not written to a file.
    yaml: Option<&'a str>,
    /// Requests sent over every endpoint.
    total_requests: usize,
    /// Wall time of all the probes in seconds.
    elapsed_secs: f64,
}

/// How the updated YAML was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum YamlLayout {
    /// The original text with `capacity` inserted or replaced: comments kept.
    Edited,
    /// Re-serialised from the parsed document: comments lost.
    Rewritten,
}

async fn bench(args: &BenchArgs, progress: &Progress) -> Result<(), Failure> {
    let path = args
        .config
        .as_deref()
        .ok_or_else(|| Failure::input("bench needs the config to fill in: pass --config FILE"))?;
    let config = GatewayConfig::load(path).map_err(|e| Failure::input(e.to_string()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read the config {}: {e}", path.display())))?;
    if config.admission.endpoints.is_empty() {
        return Err(Failure::input(format!(
            "{} has no `endpoints`: nothing to probe (add e.g. `endpoints: {{/work: {{method: POST}}}}`)",
            path.display()
        )));
    }
    check_base_url(&args.base_url)?;

    let prober = Prober::new(config.probe.clone()).with_request_timeout(config.upstream_timeout());
    let started = std::time::Instant::now();
    let results = probe_all(&prober, &config, &args.base_url, progress).await;
    let elapsed_secs = started.elapsed().as_secs_f64();
    progress.done();

    let all_ok = results.iter().all(|r| r.status == EndpointStatus::Ok);
    let total_requests = results
        .iter()
        .filter_map(|r| r.report.as_ref())
        .map(|r| r.total_requests)
        .sum();
    if args.json {
        for r in results.iter().filter(|r| r.status != EndpointStatus::Ok) {
            eprintln!(
                "error: {}: {}",
                r.path,
                r.error.as_deref().unwrap_or("not probed")
            );
        }
    } else {
        eprint!("{}", tables(&results, &config));
    }

    // Only a complete result is written: a half-probed config is worse than none.
    let updated = if all_ok {
        let caps = capacities(&results);
        let (yaml, layout) = updated_yaml(&text, &config, &caps, path)?;
        if let Some(out) = &args.out {
            write_verified(out, &yaml, &with_capacities(&config, &caps))?;
        }
        Some((yaml, layout))
    } else {
        None
    };
    let written_to = updated
        .as_ref()
        .and(args.out.as_ref())
        .map(|out| out.display().to_string());

    if args.json {
        let doc = BenchOutput {
            config: path.display().to_string(),
            base_url: &args.base_url,
            ok: all_ok,
            endpoints: &results,
            written: written_to,
            yaml_layout: updated.as_ref().map(|(_, l)| *l),
            yaml: match (&updated, &args.out) {
                (Some((y, _)), None) => Some(y.as_str()),
                _ => None,
            },
            total_requests,
            elapsed_secs,
        };
        let encoded = serde_json::to_string_pretty(&doc)
            .map_err(|e| Failure::output(format!("cannot encode the results: {e}")))?;
        emit(&format!("{encoded}\n"))?;
    } else if let Some((yaml, layout)) = &updated {
        if *layout == YamlLayout::Rewritten {
            eprintln!(
                "note: the config's layout could not be edited in place, so it was rewritten \
                 cleanly (its comments were not kept)"
            );
        }
        match &written_to {
            Some(out) => eprintln!("capacities written to {out}"),
            None => emit(yaml)?,
        }
    }

    if all_ok {
        return Ok(());
    }
    let failed: Vec<&EndpointResult> = results
        .iter()
        .filter(|r| r.status != EndpointStatus::Ok)
        .collect();
    let message = match unreachable_reason(&results) {
        Some(why) => format!("{why} Nothing written."),
        None => format!(
            "no capacity for {}; nothing written",
            failed
                .iter()
                .map(|r| r.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Err(Failure::input(message))
}

/// The "backend unreachable" reason when every endpoint failed or was skipped for it.
fn unreachable_reason(results: &[EndpointResult]) -> Option<String> {
    let reason = results.iter().find_map(|r| r.unreachable.clone())?;
    results
        .iter()
        .all(|r| r.status == EndpointStatus::Skipped || r.unreachable.is_some())
        .then_some(reason)
}

/// `--base-url` must be an absolute `http://` URL.
fn check_base_url(base_url: &str) -> Result<(), Failure> {
    let bad = |why: &str| {
        Failure::input(format!(
            "--base-url `{base_url}` {why}: pass the live API's URL, e.g. http://127.0.0.1:8000"
        ))
    };
    let uri: http::Uri = base_url.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return Err(bad("is not http:// (only plain HTTP can be probed)")),
        None => return Err(bad("has no scheme")),
    }
    if uri.authority().is_none() {
        return Err(bad("has no host"));
    }
    Ok(())
}

/// The capacities of the endpoints that got one.
fn capacities(results: &[EndpointResult]) -> BTreeMap<String, i64> {
    results
        .iter()
        .filter_map(|r| {
            let c = r.capacity?;
            Some((r.path.clone(), i64::try_from(c).unwrap_or(i64::MAX)))
        })
        .collect()
}

/// `config` with `capacity` set per endpoint from `caps`.
fn with_capacities(config: &GatewayConfig, caps: &BTreeMap<String, i64>) -> GatewayConfig {
    let mut expected = config.clone();
    for (path, cap) in caps {
        if let Some(ep) = expected.admission.endpoints.get_mut(path) {
            ep.capacity = usize::try_from(*cap).ok();
        }
    }
    expected
}

/// Probes every endpoint, one after the other.
async fn probe_all(
    prober: &Prober,
    config: &GatewayConfig,
    base_url: &str,
    progress: &Progress,
) -> Vec<EndpointResult> {
    let targets: Vec<(String, &EndpointConfig, ProbeTarget)> = config
        .admission
        .endpoints
        .iter()
        .map(|(path, ep)| (path.clone(), ep, target_for(base_url, path, ep)))
        .collect();
    progress.add_endpoints(targets.iter().map(|(p, _, _)| p.as_str()));

    let mut results = Vec::with_capacity(targets.len());
    let mut unreachable: Option<String> = None;
    for (i, (path, ep, target)) in targets.iter().enumerate() {
        let mut result = EndpointResult {
            path: path.clone(),
            target: target.to_string(),
            status: EndpointStatus::Skipped,
            capacity: None,
            previous_capacity: ep.capacity,
            best_rps_level: None,
            best_rps: None,
            bound: None,
            latency_bound: false,
            warnings: Vec::new(),
            error: None,
            unreachable: None,
            first_level_outcomes: None,
            report: None,
        };
        if let Some(why) = &unreachable {
            let msg = format!("not probed: {why}");
            progress.skipped(i, &msg);
            result.error = Some(msg);
            results.push(result);
            continue;
        }
        progress.started(i, target);
        let mut last: Option<String> = None;
        let probed = prober
            .probe_with_progress(target, |ev| progress.event(i, path, ev, &mut last))
            .await;
        match probed {
            Ok(report) => {
                result.status = EndpointStatus::Ok;
                result.capacity = Some(report.max_concurrency);
                result.best_rps_level = Some(report.best_rps_level);
                result.best_rps = Some(report.best_rps);
                result.bound = Some(report.bound);
                result.latency_bound = report.latency_bound();
                result.warnings = warnings(&report, config);
                progress.finished(i, &report);
                result.report = Some(report);
            }
            Err(e) => {
                let outcomes = e.measurement().map(|m| m.outcomes.clone());
                let connect_only = outcomes
                    .as_ref()
                    .is_some_and(|o| !o.is_empty() && o.keys().all(|k| k == "connect error"));
                let msg = if connect_only {
                    let why = format!("cannot connect to {base_url}: is the backend running?");
                    unreachable = Some(why.clone());
                    result.unreachable = Some(why.clone());
                    format!("{why} ({e})")
                } else {
                    first_level_message(&e)
                };
                result.status = EndpointStatus::Failed;
                result.first_level_outcomes = outcomes;
                progress.failed(i, &msg);
                result.error = Some(msg);
            }
        }
        results.push(result);
    }
    results
}

/// The probe target of one endpoint entry.
fn target_for(base_url: &str, path: &str, ep: &EndpointConfig) -> ProbeTarget {
    // A prefix pattern is probed at its `probe_path`, or at its prefix when it has none.
    let probed = ep
        .probe_path(path)
        .unwrap_or_else(|| path.trim_end_matches("/*"));
    let mut target = ProbeTarget::new(base_url, probed);
    if let Some(m) = &ep.method {
        target = target.with_method(m.clone());
    }
    for (name, value) in ep.headers.iter().flatten() {
        target = target.with_header(name.clone(), value.clone());
    }
    if let Some(body) = &ep.body {
        target = target.with_json_body(body.clone());
    }
    target
}

/// A failed probe, with a hint for the usual causes.
fn first_level_message(e: &ProbeError) -> String {
    let Some(m) = e.measurement() else {
        return e.to_string();
    };
    let hint = if m.outcomes.keys().any(|k| k == "404" || k == "405") {
        " Check the endpoint's path and `method` in the config."
    } else if m
        .outcomes
        .keys()
        .any(|k| k == "400" || k == "415" || k == "422")
    {
        " Check the endpoint's `body` and `headers` in the config."
    } else if m.outcomes.keys().any(|k| k == "timeout") {
        " Requests time out at `upstream_timeout`; is the backend overloaded or hung?"
    } else {
        ""
    };
    format!("{e}{hint}")
}

/// Warnings worth a user's attention for one report.
fn warnings(report: &ProbeReport, config: &GatewayConfig) -> Vec<String> {
    let mut w = Vec::new();
    match report.bound {
        ProbeBound::Latency => {
            let above = report
                .levels
                .iter()
                .filter(|m| !m.passed && m.level > report.max_concurrency)
                .min_by_key(|m| m.level);
            let detail = above.map_or(String::new(), |m| {
                format!(
                    " (level {}: p99 {:.1} ms, errors {:.1}%)",
                    m.level,
                    m.p99_ms,
                    m.error_rate * 100.0
                )
            });
            w.push(format!(
                "latency, not errors, bound the capacity: past {} the endpoint still answered but \
                 its p99 exceeded latency_threshold_ms = {}{detail}; raise latency_threshold_ms \
                 if slower answers are acceptable",
                report.max_concurrency, config.probe.latency_threshold_ms
            ));
        }
        ProbeBound::MaxConcurrency => w.push(format!(
            "every level passed up to max_probe_concurrency = {}: the endpoint may take more; \
             raise max_probe_concurrency to probe further",
            config.probe.max_probe_concurrency
        )),
        ProbeBound::Errors => {}
    }
    w
}

/// The end-of-run tables: each endpoint's levels, its summary and warnings, then an overview.
fn tables(results: &[EndpointResult], config: &GatewayConfig) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for r in results {
        let _ = writeln!(s);
        match &r.report {
            Some(report) => {
                let _ = write!(s, "{}", report.table());
                for w in &r.warnings {
                    let _ = writeln!(s, "warning: {}: {w}", r.path);
                }
            }
            None => {
                let _ = writeln!(s, "{}", r.target);
                let _ = writeln!(
                    s,
                    "error: {}: {}",
                    r.path,
                    r.error.as_deref().unwrap_or("not probed")
                );
            }
        }
    }
    let _ = writeln!(s);
    let width = results
        .iter()
        .map(|r| r.path.len())
        .max()
        .unwrap_or(0)
        .max("endpoint".len());
    let _ = writeln!(
        s,
        "{:<width$}  {:>8}  {:>8}  {:>10}  {:>8}  {:>10}  {:>8}",
        "endpoint", "capacity", "was", "best req/s", "at level", "p99 at cap", "bound"
    );
    for r in results {
        let cap = r.capacity.map_or("-".into(), |c| c.to_string());
        let was = r.previous_capacity.map_or("-".into(), |c| c.to_string());
        let best = r.best_rps.map_or("-".into(), |b| format!("{b:.1}"));
        let at = r.best_rps_level.map_or("-".into(), |l| l.to_string());
        let p99 = r
            .report
            .as_ref()
            .and_then(|rep| level_at(rep, rep.max_concurrency))
            .map_or("-".into(), |m| format!("{:.1} ms", m.p99_ms));
        let bound = match (r.status, r.bound) {
            (EndpointStatus::Ok, Some(ProbeBound::Errors)) => "errors",
            (EndpointStatus::Ok, Some(ProbeBound::Latency)) => "LATENCY",
            (EndpointStatus::Ok, _) => "max",
            (EndpointStatus::Failed, _) => "FAILED",
            (EndpointStatus::Skipped, _) => "skipped",
        };
        let _ = writeln!(
            s,
            "{:<width$}  {cap:>8}  {was:>8}  {best:>10}  {at:>8}  {p99:>10}  {bound:>8}",
            r.path
        );
    }
    let _ = writeln!(
        s,
        "(thresholds: errors {:.1}%, p99 {} ms; max_probe_concurrency {}; upstream_timeout {} s)",
        config.probe.error_threshold * 100.0,
        config.probe.latency_threshold_ms,
        config.probe.max_probe_concurrency,
        config.upstream_timeout.as_secs_f64()
    );
    s
}

/// The last passing measurement of `level`.
fn level_at(report: &ProbeReport, level: usize) -> Option<&LevelMeasurement> {
    report
        .levels
        .iter()
        .rev()
        .find(|m| m.passed && m.level == level)
}

// ---------------------------------------------------------------------------------------------
// Progress

/// One progress bar per endpoint on a terminal; plain lines on stderr otherwise.
#[derive(Debug)]
struct Progress {
    /// `None` when stderr is not a terminal.
    multi: Option<MultiProgress>,
    bars: std::sync::Mutex<Vec<ProgressBar>>,
}

impl Progress {
    fn new() -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            multi,
            bars: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn bar(&self, i: usize) -> Option<ProgressBar> {
        self.multi.as_ref()?;
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        bars.get(i).cloned()
    }

    fn add_endpoints<'a>(&self, paths: impl Iterator<Item = &'a str>) {
        let Some(multi) = &self.multi else {
            return;
        };
        let style = ProgressStyle::with_template(
            "{spinner:.cyan} {prefix:.bold} [{elapsed:>4}] {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        let paths: Vec<&str> = paths.collect();
        let width = paths.iter().map(|p| p.len()).max().unwrap_or(0);
        for p in paths {
            let bar = multi.add(
                ProgressBar::new_spinner()
                    .with_style(style.clone())
                    .with_prefix(format!("{p:<width$}"))
                    .with_message("waiting"),
            );
            bar.tick();
            bars.push(bar);
        }
    }

    fn started(&self, i: usize, target: &ProbeTarget) {
        match self.bar(i) {
            Some(bar) => {
                bar.reset_elapsed();
                bar.enable_steady_tick(Duration::from_millis(120));
                bar.set_message(format!("probing {target}"));
            }
            None => eprintln!("probing {target}"),
        }
    }

    fn event(&self, i: usize, path: &str, ev: &ProbeEvent, last: &mut Option<String>) {
        match ev {
            ProbeEvent::LevelStarted {
                level,
                phase,
                planned,
            } => {
                if let Some(bar) = self.bar(i) {
                    let prev = last
                        .as_deref()
                        .map_or(String::new(), |l| format!(" | last: {l}"));
                    bar.set_message(format!(
                        "level {level} ({}, {planned} requests){prev}",
                        phase_name(*phase)
                    ));
                }
            }
            ProbeEvent::LevelFinished(m) => {
                let summary = format!(
                    "level {}: {:.1} req/s, p99 {:.1} ms, errors {:.1}% {}",
                    m.level,
                    m.rps,
                    m.p99_ms,
                    m.error_rate * 100.0,
                    if m.passed { "pass" } else { "FAIL" }
                );
                if self.multi.is_none() {
                    eprintln!(
                        "  {path}: level {:>5} {:<9} {:>5} requests  {:>9.1} req/s  p99 {:>9.1} ms  errors {:>5.1}%  {}",
                        m.level,
                        phase_name(m.phase),
                        m.requests,
                        m.rps,
                        m.p99_ms,
                        m.error_rate * 100.0,
                        if m.passed { "pass" } else { "FAIL" }
                    );
                }
                *last = Some(summary);
            }
        }
    }

    fn finished(&self, i: usize, report: &ProbeReport) {
        let msg = format!(
            "capacity {} (bound by {}), best {:.1} req/s at {}, {} requests in {:.1} s",
            report.max_concurrency,
            bound_name(report.bound),
            report.best_rps,
            report.best_rps_level,
            report.total_requests,
            report.elapsed_secs
        );
        match self.bar(i) {
            Some(bar) => bar.finish_with_message(msg),
            None => eprintln!("  -> {msg}"),
        }
    }

    fn failed(&self, i: usize, msg: &str) {
        match self.bar(i) {
            Some(bar) => bar.abandon_with_message(format!("FAILED: {msg}")),
            None => eprintln!("  -> FAILED: {msg}"),
        }
    }

    fn skipped(&self, i: usize, msg: &str) {
        match self.bar(i) {
            Some(bar) => bar.abandon_with_message(msg.to_string()),
            None => eprintln!("skipped: {msg}"),
        }
    }

    /// Stops every spinner (leaving the final lines on screen).
    fn done(&self) {
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for bar in bars.iter().filter(|b| !b.is_finished()) {
            bar.abandon();
        }
    }

    /// Removes the bars from the screen (Ctrl-C).
    fn clear(&self) {
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for bar in bars.iter() {
            bar.finish_and_clear();
        }
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Doubling => "doubling",
        Phase::Bisecting => "bisecting",
    }
}

fn bound_name(bound: ProbeBound) -> &'static str {
    match bound {
        ProbeBound::Errors => "errors",
        ProbeBound::Latency => "latency",
        ProbeBound::MaxConcurrency => "max_probe_concurrency",
    }
}

// ---------------------------------------------------------------------------------------------
// Writing the config back

/// The config text with `caps` filled in, verified to load back as `config` with those
/// capacities: the edited text when possible, else a clean rewrite.
fn updated_yaml(
    text: &str,
    config: &GatewayConfig,
    caps: &BTreeMap<String, i64>,
    file: &Path,
) -> Result<(String, YamlLayout), Failure> {
    let expected = with_capacities(config, caps);
    let loads_back = |t: &str| GatewayConfig::from_yaml(t, file).is_ok_and(|c| c == expected);
    if let Some(edited) = edit_capacities(text, caps) {
        if loads_back(&edited) {
            return Ok((edited, YamlLayout::Edited));
        }
    }
    if let Some(rewritten) = rewrite_capacities(text, caps) {
        if loads_back(&rewritten) {
            return Ok((rewritten, YamlLayout::Rewritten));
        }
    }
    Err(Failure::output(format!(
        "cannot produce a config that loads back with the probed capacities ({}); nothing written",
        caps.iter()
            .map(|(p, c)| format!("{p}: {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Writes `yaml` to `out` through a temporary file next to it, loads it back with
/// [`GatewayConfig::load`] and renames it into place only when it equals `expected`.
fn write_verified(out: &Path, yaml: &str, expected: &GatewayConfig) -> Result<(), Failure> {
    let name = out
        .file_name()
        .ok_or_else(|| Failure::input(format!("--out `{}` does not name a file", out.display())))?;
    let tmp = out.with_file_name(format!(
        ".{}.bench-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        std::fs::write(&tmp, yaml)
            .map_err(|e| Failure::output(format!("cannot write {}: {e}", out.display())))?;
        match GatewayConfig::load(&tmp) {
            Ok(c) if &c == expected => {}
            Ok(_) => {
                return Err(Failure::output(format!(
                    "{} would not load back with the probed capacities; nothing written",
                    out.display()
                )))
            }
            Err(e) => {
                return Err(Failure::output(format!(
                    "{} would not load back ({e}); nothing written",
                    out.display()
                )))
            }
        }
        std::fs::rename(&tmp, out)
            .map_err(|e| Failure::output(format!("cannot write {}: {e}", out.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Clean rewrite: the parsed document with `capacity` set, serialised again.
fn rewrite_capacities(text: &str, caps: &BTreeMap<String, i64>) -> Option<String> {
    use serde_yaml_ng::{Mapping, Value};
    let mut doc: Value = serde_yaml_ng::from_str(text).ok()?;
    let endpoints = doc.get_mut("endpoints")?.as_mapping_mut()?;
    for (path, cap) in caps {
        let ep = endpoints.get_mut(path.as_str())?;
        if ep.is_null() {
            *ep = Value::Mapping(Mapping::new());
        }
        ep.as_mapping_mut()?
            .insert(Value::from("capacity"), Value::from(*cap));
    }
    let body = serde_yaml_ng::to_string(&doc).ok()?;
    Some(format!(
        "# Written by `gateway bench` (a clean rewrite: the original comments could not be kept).\n{body}"
    ))
}

/// One line of YAML text: its content (no line break) and its line break.
#[derive(Debug, Clone)]
struct Line {
    content: String,
    eol: String,
}

fn split_lines(text: &str) -> Vec<Line> {
    text.split_inclusive('\n')
        .map(|l| {
            let (content, eol) = if let Some(c) = l.strip_suffix("\r\n") {
                (c, "\r\n")
            } else if let Some(c) = l.strip_suffix('\n') {
                (c, "\n")
            } else {
                (l, "")
            };
            Line {
                content: content.to_string(),
                eol: eol.to_string(),
            }
        })
        .collect()
}

/// A blank or comment-only line (ignored by the structure scan).
fn is_filler(s: &str) -> bool {
    let t = s.trim_start_matches([' ', '\t']);
    t.is_empty() || t.starts_with('#')
}

/// Leading spaces; `None` when the indentation contains a tab (not valid YAML indentation).
fn indent_of(s: &str) -> Option<usize> {
    let n = s.len() - s.trim_start_matches(' ').len();
    if s[n..].starts_with('\t') {
        None
    } else {
        Some(n)
    }
}

/// The characters of a YAML line that are outside quoted scalars, each with its byte offset
/// and the character before it. A quote opens a quoted scalar only where a token starts.
#[derive(Debug)]
struct Unquoted<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    prev: Option<char>,
    /// The quote of the scalar being read, if any (still set at the end: unterminated).
    quote: Option<char>,
}

impl<'a> Unquoted<'a> {
    /// Scans `s`; `prev` is the character before it (`None` at a line start).
    fn new(s: &'a str, prev: Option<char>) -> Self {
        Self {
            chars: s.char_indices().peekable(),
            prev,
            quote: None,
        }
    }
}

impl Iterator for Unquoted<'_> {
    type Item = (usize, char, Option<char>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (i, c) = self.chars.next()?;
            let prev = self.prev.replace(c);
            match self.quote {
                Some('"') => {
                    if c == '\\' {
                        self.chars.next();
                    } else if c == '"' {
                        self.quote = None;
                    }
                }
                Some(_) => {
                    if c == '\'' {
                        if self.chars.peek().is_some_and(|(_, n)| *n == '\'') {
                            self.chars.next();
                        } else {
                            self.quote = None;
                        }
                    }
                }
                None => {
                    let token_start = prev.is_none_or(|p| p.is_whitespace() || "[{,:".contains(p));
                    if (c == '"' || c == '\'') && token_start {
                        self.quote = Some(c);
                    } else {
                        return Some((i, c, prev));
                    }
                }
            }
        }
    }
}

/// Splits `s` into its code and a trailing comment (with the whitespace before it): the first
/// `#` outside quotes that starts the line or follows whitespace.
fn split_comment(s: &str) -> (&str, &str) {
    for (i, c, prev) in Unquoted::new(s, None) {
        if c == '#' && prev.is_none_or(char::is_whitespace) {
            let code = s[..i].trim_end_matches([' ', '\t']);
            return (code, &s[code.len()..]);
        }
    }
    (s, "")
}

/// Parses `key:` at the start of `code` (no leading spaces); returns the key and the byte
/// offset just after the colon. `None` for anything but a plain or quoted scalar key.
fn parse_key(code: &str) -> Option<(String, usize)> {
    let (key, rest_at) = if code.starts_with('"') || code.starts_with('\'') {
        let q = code.chars().next()?;
        let mut end = None;
        let mut iter = code.char_indices().skip(1).peekable();
        while let Some((i, c)) = iter.next() {
            if q == '"' && c == '\\' {
                iter.next();
            } else if c == q {
                if q == '\'' && iter.peek().is_some_and(|(_, n)| *n == '\'') {
                    iter.next();
                    continue;
                }
                end = Some(i);
                break;
            }
        }
        let end = end?;
        let key: String = serde_yaml_ng::from_str(&code[..=end]).ok()?;
        (key, end + 1)
    } else {
        if code.starts_with(|c: char| "?-&*![]{}|>%@`#,".contains(c)) {
            return None;
        }
        let bytes = code.as_bytes();
        let colon = (0..bytes.len()).find(|&i| {
            bytes[i] == b':' && (i + 1 == bytes.len() || matches!(bytes[i + 1], b' ' | b'\t'))
        })?;
        (code[..colon].trim_end().to_string(), colon)
    };
    let rest = &code[rest_at..];
    let spaces = rest.len() - rest.trim_start_matches([' ', '\t']).len();
    let after = &rest[spaces..];
    let tail = after.strip_prefix(':')?;
    let quoted = code.starts_with(['"', '\'']);
    if !(quoted || tail.is_empty() || tail.starts_with([' ', '\t'])) {
        return None;
    }
    Some((key, rest_at + spaces + 1))
}

/// Byte ranges of the top-level entries of a flow collection's inside (between commas at
/// depth 0, outside quotes).
fn flow_entries(inner: &str) -> Option<Vec<(usize, usize)>> {
    let mut entries = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut scan = Unquoted::new(inner, Some('{'));
    for (i, c, _) in scan.by_ref() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                entries.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
    }
    if scan.quote.is_some() || depth != 0 {
        return None;
    }
    entries.push((start, inner.len()));
    Some(entries)
}

/// The offset of the `}` closing the flow mapping opened at `open` in `s`, on the same line.
fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c, _) in Unquoted::new(&s[open + 1..], Some('{')) {
        match c {
            '}' if depth == 0 => return Some(open + 1 + i),
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.checked_sub(1)?,
            _ => {}
        }
    }
    None
}

/// Replaces or inserts `capacity` inside a flow mapping's inside (`method: POST, capacity: 8`).
fn edit_flow_mapping(inner: &str, cap: i64) -> Option<String> {
    let entries = flow_entries(inner)?;
    let mut found = None;
    let mut method_end = None;
    let mut first_start = None;
    for &(start, end) in &entries {
        let entry = &inner[start..end];
        if entry.trim().is_empty() {
            continue;
        }
        let lead = entry.len() - entry.trim_start().len();
        first_start.get_or_insert(start + lead);
        if let Some((key, after)) = parse_key(entry.trim_start()) {
            let after = after + lead;
            if key == "capacity" {
                if found.is_some() {
                    return None;
                }
                found = Some((start + after, end));
            } else if key == "method" {
                method_end = Some(start + entry.trim_end().len());
            }
        }
    }
    let mut out = inner.to_string();
    if let Some((value_start, value_end)) = found {
        let value = &inner[value_start..value_end];
        let trailing = &value[value.trim_end().len()..];
        if value.trim().is_empty() {
            return None;
        }
        out.replace_range(value_start..value_end, &format!(" {cap}{trailing}"));
    } else if let Some(at) = method_end {
        out.insert_str(at, &format!(", capacity: {cap}"));
    } else if let Some(at) = first_start {
        out.insert_str(at, &format!("capacity: {cap}, "));
    } else if inner.trim().is_empty() {
        out = format!("capacity: {cap}");
    } else {
        return None;
    }
    Some(out)
}

/// Fills in `capacity` per endpoint by editing the YAML text, keeping everything else as it
/// was. `None` when the layout is not one handled here (the caller then rewrites cleanly);
/// the caller also verifies that the result loads back as intended.
///
/// Handled: a block-mapping top level with a block-mapping `endpoints:` whose entries are flow
/// mappings on one line (`/work: {method: POST}`), block mappings, or empty/null values.
fn edit_capacities(text: &str, caps: &BTreeMap<String, i64>) -> Option<String> {
    let mut lines = split_lines(text);
    let content_at = |lines: &[Line], i: usize| -> Option<(usize, String)> {
        let c = &lines[i].content;
        if is_filler(c) {
            None
        } else {
            Some((indent_of(c).unwrap_or(usize::MAX), c.clone()))
        }
    };

    // The top-level `endpoints:` key.
    let mut endpoints_line = None;
    for (i, line) in lines.iter().enumerate() {
        let c = &line.content;
        if is_filler(c) {
            continue;
        }
        if indent_of(c)? != 0 {
            continue;
        }
        let (code, _) = split_comment(c);
        if let Some((key, after)) = parse_key(code) {
            if key == "endpoints" {
                if endpoints_line.is_some() || !code[after..].trim().is_empty() {
                    return None;
                }
                endpoints_line = Some(i);
            }
        }
    }
    let start = endpoints_line? + 1;
    let end = (start..lines.len())
        .find(|&i| content_at(&lines, i).is_some_and(|(ind, _)| ind == 0))
        .unwrap_or(lines.len());
    let child_indent = (start..end).find_map(|i| content_at(&lines, i))?.0;
    if child_indent == usize::MAX {
        return None;
    }

    // Edits: replaced line contents, and lines inserted after a given line.
    let mut replaced: BTreeMap<usize, String> = BTreeMap::new();
    let mut inserted: BTreeMap<usize, String> = BTreeMap::new();
    let mut done: BTreeMap<String, usize> = BTreeMap::new();
    let mut i = start;
    while i < end {
        let Some((ind, content)) = content_at(&lines, i) else {
            i += 1;
            continue;
        };
        if ind != child_indent {
            // Deeper lines belong to the previous entry and are skipped below.
            return None;
        }
        let body_end = (i + 1..end)
            .find(|&j| content_at(&lines, j).is_some_and(|(d, _)| d <= child_indent))
            .unwrap_or(end);
        let (code, comment) = split_comment(&content[ind..]);
        let (key, after) = parse_key(code)?;
        if let Some(&cap) = caps.get(&key) {
            *done.entry(key.clone()).or_default() += 1;
            let value = code[after..].trim();
            let has_body = (i + 1..body_end).any(|j| content_at(&lines, j).is_some());
            let head = &content[..ind];
            if value.starts_with('{') {
                if has_body {
                    return None;
                }
                let open = after + code[after..].find('{')?;
                let close = matching_brace(code, open)?;
                if !code[close + 1..].trim().is_empty() {
                    return None;
                }
                let inner = edit_flow_mapping(&code[open + 1..close], cap)?;
                replaced.insert(
                    i,
                    format!("{head}{}{inner}{}{comment}", &code[..=open], &code[close..]),
                );
            } else if value.is_empty() && has_body {
                edit_block_mapping(&lines, i, body_end, cap, &mut replaced, &mut inserted)?;
            } else if value.is_empty() || matches!(value, "~" | "null" | "Null" | "NULL") {
                if has_body {
                    return None;
                }
                replaced.insert(
                    i,
                    format!("{head}{} {{capacity: {cap}}}{comment}", &code[..after]),
                );
            } else {
                return None;
            }
        }
        i = body_end;
    }
    if caps.keys().any(|k| done.get(k) != Some(&1)) {
        return None;
    }

    for (i, content) in replaced {
        lines[i].content = content;
    }
    let mut out = String::with_capacity(text.len() + 32 * caps.len());
    for (i, line) in lines.iter().enumerate() {
        out.push_str(&line.content);
        match inserted.get(&i) {
            Some(extra) => {
                let eol = if line.eol.is_empty() { "\n" } else { &line.eol };
                out.push_str(eol);
                out.push_str(extra);
                out.push_str(&line.eol);
            }
            None => out.push_str(&line.eol),
        }
    }
    Some(out)
}

/// Replaces or inserts `capacity:` in the block mapping of the entry at line `key_line`, whose
/// body is the lines up to `body_end`.
fn edit_block_mapping(
    lines: &[Line],
    key_line: usize,
    body_end: usize,
    cap: i64,
    replaced: &mut BTreeMap<usize, String>,
    inserted: &mut BTreeMap<usize, String>,
) -> Option<()> {
    let body: Vec<usize> = (key_line + 1..body_end)
        .filter(|&j| !is_filler(&lines[j].content))
        .collect();
    let first = *body.first()?;
    let indent = indent_of(&lines[first].content)?;
    let mut capacity_line = None;
    let mut method_line = None;
    for (n, &j) in body.iter().enumerate() {
        let content = &lines[j].content;
        let ind = indent_of(content)?;
        if ind < indent {
            return None;
        }
        if ind > indent {
            continue;
        }
        let (code, comment) = split_comment(&content[ind..]);
        let (key, after) = parse_key(code)?;
        let value = code[after..].trim();
        let continues = body
            .get(n + 1)
            .is_some_and(|&k| indent_of(&lines[k].content).is_none_or(|d| d > indent));
        if key == "capacity" {
            if capacity_line.is_some() || value.is_empty() || continues {
                return None;
            }
            capacity_line = Some((
                j,
                format!("{}{} {cap}{comment}", &content[..ind], &code[..after]),
            ));
        } else if key == "method" && !value.is_empty() && !continues {
            method_line = Some(j);
        }
    }
    match capacity_line {
        Some((j, line)) => {
            replaced.insert(j, line);
        }
        None => {
            let at = method_line.unwrap_or(key_line);
            inserted.insert(at, format!("{}capacity: {cap}", " ".repeat(indent)));
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(p, c)| (p.to_string(), *c)).collect()
    }

    fn load(text: &str) -> GatewayConfig {
        GatewayConfig::from_yaml(text, Path::new("t.yml")).unwrap()
    }

    #[test]
    fn flow_mappings_are_edited_in_place() {
        let text = "# top\nendpoints:\n  /work: {method: POST, queue_timeout: 5}  # the work\n  \"/b\": {capacity: 3}\n  /c: {}\n  /d: { headers: {x: \"a,b}\"} }\nlisten: 127.0.0.1:1 # end\n";
        let out = edit_capacities(
            text,
            &caps(&[("/work", 8), ("/b", 9), ("/c", 1), ("/d", 2)]),
        )
        .unwrap();
        assert_eq!(
            out,
            "# top\nendpoints:\n  /work: {method: POST, capacity: 8, queue_timeout: 5}  # the work\n  \"/b\": {capacity: 9}\n  /c: {capacity: 1}\n  /d: { capacity: 2, headers: {x: \"a,b}\"} }\nlisten: 127.0.0.1:1 # end\n"
        );
        let cfg = load(&out);
        assert_eq!(
            cfg.admission.endpoints["/d"].headers.as_ref().unwrap()["x"],
            "a,b}"
        );
    }

    #[test]
    fn block_mappings_and_nulls_are_edited_in_place() {
        let text = "endpoints:\r\n  /a:\r\n    # comment\r\n    method: POST\r\n    body:\r\n      x: 1\r\n  /b:\r\n    capacity: 4   # old\r\n    queue_timeout: 2\r\n  /c:\r\n  /d: ~\r\nqueue_timeout: 3";
        let out =
            edit_capacities(text, &caps(&[("/a", 5), ("/b", 6), ("/c", 7), ("/d", 8)])).unwrap();
        assert_eq!(
            out,
            "endpoints:\r\n  /a:\r\n    # comment\r\n    method: POST\r\n    capacity: 5\r\n    body:\r\n      x: 1\r\n  /b:\r\n    capacity: 6   # old\r\n    queue_timeout: 2\r\n  /c: {capacity: 7}\r\n  /d: {capacity: 8}\r\nqueue_timeout: 3"
        );
        let cfg = load(&out);
        assert_eq!(cfg.admission.endpoints["/a"].capacity, Some(5));
        assert_eq!(cfg.admission.endpoints["/d"].capacity, Some(8));
    }

    #[test]
    fn insertion_after_the_last_line_adds_a_line_break() {
        let out =
            edit_capacities("endpoints:\n  /a:\n    method: GET", &caps(&[("/a", 2)])).unwrap();
        assert_eq!(out, "endpoints:\n  /a:\n    method: GET\n    capacity: 2");
    }

    #[test]
    fn unhandled_layouts_fall_back_to_a_rewrite_that_loads_back() {
        for text in [
            "endpoints: {/w: {method: POST}}\n",
            "{endpoints: {/w: {method: POST}}}\n",
            "endpoints:\n  /w: {method: POST,\n       queue_timeout: 5}\n",
        ] {
            let c = caps(&[("/w", 12)]);
            assert!(edit_capacities(text, &c).is_none(), "{text}");
            let config = load(text);
            let (yaml, layout) = updated_yaml(text, &config, &c, Path::new("t.yml")).unwrap();
            assert_eq!(layout, YamlLayout::Rewritten);
            assert_eq!(load(&yaml).admission.endpoints["/w"].capacity, Some(12));
            assert_eq!(load(&yaml).endpoints["/w"].method.as_deref(), Some("POST"));
        }
    }

    #[test]
    fn edits_never_produce_a_config_that_differs_otherwise() {
        let text = "endpoints:\n  /w: {method: POST, capacity: 2, capacity: 3}\n";
        // A duplicate key does not load in the first place; the editor refuses it anyway.
        assert!(edit_capacities(text, &caps(&[("/w", 1)])).is_none());
        let text = "endpoints:\n  /w:\n    method: POST\n";
        let config = load(text);
        let (yaml, layout) =
            updated_yaml(text, &config, &caps(&[("/w", 4)]), Path::new("t.yml")).unwrap();
        assert_eq!(layout, YamlLayout::Edited);
        let mut expected = config.clone();
        expected.admission.endpoints.get_mut("/w").unwrap().capacity = Some(4);
        assert_eq!(load(&yaml), expected);
    }

    #[test]
    fn odd_layouts_never_panic_and_always_load_back() {
        let texts = [
            "endpoints:\n  /w: {}\n",
            "endpoints:\n  '/w': {method: \"PO#ST\"} # c: {x}\n",
            "endpoints:\n  \"/w\":\n    headers: {\"a\": \"b, c\"}\n    capacity: 1 # \u{e9}t\u{e9}\n",
            "endpoints:\n    /w:\n        body: |\n          capacity: 3\n        method: PUT\n",
            "endpoints:\n  /w: {body: {k: [1, {a: \"}\"}]}, capacity: 2}\n",
            "endpoints:\n  /w: {\"capacity\":5}\n",
            "endpoints:\n  /\u{fc}ber: {method: GET}   # \u{1f600}\n",
            "---\nendpoints:\n  /w: null\n...\n",
            "endpoints:\n  /w: &a {method: GET}\n",
            "endpoints:\n  ? /w\n  : {method: GET}\n",
            "endpoints:\n\t/w: {}\n",
            "endpoints: # watched\n  /w: {}\n  /v:\n    method: GET\n",
        ];
        for text in texts {
            for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let _ = edit_capacities(&text[..cut], &caps(&[("/w", 7)]));
            }
            let Ok(config) = GatewayConfig::from_yaml(text, Path::new("t.yml")) else {
                continue;
            };
            let c: BTreeMap<String, i64> = config
                .admission
                .endpoints
                .keys()
                .map(|k| (k.clone(), 7))
                .collect();
            let (yaml, _) = updated_yaml(text, &config, &c, Path::new("t.yml"))
                .unwrap_or_else(|e| panic!("{text:?}: {}", e.message));
            let back = load(&yaml);
            assert!(
                back.admission
                    .endpoints
                    .values()
                    .all(|e| e.capacity == Some(7)),
                "{yaml}"
            );
        }
    }

    #[test]
    fn comments_and_quotes_are_split_correctly() {
        assert_eq!(split_comment("a: 1 # c"), ("a: 1", " # c"));
        assert_eq!(split_comment("a: \"x # y\" # c"), ("a: \"x # y\"", " # c"));
        assert_eq!(split_comment("a: don't # c"), ("a: don't", " # c"));
        assert_eq!(split_comment("a: b#c"), ("a: b#c", ""));
        assert_eq!(parse_key("\"/a b\": 1"), Some(("/a b".into(), 7)));
        assert_eq!(parse_key("'it''s': 1"), Some(("it's".into(), 8)));
        assert_eq!(parse_key("/a:b: 1"), Some(("/a:b".into(), 5)));
        assert_eq!(parse_key("- a: 1"), None);
    }
}
