//! The dashboard in a real browser: headless Debian `chromium` driven through
//! `chromedriver` (WebDriver, via fantoccini).
//!
//! A real axum server on 127.0.0.1 serves the operator router with a stats source under
//! load (non-zero active requests on `/work`, a queue, an ejected replica, an engaged
//! fallback). The test opens `/balancer/ui` at 1280×800 and at phone width (390 px),
//! waits until the page shows `/work` with a non-zero active count and a drawn chart,
//! checks the upstream table and the fallback card, and saves screenshots under
//! `target/dashboard/`. With `PORTCULLIS_UPDATE_SCREENSHOT=1` it waits for a fuller chart
//! and copies the desktop screenshot to `docs/dashboard.png` (the README's image):
//!
//! ```text
//! PORTCULLIS_UPDATE_SCREENSHOT=1 cargo test -p portcullis-dashboard --test browser -- --nocapture
//! ```
//!
//! Without `chromium`/`chromedriver` the test prints a skip line and passes, unless
//! `CI=true`, where it fails (`.ci/run` installs both).

mod support;

use fantoccini::{Client, Locator};
use portcullis_dashboard::testing::{browser_tools, Driver, Profile};
use portcullis_dashboard::{router, Stats, UiConfig};
use portcullis_health::HealthRegistry;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{sample_stats, serve};

/// A gateway under load: `/work` oscillates between 5 and 8 active with a queue when full.
fn loaded_stats(started: Instant) -> Stats {
    let t = started.elapsed().as_secs_f64();
    let active = (6.5 + 1.5 * (t / 3.0).sin()).round() as u64;
    let queue = if active >= 8 {
        (3.0 + 2.0 * (t / 2.0).cos()).round() as u64
    } else {
        ((t / 1.7).sin() * 1.5).max(0.0).round() as u64
    };
    let mut s = sample_stats(active, queue);
    s.uptime_seconds += t;
    s
}

async fn wait_for_chart(client: &Client, min_points: u64, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let state = client
            .execute(
                r#"
                const card = document.querySelector('.endpoint[data-endpoint="/work"]');
                if (!card) return null;
                const canvas = card.querySelector('canvas.chart');
                let inked = 0;
                if (canvas.width && canvas.height) {
                  const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) inked++;
                }
                return {
                  active: Number(card.querySelector('.active-value').textContent),
                  capacity: Number(card.querySelector('.capacity-value').textContent),
                  util: card.querySelector('.util-value').textContent,
                  level: card.getAttribute('data-level'),
                  points: Number(canvas.getAttribute('data-points')),
                  drawn: canvas.getAttribute('data-drawn') === '1',
                  inked: inked,
                  width: window.innerWidth,
                  overflow: document.documentElement.scrollWidth > window.innerWidth,
                };
                "#,
                vec![],
            )
            .await
            .expect("script runs");
        if let Some(s) = state.as_object() {
            if s["active"].as_u64().unwrap_or(0) > 0
                && s["drawn"] == true
                && s["points"].as_u64().unwrap_or(0) >= min_points
                && s["inked"].as_u64().unwrap_or(0) > 500
            {
                return state;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard did not show /work with active > 0 and a drawn chart: {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn check_tables(client: &Client) {
    let rows = client
        .find_all(Locator::Css("#upstreams tbody tr[data-url]"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "one row per upstream");
    let ejected = client
        .find(Locator::Css(
            r#"#upstreams tr[data-url="http://10.0.0.12:8000"]"#,
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ejected.contains("ejected"), "{ejected}");
    assert!(ejected.contains("812 ms"), "probe latency shown: {ejected}");
    let healthy = client
        .find(Locator::Css(
            r#"#upstreams tr[data-url="http://10.0.0.11:8000"]"#,
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        healthy.contains("healthy") && healthy.contains("3.20 ms"),
        "{healthy}"
    );
    let fallback = client
        .find(Locator::Id("fallback"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(fallback.contains("recovering"), "{fallback}");
    assert!(fallback.contains("2 / 3 good probes"), "{fallback}");
    let banner = client
        .find(Locator::Id("fallback-banner"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(banner.contains("Fallback engaged"), "{banner}");
    let ready = client
        .find(Locator::Id("ready"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(ready, "ready");
}

fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_live_stats_in_headless_chromium() {
    let Some((chromium, chromedriver)) = browser_tools("dashboard browser test") else {
        return;
    };
    let update_docs = std::env::var("PORTCULLIS_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");

    let started = Instant::now() - Duration::from_secs(30);
    let registry = HealthRegistry::new();
    registry.register_ready("storage");
    let app = router(
        &UiConfig::default(),
        move || loaded_stats(started),
        &registry,
    );
    let (addr, _server) = serve(app).await;
    let url = format!("http://{addr}/balancer/ui");

    let out = target_dir().join("dashboard");
    std::fs::create_dir_all(&out).unwrap();
    // chromedriver cannot find the DevTools port file of a profile path with `..` in it.
    let out = std::fs::canonicalize(out).unwrap();
    let driver = Driver::start(&chromium, &chromedriver).await;

    // Desktop, 1280×800.
    let profile = Profile::new(&out, "desktop");
    let client = driver.open(&profile, false).await;
    client.goto(&url).await.unwrap();
    let (points, wait) = if update_docs {
        (26, Duration::from_secs(70))
    } else {
        (3, Duration::from_secs(20))
    };
    let state = wait_for_chart(&client, points, wait).await;
    eprintln!("desktop: {state}");
    assert_eq!(state["capacity"], 8);
    assert!(
        !state["overflow"].as_bool().unwrap(),
        "no horizontal scroll at 1280 px"
    );
    check_tables(&client).await;
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(out.join("dashboard-1280x800.png"), &png).unwrap();
    // The whole page at 1280 px wide (the README image).
    let height = client
        .execute("return document.documentElement.scrollHeight", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(800);
    client.set_window_size(1280, height as u32).await.unwrap();
    // The window may be taller than its viewport: grow it by the difference.
    let inner = client
        .execute("return window.innerHeight", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(height);
    let full = 2 * height - inner.min(height);
    client.set_window_size(1280, full as u32).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let desktop = out.join("dashboard-1280-full.png");
    std::fs::write(&desktop, client.screenshot().await.unwrap()).unwrap();
    client.close().await.unwrap();
    drop(profile);

    // Phone, 390 px wide.
    let profile = Profile::new(&out, "phone");
    let client = driver.open(&profile, true).await;
    client.goto(&url).await.unwrap();
    let state = wait_for_chart(&client, 2, Duration::from_secs(20)).await;
    eprintln!("phone: {state}");
    // Opened seconds after the router started: the chart began with the server's history.
    let seeded = client
        .execute(
            "return Number(document.body.getAttribute('data-seeded'))",
            vec![],
        )
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(0);
    assert!(
        seeded >= 2,
        "the page did not start from /balancer/stats/history ({seeded} points)"
    );
    assert_eq!(state["width"], 390);
    assert!(
        !state["overflow"].as_bool().unwrap(),
        "no horizontal scroll at 390 px"
    );
    check_tables(&client).await;
    let png = client.screenshot().await.unwrap();
    std::fs::write(out.join("dashboard-390.png"), &png).unwrap();
    client
        .execute(
            "window.scrollTo(0, document.documentElement.scrollHeight)",
            vec![],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(
        out.join("dashboard-390-bottom.png"),
        client.screenshot().await.unwrap(),
    )
    .unwrap();
    client.close().await.unwrap();
    drop(profile);

    // Several pools: one heading per pool, `default` first, each replica under its pool.
    let mut pooled = sample_stats(1, 0);
    let gpu = portcullis_dashboard::UpstreamStats {
        url: "http://10.0.0.50:8000".into(),
        healthy: true,
        status: "healthy".into(),
        ..Default::default()
    };
    for (name, upstreams) in [("default", pooled.upstreams.clone()), ("gpu", vec![gpu])] {
        let pool = portcullis_dashboard::PoolStats {
            upstreams,
            ..Default::default()
        };
        pooled.pools.insert(name.to_owned(), pool);
    }
    let app = router(&UiConfig::default(), move || pooled.clone(), &registry);
    let (addr, _pooled_server) = serve(app).await;
    let profile = Profile::new(&out, "pools");
    let client = driver.open(&profile, false).await;
    client
        .goto(&format!("http://{addr}/balancer/ui"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let groups = loop {
        let groups = client
            .execute(
                r#"
                const heads = Array.from(document.querySelectorAll('#upstreams tr.pool-head'));
                if (heads.length === 0) return null;
                return {
                  heads: heads.map(h => h.getAttribute('data-pool-head')),
                  text: heads.map(h => h.textContent),
                  gpu: Array.from(document.querySelectorAll('#upstreams tr[data-pool="gpu"]'))
                    .map(r => r.getAttribute('data-url')),
                  rows: document.querySelectorAll('#upstreams tbody tr[data-url]').length,
                  count: document.getElementById('up-count').textContent,
                };
                "#,
                vec![],
            )
            .await
            .expect("script runs");
        if !groups.is_null() {
            break groups;
        }
        assert!(Instant::now() < deadline, "no pool headings shown");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        groups["heads"],
        serde_json::json!(["default", "gpu"]),
        "{groups}"
    );
    assert!(
        groups["text"][1].as_str().unwrap().contains("Pool gpu"),
        "{groups}"
    );
    assert_eq!(
        groups["gpu"],
        serde_json::json!(["http://10.0.0.50:8000"]),
        "{groups}"
    );
    assert_eq!(groups["rows"], 4, "{groups}");
    assert_eq!(groups["count"], "4", "{groups}");
    std::fs::write(
        out.join("dashboard-pools.png"),
        client.screenshot().await.unwrap(),
    )
    .unwrap();
    client.close().await.unwrap();
    drop(profile);

    if update_docs {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        std::fs::copy(&desktop, docs.join("dashboard.png")).unwrap();
        std::fs::copy(
            out.join("dashboard-390.png"),
            docs.join("dashboard-phone.png"),
        )
        .unwrap();
        eprintln!("updated docs/dashboard.png and docs/dashboard-phone.png");
    }
    eprintln!("screenshots in {}", out.display());
}
