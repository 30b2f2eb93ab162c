//! Helpers of the config-environment tests: `gateway --check` with environment variables,
//! and a `GET` with optional Basic credentials that returns the body as text.

use super::temp_dir::TempDir;
use base64::Engine as _;
use http_body_util::BodyExt;
use std::process::Command;
use std::time::Duration;

/// `gateway --config <yaml> --check` with `env` set: the exit code and stdout + stderr.
/// Panics on a panic message in the output.
pub fn check_with_env(yaml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = TempDir::new("env-check");
    let path = dir.path().join("gw.yml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(super::gateway_binary())
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "panic for {yaml:?}: {text}");
    (out.status.code().unwrap_or(-1), text)
}

/// `GET url`, with Basic credentials when given: the status and the body, within 10 s.
pub async fn get_text(url: &str, auth: Option<(&str, &str)>) -> (u16, String) {
    let mut req = http::Request::get(url);
    if let Some((u, p)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req = req.header("authorization", format!("Basic {token}"));
    }
    let req = req.body(axum::body::Body::empty()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), super::client().request(req))
        .await
        .expect("an answer within 10 s")
        .expect("a response");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
