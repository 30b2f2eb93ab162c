//! `portcullis-admission`'s HTTP layer over the Redis-shared source, in front of a real axum
//! backend on 127.0.0.1: three "processes" (three storages, three layers) share one limit.

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portcullis_admission::{Config, Endpoints, HttpAdmissionLayer};
use portcullis_redis::testing::RedisServer;
use portcullis_redis::{OnError, RedisStorage, StorageConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{service_fn, Layer, ServiceExt};

/// A backend that records its maximum concurrency.
async fn backend() -> (String, Arc<AtomicUsize>) {
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n, m) = (now.clone(), max.clone());
    let app = Router::new().route(
        "/work",
        get(move || {
            let (n, m) = (n.clone(), m.clone());
            async move {
                let c = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(c, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                "done"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), max)
}

fn gateway_config() -> Config {
    serde_json::from_value(serde_json::json!({
        "queue_timeout": 10.0,
        "endpoints": {"/work": {}}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_limit_in_front_of_a_real_backend() {
    let Some(server) = RedisServer::start("three_processes_share_one_limit") else {
        return;
    };
    let (backend_url, backend_max) = backend().await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut clients = Vec::new();
    let mut storages = Vec::new();
    for _ in 0..3 {
        let storage = RedisStorage::connect(&StorageConfig::redis(server.url()))
            .await
            .unwrap();
        let cap = storage
            .get_or_probe("/work", false, || async { Ok::<_, std::io::Error>(4) })
            .await
            .unwrap();
        let endpoints = Endpoints::from_config_with(&gateway_config(), |path, _| {
            storage.capacity_source(path, cap)
        })
        .unwrap();
        let (client, backend_url) = (client.clone(), backend_url.clone());
        let svc = HttpAdmissionLayer::new(endpoints).layer(service_fn(move |req: Request<()>| {
            let uri = format!("{backend_url}{}", req.uri().path());
            let client = client.clone();
            async move {
                client
                    .request(Request::get(uri).body(Empty::new()).unwrap())
                    .await
            }
        }));
        storages.push(storage);
        for _ in 0..16 {
            let svc = svc.clone();
            clients.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..3 {
                    let resp = svc
                        .clone()
                        .oneshot(Request::get("/work").body(()).unwrap())
                        .await
                        .unwrap();
                    statuses.push(resp.status());
                    resp.into_body().collect().await.unwrap();
                }
                statuses
            }));
        }
    }
    for c in clients {
        let statuses = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .unwrap()
            .unwrap();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
    }
    let max = backend_max.load(Ordering::SeqCst);
    assert!(
        max <= 4,
        "backend saw {max} concurrent requests with a global capacity of 4"
    );
    assert!(max >= 2, "no concurrency at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_reject_renders_storage_unavailable() {
    let Some(mut server) = RedisServer::start("on_error_reject_renders") else {
        return;
    };
    let mut cfg = StorageConfig::redis(server.url());
    cfg.on_error = OnError::Reject;
    cfg.timeout = Duration::from_millis(200);
    let storage = RedisStorage::connect(&cfg).await.unwrap();
    let endpoints = Endpoints::from_config_with(&gateway_config(), |path, _| {
        storage.capacity_source(path, 2)
    })
    .unwrap();
    let svc = HttpAdmissionLayer::new(endpoints).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
            Bytes::from("ok"),
        )))
    }));
    let resp = svc
        .clone()
        .oneshot(Request::get("/work").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    server.stop();
    // The first request after the stop detects the outage (bounded by storage.timeout);
    // the next ones are refused at once.
    let mut last = StatusCode::OK;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let resp = svc
            .clone()
            .oneshot(Request::get("/work").body(()).unwrap())
            .await
            .unwrap();
        assert!(t0.elapsed() < Duration::from_millis(200) * 2 + Duration::from_millis(100));
        last = resp.status();
        if last == StatusCode::SERVICE_UNAVAILABLE {
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(
                body.starts_with(br#"{"error":"storage_unavailable""#),
                "{body:?}"
            );
            break;
        }
    }
    assert_eq!(last, StatusCode::SERVICE_UNAVAILABLE);
    server.start_again();
    let ok = async {
        loop {
            let resp = svc
                .clone()
                .oneshot(Request::get("/work").body(()).unwrap())
                .await
                .unwrap();
            if resp.status() == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), ok)
        .await
        .expect("back to OK after Redis returns");
}
