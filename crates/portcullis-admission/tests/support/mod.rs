//! Test support: a real axum backend that records its concurrency, and a real hyper
//! "gateway" (HttpAdmission around a small streaming proxy) in front of it, both on
//! 127.0.0.1 with ephemeral ports. Every server task is aborted when its handle drops.

#![allow(dead_code, unreachable_pub)]

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use portcullis_admission::{HttpAdmissionLayer, LocalCapacity};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::Layer;

/// Aborts the server task on drop.
pub struct Server {
    pub addr: SocketAddr,
    /// For a gateway: the proxy calls in flight *inside* the admission layer (from the inner
    /// `call` until its future ends or is dropped). Unused for a backend.
    pub proxied: Arc<BackendState>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
pub struct BackendState {
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    pub hits: AtomicUsize,
    pub order: Mutex<Vec<u64>>,
}

impl BackendState {
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
    pub fn max(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }
    pub fn reset_max(&self) {
        self.max_inflight.store(self.inflight(), Ordering::SeqCst);
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Counts a request in flight for as long as it lives (dropped when the handler future or
/// the streamed body is dropped, including on client disconnect).
pub struct InflightGuard(Arc<BackendState>);

impl InflightGuard {
    fn enter(st: &Arc<BackendState>) -> Self {
        st.hits.fetch_add(1, Ordering::SeqCst);
        let now = st.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        st.max_inflight.fetch_max(now, Ordering::SeqCst);
        Self(Arc::clone(st))
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(serde::Deserialize)]
struct WorkQuery {
    ms: Option<u64>,
    id: Option<u64>,
    chunks: Option<u32>,
}

async fn work(State(st): State<Arc<BackendState>>, Query(q): Query<WorkQuery>) -> &'static str {
    let _g = InflightGuard::enter(&st);
    if let Some(id) = q.id {
        st.order.lock().unwrap().push(id);
    }
    tokio::time::sleep(Duration::from_millis(q.ms.unwrap_or(0))).await;
    "ok"
}

/// Streams `chunks` chunks, one every `ms`; in flight until the last chunk is produced.
async fn stream(State(st): State<Arc<BackendState>>, Query(q): Query<WorkQuery>) -> Response {
    let guard = InflightGuard::enter(&st);
    let n = q.chunks.unwrap_or(4);
    let ms = q.ms.unwrap_or(500);
    let body = futures_util::stream::unfold((0u32, Some(guard)), move |(i, mut g)| async move {
        if i == n {
            g.take();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n"))),
            (i + 1, g),
        ))
    });
    axum::body::Body::from_stream(body).into_response()
}

pub async fn backend() -> (Server, Arc<BackendState>) {
    let st = Arc::new(BackendState::default());
    let app = Router::new()
        .route("/work", any(work))
        .route("/free", any(work))
        .route("/stream", get(stream))
        .route("/v1/models/{*rest}", any(work))
        .with_state(Arc::clone(&st));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (
        Server {
            addr,
            task,
            proxied: Arc::default(),
        },
        st,
    )
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http()
}

/// A real hyper server: `layer` around a streaming proxy to `backend`. The proxy counts its
/// calls in flight in [`Server::proxied`].
pub async fn gateway(layer: HttpAdmissionLayer<LocalCapacity>, backend: SocketAddr) -> Server {
    let upstream: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    let proxied = Arc::new(BackendState::default());
    let counter = Arc::clone(&proxied);
    let proxy = tower::service_fn(move |mut req: Request<Incoming>| {
        let upstream = upstream.clone();
        let counter = Arc::clone(&counter);
        async move {
            let _in_flight = InflightGuard::enter(&counter);
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_owned();
            *req.uri_mut() = format!("http://{backend}{pq}").parse().unwrap();
            upstream.request(req).await
        }
    });
    let svc = layer.layer(proxy);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server {
        addr,
        task,
        proxied,
    }
}

/// GET `http://addr{path}`, returns status, headers and the whole body.
pub async fn get_full(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let resp = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

pub fn config(json: serde_json::Value) -> portcullis_admission::Config {
    serde_json::from_value(json).unwrap()
}
