//! Processes the harness starts, and the guards that stop them.
//!
//! Every spawned process is a [`Proc`]: dropping it (normal end, early return, panic unwind)
//! sends SIGTERM to its pid, waits up to 3 s, then SIGKILLs it and any descendant it left
//! behind (nginx workers). A process-wide registry of live pids lets the SIGINT/SIGTERM
//! handler ([`install_signal_handler`]) do the same before the harness exits, and remembers the
//! temporary directory to remove. Nothing is ever stopped by name, only by the pids we spawned
//! (and their descendants, identified by pid and start time).

use crate::procfs;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Live processes we spawned (pid), and the temporary directory to remove on a signal.
/// A `std::sync::Mutex` is fine here: this is the harness, not a request path.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static TEMP_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn register(pid: u32) {
    if let Ok(mut l) = LIVE.lock() {
        l.push(pid);
    }
}

fn unregister(pid: u32) {
    if let Ok(mut l) = LIVE.lock() {
        l.retain(|&p| p != pid);
    }
}

/// Sends `signal` (e.g. `TERM`, `KILL`) to `pid` with `/usr/bin/kill` (no unsafe code here).
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32, start_time: u64) -> bool {
    // A zombie still has a stat entry; treat state Z as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => {
            let zombie = text
                .rfind(')')
                .map(|i| text[i + 1..].trim_start().starts_with('Z'))
                .unwrap_or(false);
            !zombie && procfs::parse_stat(&text).is_some_and(|s| s.start_time == start_time)
        }
        Err(_) => false,
    }
}

/// A spawned process, stopped by pid when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `<dir>/<name>.log` and stdin closed.
    pub(crate) fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> std::io::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Self::spawn_with(name, cmd, log)
    }

    /// Spawns `cmd` with the stdio already configured by the caller.
    pub(crate) fn spawn_with(name: &str, cmd: &mut Command, log: PathBuf) -> std::io::Result<Self> {
        let child = cmd.spawn()?;
        register(child.id());
        Ok(Self {
            name: name.to_string(),
            child,
            log,
            stopped: false,
        })
    }

    /// The name it was spawned with.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child handle (for piped stdio).
    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the process exits or `timeout` passes; `None` on timeout.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `lines` lines of its log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, up to 3 s grace, then SIGKILL for it and any descendant left over.
    pub(crate) fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pid = self.pid();
        let tree: Vec<(u32, u64)> = procfs::descendants(pid)
            .into_iter()
            .filter_map(|p| procfs::stat(p).map(|s| (p, s.start_time)))
            .collect();
        if self.exited().is_none() {
            send_signal(pid, "TERM");
            if self.wait_timeout(Duration::from_secs(3)).is_none() {
                eprintln!(
                    "loadbench: {} (pid {pid}) ignored SIGTERM; SIGKILL",
                    self.name
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if !wait_gone(&tree, Duration::from_secs(2)) {
            kill_survivors(&tree);
        }
        unregister(pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The harness's temporary directory, removed when dropped (and by the signal handler).
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/portcullis-loadbench-<pid>-<nanos>`.
    pub(crate) fn new() -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "portcullis-loadbench-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        if let Ok(mut t) = TEMP_DIR.lock() {
            *t = Some(dir.clone());
        }
        Ok(Self(dir))
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("LOADBENCH_KEEP_TEMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: stop every live process we spawned (by pid, with the same
/// TERM → KILL sequence), remove the temporary directory, and exit 130.
pub(crate) fn install_signal_handler() {
    let spawned = std::thread::Builder::new()
        .name("loadbench-signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let which = rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                    signal(SignalKind::hangup()),
                ) else {
                    return None;
                };
                tokio::select! {
                    _ = int.recv() => Some("SIGINT"),
                    _ = term.recv() => Some("SIGTERM"),
                    _ = hup.recv() => Some("SIGHUP"),
                }
            });
            let Some(which) = which else { return };
            eprintln!("\nloadbench: {which}: stopping everything it started");
            kill_all_registered();
            if let Ok(t) = TEMP_DIR.lock() {
                if let Some(dir) = t.as_ref() {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            std::process::exit(130);
        });
    if let Err(e) = spawned {
        eprintln!("loadbench: cannot install the signal handler: {e}");
    }
}

fn kill_all_registered() {
    let pids: Vec<u32> = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    let mut all: Vec<(u32, u64)> = Vec::new();
    for pid in pids {
        for p in procfs::tree(pid) {
            if let Some(s) = procfs::stat(p) {
                all.push((p, s.start_time));
            }
        }
    }
    for &(p, _) in &all {
        send_signal(p, "TERM");
    }
    if !wait_gone(&all, Duration::from_secs(3)) {
        kill_survivors(&all);
    }
}

/// Waits until none of `procs` (pid, start time) is alive, or `timeout` passes; `true` if
/// they are all gone.
fn wait_gone(procs: &[(u32, u64)], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !procs.iter().any(|&(p, st)| alive(p, st)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs whichever of `procs` is still alive and waits (bounded) until they are gone.
///
/// `kill` returns once the signal is queued, not once the process has died: on a loaded machine
/// the target can still be running a moment later, holding its port. Returning only when
/// they are gone means the next target (or the caller's check) never meets a leftover.
fn kill_survivors(procs: &[(u32, u64)]) {
    for &(p, st) in procs {
        if alive(p, st) {
            send_signal(p, "KILL");
        }
    }
    if !wait_gone(procs, Duration::from_secs(2)) {
        eprintln!("loadbench: some processes survived SIGKILL for 2 s: {procs:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_proc_stops_it_and_its_children() {
        let dir = TempDir::new().unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("sleep 30 & sleep 30; wait");
        let p = Proc::spawn("sleeper", &mut cmd, dir.path()).unwrap();
        let pid = p.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while procfs::descendants(pid).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let kids: Vec<(u32, u64)> = procfs::descendants(pid)
            .into_iter()
            .filter_map(|k| procfs::stat(k).map(|s| (k, s.start_time)))
            .collect();
        assert_eq!(kids.len(), 2);
        let started = Instant::now();
        drop(p);
        assert!(started.elapsed() < Duration::from_secs(6));
        assert!(procfs::stat(pid).is_none(), "the process is still there");
        for (k, st) in kids {
            assert!(!alive(k, st), "child {k} survived");
        }
        assert!(!LIVE.lock().unwrap().contains(&pid));
    }
}
