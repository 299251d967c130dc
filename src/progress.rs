//! Progress on stderr for every long phase. On a terminal: `indicatif` bars (the EM's "lap k/N"
//! bar with its ETA above the current phase's bar); elsewhere (a log file, a batch job, CI):
//! plain lines at an interval and at the end of each phase, so a log shows progress without
//! carriage-return noise. Lines printed while bars are drawn go through [`say`], above the bars.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Seconds between two log lines of one phase when stderr is not a terminal.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The bars share one [`MultiProgress`], so nested phases stack instead of overwriting each other.
fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)))
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silences this process's progress and [`say`] lines (the ranks of a data-parallel run but
/// rank 0, which speaks for the job). Errors are still printed by their callers.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether bars are drawn (stderr is a terminal and `EMPRIOR_PROGRESS` is not `lines`).
pub fn bars() -> bool {
    if quiet() {
        return false;
    }
    static BARS: OnceLock<bool> = OnceLock::new();
    *BARS.get_or_init(|| {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal() && std::env::var("EMPRIOR_PROGRESS").as_deref() != Ok("lines")
    })
}

/// Prints a line on stderr, above the bars when they are drawn.
pub fn say(line: impl AsRef<str>) {
    if quiet() {
        return;
    }
    let line = line.as_ref();
    if bars() && !multi().is_hidden() {
        let _ = multi().println(line);
    } else {
        eprintln!("{line}");
    }
}

/// One phase's progress: `done` of `total` units. Dropping it without [`Phase::finish`] clears
/// its bar (an error on the way out), leaving the error message as the last word.
pub struct Phase {
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    last_line: Instant,
    message: String,
    bar: Option<ProgressBar>,
}

impl Phase {
    /// Starts a phase named `label` (e.g. "lap 3 E-step") of `total` `unit`s (e.g. "observations").
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str) -> Phase {
        let label = label.into();
        let bar = bars().then(|| {
            let bar = multi().add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "  {{prefix}} [{{bar:30.cyan/blue}}] {{pos}}/{{len}} {unit} ({{rate}} {unit}/s, {{elapsed}}, ETA {{eta}}) {{msg}}"
                ))
                .expect("the template is valid")
                .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1}", state.per_sec());
                })
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar
        });
        let now = Instant::now();
        Phase {
            label,
            unit,
            total,
            done: 0,
            start: now,
            last_line: now,
            message: String::new(),
            bar,
        }
    }

    /// Sets how many units are done; without bars, logs a line when [`LOG_INTERVAL`] passed.
    pub fn set(&mut self, done: u64) {
        self.done = done.min(self.total);
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if self.last_line.elapsed() >= LOG_INTERVAL && self.done < self.total => {
                self.last_line = Instant::now();
                if !quiet() {
                    eprintln!("{}", self.line());
                }
            }
            None => {}
        }
    }

    /// Adds `n` done units.
    pub fn inc(&mut self, n: u64) {
        self.set(self.done + n);
    }

    /// A short note after the counts (the latest loss, the noise level).
    pub fn message(&mut self, text: impl Into<String>) {
        self.message = text.into();
        if let Some(bar) = &self.bar {
            bar.set_message(self.message.clone());
        }
    }

    /// The phase's seconds so far.
    pub fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn line(&self) -> String {
        let secs = self.seconds().max(1e-9);
        let rate = self.done as f64 / secs;
        let left = if self.done > 0 && self.done < self.total {
            format!(
                ", about {} left",
                duration((self.total - self.done) as f64 / rate)
            )
        } else {
            String::new()
        };
        let note = if self.message.is_empty() {
            String::new()
        } else {
            format!(" | {}", self.message)
        };
        format!(
            "  {}: {}/{} {} ({:.1} {}/s, {}{left}){note}",
            self.label,
            self.done,
            self.total,
            self.unit,
            rate,
            self.unit,
            duration(secs)
        )
    }

    /// Ends the phase: its bar is replaced by one line with the count, rate and time. Returns
    /// the phase's seconds.
    pub fn finish(mut self) -> f64 {
        let secs = self.seconds();
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            multi().remove(&bar);
        }
        say(self.line());
        secs
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            multi().remove(&bar);
        }
    }
}

/// The EM's outer progress: "lap k/N" with the time per lap and an ETA from the laps done in
/// this process (a resumed run's earlier laps do not count towards the rate).
pub struct Laps {
    first: usize,
    total: usize,
    start: Instant,
    bar: Option<ProgressBar>,
}

impl Laps {
    /// Laps `first..=total` are to run (lap 0, the initialisation, counts as one).
    pub fn new(first: usize, total: usize) -> Laps {
        let bar = bars().then(|| {
            let bar = multi().insert(0, ProgressBar::new((total + 1) as u64));
            bar.set_style(
                ProgressStyle::with_template("EM {msg} [{bar:30.green/white}] {elapsed} so far, ETA {eta}")
                    .expect("the template is valid")
                    .progress_chars("#>-"),
            );
            bar.set_position(first as u64);
            bar.reset_eta();
            bar
        });
        let laps = Laps {
            first,
            total,
            start: Instant::now(),
            bar,
        };
        laps.show(first);
        laps
    }

    fn show(&self, lap: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("lap {lap}/{}", self.total));
        }
    }

    /// Lap `lap` is about to start.
    pub fn start(&self, lap: usize) {
        self.show(lap);
        if self.bar.is_none() && !quiet() {
            eprintln!("lap {lap}/{}{}", self.total, self.eta(lap));
        }
    }

    /// " (ETA ...)" from the mean time of the laps this process finished before `next`.
    fn eta(&self, next: usize) -> String {
        let finished = next.saturating_sub(self.first);
        if finished == 0 || next > self.total {
            return String::new();
        }
        let per_lap = self.start.elapsed().as_secs_f64() / finished as f64;
        format!(
            " ({} per lap so far, about {} left)",
            duration(per_lap),
            duration(per_lap * (self.total + 1 - next) as f64)
        )
    }

    /// Lap `lap` is done.
    pub fn done(&self, lap: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position((lap + 1) as u64);
        }
    }
}

impl Drop for Laps {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            multi().remove(&bar);
        }
    }
}

/// Seconds as a person reads them: "42.0s", "3m05s", "2h07m".
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "-".into();
    }
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(4.25), "4.2s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(duration(7620.0), "2h07m");
        assert_eq!(duration(f64::NAN), "-");
    }

    #[test]
    fn a_phase_line_has_counts_rate_and_time() {
        let mut p = Phase::new("lap 1 E-step", 10, "observations");
        p.set(4);
        p.message("sigma 1.0e-1");
        let line = p.line();
        assert!(line.starts_with("  lap 1 E-step: 4/10 observations ("), "{line}");
        assert!(
            line.contains("left") && line.ends_with("| sigma 1.0e-1"),
            "{line}"
        );
        p.set(99);
        assert!(p.line().contains("10/10"), "done is clamped to the total");
    }
}
