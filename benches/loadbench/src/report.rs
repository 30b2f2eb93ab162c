//! Aggregating runs into the results table, the ratios and the targets, and writing
//! them into `BENCHMARKS.md` between markers (only this harness's section is replaced).

use crate::targets::Mode;
use crate::wrk::WrkResult;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Marks the start of this harness's section in `BENCHMARKS.md`.
pub(crate) const BEGIN: &str = "<!-- portcullis-loadbench:begin -->";
/// Marks its end.
pub(crate) const END: &str = "<!-- portcullis-loadbench:end -->";

/// One measured wrk run against one target.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    /// Target.
    pub(crate) mode: Mode,
    /// wrk connections.
    pub(crate) conns: u32,
    /// wrk's numbers.
    pub(crate) wrk: WrkResult,
    /// CPU seconds the proxy's process tree used during the run.
    pub(crate) cpu_s: f64,
    /// Of those, user-space seconds (the rest is system time).
    pub(crate) user_s: f64,
    /// TCP connections the backends accepted during the run (the proxy's upstream
    /// connections, its health checks included); `None` when they could not be read.
    pub(crate) upstream_conns: Option<u64>,
}

/// A target × connection-count row: the rounds combined.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// Target.
    pub(crate) mode: Mode,
    /// wrk connections.
    pub(crate) conns: u32,
    /// Mean req/s over the rounds.
    pub(crate) rps: f64,
    /// req/s of each round, in order.
    pub(crate) rps_rounds: Vec<f64>,
    /// Mean p50, ms.
    pub(crate) p50_ms: f64,
    /// Mean p99, ms.
    pub(crate) p99_ms: f64,
    /// Max latency over the rounds, ms.
    pub(crate) max_ms: f64,
    /// CPU seconds per 10k requests (all rounds).
    pub(crate) cpu_per_10k: f64,
    /// User-space CPU seconds per 10k requests.
    pub(crate) user_per_10k: f64,
    /// System CPU seconds per 10k requests.
    pub(crate) sys_per_10k: f64,
    /// Upstream connections opened per 10k requests (NaN when unknown).
    pub(crate) conns_per_10k: f64,
    /// Peak RSS of the target's process tree over the whole benchmark, MiB.
    pub(crate) peak_rss_mib: f64,
    /// Non-2xx/3xx responses plus socket errors, all rounds.
    pub(crate) bad: u64,
}

/// Combines the runs of each (target, connections) pair.
pub(crate) fn aggregate(runs: &[Run], peak_rss_kib: &BTreeMap<Mode, u64>) -> Vec<Row> {
    let mut groups: BTreeMap<(u32, Mode), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        groups.entry((r.conns, r.mode)).or_default().push(r);
    }
    let order = |m: Mode| Mode::ALL.iter().position(|&x| x == m).unwrap_or(usize::MAX);
    let mut rows: Vec<Row> = groups
        .into_iter()
        .map(|((conns, mode), rs)| {
            let n = rs.len() as f64;
            let requests: u64 = rs.iter().map(|r| r.wrk.requests).sum();
            let cpu: f64 = rs.iter().map(|r| r.cpu_s).sum();
            let user: f64 = rs.iter().map(|r| r.user_s).sum();
            let opened: Option<u64> = rs.iter().map(|r| r.upstream_conns).sum();
            let per_10k = |v: f64| {
                if requests == 0 {
                    f64::NAN
                } else {
                    v / requests as f64 * 10_000.0
                }
            };
            Row {
                mode,
                conns,
                rps: rs.iter().map(|r| r.wrk.rps).sum::<f64>() / n,
                rps_rounds: rs.iter().map(|r| r.wrk.rps).collect(),
                p50_ms: rs.iter().map(|r| r.wrk.p50_ms).sum::<f64>() / n,
                p99_ms: rs.iter().map(|r| r.wrk.p99_ms).sum::<f64>() / n,
                max_ms: rs.iter().map(|r| r.wrk.max_ms).fold(0.0, f64::max),
                cpu_per_10k: per_10k(cpu),
                user_per_10k: per_10k(user),
                sys_per_10k: per_10k(cpu - user),
                conns_per_10k: opened.map_or(f64::NAN, |n| per_10k(n as f64)),
                peak_rss_mib: peak_rss_kib.get(&mode).copied().unwrap_or(0) as f64 / 1024.0,
                bad: rs.iter().map(|r| r.wrk.non_2xx + r.wrk.socket_errors).sum(),
            }
        })
        .collect();
    rows.sort_by_key(|r| (r.conns, order(r.mode)));
    rows
}

fn find(rows: &[Row], mode: Mode, conns: u32) -> Option<&Row> {
    rows.iter().find(|r| r.mode == mode && r.conns == conns)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn krps(v: f64) -> String {
    format!("{:.1}k", v / 1000.0)
}

/// The results table (markdown).
pub(crate) fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str(
        "| target | conns | req/s | req/s per round | p50 ms | p99 ms | max ms | CPU s / 10k req | user s / 10k | sys s / 10k | upstream conns / 10k | peak RSS MiB | req/s ÷ nginx | req/s ÷ HAProxy | p99 ÷ nginx | CPU ÷ nginx | errors |\n",
    );
    t.push_str(
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let (vs_n, vs_h, p99_n, cpu_n) = if r.mode.is_gateway() || r.mode == Mode::HyperBare {
            let n = find(rows, Mode::Nginx, r.conns);
            let h = find(rows, Mode::Haproxy, r.conns);
            (
                n.map(|n| ratio(r.rps, n.rps)).unwrap_or_else(|| "–".into()),
                h.map(|h| ratio(r.rps, h.rps)).unwrap_or_else(|| "–".into()),
                n.map(|n| ratio(r.p99_ms, n.p99_ms))
                    .unwrap_or_else(|| "–".into()),
                n.map(|n| ratio(r.cpu_per_10k, n.cpu_per_10k))
                    .unwrap_or_else(|| "–".into()),
            )
        } else {
            ("".into(), "".into(), "".into(), "".into())
        };
        let rounds: Vec<String> = r.rps_rounds.iter().map(|&v| krps(v)).collect();
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            r.mode.label(),
            r.conns,
            r.rps,
            rounds.join(" / "),
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.cpu_per_10k,
            r.user_per_10k,
            r.sys_per_10k,
            r.conns_per_10k,
            r.peak_rss_mib,
            vs_n,
            vs_h,
            p99_n,
            cpu_n,
            r.bad
        );
    }
    t
}

/// One of the targets, checked against the measured rows.
#[derive(Debug, Clone)]
pub(crate) struct TargetCheck {
    /// What the issue asks.
    pub(crate) goal: &'static str,
    /// What was measured.
    pub(crate) measured: String,
    /// `Some(met)`, or `None` when a needed row is missing.
    pub(crate) met: Option<bool>,
}

/// The targets at `-c64`. `redis_used` is false when redis-server saw (almost) no
/// commands: the Redis row then measures memory mode and its target counts as not measured.
pub(crate) fn check_targets(rows: &[Row], redis_used: bool) -> Vec<TargetCheck> {
    let c = 64;
    let gw = find(rows, Mode::Gateway, c);
    let ng = find(rows, Mode::Nginx, c);
    let hp = find(rows, Mode::Haproxy, c);
    let adm = find(rows, Mode::GatewayAdmission, c);
    let redis = find(rows, Mode::GatewayRedis, c).filter(|_| redis_used);
    let routes = find(rows, Mode::GatewayRoutes, c);
    let mut out = Vec::new();
    let mut ratio_check =
        |goal: &'static str, a: Option<f64>, b: Option<f64>, ok: fn(f64) -> bool| {
            let (measured, met) = match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => (format!("{:.2}×", a / b), Some(ok(a / b))),
                _ => ("not measured".into(), None),
            };
            out.push(TargetCheck {
                goal,
                measured,
                met,
            });
        };
    type Figure = fn(&Row) -> f64;
    type Ratio<'a> = (
        &'static str,
        Option<&'a Row>,
        Option<&'a Row>,
        Figure,
        fn(f64) -> bool,
    );
    let rps: Figure = |r| r.rps;
    let p99: Figure = |r| r.p99_ms;
    let cpu: Figure = |r| r.cpu_per_10k;
    // (goal, measured row, reference row, figure, met when the ratio ...)
    let ratios: [Ratio; 6] = [
        ("gateway req/s ≥ 1.2× nginx", gw, ng, rps, |x| x >= 1.2),
        ("gateway req/s ≥ 1.0× HAProxy", gw, hp, rps, |x| x >= 1.0),
        ("gateway p99 ≤ 0.8× nginx", gw, ng, p99, |x| x <= 0.8),
        ("admission req/s ≥ 0.95× pure proxy", adm, gw, rps, |x| {
            x >= 0.95
        }),
        (
            "Redis mode req/s ≥ 0.7× memory mode (admission)",
            redis,
            adm,
            rps,
            |x| x >= 0.7,
        ),
        (
            "gateway CPU per request ≤ 1.0× nginx",
            gw,
            ng,
            cpu,
            |x| x <= 1.0,
        ),
    ];
    for (goal, a, b, figure, ok) in ratios {
        ratio_check(goal, a.map(figure), b.map(figure), ok);
    }
    ratio_check(
        "gateway upstream connections opened ≤ nginx's",
        gw.map(|r| r.conns_per_10k).filter(|v| v.is_finite()),
        ng.map(|r| r.conns_per_10k)
            .filter(|v| v.is_finite() && *v > 0.0),
        |x| x <= 1.0,
    );
    let peak = rows
        .iter()
        .filter(|r| r.mode.is_gateway())
        .map(|r| r.peak_rss_mib)
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.max(v)))
        });
    out.push(TargetCheck {
        goal: "gateway peak RSS under load ≤ 64 MiB",
        measured: peak.map_or("not measured".into(), |p| format!("{p:.1} MiB")),
        met: peak.map(|p| p <= 64.0),
    });
    // Issue 16: what five routes (the match on the last) cost against none.
    let ratio = routes
        .zip(gw)
        .filter(|(_, g)| g.rps > 0.0)
        .map(|(r, g)| r.rps / g.rps);
    out.push(TargetCheck {
        goal: "five routes (match on the last) req/s ≥ 0.97× no routes",
        measured: ratio.map_or("not measured".into(), |x| format!("{x:.2}×")),
        met: ratio.map(|x| x >= 0.97),
    });
    out
}

/// The targets as a markdown list.
pub(crate) fn targets_markdown(checks: &[TargetCheck]) -> String {
    let mut t = String::new();
    for c in checks {
        let mark = match c.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(t, "- {}: {} — {}", c.goal, c.measured, mark);
    }
    t
}

/// Replaces this harness's section of `text` (between [`BEGIN`] and [`END`]) with `section`,
/// or appends it when there is none. Everything outside the markers is kept byte for byte.
pub(crate) fn splice_section(text: &str, section: &str) -> String {
    let block = format!("{BEGIN}\n{}\n{END}\n", section.trim_end());
    if let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) {
        if b < e {
            let mut after = &text[e + END.len()..];
            if let Some(rest) = after.strip_prefix('\n') {
                after = rest;
            }
            return format!("{}{block}{after}", &text[..b]);
        }
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&block);
    out
}

/// Writes `section` into the file at `path` (created if missing).
pub(crate) fn write_section(path: &Path, section: &str) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, splice_section(&text, section))
}

/// `YYYY-MM-DD HH:MM UTC` for now (civil-from-days, Howard Hinnant's algorithm).
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: Mode, conns: u32, rps: f64, p99: f64) -> Run {
        Run {
            mode,
            conns,
            wrk: WrkResult {
                requests: (rps * 2.0) as u64,
                seconds: 2.0,
                rps,
                p50_ms: p99 / 2.0,
                p99_ms: p99,
                max_ms: p99 * 3.0,
                non_2xx: 0,
                socket_errors: 0,
            },
            cpu_s: rps * 2.0 / 20_000.0,
            user_s: rps * 2.0 / 40_000.0,
            upstream_conns: Some(64),
        }
    }

    #[test]
    fn rounds_are_combined_and_ratios_computed() {
        let runs = vec![
            run(Mode::Gateway, 64, 30_000.0, 2.0),
            run(Mode::Nginx, 64, 20_000.0, 4.0),
            run(Mode::Haproxy, 64, 40_000.0, 1.0),
            run(Mode::Gateway, 64, 34_000.0, 2.0),
            run(Mode::Nginx, 64, 20_000.0, 4.0),
            run(Mode::Haproxy, 64, 40_000.0, 1.0),
            run(Mode::GatewayAdmission, 64, 31_000.0, 2.0),
            run(Mode::GatewayAdmission, 64, 31_000.0, 2.0),
        ];
        let rss = BTreeMap::from([
            (Mode::Gateway, 20 * 1024),
            (Mode::GatewayAdmission, 70 * 1024),
        ]);
        let rows = aggregate(&runs, &rss);
        assert_eq!(rows.len(), 4);
        let gw = find(&rows, Mode::Gateway, 64).unwrap();
        assert_eq!(gw.rps, 32_000.0);
        assert_eq!(gw.rps_rounds, vec![30_000.0, 34_000.0]);
        assert!((gw.cpu_per_10k - 0.5).abs() < 1e-9);
        let checks = check_targets(&rows, true);
        assert_eq!(checks[0].measured, "1.60×");
        assert_eq!(checks[0].met, Some(true));
        assert_eq!(checks[1].met, Some(false));
        assert_eq!(checks[2].measured, "0.50×");
        assert_eq!(checks[3].measured, "0.97×"); // 31k / 32k
        assert_eq!(checks[3].met, Some(true));
        assert_eq!(checks[4].met, None);
        assert_eq!(checks[5].measured, "1.00×"); // CPU per request
        assert_eq!(checks[5].met, Some(true));
        assert_eq!(checks[6].measured, "0.62×"); // upstream connections per request
        assert_eq!(checks[7].met, Some(false));
        let t = table(&rows);
        assert!(t.contains("| gateway | 64 | 32000 | 30.0k / 34.0k |"));
        assert!(t.contains("1.60×"));
    }

    #[test]
    fn section_is_replaced_in_place_and_others_kept() {
        let base = "# Benchmarks\n\nintro\n";
        let once = splice_section(base, "## Load\nv1\n");
        assert!(once.starts_with(base));
        assert!(once.contains("v1"));
        let other = format!("{once}\n## Someone else\nkeep me\n");
        let twice = splice_section(&other, "## Load\nv2\n");
        assert!(twice.contains("v2"));
        assert!(!twice.contains("v1"));
        assert!(twice.contains("## Someone else\nkeep me\n"));
        assert_eq!(twice.matches(BEGIN).count(), 1);
    }

    #[test]
    fn date_format() {
        let d = utc_now();
        assert!(d.ends_with(" UTC"));
        assert_eq!(d.len(), "2026-01-01 00:00 UTC".len());
        assert!(d.starts_with("20"));
    }
}
