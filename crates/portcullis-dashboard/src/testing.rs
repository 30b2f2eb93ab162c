//! Test support (feature `testing`): headless Debian `chromium` driven through
//! `chromedriver` (WebDriver, via fantoccini), for tests that look at the dashboard in a
//! real browser.
//!
//! * [`browser_tools`] finds both binaries; without them a test prints a skip line and
//!   returns, except under `CI=true`, where the missing tools are a failure (`.ci/run`
//!   installs them).
//! * [`Driver::start`] runs `chromedriver` on a free 127.0.0.1 port in its own process
//!   group; dropping it kills the group (the driver and every chromium it started), so a
//!   failing test leaves no browser behind.
//! * [`Profile`] is a fresh `--user-data-dir`, removed on drop; [`Driver::open`] starts a
//!   session at 1280×800 or at phone width (390×844, 2× pixels, touch).

use fantoccini::{Client, ClientBuilder};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The first of `names` found on `PATH`.
pub fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// `(chromium, chromedriver)`, or `None` after printing a skip line for `test`.
///
/// # Panics
///
/// Under `CI=true` when either is missing.
pub fn browser_tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match (
        find_binary(&["chromium", "chromium-browser", "google-chrome"]),
        find_binary(&["chromedriver"]),
    ) {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        _ => {
            assert!(
                !ci,
                "CI=true but chromium/chromedriver are missing (.ci/run installs them)"
            );
            eprintln!(
                "SKIPPED {test}: chromium and chromedriver not found on PATH \
                 (scripts/test installs them and runs every test)"
            );
            None
        }
    }
}

/// A running `chromedriver`; its process group is killed on drop.
#[derive(Debug)]
pub struct Driver {
    child: Child,
    url: String,
    chromium: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.start_kill();
    }
}

impl Driver {
    /// Starts `chromedriver` (binary `driver`) for `chromium` and waits (at most 15 s) until
    /// it listens.
    ///
    /// # Panics
    ///
    /// When it cannot be started or does not listen in time.
    pub async fn start(chromium: &Path, driver: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            chromium: chromium.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    /// Opens a headless chromium session with a fresh `profile`: 1280×800 at 1× pixels, or
    /// a phone (390×844, 2× pixels, touch) when `phone`.
    ///
    /// # Panics
    ///
    /// When no session can be opened.
    pub async fn open(&self, profile: &Profile, phone: bool) -> Client {
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut options = json!({ "binary": self.chromium.to_string_lossy() });
        if phone {
            options["mobileEmulation"] = json!({
                "deviceMetrics": { "width": 390, "height": 844, "pixelRatio": 2.0, "touch": true }
            });
            args.push("--window-size=390,844".into());
        } else {
            args.push("--window-size=1280,800".into());
            args.push("--force-device-scale-factor=1".into());
        }
        options["args"] = json!(args);
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        ClientBuilder::native()
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session")
    }
}

/// A fresh chromium profile directory under `dir`, removed on drop.
///
/// `dir` must be canonical: chromedriver cannot find the DevTools port file of a profile
/// path with `..` in it.
#[derive(Debug)]
pub struct Profile(PathBuf);

impl Profile {
    /// `dir/profile-<name>-<pid>`, emptied first.
    pub fn new(dir: &Path, name: &str) -> Self {
        let p = dir.join(format!("profile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
