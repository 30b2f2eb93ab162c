//! The dashboard of the real gateway under real load, in a real browser: headless Debian
//! `chromium` driven through `chromedriver` (WebDriver, via fantoccini).
//!
//! Two axum replicas on 127.0.0.1 answer `/work` after 300 ms; the in-process gateway
//! admits 4 `/work` requests at a time and has a breaker fallback (a third backend).
//! Twelve client loops, started one by one, keep `/work` full with a queue behind it
//! for at most 20 s. The test opens `/balancer/ui` at 1280×800 and at phone width
//! (390×844), waits until the page shows `/work` with a non-zero active count, a
//! queue, and a chart whose active and queue lines rise above zero, checks the upstream
//! table lists both replicas and the fallback card its target, and saves screenshots
//! under `target/gateway-dashboard/` (the 1280×800 viewport, the whole page at 1280 px,
//! the phone page screen by screen). With `PORTCULLIS_UPDATE_SCREENSHOT=1` it waits for a
//! longer chart and copies the whole 1280 px page to `docs/dashboard.png` and the first
//! phone screen to `docs/dashboard-phone.png` (the README's images):
//!
//! ```text
//! PORTCULLIS_UPDATE_SCREENSHOT=1 cargo test --test gateway_dashboard -- --nocapture
//! ```
//!
//! Without `chromium`/`chromedriver` the test prints a skip line and passes, unless
//! `CI=true`, where it fails (`.ci/run` installs both).

mod support;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{any, get};
use axum::Router;
use fantoccini::Client;
use http::Request;
use http_body_util::BodyExt;
use portcullis_dashboard::testing::{browser_tools, Driver, Profile};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{backend, client, Server, TestGateway};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The gateway's `/work` capacity.
const CAPACITY: u64 = 4;
/// Client loops hammering `/work`: three times the capacity, so a queue forms.
const CLIENTS: usize = 12;
/// How long one `/work` request holds a replica.
const WORK: Duration = Duration::from_millis(300);
/// The load stops by itself after this, whatever the test is doing.
const LOAD_LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Backends and load

/// Concurrency of `/work` across every replica.
#[derive(Default)]
struct Meter {
    now: AtomicUsize,
    max: AtomicUsize,
}

/// A replica: `/healthz` 200, `/work` answers `name` after `WORK`, counted in `meter`.
async fn replica(name: &'static str, meter: Arc<Meter>) -> Server {
    let work = move |State(m): State<Arc<Meter>>| async move {
        let c = m.now.fetch_add(1, Ordering::SeqCst) + 1;
        m.max.fetch_max(c, Ordering::SeqCst);
        tokio::time::sleep(WORK).await;
        m.now.fetch_sub(1, Ordering::SeqCst);
        name
    };
    backend(
        Router::new()
            .route("/healthz", get(|| async { StatusCode::OK }))
            .route("/work", any(work))
            .with_state(meter),
    )
    .await
}

/// What the load loops saw.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    failed: Vec<String>,
}

/// `CLIENTS` loops sending `/work` back to back, started `ramp` apart; each stops at the
/// stop signal or after `LOAD_LIMIT`. Dropping it aborts the loops.
struct Load {
    stop: watch::Sender<bool>,
    tasks: JoinSet<Tally>,
}

impl Load {
    fn start(url: String, ramp: Duration) -> Self {
        let (stop, stopped) = watch::channel(false);
        let deadline = tokio::time::Instant::now() + LOAD_LIMIT;
        let http = client();
        let mut tasks = JoinSet::new();
        for i in 0..CLIENTS {
            let (url, http, mut stopped) = (url.clone(), http.clone(), stopped.clone());
            tasks.spawn(async move {
                let mut tally = Tally::default();
                tokio::select! {
                    _ = tokio::time::sleep(ramp * i as u32) => {}
                    _ = stopped.wait_for(|s| *s) => return tally,
                }
                while !*stopped.borrow() && tokio::time::Instant::now() < deadline {
                    let req = Request::get(&url).body(Body::empty()).unwrap();
                    let answer = tokio::time::timeout(Duration::from_secs(10), async {
                        let resp = http.request(req).await.map_err(|e| e.to_string())?;
                        let status = resp.status();
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>((status, body.to_bytes()))
                    })
                    .await;
                    match answer {
                        Ok(Ok((StatusCode::OK, _))) => tally.ok += 1,
                        Ok(Ok((status, body))) => tally
                            .failed
                            .push(format!("{status} {}", String::from_utf8_lossy(&body))),
                        Ok(Err(e)) => tally.failed.push(e),
                        Err(_) => tally.failed.push("no answer within 10 s".into()),
                    }
                }
                tally
            });
        }
        Self { stop, tasks }
    }

    /// Stops the loops and waits (bounded) for their last requests.
    async fn finish(mut self) -> Tally {
        let _ = self.stop.send(true);
        let mut all = Tally::default();
        let joined = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(t) = self.tasks.join_next().await {
                let t = t.expect("a load loop panicked");
                all.ok += t.ok;
                all.failed.extend(t.failed);
            }
        })
        .await;
        assert!(joined.is_ok(), "the load loops did not stop within 15 s");
        all
    }
}

// ---------------------------------------------------------------------------------------
// Browser

async fn set_viewport(client: &Client, width: u32, height: u32) {
    for _ in 0..3 {
        let v = client
            .execute("return [window.innerWidth, window.innerHeight]", vec![])
            .await
            .unwrap();
        let (w, h) = (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32);
        if (w, h) == (width, height) {
            return;
        }
        let (ww, wh) = client.get_window_size().await.unwrap();
        client
            .set_window_size(
                (ww as i64 + width as i64 - w as i64) as u32,
                (wh as i64 + height as i64 - h as i64) as u32,
            )
            .await
            .unwrap();
    }
    panic!("could not set a {width}×{height} viewport");
}

/// What the page shows, read in the page: the `/work` card, its chart, the upstream rows,
/// the fallback card, and layout faults (horizontal overflow, text cut by an ellipsis).
const PAGE_STATE: &str = r#"
const card = document.querySelector('.endpoint[data-endpoint="/work"]');
const num = (sel) => card ? Number(card.querySelector(sel).textContent.replace(/,/g, '')) : null;
let chart = null;
if (card) {
  const canvas = card.querySelector('canvas.chart');
  const dpr = window.devicePixelRatio || 1;
  // Pixels of the active (blue) and queue (orange) lines above the chart's zero line,
  // which sits 18 CSS px above the canvas bottom.
  let blue = 0, orange = 0;
  if (canvas.width && canvas.height) {
    const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const above = Math.floor((canvas.clientHeight - 18 - 4) * dpr);
    for (let y = 0; y < above; y++) for (let x = 0; x < canvas.width; x++) {
      const i = (y * canvas.width + x) * 4;
      const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
      if (a < 200) continue;
      if (b > 180 && r < 110 && g > 80 && g < 160) blue++;
      else if (r > 200 && g > 110 && g < 180 && b < 90) orange++;
    }
  }
  chart = {
    drawn: canvas.getAttribute('data-drawn') === '1',
    points: Number(canvas.getAttribute('data-points')),
    blue: blue, orange: orange,
    css_width: canvas.clientWidth, css_height: canvas.clientHeight,
  };
}
const truncated = [];
for (const el of document.querySelectorAll('body *')) {
  const cs = getComputedStyle(el);
  if (cs.display === 'none' || el.tagName === 'CANVAS' || el.tagName === 'svg') continue;
  if ((cs.textOverflow === 'ellipsis' || cs.overflowX === 'hidden') && el.scrollWidth > el.clientWidth + 1
      && el.children.length === 0) {
    truncated.push(el.className + ': ' + el.textContent.trim());
  }
}
const offscreen = [];
for (const el of document.querySelectorAll('main *, header *')) {
  const r = el.getBoundingClientRect();
  if (r.width > 0 && (r.right > window.innerWidth + 1 || r.left < -1)
      && !el.closest('.table-card') ) offscreen.push(el.tagName + '.' + el.className);
}
const fb = document.getElementById('fallback');
return {
  active: num('.active-value'),
  capacity: num('.capacity-value'),
  available: num('.available-value'),
  queue: num('.queue-value'),
  util: card ? card.querySelector('.util-value').textContent : null,
  level: card ? card.getAttribute('data-level') : null,
  chart: chart,
  upstreams: Array.from(document.querySelectorAll('#upstreams tbody tr[data-url]')).map(tr => ({
    url: tr.getAttribute('data-url'), text: tr.innerText.replace(/\s+/g, ' ').trim(),
  })),
  fallback: fb ? fb.innerText.replace(/\s+/g, ' ').trim() : null,
  ready: document.getElementById('ready').textContent,
  error: document.getElementById('error').className.includes('show')
    ? document.getElementById('error').textContent : null,
  viewport: [window.innerWidth, window.innerHeight, window.devicePixelRatio],
  page_height: document.documentElement.scrollHeight,
  overflow: document.documentElement.scrollWidth > window.innerWidth,
  truncated: truncated,
  offscreen: offscreen,
};
"#;

async fn page_state(client: &Client) -> Value {
    client
        .execute(PAGE_STATE, vec![])
        .await
        .expect("the state script runs")
}

/// Everything the test waits for, given the replica URLs and the fallback URL.
fn shows_the_load(s: &Value, replicas: &[String], fallback: &str, min_points: u64) -> bool {
    let chart = &s["chart"];
    s["active"].as_u64().unwrap_or(0) > 0
        && s["queue"].as_u64().unwrap_or(0) > 0
        && chart["drawn"] == true
        && chart["points"].as_u64().unwrap_or(0) >= min_points
        && chart["blue"].as_u64().unwrap_or(0) > 40
        && chart["orange"].as_u64().unwrap_or(0) > 40
        && replicas.iter().all(|r| {
            s["upstreams"]
                .as_array()
                .is_some_and(|rows| rows.iter().any(|row| row["url"] == r.as_str()))
        })
        && s["fallback"].as_str().is_some_and(|f| f.contains(fallback))
}

async fn wait_for_load(
    client: &Client,
    what: &str,
    replicas: &[String],
    fallback: &str,
    min_points: u64,
    deadline: Instant,
) -> Value {
    loop {
        let s = page_state(client).await;
        if shows_the_load(&s, replicas, fallback, min_points) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the dashboard did not show /work under load, a drawn chart, both \
             replicas and the fallback in time:\n{s:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Assertions on a page that shows the load.
fn check_page(s: &Value, what: &str, replicas: &[String], fallback: &str) {
    assert_eq!(s["capacity"], CAPACITY, "{what}: {s:#}");
    let active = s["active"].as_u64().unwrap();
    assert!(active <= CAPACITY, "{what}: {active} active over capacity");
    assert_eq!(
        s["available"].as_u64().unwrap(),
        CAPACITY - active,
        "{what}: {s:#}"
    );
    if active == CAPACITY {
        assert_eq!(s["level"], "red", "{what}: full is red: {s:#}");
        assert_eq!(s["util"], "100", "{what}: {s:#}");
    }
    assert_eq!(s["ready"], "ready", "{what}: {s:#}");
    assert!(s["error"].is_null(), "{what}: error banner: {s:#}");
    for r in replicas {
        let row = s["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["url"] == r.as_str())
            .unwrap();
        let text = row["text"].as_str().unwrap();
        assert!(text.contains("healthy"), "{what}: {r} healthy: {text}");
    }
    let fb = s["fallback"].as_str().unwrap();
    assert!(
        fb.contains("standby") && fb.contains("closed") && fb.contains(fallback),
        "{what}: the fallback is on standby, the breaker closed under load: {fb}"
    );
    assert_eq!(s["overflow"], false, "{what}: horizontal scroll: {s:#}");
    assert_eq!(
        s["offscreen"].as_array().unwrap().len(),
        0,
        "{what}: elements outside the viewport: {s:#}"
    );
    assert_eq!(
        s["truncated"].as_array().unwrap().len(),
        0,
        "{what}: text cut off: {s:#}"
    );
}

/// Width and height of a PNG, from its IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&png[16..20]), be(&png[20..24]))
}

async fn screenshot(client: &Client, file: &Path) -> (u32, u32) {
    let png = client.screenshot().await.unwrap();
    std::fs::write(file, &png).unwrap();
    png_size(&png)
}

fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // The test binary is target/<profile>/deps/<name>.
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_dashboard_under_load_in_headless_chromium() {
    let Some((chromium, chromedriver)) = browser_tools("gateway dashboard browser test") else {
        return;
    };
    let update_docs = std::env::var("PORTCULLIS_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");
    let started = Instant::now();

    let meter = Arc::new(Meter::default());
    let a = replica("a", meter.clone()).await;
    let b = replica("b", meter.clone()).await;
    let fallback = backend(
        Router::new()
            .route("/healthz", get(|| async { StatusCode::OK }))
            .route("/work", any(|| async { "fallback" })),
    )
    .await;
    let replicas = [a.url(), b.url()];
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.5\nhealth_check_timeout: 0.5\n\
         upstreams:\n  - {{url: \"{}\", primary: true}}\n  - {{url: \"{}\", primary: true}}\n\
         endpoints:\n  /work: {{capacity: {CAPACITY}}}\n\
         fallback: {{url: \"{}\"}}\n",
        replicas[0],
        replicas[1],
        fallback.url()
    ))
    .await;
    // Ready: both replicas probed healthy.
    let ready_by = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = client()
            .request(Request::get(gw.url("/readyz")).body(Body::empty()).unwrap())
            .await
            .unwrap();
        if resp.status() == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < ready_by,
            "the gateway is not ready within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = target_dir().join("gateway-dashboard");
    std::fs::create_dir_all(&out).unwrap();
    // chromedriver cannot find the DevTools port file of a profile path with `..` in it.
    let out = std::fs::canonicalize(out).unwrap();
    let driver = Driver::start(&chromium, &chromedriver).await;
    let desktop_profile = Profile::new(&out, "desktop");
    let phone_profile = Profile::new(&out, "phone");
    let desktop = driver.open(&desktop_profile, false).await;
    set_viewport(&desktop, 1280, 800).await;
    let phone = driver.open(&phone_profile, true).await;
    // Both pages poll from before the load, so their charts show it arrive.
    let ui = gw.url("/balancer/ui");
    desktop.goto(&ui).await.unwrap();
    phone.goto(&ui).await.unwrap();

    let load_started = Instant::now();
    let load = Load::start(gw.url("/work"), Duration::from_millis(400));
    // The docs image waits for about 12 s of chart; the plain check for three polls.
    let (min_points, wait) = if update_docs {
        (7, Duration::from_secs(17))
    } else {
        (3, Duration::from_secs(15))
    };
    let deadline = load_started + wait;

    let s = wait_for_load(
        &desktop,
        "1280×800",
        &replicas,
        &fallback.url(),
        min_points,
        deadline,
    )
    .await;
    eprintln!("1280×800 after {:?} of load: {s:#}", load_started.elapsed());
    assert_eq!(s["viewport"], json!([1280, 800, 1]));
    check_page(&s, "1280×800", &replicas, &fallback.url());
    let desktop_png = out.join("dashboard-1280x800.png");
    assert_eq!(screenshot(&desktop, &desktop_png).await, (1280, 800));
    // The whole page at 1280 px wide (the README image): at 800 px the fold cuts the
    // fallback and storage cards.
    let height = (s["page_height"].as_u64().unwrap() as u32).max(800);
    let full_png = out.join("dashboard-1280-full.png");
    set_viewport(&desktop, 1280, height).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(screenshot(&desktop, &full_png).await, (1280, height));

    let s = wait_for_load(
        &phone,
        "390×844",
        &replicas,
        &fallback.url(),
        min_points,
        deadline,
    )
    .await;
    eprintln!("390×844 after {:?} of load: {s:#}", load_started.elapsed());
    assert_eq!(s["viewport"], json!([390, 844, 2]));
    check_page(&s, "390×844", &replicas, &fallback.url());
    let phone_png = out.join("dashboard-390x844.png");
    assert_eq!(screenshot(&phone, &phone_png).await, (780, 1688));
    // The rest of the phone page, one screen at a time.
    let height = s["page_height"].as_u64().unwrap();
    let mut y = 844;
    let mut part = 2;
    while y < height {
        phone
            .execute(&format!("window.scrollTo(0, {y})"), vec![])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        screenshot(&phone, &out.join(format!("dashboard-390x844-{part}.png"))).await;
        y += 844;
        part += 1;
    }

    let load_time = load_started.elapsed();
    let tally = load.finish().await;
    desktop.close().await.unwrap();
    phone.close().await.unwrap();
    drop(driver);
    eprintln!("load: {} answers in {load_time:?}", tally.ok);
    assert!(
        tally.failed.is_empty(),
        "every load request gets a 200: {tally:?}"
    );
    assert!(tally.ok >= CAPACITY as usize * 2, "{tally:?}");
    let max = meter.max.load(Ordering::SeqCst);
    assert_eq!(
        max, CAPACITY as usize,
        "the replicas saw {max} concurrent /work"
    );

    if update_docs {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::copy(&full_png, docs.join("dashboard.png")).unwrap();
        std::fs::copy(&phone_png, docs.join("dashboard-phone.png")).unwrap();
        eprintln!("updated docs/dashboard.png and docs/dashboard-phone.png");
    }
    eprintln!(
        "screenshots in {}; test took {:?}",
        out.display(),
        started.elapsed()
    );
}
