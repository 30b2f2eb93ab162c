//! The HTTP form against real axum backends on 127.0.0.1: trip on 500s, recovery through
//! both gates by real `/healthz` probes, fallback_unavailable, and no lost request.

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use portcullis_breaker::{Breaker, BreakerState, Config, HttpFallbackLayer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

/// A backend answering `name` (200) while healthy and 500 otherwise, on every path including
/// `/healthz`.
struct Backend {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    health_hits: Arc<AtomicUsize>,
    status_when_sick: StatusCode,
    _task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn backend(name: &'static str, status_when_sick: StatusCode) -> Backend {
    let healthy = Arc::new(AtomicBool::new(true));
    let health_hits = Arc::new(AtomicUsize::new(0));
    let (h, hits) = (healthy.clone(), health_hits.clone());
    let app = Router::new().fallback(move |uri: Uri| {
        let (h, hits) = (h.clone(), hits.clone());
        async move {
            if uri.path() == "/healthz" {
                hits.fetch_add(1, Ordering::SeqCst);
            }
            if h.load(Ordering::SeqCst) {
                (StatusCode::OK, name.to_string())
            } else {
                (status_when_sick, format!("{name} broken"))
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Backend {
        addr,
        healthy,
        health_hits,
        status_when_sick,
        _task: AbortOnDrop(task),
    }
}

impl Backend {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn set_healthy(&self, v: bool) {
        self.healthy.store(v, Ordering::SeqCst);
    }
}

/// A minimal reverse proxy to `base` (connect errors become 502, as in the gateway).
fn proxy_to(
    base: String,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    tower::service_fn(move |mut req: Request<Body>| {
        let client = client.clone();
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = format!("{base}{pq}").parse().unwrap();
        async move {
            match tokio::time::timeout(Duration::from_secs(2), client.request(req)).await {
                Ok(Ok(resp)) => Ok(resp.map(Body::new)),
                Ok(Err(_)) => Ok(Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(Body::from("bad gateway"))
                    .unwrap()),
                Err(_) => Ok(Response::builder()
                    .status(StatusCode::GATEWAY_TIMEOUT)
                    .body(Body::from("timeout"))
                    .unwrap()),
            }
        }
    })
}

/// Serves primary -> HttpFallback -> fallback on 127.0.0.1 and returns its address.
async fn gateway(breaker: Breaker, primary: String, fallback: String) -> (SocketAddr, AbortOnDrop) {
    let svc = HttpFallbackLayer::new(proxy_to(fallback), breaker)
        .layer(proxy_to(primary))
        .map_response(|r| r.map(Body::new));
    let app = Router::new().fallback_service(svc);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, AbortOnDrop(task))
}

fn client() -> Client<HttpConnector, http_body_util::Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `path` with a 5 s bound; `Err` when no response came.
async fn get(
    c: &Client<HttpConnector, http_body_util::Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let uri: Uri = format!("http://{addr}{path}").parse().unwrap();
    let fut = async {
        let resp = c.get(uri).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "timeout".to_string())?
}

fn config(fallback: &str, hold: f64, recheck: f64, m: u32) -> Config {
    Config {
        url: Some(fallback.to_owned()),
        failure_threshold: 2,
        recheck_interval: Duration::from_secs_f64(recheck),
        min_fallback_duration: Duration::from_secs_f64(hold),
        recovery_success_threshold: m,
        probe_max_retries: 1,
        probe_backoff_base: Duration::from_millis(20),
        probe_timeout: Duration::from_secs(1),
        ..Config::default()
    }
}

/// The whole scenario; returns how long the fallback stayed engaged.
async fn trip_and_recover(hold: f64, recheck: f64, m: u32) -> Duration {
    let primary = backend("primary", StatusCode::INTERNAL_SERVER_ERROR).await;
    let fallback = backend("fallback", StatusCode::INTERNAL_SERVER_ERROR).await;
    let breaker = Breaker::http(
        config(&fallback.url(), hold, recheck, m),
        &primary.url(),
        "/healthz",
    );
    let (addr, _gw) = gateway(breaker.clone(), primary.url(), fallback.url()).await;
    let c = client();

    for _ in 0..3 {
        assert_eq!(
            get(&c, addr, "/work").await.unwrap(),
            (StatusCode::OK, "primary".into())
        );
    }
    // The primary pool answers 500: after failure_threshold (2) responses the fallback engages.
    primary.set_healthy(false);
    for _ in 0..2 {
        let (status, body) = get(&c, addr, "/work").await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::INTERNAL_SERVER_ERROR, "primary broken")
        );
    }
    let snap = breaker.status_snapshot();
    assert_eq!(snap.state, BreakerState::Fallback);
    // When the fallback engaged, from the breaker's own clock.
    let tripped = Instant::now() - Duration::from_secs_f64(snap.fallback_age_seconds.unwrap());
    assert_eq!(
        get(&c, addr, "/work").await.unwrap(),
        (StatusCode::OK, "fallback".into())
    );

    // The primary is healthy again at once; clients keep sending throughout.
    primary.set_healthy(true);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, c) = (stop.clone(), c.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(8);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let sent = Instant::now();
                seen.push((sent, get(&c, addr, "/work").await));
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            seen
        }));
    }
    let wait_until = Instant::now() + Duration::from_secs(6);
    while breaker.state() != BreakerState::Normal && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recovered = tripped.elapsed();
    assert_eq!(breaker.state(), BreakerState::Normal, "never recovered");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);

    let mut total = 0;
    for t in clients {
        let seen = t.await.unwrap();
        assert!(!seen.is_empty());
        for (sent, r) in &seen {
            total += 1;
            // No request is lost: every client gets a (successful) response.
            let (status, body) = r.as_ref().expect("every request gets a response");
            assert_eq!(*status, StatusCode::OK);
            if body == "primary" {
                // Only once both gates held.
                assert!(sent.duration_since(tripped) >= Duration::from_secs_f64(hold));
            }
        }
        assert_eq!(seen.last().unwrap().1.as_ref().unwrap().1, "primary");
    }
    assert!(total > 16);
    let counters = breaker.counters();
    assert_eq!(counters.fallback_engaged, 1);
    assert_eq!(counters.recovered, 1);
    assert!(counters.probes >= u64::from(m));
    assert!(primary.health_hits.load(Ordering::SeqCst) >= m as usize);
    assert_eq!(fallback.health_hits.load(Ordering::SeqCst), 0);
    recovered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_keeps_traffic_on_the_fallback() {
    // Probes every 0.1 s would satisfy M = 2 after 0.2 s; the 1 s hold decides.
    let held = trip_and_recover(1.0, 0.1, 2).await;
    assert!(held >= Duration::from_secs(1), "{held:?}");
    assert!(held < Duration::from_secs(3), "{held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_successful_probes_are_needed_after_the_hold() {
    // The 0.1 s hold passes early; 4 probes 0.25 s apart decide (>= 1 s).
    let held = trip_and_recover(0.1, 0.25, 4).await;
    assert!(held >= Duration::from_secs(1), "{held:?}");
    assert!(held < Duration::from_secs(3), "{held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_fallback_answers_fallback_unavailable() {
    let primary = backend("primary", StatusCode::INTERNAL_SERVER_ERROR).await;
    // A port nothing listens on.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let breaker = Breaker::http(config(&dead, 30.0, 60.0, 2), &primary.url(), "/healthz");
    let (addr, _gw) = gateway(breaker.clone(), primary.url(), dead).await;
    let c = client();
    primary.set_healthy(false);
    for _ in 0..2 {
        get(&c, addr, "/x").await.unwrap();
    }
    assert!(breaker.is_using_fallback());
    let (status, body) = get(&c, addr, "/x").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "fallback_unavailable");
    assert_eq!(breaker.counters().fallback_failures, 1);

    // A gRPC client sees a trailers-only UNAVAILABLE instead of JSON.
    let req = Request::get(format!("http://{addr}/svc.Method"))
        .header("content-type", "application/grpc")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert!(resp.headers()["grpc-message"]
        .to_str()
        .unwrap()
        .starts_with("fallback_unavailable"));

    // force_health_check reports both sides (the dead fallback after its retry).
    let report = breaker.force_health_check().await;
    assert!(!report.primary.healthy);
    let fb = report.fallback.unwrap();
    assert!(!fb.healthy);
    assert_eq!(fb.attempts, 2);
    assert_eq!(fb.detail, "connect error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_answering_503_is_a_503_fallback_unavailable() {
    let primary = backend("primary", StatusCode::INTERNAL_SERVER_ERROR).await;
    let fallback = backend("fallback", StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(fallback.status_when_sick, StatusCode::SERVICE_UNAVAILABLE);
    let breaker = Breaker::http(
        config(&fallback.url(), 30.0, 60.0, 2),
        &primary.url(),
        "/healthz",
    );
    let (addr, _gw) = gateway(breaker.clone(), primary.url(), fallback.url()).await;
    let c = client();
    primary.set_healthy(false);
    fallback.set_healthy(false);
    for _ in 0..2 {
        get(&c, addr, "/x").await.unwrap();
    }
    let (status, body) = get(&c, addr, "/x").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("\"error\":\"fallback_unavailable\""),
        "{body}"
    );
    // The fallback recovers: its answers pass through again.
    fallback.set_healthy(true);
    assert_eq!(
        get(&c, addr, "/x").await.unwrap(),
        (StatusCode::OK, "fallback".into())
    );
}

#[tokio::test]
async fn a_fallback_error_is_a_502_and_primary_errors_pass_through() {
    let breaker = Breaker::builder(Config {
        url: Some("fallback".into()),
        ..Config::default()
    })
    .build();
    let primary = tower::service_fn(|_: Request<Body>| async {
        Err::<Response<Body>, _>(std::io::Error::other("primary transport error"))
    });
    let fallback = tower::service_fn(|_: Request<Body>| async {
        Err::<Response<Body>, _>(std::io::Error::other("refused"))
    });
    let svc = HttpFallbackLayer::new(fallback, breaker.clone()).layer(primary);
    for _ in 0..2 {
        let e = svc
            .clone()
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "primary transport error");
    }
    assert!(breaker.is_using_fallback());
    let resp = svc
        .clone()
        .oneshot(Request::new(Body::empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "fallback_unavailable");
}
