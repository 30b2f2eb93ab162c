//! The environment's part in the example binary's config: `PORTCULLIS_<FIELD>` overrides
//! (`__` between nested keys, endpoint keys with `/`), `${VAR}` and `${VAR:-default}`
//! expansion, `--check` applying both, a bad variable exiting 2 by name, and secrets kept
//! out of every log line, error message and stats document.

mod support;

use axum::routing::get;
use axum::Router;
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::env_check::{check_with_env, get_text};
use support::gateway_process::{free_port, ready};
use support::temp_dir::TempDir;

const UPSTREAM: &str = "upstreams:\n  - {url: \"http://127.0.0.1:9001\"}\n";

/// Environment variables for one run.
type Env<'a> = &'a [(&'a str, &'a str)];

/// A gateway process started from a config file and an environment (its `listen` comes
/// from `PORTCULLIS_LISTEN`); killed when dropped.
struct EnvGateway {
    child: Child,
    dir: TempDir,
}

impl EnvGateway {
    async fn start(yaml: &str, env: &[(&str, &str)], addr: &str) -> Self {
        let dir = TempDir::new("env-gateway");
        let config = dir.path().join("gw.yml");
        std::fs::write(&config, yaml).unwrap();
        let log = File::create(dir.path().join("gw.log")).unwrap();
        let child = Command::new(support::gateway_binary())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut gw = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(addr).await {
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("the gateway exited ({status}):\n{}", gw.log());
            }
            assert!(Instant::now() < deadline, "not ready:\n{}", gw.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gw.log")).unwrap_or_default()
    }
}

impl Drop for EnvGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn overrides_and_expansion_shape_the_running_gateway() {
    let backend = support::backend(Router::new().fallback(get(|| async { "from-backend" }))).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let password = "pw-9f3e1c-secret";
    let yaml = "upstream_timeout: ${GW_TEST_TIMEOUT:-30}\nui: {username: admin, password: \"${GW_TEST_UI_PASSWORD}\"}\nupstreams:\n  - {url: \"${GW_TEST_UPSTREAM}\"}\nendpoints:\n  /work: {capacity: 4}\n";
    let gw = EnvGateway::start(
        yaml,
        &[
            ("GW_TEST_UI_PASSWORD", password),
            ("GW_TEST_UPSTREAM", &backend.url()),
            ("PORTCULLIS_LISTEN", &addr),
            ("PORTCULLIS_ENDPOINTS__/work__CAPACITY", "2"),
            ("PORTCULLIS_UI__USERNAME", "operator"),
        ],
        &addr,
    )
    .await;
    // PORTCULLIS_LISTEN: it listens where the variable says; ${GW_TEST_UPSTREAM}: it
    // proxies to the backend.
    let (status, body) = get_text(&format!("http://{addr}/work"), None).await;
    assert_eq!((status, body.as_str()), (200, "from-backend"));
    // ${GW_TEST_UI_PASSWORD} is the password, PORTCULLIS_UI__USERNAME the user name.
    let stats_url = format!("http://{addr}/balancer/stats");
    assert_eq!(get_text(&stats_url, Some(("admin", password))).await.0, 401);
    let (status, stats) = get_text(&stats_url, Some(("operator", password))).await;
    assert_eq!(status, 200, "{stats}");
    let json: serde_json::Value = serde_json::from_str(&stats).unwrap();
    // PORTCULLIS_ENDPOINTS__/work__CAPACITY set the capacity.
    assert_eq!(json["endpoints"]["/work"]["capacity"], 2, "{json}");
    assert!(!stats.contains(password), "{stats}");
    let (_, metrics) = get_text(
        &format!("http://{addr}/metrics"),
        Some(("operator", password)),
    )
    .await;
    assert!(!metrics.contains(password));
    let log = gw.log();
    assert!(log.contains("listening"), "{log}");
    assert!(
        !log.contains(password),
        "the password is in the log:\n{log}"
    );
}

#[test]
fn check_applies_overrides_and_names_a_bad_variable() {
    let ok: &[(&str, Env)] = &[
        (UPSTREAM, &[("PORTCULLIS_LISTEN", "127.0.0.1:9000")]),
        (UPSTREAM, &[("PORTCULLIS_UPSTREAM_TIMEOUT", "2.5")]),
        (UPSTREAM, &[("PORTCULLIS_STORAGE__URL", "redis://127.0.0.1:6379"), ("PORTCULLIS_STORAGE__TYPE", "redis")]),
        (UPSTREAM, &[("PORTCULLIS_STORAGE", "redis://127.0.0.1:6379")]),
        (UPSTREAM, &[("PORTCULLIS_UI__PASSWORD", "123456"), ("PORTCULLIS_UI__USERNAME", "a")]),
        (UPSTREAM, &[("PORTCULLIS_ROUTING_STRATEGY", "weighted"), ("PORTCULLIS_UPSTREAMS__0__WEIGHT", "3")]),
        ("", &[("PORTCULLIS_UPSTREAMS", "[{url: \"http://127.0.0.1:9001\"}]")]),
        ("", &[("PORTCULLIS_UPSTREAMS__0__URL", "http://127.0.0.1:9001")]),
        (UPSTREAM, &[("PORTCULLIS_CHAOS_SECS", "5"), ("PORTCULLIS_UPDATE_SCREENSHOT", "1")]),
        ("listen: ${GW_TEST_LISTEN:-127.0.0.1:9000}\nupstreams:\n  - {url: \"http://127.0.0.1:${GW_TEST_PORT}\"}\n", &[("GW_TEST_PORT", "9001")]),
    ];
    for (yaml, env) in ok {
        let (code, text) = check_with_env(yaml, env);
        assert_eq!(code, 0, "{env:?}: {text}");
    }
    // A bad override exits 2 naming the variable.
    let bad: &[(&str, Env, &str)] = &[
        (
            UPSTREAM,
            &[("PORTCULLIS_UPSTREAM_TIMEOUT", "soon")],
            "PORTCULLIS_UPSTREAM_TIMEOUT",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_UPSTREAM_TIMEOUT", "0")],
            "PORTCULLIS_UPSTREAM_TIMEOUT",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_LISTEN", "nowhere")],
            "PORTCULLIS_LISTEN",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_NOT_A_FIELD", "1")],
            "PORTCULLIS_NOT_A_FIELD",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_UI__NOPE", "1")],
            "PORTCULLIS_UI__NOPE",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_UI____PASSWORD", "x")],
            "PORTCULLIS_UI____PASSWORD",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_ENDPOINTS__/work__CAPACITY", "0")],
            "PORTCULLIS_ENDPOINTS__/work__CAPACITY",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_ENDPOINTS__/work__CAPACITY", "many")],
            "PORTCULLIS_ENDPOINTS__/work__CAPACITY",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_STORAGE", "redis")],
            "PORTCULLIS_STORAGE",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_UPSTREAMS__5__URL", "http://127.0.0.1:1")],
            "PORTCULLIS_UPSTREAMS__5__URL",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_UPSTREAMS__0__WEIGHT", "0")],
            "PORTCULLIS_UPSTREAMS__0__WEIGHT",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_ROUTING_STRATEGY", "fastest")],
            "PORTCULLIS_ROUTING_STRATEGY",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_UI__PASSWORD", "[1, 2]")],
            "PORTCULLIS_UI__PASSWORD",
        ),
        (
            UPSTREAM,
            &[("PORTCULLIS_HEALTH_CHECK_INTERVAL", "0.001")],
            "PORTCULLIS_HEALTH_CHECK_INTERVAL",
        ),
        (
            "upstreams: []\n",
            &[("PORTCULLIS_UPSTREAMS__0", "5")],
            "PORTCULLIS_UPSTREAMS__0",
        ),
    ];
    for (yaml, env, needle) in bad {
        let (code, text) = check_with_env(yaml, env);
        assert_eq!(code, 2, "{env:?}: {text}");
        assert!(text.contains(needle), "{env:?} names {needle}: {text}");
    }
}

#[test]
fn an_unset_variable_exits_2_naming_it_and_its_line() {
    let yaml = format!("{UPSTREAM}ui:\n  password: ${{GW_TEST_UNSET_PASSWORD}}\n");
    let (code, text) = check_with_env(&yaml, &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("GW_TEST_UNSET_PASSWORD"), "{text}");
    assert!(text.contains("(line 4)"), "{text}");
    // With a default, or set, it loads; `$${` is a literal `${`.
    for (yaml, env) in [
        (
            format!(
                "{UPSTREAM}ui: {{username: a, password: \"${{GW_TEST_UNSET_PASSWORD:-x}}\"}}\n"
            ),
            vec![],
        ),
        (yaml.clone(), vec![("GW_TEST_UNSET_PASSWORD", "set")]),
        (
            format!("{UPSTREAM}ui: {{username: a, password: \"$${{NOT_A_VAR}}\"}}\n"),
            vec![],
        ),
    ] {
        let (code, text) = check_with_env(&yaml, &env);
        assert_eq!(code, 0, "{yaml}: {text}");
    }
}

#[test]
fn secrets_never_reach_an_error_message() {
    let secret = "Zq9-hunter-77";
    // The password is the value a refused field shows: it is masked.
    let (code, text) = check_with_env(
        UPSTREAM,
        &[
            ("PORTCULLIS_UI__USERNAME", "a"),
            ("PORTCULLIS_UI__PASSWORD", secret),
            ("PORTCULLIS_LISTEN", secret),
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("PORTCULLIS_LISTEN") && text.contains("***"),
        "{text}"
    );
    assert!(!text.contains(secret), "{text}");
    // The same from `${VAR}` in the file.
    let yaml = format!("{UPSTREAM}ui: {{username: a, password: \"${{GW_TEST_PW}}\"}}\nlisten: \"${{GW_TEST_PW}}\"\n");
    let (code, text) = check_with_env(&yaml, &[("GW_TEST_PW", secret)]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("`listen`") && !text.contains(secret),
        "{text}"
    );
    // A Redis URL's password, in the shorthand and in the mapping.
    for env in [
        vec![(
            "PORTCULLIS_STORAGE",
            "redis://:Zq9-hunter-77@127.0.0.1:99999",
        )],
        vec![
            ("PORTCULLIS_STORAGE__TYPE", "redis"),
            (
                "PORTCULLIS_STORAGE__URL",
                "http://:Zq9-hunter-77@127.0.0.1:1",
            ),
        ],
    ] {
        let (code, text) = check_with_env(UPSTREAM, &env);
        assert_eq!(code, 2, "{env:?}: {text}");
        assert!(text.contains("PORTCULLIS_STORAGE"), "{text}");
        assert!(!text.contains(secret), "{text}");
    }
}
