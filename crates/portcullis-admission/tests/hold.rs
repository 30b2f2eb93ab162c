//! `HoldOnCancel` under `HttpAdmission`: a request whose client goes away keeps its slot
//! until the inner service's response has ended, for at most the hold limit (paused clock).

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use portcullis_admission::{Endpoints, HoldOnCancelLayer, HttpAdmissionLayer, Limiter};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type TestBody =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A service whose response comes after `head_ms`, then streams two frames `gap_ms` apart.
fn slow(
    head_ms: u64,
    gap_ms: u64,
) -> impl Service<
    Request<()>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone {
    service_fn(move |_req: Request<()>| async move {
        tokio::time::sleep(Duration::from_millis(head_ms)).await;
        let frames = stream::unfold(0u8, move |i| async move {
            match i {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"a"))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                    Some((Ok(Frame::data(Bytes::from_static(b"b"))), 2))
                }
                _ => None,
            }
        });
        Ok::<_, Infallible>(Response::new(StreamBody::new(
            Box::pin(frames) as futures_util::stream::BoxStream<'static, _>
        )))
    })
}

fn setup(hold: bool, limit: Duration) -> (Arc<Limiter>, HttpAdmissionLayer, HoldOnCancelLayer) {
    let limiter = Arc::new(Limiter::local(1));
    let endpoints = Endpoints::new().watch("/work", None, Arc::clone(&limiter));
    let admission = HttpAdmissionLayer::new(endpoints).hold_on_client_cancel(hold);
    (limiter, admission, HoldOnCancelLayer::new(limit))
}

fn work() -> Request<()> {
    Request::builder().uri("/work").body(()).unwrap()
}

async fn ms(n: u64) {
    tokio::time::sleep(Duration::from_millis(n)).await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_response_future_keeps_the_slot_until_the_response_ends() {
    let (limiter, admission, hold) = setup(true, Duration::from_secs(60));
    let mut svc = ServiceBuilder::new()
        .layer(admission)
        .layer(hold.clone())
        .service(slow(100, 100));
    let fut = svc.ready().await.unwrap().call(work());
    assert!(tokio::time::timeout(Duration::from_millis(10), fut)
        .await
        .is_err());
    let stats = limiter.stats();
    assert_eq!((stats.active_requests, stats.local_active), (1, 1));
    assert_eq!(stats.held_after_cancel, 1);
    assert_eq!(hold.held_now(), 1);
    // The head comes at 100 ms, the body ends at 200 ms: held until then.
    ms(150).await;
    assert_eq!(limiter.stats().active_requests, 1, "still reading the body");
    ms(100).await;
    let stats = limiter.stats();
    assert_eq!((stats.active_requests, stats.local_active), (0, 0));
    assert_eq!(stats.held_cut, 0);
    assert_eq!(hold.held_now(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_midway_is_drained_before_the_slot_is_freed() {
    let (limiter, admission, hold) = setup(true, Duration::from_secs(60));
    let mut svc = ServiceBuilder::new()
        .layer(admission)
        .layer(hold)
        .service(slow(0, 100));
    let resp = svc.ready().await.unwrap().call(work()).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "a");
    drop(body);
    assert_eq!(
        limiter.stats().active_requests,
        1,
        "held while the rest drains"
    );
    ms(150).await;
    let stats = limiter.stats();
    assert_eq!((stats.active_requests, stats.held_after_cancel), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_complete_response_frees_the_slot_without_holding() {
    let (limiter, admission, hold) = setup(true, Duration::from_secs(60));
    let mut svc = ServiceBuilder::new()
        .layer(admission)
        .layer(hold)
        .service(slow(10, 10));
    let resp = svc.ready().await.unwrap().call(work()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ab");
    let stats = limiter.stats();
    assert_eq!((stats.active_requests, stats.held_after_cancel), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn release_frees_the_slot_at_the_drop() {
    let (limiter, admission, hold) = setup(false, Duration::from_secs(60));
    let mut svc = ServiceBuilder::new()
        .layer(admission)
        .layer(hold)
        .service(slow(100, 100));
    let fut = svc.ready().await.unwrap().call(work());
    assert!(tokio::time::timeout(Duration::from_millis(10), fut)
        .await
        .is_err());
    let stats = limiter.stats();
    assert_eq!((stats.active_requests, stats.held_after_cancel), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_held_request_is_dropped_at_the_limit() {
    let (limiter, admission, hold) = setup(true, Duration::from_secs(1));
    let mut svc = ServiceBuilder::new()
        .layer(admission)
        .layer(hold.clone())
        .service(slow(10_000, 0));
    let fut = svc.ready().await.unwrap().call(work());
    assert!(tokio::time::timeout(Duration::from_millis(10), fut)
        .await
        .is_err());
    ms(900).await;
    assert_eq!(limiter.stats().active_requests, 1);
    ms(200).await;
    let stats = limiter.stats();
    assert_eq!((stats.active_requests, stats.held_cut), (0, 1));
    assert!(
        hold.drain(Duration::from_millis(1)).await,
        "nothing left to drain"
    );
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_whose_client_leaves_is_not_held() {
    let (limiter, admission, hold) = setup(true, Duration::from_secs(60));
    let mut svc = ServiceBuilder::new()
        .layer(admission)
        .layer(hold)
        .service(slow(100, 0));
    let first = svc.ready().await.unwrap().call(work());
    let first = async { first.await.unwrap().into_body().collect().await.unwrap() };
    let second = async {
        ms(1).await;
        // The second waits in the queue and leaves: it never reaches the service.
        let second = svc.ready().await.unwrap().call(work());
        assert!(tokio::time::timeout(Duration::from_millis(10), second)
            .await
            .is_err());
        let stats = limiter.stats();
        assert_eq!((stats.cancelled, stats.held_after_cancel), (1, 0));
    };
    let (body, ()) = tokio::join!(first, second);
    assert_eq!(body.to_bytes(), "ab");
    assert_eq!(limiter.stats().active_requests, 0);
}
