//! Showing a run: live progress for people on stderr, a results table on stdout; or JSON lines.

use std::time::Duration;

use console::{Style, Term};
use tailbox_proto::agent::v1::{
    CheckResult, CheckStarted, CheckStatus, DaemonRestart, Event, LogLine, LogSource, Phase,
    PhaseFinished, PhaseStarted, Report, Warning, event,
};

use crate::cli::ColorChoice;
use crate::env::{self, Env};
use crate::output::{OutputError, write_json_line};
use crate::plan::OutputMode;
use crate::progress::{Progress, budget_text, cut};
use crate::secret::redact_urls;
use crate::session::{Observer, controller_event};

/// Renders events as they arrive.
pub enum Renderer {
    /// For people.
    Human(Human),
    /// For tools; under --verbose the agent's log lines also go to stderr.
    Json {
        /// Relay agent stderr.
        verbose: bool,
    },
}

impl Renderer {
    /// The renderer for an output mode.
    pub fn new(mode: OutputMode) -> Self {
        match mode {
            OutputMode::Json { verbose } => Renderer::Json { verbose },
            OutputMode::Human { verbose, quiet } => Renderer::Human(Human::new(verbose, quiet)),
        }
    }

    /// Plain lines for people, each starting with `prefix` (a fan-out's sandbox without a
    /// terminal, or a fan-out's notes): never live lines.
    pub fn plain(verbose: bool, quiet: bool, prefix: &str) -> Self {
        let mut human = Human::new(verbose, quiet);
        human.progress = None;
        human.prefix = prefix.to_owned();
        Renderer::Human(human)
    }

    /// Changes the prefix of plain lines (a fan-out's sandbox got its id).
    pub fn set_prefix(&mut self, prefix: &str) {
        if let Renderer::Human(human) = self {
            human.prefix = prefix.to_owned();
        }
    }

    /// A note for people (ignored in JSON mode, where stdout is data only).
    pub fn note(&mut self, text: &str) {
        if let Renderer::Human(human) = self {
            human.line(&human.dim.apply_to(text).to_string());
        }
    }

    /// One event from the agent (or a controller-side one).
    pub fn event(&mut self, event: &Event) -> Result<(), OutputError> {
        match self {
            Renderer::Json { .. } => write_json_line("an event", event),
            Renderer::Human(human) => {
                human.event(event);
                Ok(())
            }
        }
    }

    /// Relays one line of the agent's stderr (only under --verbose).
    pub fn agent_stderr(&self, line: &str) {
        match self {
            Renderer::Human(human) => human.agent_stderr(line),
            Renderer::Json { verbose: true } => eprintln!("agent: {}", redact_urls(line)),
            Renderer::Json { verbose: false } => {}
        }
    }

    /// A block of lines for people after the results table, set off by an empty line and never
    /// cut to the terminal's width (ignored in JSON mode and under `--quiet`).
    pub fn block(&mut self, text: &str) {
        if let Renderer::Human(human) = self
            && !human.quiet
        {
            human.clear_spinner();
            eprintln!("\n{}", text.trim_end());
        }
    }

    /// Clears live progress (before an error message is printed).
    pub fn clear(&mut self) {
        if let Renderer::Human(human) = self {
            human.clear_spinner();
        }
    }
}

/// What one sandbox's work is shown through: the [`Renderer`] of a single-sandbox run, or a
/// fan-out's view of one of its sandboxes.
pub trait Shows: Observer {
    /// A note for people.
    fn note(&mut self, text: &str);

    /// The sandbox is open and has this id (a fan-out labels its lines with it).
    fn sandbox_opened(&mut self, _id: &str) {}

    /// A controller-side phase began (sandbox, upload, cleanup).
    fn controller_phase_started(&mut self, phase: Phase) -> Result<(), OutputError> {
        self.event(&controller_event(event::Kind::PhaseStarted(PhaseStarted {
            phase: phase as i32,
        })))
    }

    /// A controller-side phase ended.
    fn controller_phase_finished(
        &mut self,
        phase: Phase,
        status: CheckStatus,
        duration: Duration,
    ) -> Result<(), OutputError> {
        self.event(&controller_event(event::Kind::PhaseFinished(
            PhaseFinished {
                phase: phase as i32,
                status: status as i32,
                duration: Some(tailbox_proto::convert::duration(duration)),
            },
        )))
    }
}

impl Shows for Renderer {
    fn note(&mut self, text: &str) {
        Renderer::note(self, text);
    }
}

impl Observer for Renderer {
    fn event(&mut self, event: &Event) -> Result<(), OutputError> {
        Renderer::event(self, event)
    }

    fn agent_stderr(&mut self, line: &str) {
        Renderer::agent_stderr(self, line);
    }
}

/// Human output state.
pub struct Human {
    verbose: bool,
    quiet: bool,
    /// Live lines, on a terminal (and not under --quiet).
    progress: Option<Progress>,
    /// Put before every plain line (a fan-out's `[#3 sb-…] `).
    prefix: String,
    pass: Style,
    fail: Style,
    warn: Style,
    dim: Style,
}

impl Human {
    fn new(verbose: bool, quiet: bool) -> Self {
        let colors = console::colors_enabled_stderr();
        let style = |s: Style| s.force_styling(colors);
        Self {
            verbose,
            quiet,
            progress: (Term::stderr().is_term() && !quiet).then(Progress::stderr),
            prefix: String::new(),
            pass: style(Style::new().green()),
            fail: style(Style::new().red().bold()),
            warn: style(Style::new().yellow()),
            dim: style(Style::new().dim()),
        }
    }

    /// Prints a line on stderr above the live ones. On a terminal it is cut to its width
    /// (the whole text is in `--json`, `--report` and `-v`); elsewhere it is never cut.
    fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.progress {
            Some(progress) if !self.verbose => progress.println(&cut(text, Progress::width())),
            Some(progress) => progress.println(text),
            None => eprintln!("{}{text}", self.prefix),
        }
    }

    fn clear_spinner(&mut self) {
        if let Some(progress) = &mut self.progress {
            progress.clear();
        }
    }

    fn event(&mut self, event: &Event) {
        let Some(kind) = &event.kind else { return };
        match kind {
            event::Kind::PhaseStarted(started) => self.phase_started(phase(started.phase)),
            event::Kind::PhaseFinished(finished) => self.phase_finished(finished),
            event::Kind::CheckStarted(started) => self.check_started(started),
            event::Kind::Check(check) => {
                if let Some(progress) = &mut self.progress {
                    progress.step_finished(&check.name, &check.target);
                }
                let text = self.check_line(check);
                self.line(&text);
            }
            event::Kind::Warning(warning) => self.warning(warning),
            event::Kind::Log(log) => self.log(log),
            event::Kind::DaemonRestart(restart) => self.restart(restart),
            event::Kind::Report(_) => self.clear_spinner(),
            event::Kind::AgentHello(hello) => {
                if self.verbose {
                    self.line(&format!(
                        "{} tailbox-agent {} (sha256 {}, pid {})",
                        self.dim.apply_to("agent:"),
                        hello.agent_version,
                        hello.agent_sha256.get(..12).unwrap_or(&hello.agent_sha256),
                        hello.pid
                    ));
                }
            }
        }
    }

    fn phase_started(&mut self, phase: Phase) {
        if self.quiet {
            return;
        }
        let name = phase_name(phase);
        match &mut self.progress {
            Some(progress) => progress.phase_started(name),
            None => self.line(&format!("» {name}")),
        }
    }

    fn phase_finished(&mut self, finished: &PhaseFinished) {
        if self.quiet {
            return;
        }
        self.clear_spinner();
        let name = phase_name(phase(finished.phase));
        let took = finished
            .duration
            .as_ref()
            .map(format_duration)
            .unwrap_or_default();
        let mark = if finished.status == CheckStatus::Fail as i32 {
            self.fail.apply_to("✗")
        } else {
            self.pass.apply_to("✓")
        };
        self.line(&format!("{mark} {name} {}", self.dim.apply_to(took)));
    }

    /// A check began: a live line on a terminal, a plain line elsewhere.
    fn check_started(&mut self, started: &CheckStarted) {
        if self.quiet {
            return;
        }
        let budget = tailbox_proto::convert::to_std_duration(started.budget.as_ref());
        let target = redact_urls(&started.target);
        match &mut self.progress {
            Some(progress) => progress.step_started(&started.name, &target, budget),
            None => {
                let target = if target.is_empty() {
                    String::new()
                } else {
                    format!(" {target}")
                };
                let budget = budget
                    .map(|b| format!(" (up to {})", budget_text(b)))
                    .unwrap_or_default();
                self.line(&format!(
                    "{} {}{target}{}",
                    self.dim.apply_to("  »"),
                    started.name,
                    self.dim.apply_to(budget)
                ));
            }
        }
    }

    fn check_line(&self, check: &CheckResult) -> String {
        let status = CheckStatus::try_from(check.status).unwrap_or(CheckStatus::Unspecified);
        let mark = match status {
            CheckStatus::Pass => self.pass.apply_to("  ✓").to_string(),
            CheckStatus::Fail => self.fail.apply_to("  ✗").to_string(),
            CheckStatus::Warn => self.warn.apply_to("  !").to_string(),
            _ => self.dim.apply_to("  -").to_string(),
        };
        let target = if check.target.is_empty() {
            String::new()
        } else {
            format!(" {}", check.target)
        };
        redact_urls(&format!("{mark} {}{target}: {}", check.name, check.detail))
    }

    fn warning(&self, warning: &Warning) {
        self.line(&format!(
            "{} {}",
            self.warn.apply_to(format!("  warning[{}]:", warning.code)),
            warning.message
        ));
    }

    fn log(&self, log: &LogLine) {
        // Agent lines arrive on its stderr too (relayed under --verbose); show tailscaled's here.
        if self.verbose && log.source == LogSource::Tailscaled as i32 {
            self.line(&format!(
                "{} {}",
                self.dim.apply_to("tailscaled:"),
                redact_urls(&log.line)
            ));
        }
    }

    fn restart(&self, restart: &DaemonRestart) {
        self.line(&format!(
            "{} tailscaled died ({}); restart #{}",
            self.warn.apply_to("  !"),
            restart.exit,
            restart.attempt
        ));
    }

    /// Relays one agent stderr line (only under --verbose).
    pub fn agent_stderr(&self, line: &str) {
        if self.verbose {
            self.line(&format!(
                "{} {}",
                self.dim.apply_to("agent:"),
                redact_urls(line)
            ));
        }
    }
}

/// Applies `--color`, `NO_COLOR` and `CLICOLOR_FORCE` to everything tailbox prints.
///
/// `--color always` and `--color never` win; under `auto`, a non-empty `NO_COLOR` turns colour
/// off, then a `CLICOLOR_FORCE` other than `0` turns it on, and otherwise a terminal gets colour.
pub fn apply_color(choice: ColorChoice, env: &dyn Env) {
    let forced = match choice {
        ColorChoice::Always => Some(true),
        ColorChoice::Never => Some(false),
        ColorChoice::Auto if env.non_empty(env::NO_COLOR).is_some() => Some(false),
        ColorChoice::Auto
            if env
                .non_empty(env::CLICOLOR_FORCE)
                .is_some_and(|v| v.trim() != "0") =>
        {
            Some(true)
        }
        ColorChoice::Auto => None,
    };
    // Otherwise the console crate decides per stream: a terminal that is not `TERM=dumb`, and
    // `CLICOLOR=0` turns colour off.
    if let Some(on) = forced {
        console::set_colors_enabled(on);
        console::set_colors_enabled_stderr(on);
    }
}

/// Marks a report whose run was stopped early: its verdict says `interrupted`, never ok (the
/// agent already does; this covers a run stopped as the agent finished).
pub fn mark_interrupted(report: &mut Report) {
    let verdict = report.verdict.get_or_insert_with(Default::default);
    verdict.interrupted = true;
    verdict.ok = false;
}

/// The width the results table must fit: stdout's terminal's, or `None` (never cut) without one.
pub fn stdout_width() -> Option<usize> {
    let term = Term::stdout();
    term.is_term()
        .then(|| term.size_checked())
        .flatten()
        .map(|(_rows, cols)| usize::from(cols))
}

/// The most of the room for TARGET and DETAIL that TARGET keeps when the table must shrink.
const TARGET_SHARE_PERCENT: usize = 40;
/// The narrowest a shortened TARGET column gets.
const MIN_TARGET: usize = 16;

/// Renders the final report for people: the results table on stdout, the verdict and hints.
///
/// With a `width` (a terminal), every line fits it: TARGET and DETAIL are cut with an ellipsis,
/// and the verdict and hints wrap. Without one nothing is cut.
pub fn report_table(report: &Report, width: Option<usize>) -> String {
    let headers = ["CHECK", "TARGET", "STATUS", "TIME", "DETAIL"];
    let rows: Vec<[String; 5]> = report
        .checks
        .iter()
        .map(|c| {
            [
                c.name.clone(),
                if c.target.is_empty() {
                    "-".into()
                } else {
                    redact_urls(&c.target)
                },
                status_name(c.status).to_owned(),
                c.duration.as_ref().map(format_duration).unwrap_or_default(),
                redact_urls(&c.detail),
            ]
        })
        .collect();
    let mut widths = headers.map(console::measure_text_width);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(console::measure_text_width(cell));
        }
    }
    if let Some(limit) = width {
        fit_columns(&mut widths, limit);
    }
    let fmt_row = |cells: &[String]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let cell = match (width, i) {
                (None, _) => cell.clone(),
                (Some(_), 1) => cut_middle(cell, widths[i]),
                (Some(_), _) => cut(cell, widths[i]),
            };
            if i + 1 == cells.len() {
                line.push_str(&cell);
            } else {
                let pad = widths[i].saturating_sub(console::measure_text_width(&cell));
                line.push_str(&cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        line.trim_end().to_owned() + "\n"
    };
    let wrap = |text: &str| -> String {
        match width {
            Some(limit) => {
                let options = textwrap::Options::new(limit.max(20)).subsequent_indent("  ");
                textwrap::wrap(text, options).join("\n") + "\n"
            }
            None => format!("{text}\n"),
        }
    };
    let mut out = fmt_row(&headers.map(str::to_owned));
    for row in &rows {
        out.push_str(&fmt_row(row));
    }
    if let Some(verdict) = &report.verdict {
        out.push('\n');
        let summary = redact_urls(&verdict.summary);
        out.push_str(&wrap(&if verdict.interrupted {
            format!("verdict: interrupted ({summary})")
        } else if verdict.ok {
            format!("verdict: ok ({summary})")
        } else {
            format!("verdict: FAILED: {summary}")
        }));
    }
    for check in &report.checks {
        if check.status == CheckStatus::Fail as i32 || check.status == CheckStatus::Warn as i32 {
            if !check.hint.is_empty() {
                let target = if check.target.is_empty() {
                    String::new()
                } else {
                    format!(" {}", redact_urls(&check.target))
                };
                out.push_str(&wrap(&format!(
                    "hint ({}{target}): {}",
                    check.name, check.hint
                )));
            }
            if check.status == CheckStatus::Fail as i32 && !check.log_tail.is_empty() {
                out.push_str(&format!("tailscaled log tail ({}):\n", check.name));
                for line in &check.log_tail {
                    let line = format!("  | {}", redact_urls(line));
                    match width {
                        Some(limit) => out.push_str(&cut(&line, limit)),
                        None => out.push_str(&line),
                    }
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// What a run with no tailnet targets did not check, and the variables and flags that would
/// make it check them. `joined`: the sandbox's node is on the tailnet (an auth key was given, or
/// a sidecar's node was checked), so login and status were checked. `fan_out`: said once for
/// several sandboxes.
pub fn unchecked_guidance(joined: bool, fan_out: bool) -> String {
    let mut out = String::from(match (joined, fan_out) {
        (true, _) => {
            "not checked: no targets were given, so nothing on the dev host was pinged, fetched or cloned\n"
        }
        (false, false) => {
            "not checked: with no auth key the sandbox joined no tailnet; nothing was pinged, fetched or cloned\n"
        }
        (false, true) => {
            "not checked: with no auth key no sandbox joined a tailnet; nothing was pinged, fetched or cloned\n"
        }
    });
    if !joined {
        out.push_str("  to join the tailnet, set `TS_AUTHKEY` (ephemeral, pre-authorized) or pass `--auth-key-file PATH`\n");
    }
    out.push_str(concat!(
        "  to ping the dev host, set `COOK_TAIL_IP` or pass `--ping HOST`\n",
        "  to fetch a URL from it, set `COOK_HTTP_URL` or pass `--http URL`\n",
        "  to list a git remote on it, set `COOK_GIT_URL` or pass `--git URL` (and `--expect-ref NAME=SHA`)\n",
        "  to see a whole run on a local tailnet, with no account: `cargo xtask demo` in a tailbox checkout\n",
    ));
    out
}

/// Shrinks TARGET (index 1) and DETAIL (index 4) so that the columns and their two-space gaps
/// fit `limit`. DETAIL says the most, so TARGET gives up to its share first (it is cut in the
/// middle, keeping a URL's host and path end), then DETAIL takes what is left.
fn fit_columns(widths: &mut [usize; 5], limit: usize) {
    let fixed = widths[0] + widths[2] + widths[3] + 2 * (widths.len() - 1);
    if fixed + widths[1] + widths[4] <= limit {
        return;
    }
    let room = limit.saturating_sub(fixed);
    let target_share = (room * TARGET_SHARE_PERCENT / 100).max(MIN_TARGET);
    widths[1] = widths[1].min(target_share);
    widths[4] = widths[4].min(room.saturating_sub(widths[1])).max(1);
}

/// Cuts `text` to `width` columns in the middle, keeping both ends (`http://100.…/lab.git`).
fn cut_middle(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width || width < 5 {
        return cut(text, width);
    }
    let head = (width - 1) / 2;
    let tail = width - 1 - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

fn phase(value: i32) -> Phase {
    Phase::try_from(value).unwrap_or(Phase::Unspecified)
}

/// Lower-case phase name.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Unspecified => "phase",
        Phase::Sandbox => "sandbox",
        Phase::Upload => "upload",
        Phase::Preflight => "preflight",
        Phase::Daemon => "tailscaled",
        Phase::Login => "login",
        Phase::Checks => "checks",
        Phase::Teardown => "teardown",
        Phase::Cleanup => "cleanup",
    }
}

/// Status as the results table writes it: `pass`, `FAIL`, `skip`, `warn`.
pub fn status_name(status: i32) -> &'static str {
    match CheckStatus::try_from(status).unwrap_or(CheckStatus::Unspecified) {
        CheckStatus::Pass => "pass",
        CheckStatus::Fail => "FAIL",
        CheckStatus::Skip => "skip",
        CheckStatus::Warn => "warn",
        CheckStatus::Unspecified => "?",
    }
}

/// Compact human duration: 850µs, 12ms, 3.4s, 2m05s.
pub fn format_duration(d: &pbjson_types::Duration) -> String {
    let micros = d.seconds.saturating_mul(1_000_000) + i64::from(d.nanos / 1_000);
    match micros {
        m if m < 1_000 => format!("{m}µs"),
        m if m < 1_000_000 => format!("{}ms", m / 1_000),
        m if m < 60_000_000 => format!("{:.1}s", m as f64 / 1e6),
        m => format!("{}m{:02}s", m / 60_000_000, (m / 1_000_000) % 60),
    }
}

/// True when `report` failed at any layer (for the exit code).
pub fn report_failed(report: &Report) -> bool {
    report.verdict.as_ref().is_none_or(|v| !v.ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailbox_proto::agent::v1::Verdict;

    #[test]
    fn durations_are_compact() {
        let d = |seconds, nanos| pbjson_types::Duration { seconds, nanos };
        assert_eq!(format_duration(&d(0, 850_000)), "850µs");
        assert_eq!(format_duration(&d(0, 12_000_000)), "12ms");
        assert_eq!(format_duration(&d(3, 400_000_000)), "3.4s");
        assert_eq!(format_duration(&d(125, 0)), "2m05s");
    }

    #[test]
    fn table_lists_checks_verdict_and_hints() {
        let report = Report {
            checks: vec![
                CheckResult {
                    name: "preflight".into(),
                    status: CheckStatus::Pass as i32,
                    detail: "Debian".into(),
                    ..Default::default()
                },
                CheckResult {
                    name: "http".into(),
                    target: "http://u:pw@h/x".into(),
                    status: CheckStatus::Fail as i32,
                    detail: "status 500".into(),
                    hint: "look at the server".into(),
                    ..Default::default()
                },
            ],
            verdict: Some(Verdict {
                ok: false,
                summary: "http failed".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = report_table(&report, None);
        assert!(table.starts_with("CHECK"), "{table}");
        assert!(table.contains("preflight  -"), "{table}");
        assert!(table.contains("FAIL"), "{table}");
        assert!(table.contains("verdict: FAILED: http failed"), "{table}");
        assert!(
            table.contains("hint (http http://****@h/x): look at the server"),
            "{table}"
        );
        assert!(!table.contains("pw"), "{table}");
    }
    fn check(
        name: &str,
        target: &str,
        status: CheckStatus,
        millis: i32,
        detail: &str,
    ) -> CheckResult {
        CheckResult {
            name: name.into(),
            target: target.into(),
            status: status as i32,
            detail: detail.into(),
            duration: Some(pbjson_types::Duration {
                seconds: i64::from(millis / 1000),
                nanos: (millis % 1000) * 1_000_000,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_guidance_for_a_run_without_targets_is_pinned() {
        insta::assert_snapshot!(format!(
            "{}\n---\n\n{}\n---\n\n{}",
            unchecked_guidance(false, false),
            unchecked_guidance(true, false),
            unchecked_guidance(false, true)
        ));
    }

    #[test]
    fn the_results_table_and_verdict_are_pinned() {
        let passing = Report {
            checks: vec![
                check(
                    "preflight",
                    "",
                    CheckStatus::Pass,
                    1,
                    "Debian GNU/Linux 12 (bookworm), kernel 6.1, x86_64, uid 0, /dev/net/tun present",
                ),
                check(
                    "login",
                    "http://127.0.0.1:8080",
                    CheckStatus::Pass,
                    37,
                    "Running as tailbox-local-1 (100.64.0.6) after 36ms",
                ),
                check(
                    "ping",
                    "100.64.0.1",
                    CheckStatus::Warn,
                    12,
                    "pong from devhost (100.64.0.1) via DERP(test) in 2ms",
                ),
                check(
                    "http",
                    "http://100.64.0.1:7420/health",
                    CheckStatus::Pass,
                    3,
                    "GET answered 200 OK after 3 ms (2 bytes)",
                ),
                check(
                    "git",
                    "http://u:secret@100.64.0.1:7420/lab.git",
                    CheckStatus::Skip,
                    0,
                    "not finished: the run was interrupted",
                ),
            ],
            verdict: Some(Verdict {
                ok: true,
                summary: "3 passed, 1 warned, 1 skipped".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut failed_http = check(
            "http",
            "http://100.64.0.1:7420/health",
            CheckStatus::Fail,
            30_000,
            "no answer within 30s",
        );
        failed_http.hint =
            "Check that the dev host's server listens on 0.0.0.0, not 127.0.0.1.".into();
        let mut failed_login = check(
            "login",
            "http://127.0.0.1:8080",
            CheckStatus::Fail,
            120_000,
            "control refused the login: invalid key",
        );
        failed_login.hint =
            "Check `TS_AUTHKEY`: it must be a valid auth key for this tailnet and control server."
                .into();
        failed_login.log_tail = vec!["control: register: 401 invalid key".into()];
        let failing = Report {
            checks: vec![failed_login, failed_http],
            verdict: Some(Verdict {
                ok: false,
                summary: "login (http://127.0.0.1:8080) failed at the login layer: auth_invalid"
                    .into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // On a terminal 60 columns wide: TARGET cut in the middle, DETAIL at the end, hints wrapped.
        let narrow = [
            report_table(&passing, Some(60)),
            report_table(&failing, Some(60)),
        ];
        for table in &narrow {
            for line in table.lines() {
                assert!(console::measure_text_width(line) <= 60, "{line:?}");
            }
        }
        insta::assert_snapshot!(format!(
            "{}\n---\n\n{}\n--- 60 columns\n\n{}\n---\n\n{}",
            report_table(&passing, None),
            report_table(&failing, None),
            narrow[0],
            narrow[1]
        ));
    }
}
