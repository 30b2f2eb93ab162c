//! Requests and wall time to find a knee at K = 100 (20 ms base latency), adaptive schedule
//! versus the plain doubling-then-bisect schedule of the reference.
//!
//! ```text
//! cargo bench -p portcullis-probe --bench schedule            # 3 runs per row
//! cargo bench -p portcullis-probe --bench schedule -- --runs 1
//! ```
//!
//! Real axum backends on 127.0.0.1 (the same ones the tests use): each request sleeps 20 ms,
//! and a request that arrives while more than K are in flight either sleeps 20 ms + 2.5 s
//! ("slow") or gets an immediate 503 ("503"). Default `ProbeConfig` (error threshold 5%,
//! latency threshold 2000 ms, min 32 requests per level, cap 1024).

#[path = "../tests/support/mod.rs"]
mod support;

use portcullis_probe::{ProbeConfig, ProbeReport, ProbeTarget, Prober, Schedule};
use std::time::Duration;
use support::PastKnee;

const KNEE: usize = 100;
const BASE: Duration = Duration::from_millis(20);

async fn once(past: PastKnee, schedule: Schedule) -> ProbeReport {
    let backend = support::spawn(KNEE, BASE, past).await;
    let prober = Prober::new(ProbeConfig::default())
        .with_request_timeout(Duration::from_secs(30))
        .with_schedule(schedule);
    let target = ProbeTarget::new(&backend.base_url, "/work").with_method("POST");
    prober.probe(&target).await.expect("probe failed")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(3usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!("K = {KNEE}, base latency {BASE:?}, {runs} run(s) per row, default ProbeConfig\n");
    let mut rows = Vec::new();
    let mut details = Vec::new();
    for (name, past) in [
        ("slow (+2.5 s)", PastKnee::Slow(Duration::from_millis(2500))),
        ("503", PastKnee::Unavailable),
    ] {
        for schedule in [Schedule::Plain, Schedule::default()] {
            let mut found = Vec::new();
            let mut requests = Vec::new();
            let mut wall = Vec::new();
            let mut levels = Vec::new();
            for run in 0..runs {
                let r = rt.block_on(once(past, schedule));
                found.push(r.max_concurrency);
                requests.push(r.total_requests as f64);
                wall.push(r.elapsed_secs);
                levels.push(r.levels.len() as f64);
                if run == 0 {
                    details.push(format!("{name}, {}:\n{}", schedule.name(), r.table()));
                }
            }
            rows.push(format!(
                "| {name} | {} | {:?} | {:.0} | {:.2} | {:.0} |",
                schedule.name(),
                found,
                median(requests),
                median(wall),
                median(levels),
            ));
        }
    }
    println!("| backend past K | schedule | max_concurrency found (per run) | requests (median) | wall s (median) | levels (median) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    println!();
    for d in &details {
        println!("{d}");
    }
}
