//! Operator routes against abuse (issue 13, item 3), on a real gateway and real backends on
//! 127.0.0.1: state-changing routes need JSON and refuse cross-site requests, admin-added
//! URLs are checked (port, host length, userinfo, `upstream_admin_allow`), and non-exact
//! operator paths are proxied to the backend, never answered with operator data.

mod support;

use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::{backend, client, Server, TestGateway};

const AUTH: &str = "Basic b3BzOnB3"; // ops:pw

/// A backend that answers every path with `backend:<path>` and counts its requests.
async fn echo() -> (Server, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new().fallback(move |req: AxumRequest| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            format!("backend:{}", req.uri().path())
        }
    });
    (backend(app).await, hits)
}

async fn gateway(be: &Server) -> TestGateway {
    TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{}\", primary: true}}\nupstream_admin: true\nui: {{username: ops, password: pw}}\nupstream_admin_allow: [127.0.0.0/8]\n",
        be.url()
    ))
    .await
}

async fn send(req: Request<Body>) -> (StatusCode, serde_json::Value, String) {
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or_default(),
        text,
    )
}

async fn replicas(gw: &TestGateway) -> usize {
    let req = Request::get(gw.url("/balancer/upstreams"))
        .header("authorization", AUTH)
        .body(Body::empty())
        .unwrap();
    let (_, body, _) = send(req).await;
    body["replicas"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_routes_need_json_and_the_same_site() {
    let (be, _) = echo().await;
    let (other, _) = echo().await;
    let gw = gateway(&be).await;
    let url = gw.url("/balancer/upstreams");
    let add = format!("{{\"url\": \"{}\"}}", other.url());
    let post = |ct: Option<&str>, extra: &[(&str, &str)]| {
        let mut b = Request::post(&url).header("authorization", AUTH);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        b.body(Body::from(add.clone())).unwrap()
    };
    // The CSRF of the report: a text/plain "simple request" from a foreign page.
    let (code, body, _) = send(post(
        Some("text/plain"),
        &[("origin", "http://evil.example")],
    ))
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "cross_site_request");
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let (code, body, _) = send(post(ct, &[])).await;
        assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}: {body}");
        assert_eq!(body["error"], "unsupported_media_type");
    }
    let json = Some("application/json");
    for headers in [
        &[("origin", "http://evil.example")][..],
        &[("origin", "null")][..],
        &[("sec-fetch-site", "cross-site")][..],
        // Same host, another port: another origin.
        &[("origin", "http://127.0.0.1:1")][..],
    ] {
        let (code, body, _) = send(post(json, headers)).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{headers:?}: {body}");
        assert_eq!(body["error"], "cross_site_request");
        assert!(body["message"].is_string());
    }
    assert_eq!(
        replicas(&gw).await,
        1,
        "no refused request changed the pool"
    );
    // Without credentials: 401 first.
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .body(Body::from(add.clone()))
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::UNAUTHORIZED);
    // The operator's own page (same origin) and curl (no Origin) are served.
    let same = format!("http://{}", gw.addr);
    let (code, body, _) = send(post(
        json,
        &[("origin", &same), ("sec-fetch-site", "same-origin")],
    ))
    .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(replicas(&gw).await, 2);
    // DELETE needs JSON too.
    let del = format!("{url}?url={}", other.url());
    let req = Request::delete(&del)
        .header("authorization", AUTH)
        .body(Body::empty())
        .unwrap();
    let (code, body, _) = send(req).await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    let req = Request::delete(&del)
        .header("authorization", AUTH)
        .header("content-type", "application/json")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::OK);
    // The fallback check too (404 behind the check: no fallback is configured).
    let check = gw.url("/balancer/fallback/check");
    let req = Request::post(&check)
        .header("authorization", AUTH)
        .header("content-type", "text/plain")
        .body(Body::empty())
        .unwrap();
    let (code, body, _) = send(req).await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    let req = Request::post(&check)
        .header("authorization", AUTH)
        .header("content-type", "application/json")
        .header("origin", "http://evil.example")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::FORBIDDEN);
    let req = Request::post(&check)
        .header("authorization", AUTH)
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_added_urls_are_checked() {
    let (be, _) = echo().await;
    let gw = gateway(&be).await;
    let url = gw.url("/balancer/upstreams");
    let long = format!("http://{}:80", "a".repeat(5000));
    let cases = [
        (
            "http://127.0.0.1:99999",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("http://127.0.0.1:0", StatusCode::BAD_REQUEST, "bad_request"),
        (long.as_str(), StatusCode::BAD_REQUEST, "bad_request"),
        (
            "http://user:pw@127.0.0.1:9",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "http://169.254.169.254",
            StatusCode::FORBIDDEN,
            "upstream_not_allowed",
        ),
        (
            "http://[::1]:9",
            StatusCode::FORBIDDEN,
            "upstream_not_allowed",
        ),
        (
            "http://no-such-host.invalid:9",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (u, status, code) in cases {
        let req = Request::post(&url)
            .header("authorization", AUTH)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::json!({"url": u}).to_string()))
            .unwrap();
        let (got, body, text) = send(req).await;
        assert_eq!(got, status, "{u}: {text}");
        assert_eq!(body["error"], code, "{u}: {text}");
        assert!(!text.contains("pw@"), "credentials echoed: {text}");
        assert!(text.len() < 1000, "the long host is not echoed whole");
    }
    assert_eq!(replicas(&gw).await, 1);
    // Inside the allowlist: accepted.
    let (other, _) = echo().await;
    let req = Request::post(&url)
        .header("authorization", AUTH)
        .header("content-type", "application/json")
        .body(Body::from(
            serde_json::json!({"url": other.url()}).to_string(),
        ))
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::CREATED);
}

/// Operator routes match exact paths only: anything else goes to the backend. This test
/// pins that down so a future path normalisation cannot make these serve operator data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_exact_operator_paths_reach_the_backend() {
    let (be, hits) = echo().await;
    let gw = gateway(&be).await;
    // The exact route is the operator's.
    let (code, stats, _) = send(
        Request::get(gw.url("/balancer/stats"))
            .header("authorization", AUTH)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert!(stats["upstreams"].is_array(), "{stats}");
    for path in [
        "/balancer/stats/",
        "//balancer/stats",
        "/balancer/%73tats",
        "/metrics/",
        "/balancer/upstreams/",
        "/balancer//upstreams",
    ] {
        let before = hits.load(Ordering::SeqCst);
        let req = Request::get(format!("http://{}{path}", gw.addr))
            .header("authorization", AUTH)
            .body(Body::empty())
            .unwrap();
        let (code, _, text) = send(req).await;
        assert_eq!(code, StatusCode::OK, "{path}: {text}");
        assert_eq!(text, format!("backend:{path}"), "{path}");
        assert_eq!(hits.load(Ordering::SeqCst), before + 1, "{path}");
        assert!(!text.contains("upstreams") || path.contains("upstreams"));
        assert!(!text.contains("portcullis_"), "{path}: metrics leaked");
    }
}
