//! An in-process fallback: both sides are axum routers in this process, served on 127.0.0.1
//! through `HttpFallbackLayer`, with no `Config::url`. The fallback service given to the layer
//! is the fallback: it engages after `failure_threshold` failures, and the primary, checked
//! in-process through its own `/healthz`, gets the traffic back.

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use portcullis_breaker::{Breaker, BreakerState, Config, HttpFallbackLayer};
use portcullis_health::{Probe, ProbeFuture, ProbeResult};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

/// The primary: `"primary"` while healthy, 500 on every path (`/healthz` too) otherwise.
fn primary(healthy: Arc<AtomicBool>) -> Router {
    let answer = move || {
        let ok = healthy.load(Ordering::SeqCst);
        async move {
            if ok {
                (StatusCode::OK, "primary")
            } else {
                (StatusCode::INTERNAL_SERVER_ERROR, "primary broken")
            }
        }
    };
    Router::new()
        .route("/healthz", get(answer.clone()))
        .route("/work", get(answer))
}

/// Checks the in-process primary by calling its `/healthz` route (no socket, no URL).
struct RouterProbe(Router);

impl Probe for RouterProbe {
    fn probe(&self, _target: &str) -> ProbeFuture {
        let router = self.0.clone();
        Box::pin(async move {
            let start = Instant::now();
            let req = Request::get("/healthz").body(Body::empty()).unwrap();
            match router.oneshot(req).await {
                Ok(r) if r.status().is_success() => ProbeResult::healthy(start.elapsed(), "200"),
                Ok(r) => ProbeResult::unhealthy(start.elapsed(), r.status().to_string()),
                Err(e) => match e {},
            }
        })
    }
}

async fn get_work(c: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr) -> (u16, String) {
    let uri: Uri = format!("http://{addr}/work").parse().unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.get(uri))
        .await
        .expect("an answer within 5 s")
        .expect("a response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_in_process_fallback_engages_without_url() {
    let healthy = Arc::new(AtomicBool::new(true));
    let primary = primary(healthy.clone());
    let config = Config {
        url: None,
        failure_threshold: 2,
        recheck_interval: Duration::from_millis(50),
        min_fallback_duration: Duration::from_millis(200),
        recovery_success_threshold: 2,
        probe_max_retries: 0,
        ..Config::default()
    };
    assert_eq!(config.validate(), Ok(()));
    let breaker = Breaker::builder(config)
        .probe(RouterProbe(primary.clone()))
        .build();
    let fallback = Router::new().route("/work", get(|| async { "fallback" }));
    let layer = HttpFallbackLayer::new(fallback, breaker.clone());
    let svc = ServiceExt::<Request<Body>>::map_response(layer.layer(primary), |r| r.map(Body::new));
    assert!(breaker.has_fallback());

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, Router::new().fallback_service(svc)).await;
    });
    let c: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();

    assert_eq!(get_work(&c, addr).await, (200, "primary".into()));
    healthy.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        assert_eq!(get_work(&c, addr).await, (500, "primary broken".into()));
    }
    assert_eq!(breaker.state(), BreakerState::Fallback);
    for _ in 0..3 {
        assert_eq!(get_work(&c, addr).await, (200, "fallback".into()));
    }
    let snap = breaker.status_snapshot();
    assert!(snap.fallback_configured && snap.using_fallback);
    assert_eq!(snap.counters.fallback_engaged, 1);
    assert_eq!(snap.counters.primary_unhealthy, 0);

    // The primary heals: its in-process checks bring the traffic back after the hold.
    healthy.store(true, Ordering::SeqCst);
    let back = portcullis_testkit::eventually(Duration::from_secs(10), || {
        breaker.state() == BreakerState::Normal
    })
    .await;
    assert!(back, "{:?}", breaker.status_snapshot());
    assert_eq!(get_work(&c, addr).await, (200, "primary".into()));
    assert_eq!(breaker.counters().recovered, 1);
    server.abort();
}
