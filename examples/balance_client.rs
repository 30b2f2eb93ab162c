//! An HTTP client balancing over replicas, with active health checks and passive ejection.
//!
//! Two demo replicas start in this process on 127.0.0.1; `b` answers 500 on every path. The
//! client is `HttpBalance` over `UpstreamClient`: `b` is ejected after `eject_after` failed
//! responses (and marked unhealthy by its failing `/healthz` checks), and from then on every
//! request goes to `a`.
//!
//! ```sh
//! cargo run --example balance_client              # prints who served each request
//! cargo run --example balance_client -- --smoke   # the same, exits 0 when b was ejected
//! ```

#[path = "common/smoke.rs"]
mod smoke;

use axum::{http::StatusCode, routing::get, Router};
use http_body_util::BodyExt;
use portcullis::prelude::*;
use std::time::Duration;
use tower::{Service, ServiceBuilder, ServiceExt};

/// A demo replica answering `name` (or 500 when `sick`) on `/work` and `/healthz`.
async fn replica(name: &'static str, sick: bool) -> Result<String, BoxError> {
    let status = if sick {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let answer = move || async move { (status, name) };
    let app = Router::new()
        .route("/work", get(answer))
        .route("/healthz", get(answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (a, b) = (replica("a", false).await?, replica("b", true).await?);
    let config: BalanceConfig = serde_json::from_value(serde_json::json!({
        "upstreams": [{"url": a, "primary": true}, {"url": b, "primary": true}],
        "routing_strategy": "round-robin",
        "health_check_interval": 0.2,
        "failure_threshold": 2,
        "eject_after": 2,
        "eject_for": 30,
    }))?;
    config.validate()?;
    // The replicas keyed and addressed by their base URL, checked with GET /healthz.
    let registry = ReplicaRegistry::from_config(&config, |u| u.url.clone());
    let _checker = registry.spawn_http_checker(&config); // stops when dropped
    let mut client = ServiceBuilder::new()
        .balance(registry.clone())
        .service(UpstreamClient::new().with_timeout(Duration::from_secs(5)));

    let mut served = Vec::new();
    for i in 0..10 {
        let req = http::Request::get("/work").body(axum::body::Body::empty())?;
        let resp = client.ready().await?.call(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let by = String::from_utf8_lossy(&body).into_owned();
        println!("request {i}: {status} from {by}");
        served.push((status, by));
    }
    for r in registry.snapshot().replicas {
        println!("{}: healthy {}, ejected {}", r.url, r.healthy, r.ejected);
    }
    if smoke::enabled() {
        let snapshot = registry.snapshot();
        let ejected = snapshot.replicas.iter().any(|r| r.url == b && r.ejected);
        let tail_ok = served[6..].iter().all(|(s, by)| *s == 200 && by == "a");
        smoke::finish(
            ejected && tail_ok,
            "b ejected, the last requests served by a",
        );
    }
    Ok(())
}
