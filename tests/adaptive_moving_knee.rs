//! The moving-knee benchmark of issue 17: the same workload (48 closed-loop clients, a
//! backend whose knee moves 16 → 6 → 40, 20 ms plus 5 ms per request above the knee) through
//! the whole gateway (`storage: memory`, `queue_timeout: 1`) under an adaptive limit and
//! under three static capacities: the best fixed value in hindsight (16), twice too high (32)
//! and twice too low (8). Prints goodput (2xx/s), p99 latency and 504s per phase and in
//! total, and how long the adaptive limit took to re-enter `[0.75 K, 1.5 K]` after each move.
//!
//! A benchmark, not a test: it asserts nothing about timing and is ignored by default.
//!
//! ```text
//! cargo test --release --test adaptive_moving_knee -- --ignored --nocapture
//! MOVING_KNEE_PHASE_SECS=10 cargo test --test adaptive_moving_knee -- --ignored --nocapture
//! ```

mod support;

use std::time::{Duration, Instant};
use support::knee::{KneeBackend, KneeModel, Load};
use support::TestGateway;

const KNEES: [usize; 3] = [16, 6, 40];

struct Phase {
    ok: usize,
    p99: Duration,
    timed_out: usize,
    secs: f64,
    reconverged: Option<Duration>,
}

fn summarise(seen: &[(u16, Duration)], secs: f64, reconverged: Option<Duration>) -> Phase {
    let mut ok: Vec<Duration> = seen
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, d)| *d)
        .collect();
    ok.sort();
    let p99 = ok
        .get((ok.len() * 99 / 100).min(ok.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    Phase {
        ok: ok.len(),
        p99,
        timed_out: seen.iter().filter(|(s, _)| *s == 504).count(),
        secs,
        reconverged,
    }
}

async fn capacity(gw: &TestGateway) -> u64 {
    let resp = support::client()
        .request(
            http::Request::get(gw.url("/balancer/stats"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["endpoints"]["/work"]["capacity"].as_u64().unwrap()
}

async fn run(name: &str, endpoint: &str, phase: Duration) -> Vec<Phase> {
    let knee = KneeBackend::start(KneeModel::default()).await;
    let yaml = format!(
        "upstreams:\n  - {{url: \"{}\"}}\nhealth_endpoint: /health\neject_after: 0\n\
         queue_timeout: 1\nendpoints:\n  /work: {endpoint}\n",
        knee.url()
    );
    let gw = TestGateway::start(&yaml).await;
    let load = Load::start(gw.url("/work"), 48);
    let mut phases = Vec::new();
    for k in KNEES {
        knee.set(KneeModel {
            capacity: k,
            ..KneeModel::default()
        });
        load.take();
        let started = Instant::now();
        let mut reconverged = None;
        while started.elapsed() < phase {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let c = capacity(&gw).await as f64;
            let inside = c >= 0.75 * k as f64 && c <= 1.5 * k as f64;
            match (inside, reconverged) {
                (true, None) => reconverged = Some(started.elapsed()),
                (false, Some(_)) if started.elapsed() < phase / 2 => reconverged = None,
                _ => {}
            }
        }
        phases.push(summarise(
            &load.take(),
            started.elapsed().as_secs_f64(),
            reconverged,
        ));
    }
    drop(load);
    let total = phases.iter().fold((0, 0.0, 0), |(ok, secs, t), p| {
        (ok + p.ok, secs + p.secs, t + p.timed_out)
    });
    println!(
        "| {name} | {} | {:.0} ({}) |",
        phases
            .iter()
            .zip(KNEES)
            .map(|(p, k)| {
                let conv = p
                    .reconverged
                    .map_or("—".into(), |d| format!("{:.1} s", d.as_secs_f64()));
                format!(
                    "K={k}: {:.0}/s, p99 {:.0} ms, 504: {}, in band after {conv}",
                    p.ok as f64 / p.secs,
                    p.p99.as_secs_f64() * 1e3,
                    p.timed_out
                )
            })
            .collect::<Vec<_>>()
            .join(" | "),
        total.0 as f64 / total.1,
        total.2
    );
    phases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn moving_knee() {
    let secs: u64 = std::env::var("MOVING_KNEE_PHASE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let phase = Duration::from_secs(secs);
    println!("| capacity | K=16 | K=6 | K=40 | total goodput/s (504s) |\n|---|---|---|---|---|");
    run(
        "adaptive (gradient, 2..100, initial 16)",
        "{capacity: 16, adaptive: {min_capacity: 2, max_capacity: 100}}",
        phase,
    )
    .await;
    run("static 16 (best in hindsight)", "{capacity: 16}", phase).await;
    run("static 32 (2× high)", "{capacity: 32}", phase).await;
    run("static 8 (2× low)", "{capacity: 8}", phase).await;
}
