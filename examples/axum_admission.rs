//! Your own axum app with admission control, the stats routes and health probes.
//!
//! ```sh
//! cargo run --example axum_admission
//! curl -X POST http://127.0.0.1:3000/predict        # 8 at a time, the rest queue (FIFO)
//! curl http://127.0.0.1:3000/balancer/stats         # also /metrics, /healthz, /readyz
//! # and the dashboard: http://127.0.0.1:3000/balancer/ui
//! cargo run --example axum_admission -- --smoke     # serves one request to itself, exits 0
//! ```

#[path = "common/smoke.rs"]
mod smoke;

use axum::{routing::post, Router};
use http::Method;
use portcullis::prelude::*;
use std::{sync::Arc, time::Duration};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // POST /predict: 8 at a time, the rest wait in FIFO order, 504 after 5 s in the queue.
    let predict = Arc::new(Limiter::local(8).with_queue_timeout(Duration::from_secs(5)));
    let endpoints = Endpoints::new().watch("/predict", Some(Method::POST), predict);
    let app = Router::new()
        .route("/predict", post(|| async { "scored\n" }))
        .layer(HttpAdmissionLayer::new(endpoints.clone()))
        // /balancer/stats, /balancer/stats/history, /metrics, /balancer/ui, /healthz, /readyz
        .merge(router_for(&endpoints));

    let listener = tokio::net::TcpListener::bind(smoke::listen_addr(3000)).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("listening on {base}: POST /predict, GET /balancer/stats, /balancer/ui");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if smoke::enabled() {
        let (status, body) = smoke::send(&base, Method::POST, "/predict").await;
        let (_, stats) = smoke::send(&base, Method::GET, "/balancer/stats").await;
        let stats: serde_json::Value = serde_json::from_str(&stats)?;
        let admitted = &stats["endpoints"]["/predict"]["admitted"];
        smoke::finish(
            status == 200 && body == "scored\n" && admitted == 1,
            &format!("POST /predict: {status}, admitted {admitted}"),
        );
    }
    server.await??;
    Ok(())
}
