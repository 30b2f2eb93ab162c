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

mod progress;
mod report;
mod yaml_edit;

use portcullis::gateway::config::{EndpointConfig, GatewayConfig};
use portcullis_probe::{ProbeBound, ProbeError, ProbeReport, ProbeTarget, Prober};
use progress::Progress;
use report::tables;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use yaml_edit::{updated_yaml, write_verified, YamlLayout};

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
