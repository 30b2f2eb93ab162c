//! A circuit breaker whose fallback is another service in the same process: no URL, no
//! second server.
//!
//! `/recommend` is served by the "model" (the primary) while it works, and by a cheap
//! in-process fallback (a static answer) after 2 consecutive failures. The breaker checks the
//! primary's own `/healthz` route in-process and returns traffic to it after 2 good checks
//! and at least 5 s on the fallback.
//!
//! ```sh
//! cargo run --example breaker_inprocess
//! curl http://127.0.0.1:3001/recommend               # from the model
//! curl -X POST http://127.0.0.1:3001/model/break     # the model starts failing
//! curl http://127.0.0.1:3001/recommend               # 500, 500, then the fallback's answer
//! curl -X POST http://127.0.0.1:3001/model/heal      # back to the model within ~7 s
//! cargo run --example breaker_inprocess -- --smoke   # breaks the model, checks the fallback
//! ```

#[path = "common/smoke.rs"]
mod smoke;

use axum::{body::Body, http::StatusCode, routing::get, routing::post, Router};
use http::Method;
use portcullis::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{Layer, ServiceExt};

/// The primary: answers while `healthy`, 500 otherwise (its `/healthz` too).
fn model(healthy: Arc<AtomicBool>) -> Router {
    let answer = move || {
        let ok = healthy.load(Ordering::Relaxed);
        async move {
            match ok {
                true => (StatusCode::OK, "from the model\n"),
                false => (StatusCode::INTERNAL_SERVER_ERROR, "model failed\n"),
            }
        }
    };
    Router::new()
        .route("/recommend", get(answer.clone()))
        .route("/healthz", get(answer))
}

/// The breaker's recovery check: the primary's `/healthz`, called in-process.
struct InProcessCheck(Router);

impl Probe for InProcessCheck {
    fn probe(&self, _target: &str) -> ProbeFuture {
        let model = self.0.clone();
        Box::pin(async move {
            let start = Instant::now();
            let req = http::Request::get("/healthz").body(Body::empty());
            let Ok(req) = req else {
                return ProbeResult::unhealthy(start.elapsed(), "bad request");
            };
            let Ok(resp) = model.oneshot(req).await;
            match resp.status().is_success() {
                true => ProbeResult::healthy(start.elapsed(), resp.status().to_string()),
                false => ProbeResult::unhealthy(start.elapsed(), resp.status().to_string()),
            }
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let healthy = Arc::new(AtomicBool::new(true));
    let primary = model(healthy.clone());
    let fallback = Router::new().route("/recommend", get(|| async { "popular items\n" }));
    let config = BreakerConfig {
        failure_threshold: 2,
        recheck_interval: Duration::from_secs(1),
        min_fallback_duration: Duration::from_secs(5),
        recovery_success_threshold: 2,
        ..BreakerConfig::default() // no `url`: the fallback is the service given below
    };
    config.validate()?;
    let breaker = Breaker::builder(config)
        .probe(InProcessCheck(primary.clone()))
        .build();
    let recommend = HttpFallbackLayer::new(fallback, breaker.clone()).layer(primary);

    let (h1, h2) = (healthy.clone(), healthy);
    let app = Router::new()
        .route_service("/recommend", recommend)
        .route(
            "/model/break",
            post(move || async move { h1.store(false, Ordering::Relaxed) }),
        )
        .route(
            "/model/heal",
            post(move || async move { h2.store(true, Ordering::Relaxed) }),
        );
    let listener = tokio::net::TcpListener::bind(smoke::listen_addr(3001)).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("listening on {base}: GET /recommend, POST /model/break, POST /model/heal");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    if smoke::enabled() {
        let first = smoke::send(&base, Method::GET, "/recommend").await;
        smoke::send(&base, Method::POST, "/model/break").await;
        let mut statuses = Vec::new();
        for _ in 0..2 {
            statuses.push(smoke::send(&base, Method::GET, "/recommend").await.0);
        }
        let served = smoke::send(&base, Method::GET, "/recommend").await;
        smoke::finish(
            first.1 == "from the model\n"
                && statuses == [500, 500]
                && served == (StatusCode::OK, "popular items\n".into())
                && breaker.state() == BreakerState::Fallback,
            &format!("primary failures {statuses:?}, then {served:?}"),
        );
    }
    server.await??;
    Ok(())
}
