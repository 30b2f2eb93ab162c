//! fastapi-balancer configs as they are, through the example binary: the annotated fixture
//! (`tests/fixtures/fastapi_balancer.yml`, older field names included) passes `--check` and
//! serves; `least-connections` sends requests to the least loaded of three real backends
//! while two of them are held busy; `weighted` splits requests by weight; the storage
//! shorthands and the deprecated names pass `--check`, the latter with a warning each; the
//! `storage: redis://...` shorthand runs against a real redis-server with a password.

mod support;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use portcullis_testkit::eventually;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::env_check::{check_with_env as check, get_text};
use support::gateway_process::GatewayProcess;
use tokio::sync::Semaphore;

const FIXTURE: &str = include_str!("fixtures/fastapi_balancer.yml");

/// What a backend shares with its handlers.
struct BackendState {
    name: String,
    /// `/hold` requests being held.
    active: AtomicUsize,
    /// One permit lets one held request answer.
    release: Semaphore,
}

/// A real axum backend that names itself on every path and holds `/hold` until released.
struct Backend {
    state: Arc<BackendState>,
    server: support::Server,
}

impl Backend {
    async fn start(name: &str) -> Self {
        let state = Arc::new(BackendState {
            name: name.to_owned(),
            active: AtomicUsize::new(0),
            release: Semaphore::new(0),
        });
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/hold",
                get(|State(s): State<Arc<BackendState>>| async move {
                    s.active.fetch_add(1, Ordering::SeqCst);
                    // Bounded: a failed test does not leave the request held for ever.
                    let permit =
                        tokio::time::timeout(Duration::from_secs(30), s.release.acquire()).await;
                    if let Ok(Ok(p)) = permit {
                        p.forget();
                    }
                    s.active.fetch_sub(1, Ordering::SeqCst);
                    s.name.clone()
                }),
            )
            .fallback(|State(s): State<Arc<BackendState>>| async move { s.name.clone() })
            .with_state(state.clone());
        let server = support::backend(app).await;
        Self { state, server }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn active(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }
}

fn upstreams(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| format!("  - {{url: \"{}\"}}\n", b.url()))
        .collect::<String>()
}

#[test]
fn fixture_passes_check_with_a_warning_per_deprecated_name() {
    let (code, text) = check(FIXTURE, &[]);
    assert_eq!(code, 0, "{text}");
    for old in ["strategy", "ui_username", "ui_password"] {
        let warnings = text
            .lines()
            .filter(|l| {
                l.contains("WARN") && l.contains(&format!("deprecated config field `{old}`"))
            })
            .count();
        assert_eq!(warnings, 1, "one warning for `{old}`:\n{text}");
    }
    assert!(
        !text.contains("change-me"),
        "the password is not logged:\n{text}"
    );
}

#[tokio::test]
async fn fixture_runs_and_serves() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let password = "fixture-pw-41c7";
    let gw = GatewayProcess::start_with_env(
        "fastapi-fixture",
        FIXTURE,
        &[
            ("FASTAPI_UPSTREAM_1", &a.url()),
            ("FASTAPI_UPSTREAM_2", &b.url()),
            ("FASTAPI_UI_PASSWORD", password),
        ],
    )
    .await;
    let (status, body) = get_text(&gw.url("/work"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body == "a" || body == "b", "{body}");
    // ui_username / ui_password protect the operator routes.
    let (status, _) = get_text(&gw.url("/balancer/stats"), None).await;
    assert_eq!(status, 401);
    let (status, stats) = get_text(&gw.url("/balancer/stats"), Some(("admin", password))).await;
    assert_eq!(status, 200, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["endpoints"]["/predict"]["capacity"], 4, "{stats}");
    assert!(!stats.to_string().contains(password));
    assert!(!gw.log().contains(password), "{}", gw.log());
}

#[tokio::test]
async fn least_connections_picks_the_least_loaded_replica() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let yaml = format!(
        "routing_strategy: least-connections\nupstreams:\n{}",
        upstreams(&backends.iter().collect::<Vec<_>>())
    );
    let gw = GatewayProcess::start("least-connections", &yaml).await;
    let total = || backends.iter().map(Backend::active).sum::<usize>();
    // Two held requests: the second goes to a replica with nothing in flight, so two
    // different replicas are busy.
    let mut held = Vec::new();
    for n in 1..=2 {
        let url = gw.url("/hold");
        held.push(tokio::spawn(async move { get_text(&url, None).await }));
        assert!(
            eventually(Duration::from_secs(10), || total() == n).await,
            "{n} held requests reach the backends"
        );
    }
    let busy: Vec<usize> = backends.iter().map(Backend::active).collect();
    assert!(busy.iter().all(|n| *n <= 1), "{busy:?}");
    let idle = backends.iter().find(|b| b.active() == 0).unwrap();
    // Every request now goes to the idle replica (p2c would pick a busy one about a third
    // of the time).
    for _ in 0..30 {
        let (status, body) = get_text(&gw.url("/who"), None).await;
        assert_eq!((status, body.as_str()), (200, idle.state.name.as_str()));
    }
    for b in &backends {
        b.state.release.add_permits(1);
    }
    for h in held {
        let (status, _) = h.await.unwrap();
        assert_eq!(status, 200);
    }
    assert!(eventually(Duration::from_secs(10), || total() == 0).await);
}

#[tokio::test]
async fn weighted_splits_by_weight() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let yaml = format!(
        "routing_strategy: weighted\nupstreams:\n  - {{url: \"{}\", weight: 1}}\n  - {{url: \"{}\", weight: 2}}\n  - {{url: \"{}\", weight: 5}}\n",
        backends[0].url(),
        backends[1].url(),
        backends[2].url()
    );
    let gw = GatewayProcess::start("weighted", &yaml).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let rounds = 40; // 40 × (1 + 2 + 5) requests
    for _ in 0..rounds * 8 {
        let (status, body) = get_text(&gw.url("/who"), None).await;
        assert_eq!(status, 200, "{body}");
        *seen.entry(body).or_default() += 1;
    }
    for (name, weight) in [("a", 1), ("b", 2), ("c", 5)] {
        let got = seen.get(name).copied().unwrap_or(0);
        let want = rounds * weight;
        // Sequential requests through one shared pool get exactly their share; allow a
        // little for a request that raced a health-check refresh.
        assert!(
            got.abs_diff(want) <= 2 + want / 20,
            "{name}: {got} requests for {want} ({seen:?})"
        );
    }
}

#[test]
fn storage_shorthands_and_old_names_pass_check() {
    let base = "upstreams:\n  - {url: \"http://127.0.0.1:9001\"}\n";
    for extra in [
        "storage: memory\n",
        "storage: null\n",
        "storage:\n",
        "storage: redis://127.0.0.1:6379\n",
        "storage: \"rediss://:pw@127.0.0.1:6380\"\n",
        "strategy: weighted\n",
        "strategy: p2c\nrouting_strategy: p2c\n",
        "ui_username: admin\nui_password: 1234\n",
        "ui: {username: admin}\nui_password: 1234\n",
        "routing_strategy: least-connections\n",
    ] {
        let (code, text) = check(&format!("{base}{extra}"), &[]);
        assert_eq!(code, 0, "{extra:?}: {text}");
    }
    for (extra, needle) in [
        ("storage: redis\n", "`storage`"),
        ("strategy: p2c\nrouting_strategy: weighted\n", "`strategy`"),
        ("ui_password: a\nui: {password: b}\n", "`ui_password`"),
        ("strategy: fastest\n", "`strategy`"),
        (
            "upstreams:\n  - {url: \"http://127.0.0.1:1\", weight: 0}\n",
            "`upstreams[0].weight`",
        ),
    ] {
        let (code, text) = check(extra, &[]);
        assert_eq!(code, 2, "{extra:?}: {text}");
        assert!(text.contains(needle), "{extra:?} names {needle}: {text}");
        assert!(!text.contains("pw@"), "{text}");
    }
}

#[tokio::test]
async fn redis_url_shorthand_runs_against_a_real_redis() {
    let password = "Zq9-redis-pw";
    let Some(redis) = portcullis_redis::testing::RedisServer::start_with(
        "redis_url_shorthand_runs_against_a_real_redis",
        &["--requirepass", password],
    ) else {
        return;
    };
    let backend = Backend::start("a").await;
    let url = format!("redis://:{password}@127.0.0.1:{}", redis.port());
    let yaml = format!(
        "storage: \"{url}\"\nupstreams:\n  - {{url: \"{}\"}}\nendpoints:\n  /work: {{capacity: 2}}\n",
        backend.url()
    );
    // Ready means the storage readiness check passed: the gateway reached Redis with the
    // shorthand's URL and password.
    let gw = GatewayProcess::start("redis-shorthand", &yaml).await;
    let (status, body) = get_text(&gw.url("/work"), None).await;
    assert_eq!((status, body.as_str()), (200, "a"));
    let log = gw.log();
    assert!(log.contains("redis storage configured"), "{log}");
    assert!(
        !log.contains(password),
        "the Redis password is in the log:\n{log}"
    );
    let stats = gw.stats().await.to_string();
    assert!(!stats.contains(password), "{stats}");
}
