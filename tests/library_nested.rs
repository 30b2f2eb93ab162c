//! The admission layer under axum's `Router::nest`, as docs/library.md documents it: a layer
//! inside the nested router sees the path with the nest prefix stripped (watch `/predict`),
//! a layer on the outer router sees the whole path (watch `/api/predict`). The layer matches
//! `Request::uri()`, never axum's `OriginalUri`.

mod support;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Method, Request, StatusCode};
use portcullis::admission::{Endpoints, HttpAdmissionLayer, Limiter};
use std::sync::Arc;
use support::{backend, client};

fn watching(paths: &[&str]) -> Endpoints {
    paths.iter().fold(Endpoints::new(), |e, p| {
        e.watch(*p, Some(Method::POST), Arc::new(Limiter::local(4)))
    })
}

fn predict() -> Router {
    Router::new().route("/predict", post(|| async { "scored" }))
}

async fn post_predict(app: Router) -> StatusCode {
    let server = backend(app).await;
    let req = Request::post(format!("{}/api/predict", server.url()))
        .body(Body::empty())
        .unwrap();
    client().request(req).await.unwrap().status()
}

fn admitted(endpoints: &Endpoints, path: &str) -> u64 {
    endpoints.stats().endpoints[path].admitted
}

#[tokio::test]
async fn inside_a_nested_router_the_layer_sees_the_stripped_path() {
    let endpoints = watching(&["/predict", "/api/predict"]);
    let inner = predict().layer(HttpAdmissionLayer::new(endpoints.clone()));
    let app = Router::new().nest("/api", inner);
    assert_eq!(post_predict(app).await, StatusCode::OK);
    assert_eq!(admitted(&endpoints, "/predict"), 1);
    assert_eq!(admitted(&endpoints, "/api/predict"), 0);
}

#[tokio::test]
async fn on_the_outer_router_the_layer_sees_the_whole_path() {
    let endpoints = watching(&["/predict", "/api/predict"]);
    let app = Router::new()
        .nest("/api", predict())
        .layer(HttpAdmissionLayer::new(endpoints.clone()));
    assert_eq!(post_predict(app).await, StatusCode::OK);
    assert_eq!(admitted(&endpoints, "/api/predict"), 1);
    assert_eq!(admitted(&endpoints, "/predict"), 0);
}
