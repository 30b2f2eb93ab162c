//! The one-line stats route of your own app (`portcullis::dashboard::router_for`) against the
//! example gateway's `/balancer/stats`: the same traffic through the same limit gives the
//! same endpoint numbers, and both documents match `docs/stats.schema.json`.

mod support;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use portcullis::admission::{Endpoints, HttpAdmissionLayer, Limiter};
use portcullis_testkit::eventually_async;
use std::sync::Arc;
use std::time::Duration;
use support::{backend, client, TestGateway};
use tokio::sync::Semaphore;

/// `GET /work` answers once the test lets it through (one permit per request).
fn gated(gate: Arc<Semaphore>) -> Router {
    Router::new()
        .route(
            "/work",
            get(|State(gate): State<Arc<Semaphore>>| async move {
                gate.acquire().await.expect("gate open").forget();
                "done"
            }),
        )
        .with_state(gate)
}

async fn get_json(url: &str) -> (StatusCode, serde_json::Value) {
    let resp = client()
        .request(Request::get(url).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn schema_errors(doc: &serde_json::Value) -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/stats.schema.json"
    ))
    .unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    validator.iter_errors(doc).map(|e| e.to_string()).collect()
}

/// The `/work` entry of a stats document without what depends on timing (the waits' sum
/// and buckets); its wait count stays.
fn work_entry(doc: &serde_json::Value) -> serde_json::Value {
    let mut e = doc["endpoints"]["/work"].clone();
    let count = e["queue_wait"]["count"].clone();
    e["queue_wait"] = serde_json::json!({ "count": count });
    e
}

/// Sends `n` requests to `url` at once; the tasks, to join later.
fn spawn_requests(url: &str, n: usize) -> Vec<tokio::task::JoinHandle<StatusCode>> {
    (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { get_json(&url).await.0 })
        })
        .collect()
}

/// Waits until the stats at `stats_url` show `active` requests holding a slot and `queued`
/// waiting.
async fn wait_for_load(stats_url: &str, active: u64, queued: u64) {
    let seen = eventually_async(Duration::from_secs(10), async || {
        let (_, s) = get_json(stats_url).await;
        let e = &s["endpoints"]["/work"];
        e["active_requests"] == active && e["queue_depth"] == queued
    })
    .await;
    assert!(seen, "{stats_url}: {:?}", get_json(stats_url).await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_line_stats_route_matches_the_gateways_stats() {
    // The gateway, proxying to a gated backend, with /work limited to 2 at a time.
    let gw_gate = Arc::new(Semaphore::new(0));
    let be = backend(gated(gw_gate.clone())).await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{}\", primary: true}}\n\
         endpoints:\n  /work: {{capacity: 2, method: GET}}\n",
        be.url()
    ))
    .await;

    // Your own app: the same handler behind the same limit, and the stats in one line.
    let app_gate = Arc::new(Semaphore::new(0));
    let limiter = Limiter::local(2).with_queue_timeout(Duration::from_secs(30));
    let endpoints = Endpoints::new().watch("/work", Some(Method::GET), Arc::new(limiter));
    let app = gated(app_gate.clone())
        .layer(HttpAdmissionLayer::new(endpoints.clone()))
        .merge(portcullis::dashboard::router_for(&endpoints));
    let own = backend(app).await;

    let sides = [
        (gw.url("/work"), gw.url("/balancer/stats"), gw_gate),
        (
            format!("{}/work", own.url()),
            format!("{}/balancer/stats", own.url()),
            app_gate,
        ),
    ];
    let mut docs = Vec::new();
    for (work, stats, gate) in &sides {
        // Three requests one after the other, then three at once: two run, one queues.
        gate.add_permits(3);
        for _ in 0..3 {
            assert_eq!(get_json(work).await.0, StatusCode::OK);
        }
        let held = spawn_requests(work, 3);
        wait_for_load(stats, 2, 1).await;
        let (status, loaded) = get_json(stats).await;
        assert_eq!(status, StatusCode::OK);
        gate.add_permits(3);
        for t in held {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
        wait_for_load(stats, 0, 0).await;
        let (_, done) = get_json(stats).await;
        docs.push((loaded, done));
    }

    let (gw_loaded, gw_done) = &docs[0];
    let (own_loaded, own_done) = &docs[1];
    for doc in [gw_loaded, gw_done, own_loaded, own_done] {
        let errors = schema_errors(doc);
        assert!(errors.is_empty(), "{errors:?}\n{doc}");
    }
    assert_eq!(work_entry(own_loaded), work_entry(gw_loaded));
    assert_eq!(work_entry(own_done), work_entry(gw_done));
    let e = &own_loaded["endpoints"]["/work"];
    assert_eq!(
        (&e["capacity"], &e["active_requests"], &e["available_slots"]),
        (&2.into(), &2.into(), &0.into())
    );
    assert_eq!((&e["queue_depth"], &e["admitted"]), (&1.into(), &5.into()));
    let e = &own_done["endpoints"]["/work"];
    assert_eq!((&e["admitted"], &e["method"]), (&6.into(), &"GET".into()));
    assert_eq!(e["queue_wait"]["count"], 6);
    assert_eq!(own_done["health"]["ready"], true);
}
