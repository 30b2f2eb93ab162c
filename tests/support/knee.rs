//! A backend whose knee moves at run time: `/work` answers after `base_ms`, plus
//! `per_request_ms` for every request in flight above `capacity`; with `fail` set, every
//! `/work` answers 500 at once. `POST /control` with a JSON object of those fields changes
//! the model while it serves; `GET /control` answers the model, the in-flight count and
//! its peak. In-process tests read the same counters through [`KneeBackend`].

use super::{backend, Server};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{any, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The latency model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KneeModel {
    /// Requests served at `base_ms`.
    pub capacity: usize,
    /// Latency up to the knee.
    pub base_ms: u64,
    /// Added per request in flight above the knee.
    pub per_request_ms: u64,
    /// Every request answers 500 at once.
    pub fail: bool,
}

impl Default for KneeModel {
    fn default() -> Self {
        Self {
            capacity: 16,
            base_ms: 20,
            per_request_ms: 5,
            fail: false,
        }
    }
}

/// What the backend shares with its handlers and the test.
#[derive(Debug, Default)]
pub struct KneeState {
    model: Mutex<KneeModel>,
    inflight: AtomicUsize,
    peak: AtomicUsize,
    served: AtomicU64,
}

/// A running knee backend.
pub struct KneeBackend {
    pub server: Server,
    pub state: Arc<KneeState>,
}

impl KneeBackend {
    pub async fn start(model: KneeModel) -> Self {
        let state = Arc::new(KneeState {
            model: Mutex::new(model),
            ..Default::default()
        });
        let app = Router::new()
            .route("/work", any(work))
            .route("/control", get(read).post(control))
            .route("/health", get(|| async { "ok" }))
            .with_state(state.clone());
        Self {
            server: backend(app).await,
            state,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Changes the model while it serves.
    pub fn set(&self, model: KneeModel) {
        *self.state.model.lock().unwrap() = model;
    }

    pub fn inflight(&self) -> usize {
        self.state.inflight.load(Ordering::SeqCst)
    }

    /// The highest in-flight count since the last call (resets it to the current count).
    pub fn take_peak(&self) -> usize {
        self.state.peak.swap(self.inflight(), Ordering::SeqCst)
    }

    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::SeqCst)
    }
}

/// Decrements the in-flight count however the handler ends (a client that goes away
/// drops it).
struct InFlight<'a>(&'a KneeState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn work(State(s): State<Arc<KneeState>>) -> (StatusCode, &'static str) {
    let model = *s.model.lock().unwrap();
    let now = s.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(&s);
    s.peak.fetch_max(now, Ordering::SeqCst);
    if model.fail {
        return (StatusCode::INTERNAL_SERVER_ERROR, "failing");
    }
    let over = now.saturating_sub(model.capacity) as u64;
    tokio::time::sleep(Duration::from_millis(
        model.base_ms + model.per_request_ms * over,
    ))
    .await;
    s.served.fetch_add(1, Ordering::SeqCst);
    (StatusCode::OK, "done")
}

async fn read(State(s): State<Arc<KneeState>>) -> Json<serde_json::Value> {
    let model = *s.model.lock().unwrap();
    Json(serde_json::json!({
        "model": model,
        "inflight": s.inflight.load(Ordering::SeqCst),
        "peak": s.peak.load(Ordering::SeqCst),
        "served": s.served.load(Ordering::SeqCst),
    }))
}

async fn control(
    State(s): State<Arc<KneeState>>,
    Json(change): Json<serde_json::Value>,
) -> Json<KneeModel> {
    let mut model = s.model.lock().unwrap();
    let mut v = serde_json::to_value(*model).unwrap();
    if let (Some(v), Some(change)) = (v.as_object_mut(), change.as_object()) {
        v.extend(change.clone());
    }
    if let Ok(m) = serde_json::from_value(v) {
        *model = m;
    }
    Json(*model)
}

/// `n` closed-loop clients sending `GET url` back to back until dropped, recording each
/// answer's status and latency (a transport error is status 0).
pub struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u16, Duration)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: String, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..n)
            .map(|_| {
                let (stop, url, seen) = (stop.clone(), url.clone(), seen.clone());
                tokio::spawn(async move {
                    let client = super::client();
                    while !stop.load(Ordering::Relaxed) {
                        let req = http::Request::get(&url)
                            .body(axum::body::Body::empty())
                            .unwrap();
                        let started = Instant::now();
                        let status = match client.request(req).await {
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                                status
                            }
                            Err(_) => 0,
                        };
                        seen.lock().unwrap().push((status, started.elapsed()));
                        if status == 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Self { stop, seen, tasks }
    }

    /// The answers recorded since the last call.
    pub fn take(&self) -> Vec<(u16, Duration)> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}
