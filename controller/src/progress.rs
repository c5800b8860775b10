//! Live progress on a terminal: one spinner line for the phase, and under it one line per
//! pending step naming what it waits for, how long it has waited and its budget:
//!
//! ```text
//! ⠒ checks 3.4s
//!   ⠒ http http://100.64.0.1:7420/slow  3.1s of 30s
//!   ⠒ git http://100.64.0.1:7420/git/me/app.git  3.1s of 1m
//! ```
//!
//! Every line is cut to the terminal's width, so a redraw never wraps. Without a terminal there
//! is no live progress: the renderer prints plain lines instead.

use std::fmt::Write as _;
use std::time::Duration;

use console::{Term, truncate_str};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// How often spinners redraw.
const TICK: Duration = Duration::from_millis(100);
/// Width assumed when the terminal does not say.
const FALLBACK_WIDTH: usize = 80;
/// Room kept for `  ⠒ ` and `  999.9s of 10m30s` around a step's name and target.
const STEP_CHROME: usize = 4 + 2 + 16;

/// The live lines on stderr.
pub struct Progress {
    multi: MultiProgress,
    phase: Option<ProgressBar>,
    steps: Vec<Step>,
}

/// One pending step.
struct Step {
    name: String,
    target: String,
    bar: ProgressBar,
}

impl Progress {
    /// Progress drawn on stderr (which must be a terminal).
    pub fn stderr() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            phase: None,
            steps: Vec::new(),
        }
    }

    /// The terminal's width in columns.
    pub fn width() -> usize {
        Term::stderr()
            .size_checked()
            .map_or(FALLBACK_WIDTH, |(_rows, cols)| usize::from(cols))
    }

    /// A phase began: its spinner replaces the last phase's, and no step is pending yet.
    pub fn phase_started(&mut self, name: &str) {
        self.clear();
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(style("{spinner} {msg} {elapsed_s:.dim}"));
        bar.set_message(cut(name, Self::width().saturating_sub(12)));
        bar.enable_steady_tick(TICK);
        self.phase = Some(bar);
    }

    /// A step of the phase began (a check, with its target and budget).
    pub fn step_started(&mut self, name: &str, target: &str, budget: Option<Duration>) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(style("  {spinner} {msg}  {elapsed_s:.dim}{prefix:.dim}"));
        let label = if target.is_empty() {
            name.to_owned()
        } else {
            format!("{name} {target}")
        };
        bar.set_message(cut(&label, Self::width().saturating_sub(STEP_CHROME)));
        bar.set_prefix(
            budget
                .map(|b| format!(" of {}", budget_text(b)))
                .unwrap_or_default(),
        );
        bar.enable_steady_tick(TICK);
        self.steps.push(Step {
            name: name.to_owned(),
            target: target.to_owned(),
            bar,
        });
    }

    /// A step ended: its line goes away.
    pub fn step_finished(&mut self, name: &str, target: &str) {
        if let Some(at) = self
            .steps
            .iter()
            .position(|s| s.name == name && s.target == target)
        {
            let step = self.steps.remove(at);
            step.bar.finish_and_clear();
            self.multi.remove(&step.bar);
        }
    }

    /// Prints a line above the live ones.
    pub fn println(&self, line: &str) {
        if self.phase.is_none() && self.steps.is_empty() {
            eprintln!("{line}");
        } else {
            // On a terminal that went away there is no one to tell.
            let _ = self.multi.println(line);
        }
    }

    /// Removes every live line (at the end of a phase, or before an error is printed).
    pub fn clear(&mut self) {
        for step in self.steps.drain(..) {
            step.bar.finish_and_clear();
            self.multi.remove(&step.bar);
        }
        if let Some(bar) = self.phase.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A fan-out's live lines: one per sandbox, naming it and its current phase, and left in place
/// with its outcome when it is done:
///
/// ```text
/// ✓ #1 sb-4b1f… (modal-sb-4b1f)  passed in 4.2s
/// ⠒ #2 sb-9c3a… (modal-sb-9c3a)  checks  3.1s
/// ⠒ #3  sandbox  0.4s
/// ```
pub struct FleetProgress {
    multi: MultiProgress,
    bars: Vec<(u32, ProgressBar)>,
}

impl FleetProgress {
    /// Lines drawn on stderr (which must be a terminal).
    pub fn stderr() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Vec::new(),
        }
    }

    fn bar(&mut self, slot: u32) -> &ProgressBar {
        if let Some(at) = self.bars.iter().position(|(s, _)| *s == slot) {
            return &self.bars[at].1;
        }
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(style("{spinner} {prefix}  {msg}  {elapsed_s:.dim}"));
        bar.enable_steady_tick(TICK);
        self.bars.push((slot, bar));
        &self.bars[self.bars.len() - 1].1
    }

    /// Sandbox `slot` is now known as `label` (its number, id and hostname).
    pub fn label(&mut self, slot: u32, label: &str) {
        let width = Progress::width();
        self.bar(slot)
            .set_prefix(cut(label, width.saturating_sub(24).max(8)));
    }

    /// Sandbox `slot` entered `phase`.
    pub fn phase(&mut self, slot: u32, phase: &str) {
        let bar = self.bar(slot);
        bar.reset_elapsed();
        bar.set_message(phase.to_owned());
    }

    /// Sandbox `slot` is done: its line becomes `line` and stays.
    pub fn finish(&mut self, slot: u32, line: &str) {
        let width = Progress::width();
        let bar = self.bar(slot);
        bar.set_style(style("{msg}"));
        bar.finish_with_message(cut(line, width));
    }

    /// Prints a line above the live ones.
    pub fn println(&self, line: &str) {
        let _ = self.multi.println(cut(line, Progress::width()));
    }

    /// Removes every live line that is not done (after Ctrl-C, or before an error is printed).
    pub fn clear(&mut self) {
        for (_, bar) in &self.bars {
            if !bar.is_finished() {
                bar.finish_and_clear();
            }
        }
    }
}

/// A spinner style with `{elapsed_s}`: seconds with a tenth, e.g. `3.1s`.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .with_key(
            "elapsed_s",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&elapsed_text(state.elapsed()));
            },
        )
}

/// Cuts `text` to `width` columns with an ellipsis (never below a few columns).
pub fn cut(text: &str, width: usize) -> String {
    truncate_str(text, width.max(8), "…").into_owned()
}

/// Time waited so far: `850ms`, `3.1s`, `2m05s`.
pub fn elapsed_text(d: Duration) -> String {
    let millis = d.as_millis();
    match millis {
        m if m < 1_000 => format!("{m}ms"),
        m if m < 60_000 => format!("{:.1}s", d.as_secs_f64()),
        m => format!("{}m{:02}s", m / 60_000, (m / 1_000) % 60),
    }
}

/// A budget as people write it: `500ms`, `30s`, `2m`, `1m30s`, `1h`.
pub fn budget_text(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if value > 0 {
            let _ = write!(out, "{value}{unit}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(elapsed_text(Duration::from_millis(850)), "850ms");
        assert_eq!(elapsed_text(Duration::from_millis(3_140)), "3.1s");
        assert_eq!(elapsed_text(Duration::from_secs(125)), "2m05s");
        assert_eq!(budget_text(Duration::from_millis(500)), "500ms");
        assert_eq!(budget_text(Duration::from_secs(30)), "30s");
        assert_eq!(budget_text(Duration::from_secs(120)), "2m");
        assert_eq!(budget_text(Duration::from_secs(90)), "1m30s");
        assert_eq!(budget_text(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn cutting_keeps_the_start_and_marks_the_cut() {
        assert_eq!(
            cut("http http://100.64.0.1/slow", 100),
            "http http://100.64.0.1/slow"
        );
        let cut_text = cut("http http://100.64.0.1:7420/a/long/path", 20);
        assert_eq!(console::measure_text_width(&cut_text), 20);
        assert!(cut_text.starts_with("http http://"), "{cut_text}");
        assert!(cut_text.ends_with('…'), "{cut_text}");
    }
}
