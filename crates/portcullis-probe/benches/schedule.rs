//! Requests, wall time and peak in-flight at the backend to find a knee at K = 4, 24 and 100
//! (20 ms base latency), before and after issue 17 in one run: the adaptive doubling schedule
//! (the default before) against the gentle schedule (the default now), and optionally the
//! plain doubling-then-bisect schedule of the reference.
//!
//! ```text
//! cargo bench -p portcullis-probe --bench schedule                      # 3 runs per row
//! cargo bench -p portcullis-probe --bench schedule -- --runs 1
//! cargo bench -p portcullis-probe --bench schedule -- --plain --knees 100
//! ```
//!
//! Real axum backends on 127.0.0.1 (the same ones the tests use): each request sleeps 20 ms,
//! and a request that arrives while more than K are in flight either sleeps 20 ms + 2.5 s
//! ("slow") or gets an immediate 503 ("503"). The backend counts its own in-flight requests
//! (from arrival until the handler ends); "peak" is the largest count it saw during the
//! probe. Default `ProbeConfig` (error threshold 5%, latency threshold 2000 ms, min 32
//! requests per level, cap 1024, growth 1.5).

#[path = "../tests/support/mod.rs"]
mod support;

use portcullis_probe::{ProbeConfig, ProbeReport, ProbeTarget, Prober, Schedule};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::PastKnee;

const BASE: Duration = Duration::from_millis(20);

async fn once(knee: usize, past: PastKnee, schedule: Schedule) -> (ProbeReport, usize) {
    let backend = support::spawn(knee, BASE, past).await;
    let prober = Prober::new(ProbeConfig::default())
        .with_request_timeout(Duration::from_secs(30))
        .with_schedule(schedule);
    let target = ProbeTarget::new(&backend.base_url, "/work").with_method("POST");
    let report = prober.probe(&target).await.expect("probe failed");
    let peak = backend.counters.max_inflight.load(Ordering::SeqCst);
    (report, peak)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--runs")
        .and_then(|n| n.parse().ok())
        .unwrap_or(3usize);
    let knees: Vec<usize> = arg(&args, "--knees")
        .map(|s| s.split(',').filter_map(|k| k.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![4, 24, 100]);
    let mut schedules = vec![
        ("before", Schedule::Adaptive { tolerance: 0.1 }),
        ("after", Schedule::default()),
    ];
    if args.iter().any(|a| a == "--plain") {
        schedules.insert(0, ("reference", Schedule::Plain));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!("base latency {BASE:?}, {runs} run(s) per row, default ProbeConfig\n");
    let mut rows = Vec::new();
    let mut details = Vec::new();
    for &knee in &knees {
        for (name, past) in [
            ("slow (+2.5 s)", PastKnee::Slow(Duration::from_millis(2500))),
            ("503", PastKnee::Unavailable),
        ] {
            let mut before_requests = None;
            for &(when, schedule) in &schedules {
                let mut found = Vec::new();
                let mut requests = Vec::new();
                let mut wall = Vec::new();
                let mut levels = Vec::new();
                let mut peaks = Vec::new();
                for run in 0..runs {
                    let (r, peak) = rt.block_on(once(knee, past, schedule));
                    found.push(r.max_concurrency);
                    requests.push(r.total_requests as f64);
                    wall.push(r.elapsed_secs);
                    levels.push(r.levels.len() as f64);
                    peaks.push(peak);
                    if run == 0 {
                        details.push(format!(
                            "K = {knee}, {name}, {} ({when}), peak in flight {peak}:\n{}",
                            schedule.name(),
                            r.table()
                        ));
                    }
                }
                let req = median(requests);
                let ratio = match (when, before_requests) {
                    ("after", Some(b)) => format!("{:.2}", req / b),
                    _ => String::from("-"),
                };
                if when == "before" {
                    before_requests = Some(req);
                }
                let max_peak = *peaks.iter().max().unwrap_or(&0);
                rows.push(format!(
                    "| {knee} | {name} | {} ({when}) | {:?} | {:.0} | {ratio} | {:?} | {:.2} | {:.2} | {:.0} |",
                    schedule.name(),
                    found,
                    req,
                    peaks,
                    max_peak as f64 / knee as f64,
                    median(wall),
                    median(levels),
                ));
            }
        }
    }
    println!(
        "| K | backend past K | schedule | max_concurrency found (per run) | requests (median) \
         | requests after/before | peak in flight at the backend (per run) | worst peak / K \
         | wall s (median) | levels (median) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    println!();
    for d in &details {
        println!("{d}");
    }
}
