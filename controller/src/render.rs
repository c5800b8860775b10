//! Showing a run: live progress for people on stderr, a results table on stdout; or JSON lines.

use std::time::Duration;

use console::{Style, Term};
use indicatif::{ProgressBar, ProgressStyle};
use tailbox_proto::agent::v1::{
    CheckResult, CheckStatus, DaemonRestart, Event, LogLine, LogSource, Phase, PhaseFinished,
    PhaseStarted, Report, Warning, event,
};

use crate::output::{OutputError, write_json_line};
use crate::plan::OutputMode;
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

    /// A note for people (ignored in JSON mode, where stdout is data only).
    pub fn note(&mut self, text: &str) {
        if let Renderer::Human(human) = self {
            human.line(&human.dim.apply_to(text).to_string());
        }
    }

    /// A controller-side phase began (sandbox, upload, cleanup).
    pub fn controller_phase_started(&mut self, phase: Phase) -> Result<(), OutputError> {
        self.event(&controller_event(event::Kind::PhaseStarted(PhaseStarted {
            phase: phase as i32,
        })))
    }

    /// A controller-side phase ended.
    pub fn controller_phase_finished(
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

    /// A block of lines for people after the results table, set off by an empty line (ignored
    /// in JSON mode and under `--quiet`).
    pub fn block(&mut self, text: &str) {
        if let Renderer::Human(human) = self {
            human.clear_spinner();
            human.line("");
            for line in text.lines() {
                human.line(line);
            }
        }
    }

    /// Clears live progress (before an error message is printed).
    pub fn clear(&mut self) {
        if let Renderer::Human(human) = self {
            human.clear_spinner();
        }
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
    interactive: bool,
    spinner: Option<ProgressBar>,
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
            interactive: Term::stderr().is_term(),
            spinner: None,
            pass: style(Style::new().green()),
            fail: style(Style::new().red().bold()),
            warn: style(Style::new().yellow()),
            dim: style(Style::new().dim()),
        }
    }

    /// Prints a line on stderr without disturbing the spinner.
    fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.spinner {
            Some(spinner) => spinner.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn clear_spinner(&mut self) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
    }

    fn event(&mut self, event: &Event) {
        let Some(kind) = &event.kind else { return };
        match kind {
            event::Kind::PhaseStarted(started) => self.phase_started(phase(started.phase)),
            event::Kind::PhaseFinished(finished) => self.phase_finished(finished),
            event::Kind::Check(check) => {
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
        if self.interactive {
            self.clear_spinner();
            let spinner = ProgressBar::new_spinner();
            spinner.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            spinner.set_message(name.to_owned());
            spinner.enable_steady_tick(Duration::from_millis(100));
            self.spinner = Some(spinner);
        } else {
            self.line(&format!("» {name}"));
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

/// Renders the final report for people: the results table on stdout, the verdict and hints.
pub fn report_table(report: &Report) -> String {
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
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let fmt_row = |cells: &[String]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        line.trim_end().to_owned() + "\n"
    };
    let mut out = fmt_row(&headers.map(str::to_owned));
    for row in &rows {
        out.push_str(&fmt_row(row));
    }
    if let Some(verdict) = &report.verdict {
        out.push('\n');
        if verdict.ok {
            out.push_str(&format!("verdict: ok ({})\n", verdict.summary));
        } else {
            out.push_str(&format!(
                "verdict: FAILED: {}\n",
                redact_urls(&verdict.summary)
            ));
        }
    }
    for check in &report.checks {
        if check.status == CheckStatus::Fail as i32 || check.status == CheckStatus::Warn as i32 {
            if !check.hint.is_empty() {
                let target = if check.target.is_empty() {
                    String::new()
                } else {
                    format!(" {}", redact_urls(&check.target))
                };
                out.push_str(&format!("hint ({}{target}): {}\n", check.name, check.hint));
            }
            if check.status == CheckStatus::Fail as i32 && !check.log_tail.is_empty() {
                out.push_str(&format!("tailscaled log tail ({}):\n", check.name));
                for line in &check.log_tail {
                    out.push_str(&format!("  | {}\n", redact_urls(line)));
                }
            }
        }
    }
    out
}

/// What a run with no tailnet targets did not check, and the variables and flags that would
/// make it check them. `joined`: the sandbox's node is on the tailnet (an auth key was given, or
/// a sidecar's node was checked), so login and status were checked.
pub fn unchecked_guidance(joined: bool) -> String {
    let mut out = String::from(if joined {
        "not checked: no targets were given, so nothing on the dev host was pinged, fetched or cloned\n"
    } else {
        "not checked: no auth key was given, so the sandbox joined no tailnet and nothing was pinged, fetched or cloned\n"
    });
    if !joined {
        out.push_str("  to join the tailnet, set `TS_AUTHKEY` (an ephemeral, pre-authorized auth key) or pass `--auth-key-file PATH`\n");
    }
    out.push_str(concat!(
        "  to ping the dev host, set `COOK_TAIL_IP` or pass `--ping HOST`\n",
        "  to fetch a URL from it, set `COOK_HTTP_URL` or pass `--http URL`\n",
        "  to list a git remote on it, set `COOK_GIT_URL` or pass `--git URL` (and `--expect-ref NAME=SHA`)\n",
        "  to see a whole run on a local tailnet, with no account: `cargo xtask demo` in a tailbox checkout\n",
    ));
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

fn status_name(status: i32) -> &'static str {
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
        let table = report_table(&report);
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
            "{}\n---\n\n{}",
            unchecked_guidance(false),
            unchecked_guidance(true)
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
                    "the run was cancelled before this check finished",
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
        insta::assert_snapshot!(format!(
            "{}\n---\n\n{}",
            report_table(&passing),
            report_table(&failing)
        ));
    }
}
