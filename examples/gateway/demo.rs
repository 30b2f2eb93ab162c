//! Two small demo backends started inside the gateway process when it runs without
//! `--config`, so `cargo run --release --example gateway` works on a fresh machine.

use axum::routing::{get, post};
use axum::{Json, Router};
use std::time::Duration;
use tokio::net::TcpListener;

/// Starts one demo backend on an ephemeral 127.0.0.1 port; returns its port.
pub(crate) async fn start(name: &'static str) -> std::io::Result<u16> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/work",
            post(move |body: String| async move {
                // Simulate a little work so the admission queue has something to do.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Json(serde_json::json!({ "backend": name, "received_bytes": body.len() }))
            }),
        )
        .fallback(move |uri: axum::http::Uri| async move {
            Json(serde_json::json!({ "backend": name, "path": uri.path() }))
        });
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}
