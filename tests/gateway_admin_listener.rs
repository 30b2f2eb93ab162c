//! The admin listener (issue 18): with `admin.listen` set, the operator routes are served on
//! that address only, and the data-plane port proxies every path (`/metrics` and `/healthz`
//! included) to the upstream. Real gateway, real backend, on 127.0.0.1.

mod support;

use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::path::Path;
use support::{backend, client, TestGateway};

const AUTH: &str = "Basic b3BzOnB3"; // ops:pw

async fn send(req: Request<Body>) -> (StatusCode, String) {
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn get(url: String) -> (StatusCode, String) {
    send(Request::get(url).body(Body::empty()).unwrap()).await
}

async fn get_authorized(url: String) -> (StatusCode, String) {
    send(
        Request::get(url)
            .header("authorization", AUTH)
            .body(Body::empty())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn operator_routes_move_to_the_admin_listener_and_the_data_plane_proxies_every_path() {
    let be = backend(
        Router::new()
            .fallback(|req: AxumRequest| async move { format!("backend:{}", req.uri().path()) }),
    )
    .await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: \"127.0.0.1:0\"}}\nupstreams:\n  - {{url: \"{}\", primary: true}}\nupstream_admin: true\nui: {{username: ops, password: pw}}\nfallback: {{failure_threshold: 3}}\n",
        be.url()
    ))
    .await;
    let admin = gw.gateway.admin_addr().expect("admin listener bound");
    let admin_url = |p: &str| format!("http://{admin}{p}");

    // The data plane: every path reaches the upstream, operator paths included.
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/balancer/stats",
        "/balancer/ui",
        "/balancer/upstreams",
        "/work",
    ] {
        let (status, body) = get(gw.url(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body, format!("backend:{path}"), "{path}");
    }

    // The admin listener: the operator routes.
    let (status, metrics) = get_authorized(admin_url("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("portcullis_uptime_seconds"), "{metrics}");
    let (status, _) = get(admin_url("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, stats) = get_authorized(admin_url("/balancer/stats")).await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["upstreams"][0]["url"], be.url(), "{stats}");
    let (status, page) = get_authorized(admin_url("/balancer/ui")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<html"), "the dashboard page");
    // The upstream admin routes, behind the credentials.
    let (status, _) = get(admin_url("/balancer/upstreams")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, list) = get_authorized(admin_url("/balancer/upstreams")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert!(list.contains(&be.url()), "{list}");
    // The fallback check.
    let (status, report) = send(
        Request::post(admin_url("/balancer/fallback/check"))
            .header("authorization", AUTH)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    // A path the admin listener does not serve is not proxied from there.
    let (status, body) = get_authorized(admin_url("/work")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(!body.contains("backend:"), "{body}");
}

#[tokio::test]
async fn without_an_admin_listener_the_operator_routes_stay_on_the_data_plane() {
    let be = backend(Router::new().fallback(|| async { "backend" })).await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{}\", primary: true}}\n",
        be.url()
    ))
    .await;
    assert_eq!(gw.gateway.admin_addr(), None);
    let (status, metrics) = get(gw.url("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("portcullis_uptime_seconds"), "{metrics}");
}

#[test]
fn state_changing_routes_off_loopback_need_credentials() {
    let base = "upstreams:\n  - {url: \"http://127.0.0.1:1\"}\nfallback: {failure_threshold: 3}\n";
    let load = |extra: &str| {
        portcullis::gateway::GatewayConfig::from_yaml(&format!("{base}{extra}"), Path::new("t.yml"))
    };
    let e = load("admin: {listen: \"0.0.0.0:9901\"}\n").unwrap_err();
    assert_eq!(e.field.as_deref(), Some("admin.listen"), "{e}");
    assert!(e.message.contains("fallback/check"), "{e}");
    assert!(load("admin: {listen: \"127.0.0.1:9901\"}\n").is_ok());
    assert!(load("admin: {listen: \"0.0.0.0:9901\"}\nui: {username: a, password: b}\n").is_ok());
    // A named pool's fallback makes the check a state-changing route too (`?pool=`).
    let e = portcullis::gateway::GatewayConfig::from_yaml(
        "upstreams:\n  - {url: \"http://127.0.0.1:1\"}\npools:\n  gpu:\n    upstreams: [{url: \"http://127.0.0.1:2\"}]\n    fallback: {url: \"http://127.0.0.1:3\"}\nadmin: {listen: \"0.0.0.0:9901\"}\n",
        Path::new("t.yml"),
    )
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("admin.listen"), "{e}");
    assert!(e.message.contains("fallback/check"), "{e}");
}
