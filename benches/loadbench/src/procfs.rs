//! Reading CPU time and memory of a process tree from `/proc` (Linux).
//!
//! CPU is `utime` (user) and `stime` (system) of `/proc/<pid>/stat` (process-wide, all
//! threads), summed over the process and its descendants (nginx's workers). Memory is `VmRSS` / `VmHWM` of
//! `/proc/<pid>/status`.

use std::fs;

/// The fields of `/proc/<pid>/stat` the harness uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Parent pid.
    pub(crate) ppid: u32,
    /// `utime + stime`, in clock ticks.
    pub(crate) cpu_ticks: u64,
    /// `utime` (user space), in clock ticks.
    pub(crate) user_ticks: u64,
    /// Start time after boot, in clock ticks (tells a reused pid apart).
    pub(crate) start_time: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name may hold spaces and parentheses,
/// so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] = state (field 3), so field N is f[N - 3].
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(Stat {
        ppid: u32::try_from(num(4)?).ok()?,
        cpu_ticks: num(14)? + num(15)?,
        user_ticks: num(14)?,
        start_time: num(22)?,
    })
}

/// `/proc/<pid>/stat` of a live process.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every live descendant of `root` (not `root` itself).
pub(crate) fn descendants(root: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                if let Some(s) = stat(pid) {
                    all.push((pid, s.ppid));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &all {
            if ppid == p && pid != root && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// `root` and its descendants.
pub(crate) fn tree(root: u32) -> Vec<u32> {
    let mut t = vec![root];
    t.extend(descendants(root));
    t
}

/// Summed CPU ticks of `pids` (processes that are gone count 0): `(user, user + system)`.
pub(crate) fn cpu_ticks(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|&p| stat(p))
        .fold((0, 0), |(u, t), s| (u + s.user_ticks, t + s.cpu_ticks))
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`), in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    parse_status_kib(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

/// Parses one `Name:   1234 kB` line of a `/proc/<pid>/status` text.
pub(crate) fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Summed `VmRSS` of `pids`, in KiB.
pub(crate) fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| status_kib(p, "VmRSS")).sum()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when unknown).
pub(crate) fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let text = "4242 (nginx: worker (x) y) S 4241 4241 4241 0 -1 4194624 100 0 0 0 \
                    37 12 0 0 20 0 1 0 987654 12345678 900 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.ppid, 4241);
        assert_eq!(s.cpu_ticks, 49);
        assert_eq!(s.user_ticks, 37);
        assert_eq!(s.start_time, 987654);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert!(s.ppid > 0);
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
        assert!(status_kib(me, "VmHWM").unwrap() >= status_kib(me, "VmRSS").unwrap() / 2);
        assert!(tree(me).contains(&me));
    }

    #[test]
    fn status_field_parsing() {
        let text = "Name:\tnginx\nVmHWM:\t   10240 kB\nVmRSS:\t    8192 kB\n";
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(8192));
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(10240));
        assert_eq!(parse_status_kib(text, "VmSwap"), None);
    }
}
