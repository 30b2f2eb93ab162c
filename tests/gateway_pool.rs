//! The proxy's own upstream connection pool, observed from a real hyper backend on 127.0.0.1
//! that counts the connections the gateway opens to it: reuse, broken connections, the idle
//! timeout and the drain.

mod support;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_testkit::eventually;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{client, TestGateway};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Connections the gateway made to the backend for proxied requests (the health checker's
/// own connections, which only ask `/healthz`, are not counted).
#[derive(Default)]
struct Counts {
    /// Connections that carried at least one proxied request.
    proxied: AtomicUsize,
    /// Of those, the ones still open.
    open: AtomicUsize,
}

/// A hyper HTTP/1 backend: `/ok` answers `ok`, `/slow` answers after 500 ms, `/cut` sends
/// one chunk and then breaks the connection mid-body.
struct CountingBackend {
    addr: SocketAddr,
    counts: Arc<Counts>,
    /// Each bump drops every connection open at that moment (no response, no close
    /// handshake beyond the socket's own).
    kill: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let (kill, kill_rx) = watch::channel(0u64);
        let c = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_one(stream, Arc::clone(&c), kill_rx.clone()));
            }
        });
        Self {
            addr,
            counts,
            kill,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn proxied(&self) -> usize {
        self.counts.proxied.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    /// Drops every open connection; connections accepted later are served again.
    fn kill_connections(&self) {
        self.kill.send_modify(|generation| *generation += 1);
    }
}

async fn serve_one(
    stream: tokio::net::TcpStream,
    counts: Arc<Counts>,
    mut kill: watch::Receiver<u64>,
) {
    kill.borrow_and_update();
    let proxied = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&proxied);
    let c = Arc::clone(&counts);
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let path = req.uri().path().to_owned();
        if path != "/healthz" && !seen.swap(true, Ordering::SeqCst) {
            c.proxied.fetch_add(1, Ordering::SeqCst);
            c.open.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            let body = match path.as_str() {
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Body::from("slow")
                }
                // The head and a first chunk go out; then the connection breaks.
                "/cut" => Body::from_stream(futures_util::stream::unfold(0, |step| async move {
                    match step {
                        0 => Some((Ok(Bytes::from_static(b"first")), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Some((Err(std::io::Error::other("backend broke the body")), 2))
                        }
                        _ => None,
                    }
                })),
                _ => Body::from("ok"),
            };
            Ok::<_, Infallible>(http::Response::new(body))
        }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = kill.changed() => {}
    }
    if proxied.load(Ordering::SeqCst) {
        counts.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn yaml(backend: &CountingBackend, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 30\nupstreams:\n  - {{url: \"{}\"}}\n{extra}",
        backend.url()
    )
}

/// GETs `path` through the gateway; the status and the body (or the body's error).
async fn get(gw: &TestGateway, path: &str) -> (u16, Result<Bytes, String>) {
    let resp = client()
        .request(
            http::Request::get(gw.url(path))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

#[tokio::test]
async fn pooled_connections_are_reused_up_to_the_concurrency() {
    let be = CountingBackend::start().await;
    let gw = TestGateway::start(&yaml(&be, "")).await;
    const CONCURRENCY: usize = 4;
    let gw = Arc::new(gw);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move {
                for _ in 0..25 {
                    let (status, body) = get(&gw, "/ok").await;
                    assert_eq!(status, 200);
                    assert_eq!(&body.unwrap()[..], b"ok");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let opened = be.proxied();
    assert!(
        (1..=CONCURRENCY).contains(&opened),
        "100 requests at concurrency {CONCURRENCY} opened {opened} upstream connections"
    );
    // Sequential requests afterwards take the pooled connections: none is opened.
    for _ in 0..10 {
        assert_eq!(get(&gw, "/ok").await.0, 200);
    }
    assert_eq!(be.proxied(), opened);
    let to = &gw.gateway.registry().replicas()[0];
    assert_eq!(to.target().connections_opened(), opened as u64);
}

#[tokio::test]
async fn a_broken_connection_is_never_reused() {
    let be = CountingBackend::start().await;
    let gw = TestGateway::start(&yaml(&be, "")).await;
    assert_eq!(get(&gw, "/ok").await.0, 200);
    assert_eq!(be.proxied(), 1);

    // The pooled connection carries /cut and breaks mid-body: the client sees the
    // truncation, and the connection is not given back.
    let (status, body) = get(&gw, "/cut").await;
    assert_eq!(status, 200);
    assert!(
        body.is_err(),
        "a body cut by the upstream must reach the client cut"
    );
    assert_eq!(be.proxied(), 1, "/cut was served on the pooled connection");
    assert_eq!(get(&gw, "/ok").await, (200, Ok(Bytes::from_static(b"ok"))));
    assert_eq!(be.proxied(), 2, "the broken connection was reused");

    // The upstream drops its idle connections: the next request is not sent on a dead one
    // (no 502), it opens a new connection.
    be.kill_connections();
    assert!(
        eventually(Duration::from_secs(5), || be.open() == 0).await,
        "not within 5 s: the backend dropped its connections"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&gw, "/ok").await, (200, Ok(Bytes::from_static(b"ok"))));
    assert_eq!(be.proxied(), 3);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let be = CountingBackend::start().await;
    let gw = TestGateway::start(&yaml(&be, "upstream_idle_timeout: 0.3\n")).await;
    assert_eq!(get(&gw, "/ok").await.0, 200);
    assert_eq!(be.open(), 1);
    // Still open (and reused) well within the timeout.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&gw, "/ok").await.0, 200);
    assert_eq!((be.proxied(), be.open()), (1, 1));
    // Closed by the gateway once idle for 0.3 s.
    assert!(
        eventually(Duration::from_secs(5), || be.open() == 0).await,
        "not within 5 s: the idle connection was closed"
    );
    assert_eq!(get(&gw, "/ok").await.0, 200);
    assert_eq!((be.proxied(), be.open()), (2, 1));
}

#[tokio::test]
async fn upstream_max_idle_bounds_the_idle_connections() {
    let be = CountingBackend::start().await;
    let gw = Arc::new(TestGateway::start(&yaml(&be, "upstream_max_idle: 2\n")).await);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move { get(&gw, "/slow").await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        be.proxied(),
        5,
        "five concurrent requests, five connections"
    );
    assert!(
        eventually(Duration::from_secs(5), || be.open() == 2).await,
        "not within 5 s: only upstream_max_idle connections stay open"
    );
}

#[tokio::test]
async fn drain_finishes_requests_on_pooled_connections_then_closes_them() {
    let be = CountingBackend::start().await;
    let mut gw = TestGateway::start(&yaml(&be, "drain_timeout: 5\n")).await;
    // Warm the pool, then start a request on the pooled connection and shut down under it.
    assert_eq!(get(&gw, "/ok").await.0, 200);
    let url = gw.url("/slow");
    let in_flight = tokio::spawn(async move {
        let resp = client()
            .request(http::Request::get(url).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let server = gw.shutdown();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"slow");
    assert!(
        server.await.unwrap().unwrap(),
        "the server did not drain cleanly"
    );
    assert_eq!(
        be.proxied(),
        1,
        "the in-flight request used the pooled connection"
    );
    // The gateway going away closes its pooled upstream connections.
    let TestGateway { gateway, .. } = gw;
    drop(gateway);
    assert!(
        eventually(Duration::from_secs(5), || be.open() == 0).await,
        "not within 5 s: the pooled connections were closed"
    );
}
