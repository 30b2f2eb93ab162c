//! Adaptive capacity through the whole gateway (`storage: memory`) against a real backend on
//! 127.0.0.1 whose knee moves at run time (tests/support/knee.rs): the limit converges near
//! the knee, follows it down and up, and never leaves `[min_capacity, max_capacity]`, even
//! when the backend fails everything.

mod support;

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use support::knee::{KneeBackend, KneeModel, Load};
use support::{client, TestGateway};

/// The whole `/balancer/stats` document.
async fn stats(gw: &TestGateway) -> serde_json::Value {
    let resp = client()
        .request(
            Request::get(gw.url("/balancer/stats"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// `endpoints./work` of `/balancer/stats`.
async fn work_stats(gw: &TestGateway) -> serde_json::Value {
    stats(gw).await["endpoints"]["/work"].clone()
}

/// Polls the limit every 250 ms until 8 readings in a row (2 s) are inside `range`, for at
/// most `within`; readings taken while `min_rtt` is being measured (the limit held at
/// `min_capacity` for one window) are skipped. Returns every reading; panics on timeout.
async fn settles(
    gw: &TestGateway,
    within: Duration,
    range: std::ops::RangeInclusive<u64>,
    bounds: std::ops::RangeInclusive<u64>,
) -> Vec<u64> {
    let start = Instant::now();
    let (mut seen, mut inside) = (Vec::new(), 0);
    while start.elapsed() < within {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = work_stats(gw).await;
        let limit = s["capacity"].as_u64().unwrap();
        assert!(
            bounds.contains(&limit),
            "limit {limit} outside the bounds {bounds:?}: {s}"
        );
        seen.push(limit);
        if s["adaptive"]["state"] == "measuring_min_rtt" {
            continue;
        }
        inside = if range.contains(&limit) {
            inside + 1
        } else {
            0
        };
        if inside >= 8 {
            return seen;
        }
    }
    panic!("the limit did not settle in {range:?} within {within:?}: {seen:?}");
}

fn config(backend: &KneeBackend, adaptive: &str) -> String {
    format!(
        "upstreams:\n  - {{url: \"{}\"}}\nhealth_endpoint: /health\neject_after: 0\nqueue_timeout: 30\n\
         endpoints:\n  /work: {{capacity: 8}}\nadaptive: {adaptive}\n",
        backend.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_converges_near_the_knee_and_follows_it() {
    let knee = KneeBackend::start(KneeModel::default()).await; // K = 16, 20 ms, +5 ms
    let gw = TestGateway::start(&config(&knee, "{min_capacity: 2, max_capacity: 100}")).await;
    let _clients = Load::start(gw.url("/work"), 48);

    let seen = settles(&gw, Duration::from_secs(10), 12..=24, 2..=100).await;
    // Settled: the backend does not see more than 1.5 × K in flight for long (the mean of
    // 20 ms samples over each second stays at or below 24).
    knee.take_peak();
    let mut means = Vec::new();
    for _ in 0..3 {
        let mut sum = 0;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            sum += knee.inflight();
        }
        means.push(sum as f64 / 50.0);
    }
    assert!(
        means.iter().all(|&m| m <= 24.0),
        "in flight per second {means:?} after {seen:?}"
    );
    let s = work_stats(&gw).await;
    let a = &s["adaptive"];
    assert_eq!(
        (
            a["algorithm"].as_str(),
            a["min_capacity"].as_u64(),
            a["max_capacity"].as_u64()
        ),
        (Some("gradient"), Some(2), Some(100)),
        "{s}"
    );
    let min_rtt = a["min_rtt_ms"].as_f64().unwrap();
    assert!(
        (19.0..40.0).contains(&min_rtt),
        "min_rtt {min_rtt} for a 20 ms backend: {s}"
    );
    assert!(a["sample_rtt_ms"].as_f64().unwrap() >= min_rtt * 0.9, "{s}");
    assert!(a["changes"].as_u64().unwrap() > 0, "{s}");
    let schema_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/stats.schema.json"
    ))
    .unwrap();
    let schema: serde_json::Value = serde_json::from_str(&schema_text).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let doc = stats(&gw).await;
    let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}\n{doc}");
    let metrics = client()
        .request(
            Request::get(gw.url("/metrics"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        "portcullis_endpoint_capacity_min{endpoint=\"/work\"} 2",
        "portcullis_endpoint_capacity_max{endpoint=\"/work\"} 100",
        "portcullis_endpoint_min_rtt_seconds{endpoint=\"/work\"}",
        "portcullis_endpoint_capacity_changes_total{endpoint=\"/work\"}",
    ] {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }

    knee.set(KneeModel {
        capacity: 6,
        ..KneeModel::default()
    });
    settles(&gw, Duration::from_secs(10), 4..=10, 2..=100).await;
    knee.set(KneeModel {
        capacity: 40,
        ..KneeModel::default()
    });
    settles(&gw, Duration::from_secs(15), 30..=60, 2..=100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bounds_hold_past_the_knee_and_when_everything_fails() {
    let knee = KneeBackend::start(KneeModel {
        capacity: 40,
        ..KneeModel::default()
    })
    .await;
    let gw = TestGateway::start(&config(&knee, "{min_capacity: 4, max_capacity: 10}")).await;
    let _clients = Load::start(gw.url("/work"), 48);
    // Room for 40: the limit climbs to max_capacity and no further.
    settles(&gw, Duration::from_secs(10), 10..=10, 4..=10).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let limit = work_stats(&gw).await["capacity"].as_u64().unwrap();
        assert!((4..=10).contains(&limit), "{limit}");
        assert!(
            knee.take_peak() <= 10,
            "the backend saw more than max_capacity in flight"
        );
    }
    // Every request fails at once: the limit backs off to min_capacity, never below.
    knee.set(KneeModel {
        fail: true,
        ..KneeModel::default()
    });
    settles(&gw, Duration::from_secs(10), 4..=4, 4..=10).await;
    let s = work_stats(&gw).await;
    assert_eq!(s["adaptive"]["state"], "overloaded", "{s}");
}
