//! The generic service and the HTTP form without a network, on tokio's paused clock.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use portcullis_admission::{
    AcquireError, Admission, AdmissionLayer, CapacitySource, Endpoints, HttpAdmissionLayer,
    Limiter, LocalCapacity, QueueFull, QueueTimeout, StorageUnavailable, Unhealthy,
};
use portcullis_core::{BoxError, IntoRejection};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn sleeper() -> impl Service<u64, Response = u64, Error = Infallible, Future = impl Send> + Clone {
    service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, Infallible>(ms)
    })
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_fires_exactly_at_the_deadline() {
    let layer = AdmissionLayer::new(1).with_queue_timeout(Duration::from_millis(1500));
    let svc = layer.layer(sleeper());
    let holder = tokio::spawn(svc.clone().oneshot(10_000));
    tokio::task::yield_now().await;
    let t = Instant::now();
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert_eq!(t.elapsed(), Duration::from_millis(1500));
    let e = err.downcast_ref::<QueueTimeout>().expect("a QueueTimeout");
    assert_eq!(e.waited(), Duration::from_millis(1500));
    assert_eq!(e.to_rejection().status(), StatusCode::GATEWAY_TIMEOUT);
    let s = layer.limiter().stats();
    assert_eq!(
        (
            s.timed_out_504,
            s.queue_depth,
            s.active_requests,
            s.cancelled
        ),
        (1, 0, 1, 0)
    );
    holder.abort();
    let _ = holder.await;
    assert_eq!(layer.limiter().stats().active_requests, 0);
}

#[tokio::test(start_paused = true)]
async fn waiter_admitted_before_deadline_records_its_wait() {
    let layer = AdmissionLayer::new(1).with_queue_timeout(Duration::from_secs(5));
    let svc = layer.layer(sleeper());
    let holder = tokio::spawn(svc.clone().oneshot(2000));
    tokio::task::yield_now().await;
    let t = Instant::now();
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), 0);
    assert_eq!(t.elapsed(), Duration::from_millis(2000));
    holder.await.unwrap().unwrap();
    let s = layer.limiter().stats();
    assert_eq!(s.admitted, 2);
    let h = &s.queue_wait;
    assert_eq!(h.count, 2);
    assert_eq!(h.buckets[0].count, 1, "the holder did not wait");
    let b = h.buckets.iter().find(|b| b.le == Some(2.5)).unwrap();
    assert_eq!(b.count, 1, "{h:?}");
    assert!((h.sum_seconds - 2.0).abs() < 0.01);
}

#[tokio::test(start_paused = true)]
async fn max_queue_refuses_at_once() {
    let layer = AdmissionLayer::new(1).with_max_queue(Some(1));
    let svc = layer.layer(sleeper());
    let holder = tokio::spawn(svc.clone().oneshot(1000));
    tokio::task::yield_now().await;
    let queued = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    let t = Instant::now();
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert!(err.is::<QueueFull>());
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(layer.limiter().stats().rejected_503, 1);
    holder.await.unwrap().unwrap();
    assert_eq!(queued.await.unwrap().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_waiters_count_as_cancelled_and_free_their_place() {
    let layer = AdmissionLayer::new(1);
    let svc = layer.layer(sleeper());
    let holder = tokio::spawn(svc.clone().oneshot(100));
    tokio::task::yield_now().await;
    let gone = tokio::spawn(svc.clone().oneshot(1));
    let next = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    assert_eq!(layer.limiter().stats().queue_depth, 2);
    gone.abort();
    let _ = gone.await;
    let s = layer.limiter().stats();
    assert_eq!((s.queue_depth, s.cancelled), (1, 1));
    holder.await.unwrap().unwrap();
    assert_eq!(next.await.unwrap().unwrap(), 2);
    let s = layer.limiter().stats();
    assert_eq!((s.admitted, s.cancelled, s.active_requests), (2, 1, 0));
}

#[tokio::test]
async fn unhealthy_refuses_without_calling_inner() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let inner = service_fn(move |_: ()| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ready(Ok::<_, Infallible>(()))
    });
    let mut svc = AdmissionLayer::new(4).with_health(|| false).layer(inner);
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(err.is::<Unhealthy>());
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn poll_ready_never_takes_a_slot() {
    let layer = AdmissionLayer::new(2);
    let mut idle: Vec<_> = (0..10).map(|_| layer.layer(sleeper())).collect();
    for s in &mut idle {
        // Like hyper on an idle keep-alive connection.
        std::future::poll_fn(|cx| Service::<u64>::poll_ready(s, cx))
            .await
            .unwrap();
    }
    let s = layer.limiter().stats();
    assert_eq!((s.active_requests, s.available_slots), (0, 2));
    assert_eq!(idle[0].call(0).await.unwrap(), 0);
}

#[tokio::test]
async fn panic_in_inner_service_releases_the_slot() {
    let layer = AdmissionLayer::new(1);
    // Panics while called (synchronously, inside `call` on the fast path).
    let boom = layer.layer(service_fn(|_: ()| -> Ready<Result<(), Infallible>> {
        panic!("boom")
    }));
    let r = tokio::spawn(async move { boom.oneshot(()).await }).await;
    assert!(r.unwrap_err().is_panic());
    assert_eq!(layer.limiter().stats().active_requests, 0);
    // Panics inside the inner future, after waiting in the queue.
    let svc = layer.layer(service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if ms == 1 {
            panic!("boom");
        }
        Ok::<_, Infallible>(ms)
    }));
    let holder = tokio::spawn(svc.clone().oneshot(50));
    tokio::task::yield_now().await;
    let panicking = tokio::spawn(svc.clone().oneshot(1));
    holder.await.unwrap().unwrap();
    assert!(panicking.await.unwrap_err().is_panic());
    assert_eq!(layer.limiter().stats().active_requests, 0);
    assert_eq!(svc.oneshot(0).await.unwrap(), 0);
}

/// A source whose storage is down (`on_error: reject`).
struct DownSource;

impl CapacitySource for DownSource {
    type Permit = ();
    type Acquire = Ready<Result<(), AcquireError>>;
    fn acquire(&self, _: Option<usize>) -> Self::Acquire {
        ready(Err(AcquireError::storage_unavailable("connection refused")))
    }
    fn set_capacity(&self, _: usize) {}
    fn capacity(&self) -> usize {
        8
    }
    fn active(&self) -> usize {
        0
    }
    fn queue_depth(&self) -> usize {
        0
    }
}

#[tokio::test]
async fn storage_unavailable_becomes_a_typed_error_and_a_503() {
    let err: BoxError = AdmissionLayer::with_source(DownSource)
        .layer(sleeper())
        .oneshot(0)
        .await
        .unwrap_err();
    let e = err
        .downcast_ref::<StorageUnavailable>()
        .expect("StorageUnavailable");
    assert!(std::error::Error::source(e)
        .unwrap()
        .to_string()
        .contains("refused"));

    let eps = Endpoints::new().watch("/x", None, Arc::new(Limiter::new(DownSource)));
    let svc = HttpAdmissionLayer::new(eps.clone()).layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("no"))))
    }));
    let resp = svc
        .oneshot(Request::get("/x").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "storage_unavailable");
    assert_eq!(eps.stats().endpoints["/x"].rejected_503, 1);
}

/// The response of an admission-wrapped test service.
type HttpSvcResponse = Response<
    portcullis_core::RejectionBody<
        portcullis_admission::AdmissionBody<
            Full<Bytes>,
            portcullis_admission::AdmissionSlot<LocalCapacity>,
        >,
    >,
>;

fn http_svc(
    layer: &HttpAdmissionLayer<LocalCapacity>,
) -> impl Service<Request<()>, Response = HttpSvcResponse, Error = Infallible, Future = impl Send> + Clone
{
    layer.layer(service_fn(|req: Request<()>| async move {
        let ms: u64 = req.uri().query().and_then(|q| q.parse().ok()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
    }))
}

#[tokio::test(start_paused = true)]
async fn http_queue_full_is_json_and_grpc_gets_trailers_only() {
    let eps = Endpoints::new().watch(
        "/w",
        None,
        Arc::new(
            Limiter::local(1)
                .with_max_queue(Some(0))
                .with_queue_timeout(Duration::from_secs(1)),
        ),
    );
    let layer = HttpAdmissionLayer::new(eps);
    let svc = http_svc(&layer);
    let holder = tokio::spawn(
        svc.clone()
            .oneshot(Request::get("/w?5000").body(()).unwrap()),
    );
    tokio::task::yield_now().await;
    let resp = svc
        .clone()
        .oneshot(Request::get("/w").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(br#"{"error":"queue_full""#));

    let grpc = Request::post("/w")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let resp = svc.clone().oneshot(grpc).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // queue_full is RESOURCE_EXHAUSTED (8) for a gRPC client.
    assert_eq!(resp.headers()["grpc-status"], "8");
    assert!(http_body::Body::is_end_stream(resp.body()));
    holder.abort();
}

#[tokio::test(start_paused = true)]
async fn http_grpc_queue_timeout_is_deadline_exceeded() {
    let config: portcullis_admission::Config = serde_json::from_value(serde_json::json!({
        "queue_timeout": 0.5, "endpoints": {"/svc.Greeter/Hello": {"capacity": 1}}
    }))
    .unwrap();
    let layer = HttpAdmissionLayer::from_config(&config, 1).unwrap();
    let svc = http_svc(&layer);
    let holder = tokio::spawn(
        svc.clone()
            .oneshot(Request::post("/svc.Greeter/Hello?5000").body(()).unwrap()),
    );
    tokio::task::yield_now().await;
    let grpc = Request::post("/svc.Greeter/Hello")
        .header("content-type", "application/grpc+proto")
        .body(())
        .unwrap();
    let t = Instant::now();
    let resp = svc.oneshot(grpc).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(500));
    assert_eq!(resp.headers()["grpc-status"], "4");
    assert!(resp.headers()["grpc-message"]
        .to_str()
        .unwrap()
        .starts_with("queue_timeout"));
    holder.abort();
}

#[tokio::test(start_paused = true)]
async fn http_body_dropped_early_releases_the_slot() {
    let layer = HttpAdmissionLayer::from_config(
        &serde_json::from_value(serde_json::json!({"endpoints": {"/w": {"capacity": 1}}})).unwrap(),
        1,
    )
    .unwrap();
    let svc = http_svc(&layer);
    let resp = svc
        .clone()
        .oneshot(Request::get("/w").body(()).unwrap())
        .await
        .unwrap();
    let stats = || layer.endpoints().stats().endpoints["/w"].clone();
    assert_eq!(stats().active_requests, 1, "the body holds the slot");
    assert!(!resp.body().is_rejection());
    drop(resp);
    assert_eq!(stats().active_requests, 0);
    // Fully read body releases on its last frame, before the body is dropped.
    let resp = svc
        .oneshot(Request::get("/w").body(()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "ok");
    assert_eq!(stats().active_requests, 0);
    drop(body);
}

#[tokio::test]
async fn admission_new_and_capacity_change_through_the_limiter() {
    let svc = Admission::new(sleeper(), 1);
    let limiter = Arc::clone(svc.limiter());
    limiter.set_capacity(3);
    assert_eq!(limiter.stats().available_slots, 3);
    assert_eq!(svc.oneshot(0).await.unwrap(), 0);
}
