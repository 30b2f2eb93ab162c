//! `on_client_cancel`: a backend that keeps working after its client went away never runs
//! more than `capacity` requests at once with `hold`; real axum backend, the real gateway.

mod support;

use axum::routing::{any, get};
use axum::Router;
use http_body_util::BodyExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{backend, client, Server, TestGateway};

/// The exact number of requests the backend works on, and the most it saw at once.
#[derive(Default)]
struct Work {
    now: AtomicUsize,
    max: AtomicUsize,
    done: AtomicUsize,
    /// The `x-job` ids the backend started working on.
    started: Mutex<HashSet<String>>,
}

impl Work {
    fn started(&self, job: &str) -> bool {
        self.started.lock().unwrap().contains(job)
    }
}

/// A backend like a model server: each `/work` request runs for `work_ms` whether or not
/// its client is still there (the work is a task of its own that the handler only awaits).
async fn stubborn_backend(work_ms: u64) -> (Server, Arc<Work>) {
    let work = Arc::new(Work::default());
    let w = Arc::clone(&work);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/work",
            any(move |headers: http::HeaderMap| {
                let w = Arc::clone(&w);
                async move {
                    if let Some(id) = headers.get("x-job").and_then(|v| v.to_str().ok()) {
                        w.started.lock().unwrap().insert(id.to_owned());
                    }
                    let job = tokio::spawn(async move {
                        let now = w.now.fetch_add(1, Ordering::SeqCst) + 1;
                        w.max.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(work_ms)).await;
                        w.now.fetch_sub(1, Ordering::SeqCst);
                        w.done.fetch_add(1, Ordering::SeqCst);
                    });
                    let _ = job.await;
                    "done"
                }
            }),
        );
    (backend(app).await, work)
}

fn config(upstream: &Server, capacity: usize, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.5\nqueue_timeout: 30\nupstreams:\n  - {{url: \"{}\", primary: true}}\nendpoints:\n  /work: {{capacity: {capacity}}}\n{extra}",
        upstream.url()
    )
}

async fn endpoint_stats(gw: &TestGateway) -> serde_json::Value {
    let resp = client()
        .get(gw.url("/balancer/stats").parse().unwrap())
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["endpoints"]["/work"].clone()
}

/// Runs `total` requests, `parallel` at a time; every `cancel_every`-th is dropped by its
/// client as soon as the backend started working on it (it was admitted and forwarded; the
/// work is still running), the others are awaited. Returns (answered, cancelled).
async fn load(
    gw: &TestGateway,
    work: &Arc<Work>,
    total: usize,
    parallel: usize,
    cancel_every: usize,
) -> (usize, usize) {
    let url: http::Uri = gw.url("/work").parse().unwrap();
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for i in 0..total {
        let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
        let url = url.clone();
        let work = Arc::clone(work);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let job = i.to_string();
            let req = http::Request::get(url)
                .header("x-job", &job)
                .body(axum::body::Body::empty())
                .unwrap();
            let req = async {
                let resp = client().request(req).await.unwrap();
                let status = resp.status();
                resp.into_body().collect().await.unwrap();
                status
            };
            if i % cancel_every == 0 {
                let started = async {
                    while !work.started(&job) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                };
                tokio::select! {
                    // Answered before the client saw the backend start: not a cancel.
                    status = req => Some(status),
                    _ = tokio::time::timeout(Duration::from_secs(30), started) => None,
                }
            } else {
                let status = tokio::time::timeout(Duration::from_secs(60), req)
                    .await
                    .expect("a request that was not cancelled is answered");
                Some(status)
            }
        }));
    }
    let (mut answered, mut cancelled) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Some(status) => {
                assert_eq!(status, 200);
                answered += 1;
            }
            None => cancelled += 1,
        }
    }
    (answered, cancelled)
}

/// Waits up to 10 s for the endpoint to be idle; returns its last stats.
async fn settle(gw: &TestGateway) -> serde_json::Value {
    let mut stats = endpoint_stats(gw).await;
    for _ in 0..100 {
        if stats["active_requests"] == 0 && stats["queue_depth"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = endpoint_stats(gw).await;
    }
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_the_backends_true_concurrency_within_capacity() {
    let (upstream, work) = stubborn_backend(60).await;
    let gw = TestGateway::start(&config(&upstream, 4, "")).await;
    // A third of the clients go away mid-request.
    let (answered, cancelled) = load(&gw, &work, 200, 12, 3).await;
    let stats = settle(&gw).await;
    println!(
        "hold: answered {answered}, cancelled {cancelled}, backend max concurrency {}, held {}",
        work.max.load(Ordering::SeqCst),
        stats["held_after_cancel"]
    );
    assert!(cancelled > 20, "the load cancelled requests ({cancelled})");
    assert!(
        stats["held_after_cancel"].as_u64().unwrap() > 0,
        "admitted requests were held after their client left: {stats}"
    );
    assert!(
        work.max.load(Ordering::SeqCst) <= 4,
        "the backend ran {} at once, capacity 4",
        work.max.load(Ordering::SeqCst)
    );
    assert_eq!(stats["active_requests"], 0, "{stats}");
    assert_eq!(stats["local_active"], 0, "{stats}");
    assert_eq!(stats["queue_depth"], 0, "{stats}");
    assert_eq!(work.now.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_frees_the_slot_at_the_cancel() {
    // One slot, a 2 s job: the first client leaves after 100 ms; with `release` the second
    // request starts while the backend still works on the first.
    let (upstream, work) = stubborn_backend(2_000).await;
    let gw = TestGateway::start(&config(&upstream, 1, "on_client_cancel: release\n")).await;
    let url: http::Uri = gw.url("/work").parse().unwrap();
    let first = tokio::time::timeout(Duration::from_millis(100), client().get(url.clone())).await;
    assert!(first.is_err(), "the first request was cut by its client");
    let stats = endpoint_stats(&gw).await;
    assert_eq!(stats["held_after_cancel"], 0, "{stats}");
    let second = tokio::time::timeout(Duration::from_secs(10), client().get(url))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(
        work.max.load(Ordering::SeqCst),
        2,
        "with release, the backend worked on both at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_cut_at_the_hold_limit() {
    // A job far longer than the hold limit: the slot is freed at the limit, not at the end.
    let (upstream, _work) = stubborn_backend(20_000).await;
    let gw = TestGateway::start(&config(&upstream, 1, "client_cancel_hold_timeout: 0.5\n")).await;
    let url: http::Uri = gw.url("/work").parse().unwrap();
    let first = tokio::time::timeout(Duration::from_millis(100), client().get(url.clone())).await;
    assert!(first.is_err());
    // The gateway sees the client's close when it next polls that connection: wait for it.
    let mut stats = endpoint_stats(&gw).await;
    for _ in 0..50 {
        if stats["held_after_cancel"] != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = endpoint_stats(&gw).await;
    }
    assert_eq!(stats["local_active"], 1, "held after the cancel: {stats}");
    assert_eq!(stats["held_after_cancel"], 1, "{stats}");
    let stats = settle(&gw).await;
    assert_eq!(stats["active_requests"], 0, "freed at the limit: {stats}");
    assert_eq!(stats["held_cut"], 1, "{stats}");
}
