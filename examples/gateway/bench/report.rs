//! The end-of-run tables on stderr: each endpoint's levels, summary and warnings, then an
//! overview of every endpoint.

use super::{EndpointResult, EndpointStatus};
use portcullis::gateway::config::GatewayConfig;
use portcullis_probe::{LevelMeasurement, ProbeBound, ProbeReport};

/// The end-of-run tables: each endpoint's levels, its summary and warnings, then an overview.
pub(super) fn tables(results: &[EndpointResult], config: &GatewayConfig) -> String {
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
