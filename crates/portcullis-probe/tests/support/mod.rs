//! Real axum test backends on 127.0.0.1 whose behaviour changes past a known knee.
#![allow(dead_code, unreachable_pub)]

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use axum::Router;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a request that arrives while more than `knee` are in flight gets.
#[derive(Debug, Clone, Copy)]
pub enum PastKnee {
    /// `base + penalty` latency, then 200.
    Slow(Duration),
    /// An immediate 503.
    Unavailable,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    pub requests: AtomicUsize,
    pub bad_requests: AtomicUsize,
}

struct Shared {
    knee: usize,
    base: Duration,
    past: PastKnee,
    /// When set, the request must carry this `authorization` header and a JSON body with
    /// `"x": 1`, else it gets a 400.
    require_auth: Option<&'static str>,
    counters: Arc<Counters>,
}

/// A running backend; the server task is aborted on drop.
#[derive(Debug)]
pub struct KneeBackend {
    pub base_url: String,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KneeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn work(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let c = s.counters.clone();
    c.requests.fetch_add(1, Ordering::SeqCst);
    // Counted from arrival until the handler ends or is dropped (client went away).
    let now = c.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(c.clone());
    c.max_inflight.fetch_max(now, Ordering::SeqCst);
    if let Some(auth) = s.require_auth {
        let body_ok = serde_json::from_slice::<serde_json::Value>(&body)
            .map(|v| v["x"] == 1)
            .unwrap_or(false);
        let json = headers
            .get("content-type")
            .is_some_and(|v| v == "application/json");
        if headers.get("authorization").is_none_or(|v| v != auth) || !body_ok || !json {
            c.bad_requests.fetch_add(1, Ordering::SeqCst);
            return StatusCode::BAD_REQUEST;
        }
    }
    if now > s.knee {
        match s.past {
            PastKnee::Slow(penalty) => tokio::time::sleep(s.base + penalty).await,
            PastKnee::Unavailable => return StatusCode::SERVICE_UNAVAILABLE,
        }
    } else {
        tokio::time::sleep(s.base).await;
    }
    StatusCode::OK
}

/// Starts a backend serving `/work` (any method) with a knee at `knee` concurrent requests.
pub async fn spawn(knee: usize, base: Duration, past: PastKnee) -> KneeBackend {
    spawn_with(knee, base, past, None).await
}

/// Like [`spawn`], requiring `authorization: <auth>` and a JSON body `{"x": 1}`.
pub async fn spawn_with(
    knee: usize,
    base: Duration,
    past: PastKnee,
    require_auth: Option<&'static str>,
) -> KneeBackend {
    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Shared {
        knee,
        base,
        past,
        require_auth,
        counters: counters.clone(),
    });
    let app = Router::new().route("/work", any(work)).with_state(shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    KneeBackend {
        base_url,
        counters,
        task,
    }
}

/// A base URL on which nothing listens.
pub async fn down_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}
