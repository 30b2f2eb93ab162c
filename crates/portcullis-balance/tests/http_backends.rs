//! The HTTP form against real axum backends on 127.0.0.1: health gating within the bound,
//! 503 `no_healthy_upstream`, passive ejection, the in-flight slot held by the body, and
//! removing replicas while 64 clients send requests.

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use portcullis_balance::{Config, HttpBalance, ReplicaRegistry, RoutingStrategy, Tier};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt};

struct Backend {
    id: String,
    url: String,
    healthy: AtomicBool,
    fail: AtomicBool,
    hits: AtomicUsize,
}

async fn backend(id: &str) -> Arc<Backend> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = Arc::new(Backend {
        id: id.into(),
        url: format!("http://{}", listener.local_addr().unwrap()),
        healthy: AtomicBool::new(true),
        fail: AtomicBool::new(false),
        hits: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(b): State<Arc<Backend>>| async move {
                if b.healthy.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "slow"
            }),
        )
        .fallback(|State(b): State<Arc<Backend>>| async move {
            b.hits.fetch_add(1, Ordering::SeqCst);
            if b.fail.load(Ordering::SeqCst) {
                (StatusCode::INTERNAL_SERVER_ERROR, b.id.clone())
            } else {
                (StatusCode::OK, b.id.clone())
            }
        })
        .with_state(b.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    b
}

type Proxy = tower::util::BoxCloneSyncService<
    (Arc<str>, Request<Body>),
    Response<hyper::body::Incoming>,
    hyper_util::client::legacy::Error,
>;

/// The shared proxy: forwards the request to the chosen base URL on one pooled client.
fn proxy() -> Proxy {
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |(base, mut req): (Arc<str>, Request<Body>)| {
            let client = client.clone();
            async move {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                *req.uri_mut() = format!("{base}{pq}").parse().unwrap();
                client.request(req).await
            }
        },
    ))
}

fn balancer(
    config: &Config,
    backends: &[(&Arc<Backend>, bool)],
) -> (ReplicaRegistry<Arc<str>>, HttpBalance<Proxy, Arc<str>>) {
    let registry = ReplicaRegistry::new(config);
    for (b, primary) in backends {
        let url: Arc<str> = b.url.as_str().into();
        registry.add(url.clone(), Tier::from_primary(*primary), url);
    }
    let svc = HttpBalance::new(proxy(), registry.clone());
    (registry, svc)
}

async fn send(
    svc: &mut HttpBalance<Proxy, Arc<str>>,
    path: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let req = Request::get(path).body(Body::empty()).unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn fast_checks() -> Config {
    Config {
        routing_strategy: RoutingStrategy::RoundRobin,
        health_check_interval: Duration::from_millis(100),
        health_check_timeout: Duration::from_millis(100),
        failure_threshold: 3,
        recovery_threshold: 2,
        eject_after: 0,
        ..Config::default()
    }
}

#[tokio::test]
async fn a_replica_whose_healthz_fails_stops_getting_traffic_within_the_bound_and_comes_back() {
    let (a, b) = (backend("a").await, backend("b").await);
    let cfg = fast_checks();
    let (registry, mut svc) = balancer(&cfg, &[(&a, true), (&b, true)]);
    let _checker = registry.spawn_http_checker(&cfg);
    for _ in 0..10 {
        send(&mut svc, "/").await;
    }
    assert!(b.hits.load(Ordering::SeqCst) > 0);

    b.healthy.store(false, Ordering::SeqCst);
    // failure_threshold × interval + timeout + interval = 0.5 s (plus scheduling slack).
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert!(
        !registry.snapshot().replicas[1].healthy,
        "{:?}",
        registry.snapshot()
    );
    let before = b.hits.load(Ordering::SeqCst);
    for _ in 0..20 {
        let (status, _, body) = send(&mut svc, "/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "a"));
    }
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        before,
        "no new request reached b"
    );
    let snap = registry.snapshot();
    assert!(snap.replicas[1].counters.consecutive_probe_failures >= 3);
    assert!(snap.replicas[1].counters.last_probe_latency.is_some());

    b.healthy.store(true, Ordering::SeqCst);
    // recovery_threshold × interval (+ slack).
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut seen = HashSet::new();
    for _ in 0..10 {
        seen.insert(send(&mut svc, "/").await.2);
    }
    assert!(seen.contains("b"), "b gets traffic back: {seen:?}");
}

#[tokio::test]
async fn no_healthy_replica_answers_503_no_healthy_upstream() {
    let a = backend("a").await;
    let cfg = fast_checks();
    let (registry, mut svc) = balancer(&cfg, &[(&a, true)]);
    let _checker = registry.spawn_http_checker(&cfg);
    a.healthy.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(650)).await;
    let (status, headers, body) = send(&mut svc, "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "no_healthy_upstream");
    assert_eq!(a.hits.load(Ordering::SeqCst), 0);
    // gRPC clients get a trailers-only UNAVAILABLE.
    let req = Request::post("/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "14");
}

#[tokio::test]
async fn consecutive_5xx_eject_and_one_probe_recovers() {
    let (a, b) = (backend("a").await, backend("b").await);
    let cfg = Config {
        routing_strategy: RoutingStrategy::FirstHealthy,
        eject_after: 3,
        eject_for: Duration::from_millis(200),
        eject_max: Duration::from_secs(1),
        ..Config::default()
    };
    let (registry, mut svc) = balancer(&cfg, &[(&a, true), (&b, false)]);
    a.fail.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            send(&mut svc, "/").await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert!(registry.snapshot().replicas[0].ejected);
    for _ in 0..5 {
        assert_eq!(send(&mut svc, "/").await.2, "b");
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 3);
    // Cooldown over: one request probes `a`; it still fails, so it is re-ejected (2 × 0.2 s).
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        send(&mut svc, "/").await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(send(&mut svc, "/").await.2, "b");
    assert_eq!(registry.snapshot().replicas[0].counters.ejections, 2);
    a.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(send(&mut svc, "/").await.2, "a", "the probe succeeds");
    assert_eq!(send(&mut svc, "/").await.2, "a", "reinstated");
    assert!(registry.snapshot().replicas[0].healthy);
}

#[tokio::test]
async fn the_body_holds_the_slot_and_a_cancelled_request_releases_it() {
    let a = backend("a").await;
    let (registry, mut svc) = balancer(&Config::default(), &[(&a, true)]);
    let req = Request::get("/").body(Body::empty()).unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(
        registry.snapshot().replicas[0].inflight,
        1,
        "headers arrived, body not read"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"a");
    assert_eq!(
        registry.snapshot().replicas[0].inflight,
        0,
        "released at the end of the body"
    );

    let req = Request::get("/").body(Body::empty()).unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    drop(resp);
    assert_eq!(
        registry.snapshot().replicas[0].inflight,
        0,
        "released when the body is dropped"
    );

    let req = Request::get("/slow").body(Body::empty()).unwrap();
    let fut = svc.ready().await.unwrap().call(req);
    assert!(tokio::time::timeout(Duration::from_millis(100), fut)
        .await
        .is_err());
    assert_eq!(
        registry.snapshot().replicas[0].inflight,
        0,
        "cancelled: released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_replicas_while_64_clients_send_loses_nothing_and_never_misroutes() {
    let backends = [
        backend("r0").await,
        backend("r1").await,
        backend("r2").await,
        backend("r3").await,
    ];
    let cfg = Config::default(); // p2c
    let refs: Vec<(&Arc<Backend>, bool)> = backends.iter().map(|b| (b, true)).collect();
    let (registry, svc) = balancer(&cfg, &refs);
    // `removed[i]` is set only after `registry.remove` returned for backend i.
    let removed: Arc<[AtomicBool; 4]> = Arc::new(Default::default());
    let ids: Arc<Vec<String>> = Arc::new(backends.iter().map(|b| b.id.clone()).collect());
    const CLIENTS: usize = 64;
    const PER_CLIENT: usize = 40;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut svc = svc.clone();
            let removed = removed.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut ok = 0usize;
                let mut misrouted = 0usize;
                for _ in 0..PER_CLIENT {
                    let gone: Vec<bool> =
                        removed.iter().map(|f| f.load(Ordering::SeqCst)).collect();
                    let (status, _, body) = send(&mut svc, "/").await;
                    if status == StatusCode::OK {
                        ok += 1;
                    }
                    let i = ids.iter().position(|id| *id == body).expect("a backend id");
                    if gone[i] {
                        misrouted += 1;
                    }
                }
                (ok, misrouted)
            })
        })
        .collect();
    let hits = || {
        backends
            .iter()
            .map(|b| b.hits.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    let wait_for = |n: usize| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while hits() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    wait_for(CLIENTS * PER_CLIENT / 4).await;
    assert!(registry.remove(&backends[1].url));
    removed[1].store(true, Ordering::SeqCst);
    wait_for(CLIENTS * PER_CLIENT / 2).await;
    assert!(
        hits() < CLIENTS * PER_CLIENT,
        "clients still running at the second removal"
    );
    assert!(registry.remove(&backends[3].url));
    removed[3].store(true, Ordering::SeqCst);
    let (mut ok, mut misrouted) = (0, 0);
    for c in clients {
        let (o, m) = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .unwrap()
            .unwrap();
        ok += o;
        misrouted += m;
    }
    assert_eq!(ok, CLIENTS * PER_CLIENT, "every request answered 200");
    assert_eq!(
        misrouted, 0,
        "no request picked after a removal went to the removed replica"
    );
    assert_eq!(registry.len(), 2);
    let total: usize = backends.iter().map(|b| b.hits.load(Ordering::SeqCst)).sum();
    assert_eq!(total, CLIENTS * PER_CLIENT);
    assert!(
        backends[0].hits.load(Ordering::SeqCst) > 0 && backends[2].hits.load(Ordering::SeqCst) > 0
    );
    assert_eq!(
        registry
            .snapshot()
            .replicas
            .iter()
            .map(|r| r.inflight)
            .sum::<usize>(),
        0
    );
}

/// The gateway's wiring: an `Infallible` shared proxy over `(payload, Request<Body>)`, the
/// balancer as the router's fallback service, bodies mapped to `axum::body::Body`.
#[tokio::test]
async fn wires_into_an_axum_router_as_the_gateway_will() {
    let (a, b) = (backend("a").await, backend("b").await);
    let cfg = Config::default();
    let registry: ReplicaRegistry<Arc<str>> = ReplicaRegistry::new(&cfg);
    for be in [&a, &b] {
        registry.add(be.url.as_str(), Tier::Primary, be.url.as_str().into());
    }
    let inner = proxy();
    let dispatch = tower::service_fn(move |(u, req): (Arc<str>, Request<Body>)| {
        let fut = inner.clone().oneshot((u, req));
        async move {
            Ok::<_, std::convert::Infallible>(match fut.await {
                Ok(resp) => resp.map(Body::new),
                Err(_) => portcullis_core::Rejection::bad_gateway()
                    .to_json_response::<Body>()
                    .map(Body::new),
            })
        }
    });
    let balance = portcullis_balance::HttpBalanceLayer::new(registry.clone())
        .layer(dispatch)
        .map_response(|r| r.map(Body::new));
    let app = Router::new().fallback_service(balance);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let resp = client
            .request(
                Request::get(format!("http://{addr}/x"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        seen.insert(
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
                .into_owned(),
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    registry.remove(&a.url);
    registry.remove(&b.url);
    let resp = client
        .request(
            Request::get(format!("http://{addr}/x"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}
