//! The HTTP admission layer behind a real hyper server, in front of a real axum backend.

mod support;

use http::StatusCode;
use http_body_util::BodyExt;
use portcullis_admission::HttpAdmissionLayer;
use portcullis_testkit::eventually;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_never_sees_more_than_capacity_with_64_clients() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"queue_timeout": 30, "endpoints": {"/work": {"capacity": 8}}})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let client = client.clone();
            let addr = gw.addr;
            tokio::spawn(async move { get_full(&client, addr, "/work?ms=40").await.0 })
        })
        .collect();
    let mut peak_queue = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        let s = &layer.endpoints().stats().endpoints["/work"];
        assert!(s.active_requests <= 8, "active {} > 8", s.active_requests);
        peak_queue = peak_queue.max(s.queue_depth);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert!(
        st.max() <= 8,
        "backend saw {} concurrent requests",
        st.max()
    );
    assert_eq!(st.max(), 8, "the limit should be reached with 64 clients");
    assert!(peak_queue > 0, "64 clients on 8 slots must queue");
    let s = &layer.endpoints().stats().endpoints["/work"];
    assert_eq!((s.admitted, s.active_requests, s.queue_depth), (64, 0, 0));
    assert_eq!(s.queue_wait.count, 64);
    assert!(s.queue_wait.sum_seconds > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_admitted_in_strict_arrival_order() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"endpoints": {"/work": {"capacity": 1}}})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let addr = gw.addr;
    let holder = {
        let client = client.clone();
        tokio::spawn(async move { get_full(&client, addr, "/work?ms=300&id=0").await.0 })
    };
    assert!(eventually(Duration::from_secs(2), || st.inflight() == 1).await);
    let mut tasks = Vec::new();
    for id in 1..=12u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            get_full(&client, addr, &format!("/work?ms=5&id={id}"))
                .await
                .0
        }));
        // The next request is sent only once this one is queued: a deterministic sequence.
        let l = layer.clone();
        assert!(
            eventually(Duration::from_secs(2), || l.endpoints().stats().endpoints
                ["/work"]
                .queue_depth
                == id as usize)
            .await,
            "request {id} never queued"
        );
    }
    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(*st.order.lock().unwrap(), (0..=12).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_requests_get_504_json_after_queue_timeout() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"queue_timeout": 30, "endpoints": {"/work": {"capacity": 2, "queue_timeout": 0.4}}})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let addr = gw.addr;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { get_full(&client, addr, "/work?ms=1500").await.0 })
        })
        .collect();
    assert!(eventually(Duration::from_secs(2), || st.inflight() == 2).await);
    let excess: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = get_full(&client, addr, "/work?ms=1").await;
                (r, t.elapsed())
            })
        })
        .collect();
    for t in excess {
        let ((status, headers, body), took) = t.await.unwrap();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(headers["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "queue_timeout");
        assert!(v["message"].as_str().unwrap().contains("queue"));
        let ms = took.as_millis() as i64;
        assert!(
            (ms - 400).abs() <= 100,
            "504 after {ms} ms, expected 400 ± 100"
        );
    }
    assert_eq!(
        st.hits(),
        2,
        "timed-out requests must not reach the backend"
    );
    let s = &layer.endpoints().stats().endpoints["/work"];
    assert_eq!((s.timed_out_504, s.queue_depth), (3, 0));
    assert_eq!(s.queue_timeout, 0.4);
    for t in slow {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_backend_gets_503_without_being_touched() {
    let (be, st) = backend().await;
    let healthy = Arc::new(AtomicBool::new(false));
    let h = Arc::clone(&healthy);
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"endpoints": {"/work": {"capacity": 4}}})),
        1,
    )
    .unwrap()
    .with_health(move || h.load(Ordering::SeqCst));
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let (status, headers, body) = get_full(&client, gw.addr, "/work").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "backend_unhealthy");
    assert_eq!(st.hits(), 0);
    let s = &layer.endpoints().stats().endpoints["/work"];
    assert_eq!((s.rejected_503, s.admitted, s.active_requests), (1, 0, 0));
    healthy.store(true, Ordering::SeqCst);
    assert_eq!(get_full(&client, gw.addr, "/work").await.0, StatusCode::OK);
    assert_eq!(st.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_holds_its_slot_until_the_last_chunk() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"endpoints": {"/stream": {"capacity": 1}, "/work": {"capacity": 1}}})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let started = Instant::now();
    // 4 chunks, one every 500 ms: the backend streams for 2 s.
    let resp = client
        .get(
            format!("http://{}/stream?chunks=4&ms=500", gw.addr)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let headers_at = started.elapsed();
    assert!(
        headers_at < Duration::from_millis(400),
        "headers took {headers_at:?}"
    );
    // Headers are back, the body is still streaming: the slot is still held.
    let stats = || layer.endpoints().stats().endpoints["/stream"].clone();
    assert_eq!(stats().active_requests, 1);
    let second = {
        let client = client.clone();
        let addr = gw.addr;
        tokio::spawn(async move {
            let r = get_full(&client, addr, "/stream?chunks=1&ms=1").await.0;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = stats();
    assert_eq!(
        (s.active_requests, s.queue_depth),
        (1, 1),
        "slot released before the body ended"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let ended = Instant::now();
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 4);
    assert!(started.elapsed() >= Duration::from_millis(1900));
    let (status, admitted_done) = second.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(admitted_done >= ended - Duration::from_millis(50));
    assert!(eventually(Duration::from_secs(1), || stats().active_requests == 0).await);
    assert_eq!(st.max(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancellations_leave_nothing_behind() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"endpoints": {"/work": {"capacity": 4}}})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut tasks = Vec::new();
    let mut cancelled = 0;
    for _ in 0..60 {
        let client = client.clone();
        let addr = gw.addr;
        let cancel_after = rng
            .random_bool(0.3)
            .then(|| Duration::from_millis(rng.random_range(1..400)));
        cancelled += usize::from(cancel_after.is_some());
        tasks.push(tokio::spawn(async move {
            let req = get_full(&client, addr, "/work?ms=60");
            match cancel_after {
                // Dropping the request future closes the connection: the client went away.
                Some(after) => tokio::time::timeout(after, req).await.map(|r| r.0).ok(),
                None => Some(req.await.0),
            }
        }));
    }
    assert!(cancelled >= 10);
    for t in tasks {
        if let Some(status) = t.await.unwrap() {
            assert_eq!(status, StatusCode::OK);
        }
    }
    let stats = || layer.endpoints().stats().endpoints["/work"].clone();
    assert!(
        eventually(Duration::from_secs(3), || {
            let s = stats();
            s.active_requests == 0 && s.queue_depth == 0 && st.inflight() == 0
        })
        .await,
        "leftovers: {:?}, backend in flight {}",
        stats(),
        st.inflight()
    );
    let s = stats();
    assert!(s.cancelled > 0, "some clients must have left while queued");
    // The layer never lets more than `capacity` calls into the service it wraps, however
    // the clients leave. (The backend's own count is not the measure here: a client that
    // leaves frees its slot at once, while the backend only drops the abandoned request
    // when it notices the closed connection, so under load it briefly sees one more.)
    assert!(
        gw.proxied.max() <= 4,
        "{} proxy calls in flight at once",
        gw.proxied.max()
    );
    assert_eq!(s.available_slots, 4);
    // The slots all work again.
    for _ in 0..4 {
        assert_eq!(get_full(&client, gw.addr, "/work").await.0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_changes_at_runtime_under_load() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"endpoints": {"/work": {"capacity": 8}}})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..24)
        .map(|_| {
            let client = client.clone();
            let addr = gw.addr;
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 400 {
                    assert_eq!(
                        get_full(&client, addr, "/work?ms=20").await.0,
                        StatusCode::OK
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(st.max(), 8);

    assert!(layer.endpoints().set_capacity("/work", 2));
    assert!(!layer.endpoints().set_capacity("/nope", 2));
    let l = layer.clone();
    assert!(
        eventually(Duration::from_secs(2), || l.endpoints().stats().endpoints
            ["/work"]
            .active_requests
            <= 2)
        .await
    );
    assert!(eventually(Duration::from_secs(2), || st.inflight() <= 2).await);
    st.reset_max();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        st.max() <= 2,
        "backend saw {} after shrinking to 2",
        st.max()
    );
    assert!(
        layer.endpoints().stats().endpoints["/work"].queue_depth > 0,
        "queued requests must survive the shrink"
    );

    layer.endpoints().set_capacity("/work", 8);
    st.reset_max();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(st.max(), 8, "growing back to 8 must admit 8 at once");

    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    let s = &layer.endpoints().stats().endpoints["/work"];
    assert_eq!(s.admitted as usize, total, "no request was dropped");
    assert_eq!((s.capacity, s.active_requests, s.queue_depth), (8, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwatched_paths_and_methods_pass_uncounted() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"endpoints": {"/work": {"capacity": 1, "method": "GET"}}})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let addr = gw.addr;
    // Fill the only /work slot.
    let holder = {
        let client = client.clone();
        tokio::spawn(async move { get_full(&client, addr, "/work?ms=600").await.0 })
    };
    assert!(eventually(Duration::from_secs(2), || st.inflight() == 1).await);
    // Another path, and another method on the watched path, pass at once.
    let t = Instant::now();
    let (status, _, body) = get_full(&client, addr, "/free?ms=1").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let post = http::Request::post(format!("http://{addr}/work?ms=1"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = client.request(post).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "unwatched requests waited"
    );
    let s = &layer.endpoints().stats().endpoints["/work"];
    assert_eq!((s.admitted, s.active_requests, s.queue_depth), (1, 1, 0));
    assert_eq!(layer.endpoints().stats().endpoints.len(), 1);
    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    assert_eq!(st.hits(), 3);
    assert_eq!(
        st.max(),
        2,
        "the holder plus one unwatched request at a time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_under_one_prefix_pattern_share_its_capacity() {
    let (be, st) = backend().await;
    let layer = HttpAdmissionLayer::from_config(
        &config(json!({"endpoints": {
            "/v1/models/*": {"capacity": 2},
            "/v1/models/list": {"capacity": 4}
        }})),
        1,
    )
    .unwrap();
    let gw = gateway(layer.clone(), be.addr).await;
    let client = client();
    let addr = gw.addr;
    let pattern = || layer.endpoints().stats().endpoints["/v1/models/*"].clone();

    // 16 clients on two different paths under the pattern: 2 slots between them, not 2 each.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            let path = ["/v1/models/a?ms=40", "/v1/models/b/c?ms=40"][i % 2];
            tokio::spawn(async move { get_full(&client, addr, path).await.0 })
        })
        .collect();
    let mut peak_queue = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        let s = pattern();
        assert!(s.active_requests <= 2, "active {} > 2", s.active_requests);
        peak_queue = peak_queue.max(s.queue_depth);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(st.max(), 2, "backend saw {} concurrent requests", st.max());
    assert!(peak_queue > 0, "16 clients on 2 slots must queue");
    let s = pattern();
    assert_eq!((s.admitted, s.active_requests, s.queue_depth), (16, 0, 0));
    // Stats are keyed by the pattern, not by the matched paths.
    let keys: Vec<_> = layer.endpoints().stats().endpoints.into_keys().collect();
    assert_eq!(keys, ["/v1/models/*", "/v1/models/list"]);

    // Both slots held by two paths; a third path under the pattern queues, while the exact
    // key (which wins over the pattern) and an unwatched path pass at once.
    let holders: Vec<_> = ["/v1/models/a?ms=800", "/v1/models/b?ms=800"]
        .into_iter()
        .map(|path| {
            let client = client.clone();
            tokio::spawn(async move { get_full(&client, addr, path).await.0 })
        })
        .collect();
    assert!(eventually(Duration::from_secs(2), || pattern().active_requests == 2).await);
    let queued = {
        let client = client.clone();
        tokio::spawn(async move { get_full(&client, addr, "/v1/models/x/y?ms=1").await.0 })
    };
    assert!(eventually(Duration::from_secs(2), || pattern().queue_depth == 1).await);
    let t = Instant::now();
    assert_eq!(
        get_full(&client, addr, "/v1/models/list?ms=1").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_full(&client, addr, "/free?ms=1").await.0,
        StatusCode::OK
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "the exact key and an unwatched path waited behind the pattern"
    );
    assert_eq!(pattern().queue_depth, 1, "still queued behind the holders");
    assert_eq!(
        layer.endpoints().stats().endpoints["/v1/models/list"].admitted,
        1
    );
    for h in holders {
        assert_eq!(h.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(queued.await.unwrap(), StatusCode::OK);
    let s = pattern();
    assert_eq!((s.admitted, s.active_requests, s.queue_depth), (19, 0, 0));
}
