//! Progress on stderr while the endpoints are probed: one spinner per endpoint on a terminal,
//! plain lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use portcullis_probe::{Phase, ProbeBound, ProbeEvent, ProbeReport, ProbeTarget};
use std::io::IsTerminal as _;
use std::time::Duration;

/// One progress bar per endpoint on a terminal; plain lines on stderr otherwise.
#[derive(Debug)]
pub(super) struct Progress {
    /// `None` when stderr is not a terminal.
    multi: Option<MultiProgress>,
    bars: std::sync::Mutex<Vec<ProgressBar>>,
}

impl Progress {
    pub(super) fn new() -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            multi,
            bars: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn bar(&self, i: usize) -> Option<ProgressBar> {
        self.multi.as_ref()?;
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        bars.get(i).cloned()
    }

    pub(super) fn add_endpoints<'a>(&self, paths: impl Iterator<Item = &'a str>) {
        let Some(multi) = &self.multi else {
            return;
        };
        let style = ProgressStyle::with_template(
            "{spinner:.cyan} {prefix:.bold} [{elapsed:>4}] {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        let paths: Vec<&str> = paths.collect();
        let width = paths.iter().map(|p| p.len()).max().unwrap_or(0);
        for p in paths {
            let bar = multi.add(
                ProgressBar::new_spinner()
                    .with_style(style.clone())
                    .with_prefix(format!("{p:<width$}"))
                    .with_message("waiting"),
            );
            bar.tick();
            bars.push(bar);
        }
    }

    pub(super) fn started(&self, i: usize, target: &ProbeTarget) {
        match self.bar(i) {
            Some(bar) => {
                bar.reset_elapsed();
                bar.enable_steady_tick(Duration::from_millis(120));
                bar.set_message(format!("probing {target}"));
            }
            None => eprintln!("probing {target}"),
        }
    }

    pub(super) fn event(&self, i: usize, path: &str, ev: &ProbeEvent, last: &mut Option<String>) {
        match ev {
            ProbeEvent::LevelStarted {
                level,
                phase,
                planned,
            } => {
                if let Some(bar) = self.bar(i) {
                    let prev = last
                        .as_deref()
                        .map_or(String::new(), |l| format!(" | last: {l}"));
                    bar.set_message(format!(
                        "level {level} ({}, {planned} requests){prev}",
                        phase_name(*phase)
                    ));
                }
            }
            ProbeEvent::LevelFinished(m) => {
                let summary = format!(
                    "level {}: {:.1} req/s, p99 {:.1} ms, errors {:.1}% {}",
                    m.level,
                    m.rps,
                    m.p99_ms,
                    m.error_rate * 100.0,
                    if m.passed { "pass" } else { "FAIL" }
                );
                if self.multi.is_none() {
                    eprintln!(
                        "  {path}: level {:>5} {:<9} {:>5} requests  {:>9.1} req/s  p99 {:>9.1} ms  errors {:>5.1}%  {}",
                        m.level,
                        phase_name(m.phase),
                        m.requests,
                        m.rps,
                        m.p99_ms,
                        m.error_rate * 100.0,
                        if m.passed { "pass" } else { "FAIL" }
                    );
                }
                *last = Some(summary);
            }
        }
    }

    pub(super) fn finished(&self, i: usize, report: &ProbeReport) {
        let msg = format!(
            "capacity {} (bound by {}), best {:.1} req/s at {}, {} requests in {:.1} s",
            report.max_concurrency,
            bound_name(report.bound),
            report.best_rps,
            report.best_rps_level,
            report.total_requests,
            report.elapsed_secs
        );
        match self.bar(i) {
            Some(bar) => bar.finish_with_message(msg),
            None => eprintln!("  -> {msg}"),
        }
    }

    pub(super) fn failed(&self, i: usize, msg: &str) {
        match self.bar(i) {
            Some(bar) => bar.abandon_with_message(format!("FAILED: {msg}")),
            None => eprintln!("  -> FAILED: {msg}"),
        }
    }

    pub(super) fn skipped(&self, i: usize, msg: &str) {
        match self.bar(i) {
            Some(bar) => bar.abandon_with_message(msg.to_string()),
            None => eprintln!("skipped: {msg}"),
        }
    }

    /// Stops every spinner (leaving the final lines on screen).
    pub(super) fn done(&self) {
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for bar in bars.iter().filter(|b| !b.is_finished()) {
            bar.abandon();
        }
    }

    /// Removes the bars from the screen (Ctrl-C).
    pub(super) fn clear(&self) {
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for bar in bars.iter() {
            bar.finish_and_clear();
        }
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Doubling => "doubling",
        Phase::Growing => "growing",
        Phase::Bisecting => "bisecting",
    }
}

fn bound_name(bound: ProbeBound) -> &'static str {
    match bound {
        ProbeBound::Errors => "errors",
        ProbeBound::Latency => "latency",
        ProbeBound::MaxConcurrency => "max_probe_concurrency",
    }
}
