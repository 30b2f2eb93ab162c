//! Request ids and the access log (issue 18), on a real gateway and a real backend on
//! 127.0.0.1: one valid JSON line per request, the same request id at the backend, in the
//! response and in the line, a valid client-supplied id kept (an invalid one replaced), and
//! the id in the body of a rejection.

mod support;

use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use portcullis_testkit::eventually;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::temp_dir::TempDir;
use support::{backend, client, closed_port, TestGateway};

/// The request ids the backend received, in order (health checks left out).
type Seen = Arc<Mutex<Vec<String>>>;

async fn recording_backend() -> (support::Server, Seen) {
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let app = Router::new().fallback(move |req: AxumRequest| {
        let s = Arc::clone(&s);
        async move {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            // The health checks are not the test's requests.
            if req.uri().path() != "/healthz" {
                s.lock().unwrap().push(id);
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            format!("got {} bytes", body.len())
        }
    });
    (backend(app).await, seen)
}

async fn send(req: Request<Body>) -> (StatusCode, Option<String>, String) {
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, id, String::from_utf8_lossy(&body).into_owned())
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[tokio::test]
async fn one_json_line_per_request_with_the_request_id_seen_everywhere() {
    let dir = TempDir::new("access-log");
    let log = dir.path().join("access.log");
    let (be, seen) = recording_backend().await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{}\", primary: true}}\naccess_log: {{enable: true, format: json, path: \"{}\"}}\n",
        be.url(),
        log.display()
    ))
    .await;

    // Generated ids.
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, id, _) = send(
            Request::get(gw.url(&format!("/get/{i}")))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        ids.push(id.expect("a generated id"));
    }
    // A valid client id is kept; a POST body is counted.
    let (status, id, body) = send(
        Request::post(gw.url("/post"))
            .header("x-request-id", "client-id-42")
            .body(Body::from("hello"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "got 5 bytes");
    assert_eq!(id.as_deref(), Some("client-id-42"));
    ids.push("client-id-42".into());
    // An invalid one (too long) is replaced.
    let long = "x".repeat(129);
    let (_, id, _) = send(
        Request::get(gw.url("/long"))
            .header("x-request-id", &long)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let replaced = id.unwrap();
    assert_ne!(replaced, long);
    ids.push(replaced);
    // An operator route gets an id and a line too.
    let (status, id, _) = send(
        Request::get(gw.url("/healthz"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let healthz_id = id.unwrap();

    // The backend saw exactly the ids the client got back.
    assert_eq!(*seen.lock().unwrap(), ids);
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "ids are unique: {ids:?}");

    // One JSON line per request, in order, with the same ids.
    assert!(
        eventually(Duration::from_secs(5), || lines(&log).len() == 6).await,
        "{:?}",
        lines(&log)
    );
    let lines = lines(&log);
    let logged: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.push(&healthz_id);
    assert_eq!(logged, expected);
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/get/0");
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream"], be.url());
    assert_eq!(first["remote"], "127.0.0.1");
    assert!(first["error"].is_null());
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["admission_wait_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["bytes_out"].as_u64().unwrap() > 0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'), "{first}");
    let post = &lines[3];
    assert_eq!(post["method"], "POST");
    assert_eq!(post["bytes_in"], 5);
    assert_eq!(post["bytes_out"], "got 5 bytes".len());
    // The operator route never reached an upstream.
    assert!(lines[5]["upstream"].is_null(), "{}", lines[5]);
    assert_eq!(gw.gateway.app().access_log().unwrap().dropped(), 0);
}

#[tokio::test]
async fn a_rejection_carries_the_request_id_in_its_body_and_its_line() {
    let dir = TempDir::new("access-log-rejection");
    let log = dir.path().join("access.log");
    let port = closed_port().await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"http://127.0.0.1:{port}\", primary: true}}\nfailure_threshold: 1000\naccess_log: {{enable: true, path: \"{}\"}}\n",
        log.display()
    ))
    .await;
    let (status, id, body) = send(
        Request::get(gw.url("/x"))
            .header("x-request-id", "rejected-1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(id.as_deref(), Some("rejected-1"));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "bad_gateway");
    assert_eq!(json["request_id"], "rejected-1");
    assert!(json["message"].is_string());
    assert!(eventually(Duration::from_secs(5), || lines(&log).len() == 1).await);
    let line = &lines(&log)[0];
    assert_eq!(line["status"], 502);
    assert_eq!(line["error"], "bad_gateway");
    assert_eq!(line["request_id"], "rejected-1");
}

#[tokio::test]
async fn ids_without_an_access_log_and_the_combined_format() {
    // No access log: ids are still given and passed on.
    let (be, seen) = recording_backend().await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{}\", primary: true}}\n",
        be.url()
    ))
    .await;
    assert!(gw.gateway.app().access_log().is_none());
    let (_, id, _) = send(Request::get(gw.url("/a")).body(Body::empty()).unwrap()).await;
    assert_eq!(seen.lock().unwrap().as_slice(), &[id.unwrap()]);

    // The combined format.
    let dir = TempDir::new("access-log-combined");
    let log = dir.path().join("access.log");
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{}\", primary: true}}\naccess_log: {{enable: true, format: combined, path: \"{}\"}}\n",
        be.url(),
        log.display()
    ))
    .await;
    let (_, _, _) = send(
        Request::get(gw.url("/c"))
            .header("x-request-id", "combined-1")
            .header("user-agent", "test-agent")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || read().lines().count() == 1).await);
    let line = read();
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("\"GET /c HTTP/1.1\" 200 "), "{line}");
    assert!(line.contains("\"test-agent\""), "{line}");
    assert!(line.contains("request_id=combined-1"), "{line}");
}
