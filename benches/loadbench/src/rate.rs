//! The constant-rate latency run: every target at one fixed request rate, with latency
//! measured from when each request was *due*, not from when the load tool got round to
//! sending it.
//!
//! A closed-loop tool such as `wrk` sends the next request on a connection only after the
//! previous answer, so a stall delays the requests that should have gone out meanwhile and
//! they are never counted as slow (coordinated omission): its p99 hides queueing. `oha` with
//! `-q RATE --latency-correction` schedules requests at the fixed rate and measures each from
//! its scheduled start. The harness runs it once per target after the closed-loop rounds, at
//! a rate below every target's peak (by default 70 % of nginx's req/s at -c64 in the same
//! run), so the comparison is of latency under the same offered load.
//!
//! `oha` is a crates.io crate; when it is not installed the harness installs it with
//! `cargo install oha --locked` into `target/loadbench-tools` (bounded in time).

use crate::targets::Mode;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `cargo install oha` may take before the rate run is skipped.
const INSTALL_LIMIT: Duration = Duration::from_secs(900);

/// The share of nginx's closed-loop req/s that the constant-rate run offers by default.
pub(crate) const DEFAULT_SHARE: f64 = 0.7;

/// One target's constant-rate run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RateRun {
    /// Target.
    pub(crate) mode: Mode,
    /// The offered rate, requests per second.
    pub(crate) rate: f64,
    /// What oha measured.
    pub(crate) oha: OhaResult,
    /// CPU seconds the proxy's process tree used during the run.
    pub(crate) cpu_s: f64,
}

/// oha's error for the requests in flight when the run's duration ended.
const DEADLINE: &str = "aborted due to deadline";

/// The numbers of one `oha --output-format json` run.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct OhaResult {
    /// Requests answered per second.
    pub(crate) rps: f64,
    /// Requests answered (any status).
    pub(crate) requests: u64,
    /// Answers that were not 2xx, plus requests that failed without an answer (not those
    /// cut off by the end of the run).
    pub(crate) bad: u64,
    /// Median latency, ms (from each request's scheduled start).
    pub(crate) p50_ms: f64,
    /// 99th percentile, ms.
    pub(crate) p99_ms: f64,
    /// 99.9th percentile, ms.
    pub(crate) p999_ms: f64,
}

/// Parses oha's JSON report (`latencyPercentiles` in seconds, `statusCodeDistribution`,
/// `errorDistribution`, `summary.requestsPerSec`).
pub(crate) fn parse(json: &str) -> Result<OhaResult, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("oha's report is not JSON: {e}"))?;
    let seconds = |key: &str| -> Result<f64, String> {
        v["latencyPercentiles"][key]
            .as_f64()
            .map(|s| s * 1000.0)
            .ok_or_else(|| format!("oha's report has no latencyPercentiles.{key}"))
    };
    let counts = |key: &str| -> Vec<(String, u64)> {
        v[key]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let statuses = counts("statusCodeDistribution");
    // Requests still in flight when the duration ends are cut off, not failed.
    let errors: u64 = counts("errorDistribution")
        .iter()
        .filter(|(what, _)| what != DEADLINE)
        .map(|(_, n)| n)
        .sum();
    let requests: u64 = statuses.iter().map(|(_, n)| n).sum();
    let non_2xx: u64 = statuses
        .iter()
        .filter(|(code, _)| !code.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    Ok(OhaResult {
        rps: v["summary"]["requestsPerSec"]
            .as_f64()
            .ok_or("oha's report has no summary.requestsPerSec")?,
        requests,
        bad: non_2xx + errors,
        p50_ms: seconds("p50")?,
        p99_ms: seconds("p99")?,
        p999_ms: seconds("p99.9")?,
    })
}

/// The arguments of one oha run at `rate` requests/s over `conns` connections for `secs`.
pub(crate) fn args(url: &str, rate: f64, conns: u32, secs: u64) -> Vec<String> {
    [
        "--no-tui",
        "--output-format",
        "json",
        "--latency-correction",
        "-q",
        &format!("{:.0}", rate.max(1.0)),
        "-c",
        &conns.to_string(),
        "-z",
        &format!("{secs}s"),
        "-t",
        "5s",
        url,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The rate to offer: `DEFAULT_SHARE` of `reference` req/s (nginx's, or the slowest
/// target's when nginx did not run).
pub(crate) fn auto_rate(reference: f64) -> f64 {
    (reference * DEFAULT_SHARE).round().max(1.0)
}

/// `oha` on PATH, in `~/.cargo/bin` or in the harness's tool directory; otherwise installed
/// there with `cargo install oha --locked`, bounded by [`INSTALL_LIMIT`].
pub(crate) fn find_or_install(root: &Path) -> Result<PathBuf, String> {
    let tools = root.join("target/loadbench-tools");
    let home_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/oha"));
    if let Some(p) = crate::find_tool("oha")
        .or_else(|| home_bin.filter(|p| p.is_file()))
        .or_else(|| Some(tools.join("bin/oha")).filter(|p| p.is_file()))
    {
        return Ok(p);
    }
    println!(
        "loadbench: `oha` missing; installing it with cargo install oha --locked (up to {} min)",
        INSTALL_LIMIT.as_secs() / 60
    );
    let mut child = Command::new("cargo")
        .args(["install", "oha", "--locked", "--root"])
        .arg(&tools)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run cargo install oha: {e}"))?;
    let deadline = Instant::now() + INSTALL_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => break,
            Ok(Some(s)) => return Err(format!("cargo install oha failed ({s})")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("cargo install oha did not finish in time".into());
            }
        }
    }
    let p = tools.join("bin/oha");
    p.is_file()
        .then_some(p)
        .ok_or_else(|| "cargo install oha left no binary".into())
}

/// The constant-rate table: one row per target, with p99 ÷ nginx's.
pub(crate) fn table(runs: &[RateRun]) -> String {
    let nginx_p99 = runs
        .iter()
        .find(|r| r.mode == Mode::Nginx)
        .map(|r| r.oha.p99_ms);
    let mut s = String::from(
        "| target | offered req/s | answered req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 10k req | p99 ÷ nginx | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let ratio = match nginx_p99 {
            Some(n) if n > 0.0 && r.mode != Mode::Nginx => format!("{:.2}×", r.oha.p99_ms / n),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.3} | {ratio} | {} |",
            r.mode.label(),
            r.rate,
            r.oha.rps,
            r.oha.p50_ms,
            r.oha.p99_ms,
            r.oha.p999_ms,
            r.cpu_s / (r.oha.requests.max(1) as f64) * 10_000.0,
            r.oha.bad,
        );
    }
    s
}

/// The issue's target for the constant-rate run: the gateway's p99 ≤ 0.8× nginx's.
pub(crate) fn target_line(runs: &[RateRun]) -> Option<String> {
    let p99 = |m: Mode| runs.iter().find(|r| r.mode == m).map(|r| r.oha.p99_ms);
    let (g, n) = (p99(Mode::Gateway)?, p99(Mode::Nginx)?);
    let ratio = g / n.max(f64::MIN_POSITIVE);
    Some(format!(
        "- gateway p99 at the fixed rate ≤ 0.8× nginx: {ratio:.2}× — {}\n",
        if ratio <= 0.8 { "met" } else { "**missed**" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"{
      "summary": {"successRate": 1.0, "total": 10.0, "requestsPerSec": 1000.5},
      "latencyPercentiles": {"p10": 0.0001, "p50": 0.0005, "p99": 0.002, "p99.9": 0.0125},
      "statusCodeDistribution": {"200": 9990, "503": 5},
      "errorDistribution": {"connection closed": 3, "aborted due to deadline": 64}
    }"#;

    #[test]
    fn the_report_gives_percentiles_in_ms_and_counts_what_failed() {
        let r = parse(REPORT).unwrap();
        assert_eq!(r.rps, 1000.5);
        assert_eq!(r.requests, 9995);
        assert_eq!(r.bad, 8);
        assert!((r.p50_ms - 0.5).abs() < 1e-9);
        assert!((r.p99_ms - 2.0).abs() < 1e-9);
        assert!((r.p999_ms - 12.5).abs() < 1e-9);
    }

    #[test]
    fn a_report_without_percentiles_is_an_error() {
        assert!(parse(r#"{"summary": {"requestsPerSec": 1.0}}"#)
            .unwrap_err()
            .contains("p50"));
        assert!(parse("not json").is_err());
    }

    #[test]
    fn the_rate_is_fixed_and_corrected() {
        let a = args("http://127.0.0.1:1/bench", 1234.4, 64, 10);
        let joined = a.join(" ");
        assert!(joined.contains("-q 1234 "), "{joined}");
        assert!(joined.contains("--latency-correction"));
        assert!(joined.contains("-c 64 -z 10s"));
        assert_eq!(auto_rate(20_000.0), 14_000.0);
    }

    #[test]
    fn the_table_compares_p99_with_nginx() {
        let run = |mode, p99_ms| RateRun {
            mode,
            rate: 100.0,
            oha: OhaResult {
                rps: 100.0,
                requests: 1000,
                p99_ms,
                ..OhaResult::default()
            },
            cpu_s: 0.1,
        };
        let runs = [run(Mode::Gateway, 3.0), run(Mode::Nginx, 4.0)];
        let t = table(&runs);
        assert!(t.contains("| 0.75× |"), "{t}");
        assert!(target_line(&runs).unwrap().contains("0.75× — met"));
    }
}
