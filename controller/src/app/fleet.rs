//! `tailbox check` over many sandboxes (`--count N`, or several `--sandbox-id`): each sandbox
//! is one [`super::check_in`], at most `--parallel` at once, shown through its own [`SlotView`];
//! one failing does not stop the others. Ctrl-C stops them all the backend's way (Modal:
//! every created sandbox terminated at once; local: every agent asked to log out), and the
//! aggregated [`FleetReport`] ends the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use console::Term;
use futures::StreamExt as _;
use tailbox_proto::agent::v1::{
    CheckStatus, Event, FleetEvent, FleetReport, FleetSandbox, FleetSandboxStatus, Phase,
    PhaseTiming, Report, event, fleet_event,
};

use super::{
    CLEANUP_BUDGET, INTERRUPTED_CLEANUP_BUDGET, Stop, check_in, interrupted, show_released,
    stop_requested,
};
use crate::backend::{Backend, Interrupt};
use crate::error::{CliError, CliResult, ExitStatus};
use crate::fleet::{self, RunFacts, SlotOutcome, SlotRecord, sandbox_label};
use crate::output::{OutputError, write_json_line, write_stdout};
use crate::plan::{CheckPlan, OutputMode};
use crate::progress::FleetProgress;
use crate::render::{self, Renderer, Shows, phase_name};
use crate::session::Observer;

/// How a fan-out is shown.
enum Display {
    /// `--json`: FleetEvent lines.
    Json { verbose: bool },
    /// A terminal: one live line per sandbox.
    Live(FleetProgress),
    /// Plain lines, each starting with its sandbox.
    Plain { verbose: bool, quiet: bool },
}

/// What every sandbox's view shares: the records and the display.
struct Board {
    records: Vec<SlotRecord>,
    display: Display,
}

type Shared = Arc<Mutex<Board>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Board> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the plan's sandboxes and reports them together.
pub(super) async fn check_fleet(
    backend: &dyn Backend,
    plan: &CheckPlan,
    run_id: &str,
) -> CliResult<ExitStatus> {
    let started_at = SystemTime::now();
    let display = match plan.output {
        OutputMode::Json { verbose } => Display::Json { verbose },
        OutputMode::Human { quiet: false, .. } if Term::stderr().is_term() => {
            Display::Live(FleetProgress::stderr())
        }
        OutputMode::Human { verbose, quiet } => Display::Plain { verbose, quiet },
    };
    let shared: Shared = Arc::new(Mutex::new(Board {
        records: (1..=plan.count)
            .map(|slot| SlotRecord {
                slot,
                ..Default::default()
            })
            .collect(),
        display,
    }));
    let stopping = AtomicBool::new(false);
    let parallel = usize::try_from(plan.parallel.max(1)).unwrap_or(1);

    let stopped = {
        let work = futures::stream::iter(1..=plan.count)
            .map(|slot| run_slot(backend, plan, slot, run_id, &shared, &stopping))
            .buffer_unordered(parallel)
            .collect::<Vec<()>>();
        let mut work = Box::pin(work);
        tokio::select! {
            _ = &mut work => None,
            stop = stop_requested() => {
                stopping.store(true, Ordering::SeqCst);
                match backend.interrupt() {
                    Interrupt::AwaitReports(grace) => tokio::select! {
                        _ = tokio::time::timeout(grace, &mut work) => {}
                        // A second Ctrl-C stops waiting.
                        () = interrupted() => {}
                    },
                    Interrupt::Abandon => {}
                }
                Some(stop)
            }
        }
    };
    // Every slot's work is done or dropped; what it created, the backend knows.
    let budget = if stopped.is_some() {
        INTERRUPTED_CLEANUP_BUDGET
    } else {
        CLEANUP_BUDGET
    };
    let released = backend.release(budget).await;
    let mut notes = match plan.output {
        OutputMode::Human { verbose, quiet } => Renderer::plain(verbose, quiet, ""),
        OutputMode::Json { verbose } => Renderer::new(OutputMode::Json { verbose }),
    };
    {
        let mut board = lock(&shared);
        if let Display::Live(progress) = &mut board.display {
            progress.clear();
        }
    }
    show_released(&mut notes, released, budget);

    let records = lock(&shared).records.clone();
    let facts = RunFacts {
        run_id: run_id.to_owned(),
        backend: backend.kind().to_owned(),
        requested: plan.count,
        parallel: plan.parallel,
        started_at,
        interrupted: stopped.is_some(),
    };
    let report = fleet::aggregate(&facts, &records);
    finish(plan, &report)?;
    if stopped.is_none() && !plan.has_targets() && fleet::exit_status(&report) == ExitStatus::Passed
    {
        // As after one sandbox: nothing failed, but say what went unchecked, once for all.
        let joined = report
            .sandboxes
            .iter()
            .any(|s| s.report.as_ref().is_some_and(|r| r.tailnet.is_some()));
        notes.block(&render::unchecked_guidance(joined, true));
    }
    match stopped {
        Some(Stop::ClosedStdout) => Ok(ExitStatus::ClosedStdout),
        Some(Stop::Signal) => Err(CliError::interrupted().with_detail(format!(
            "{} of {} sandboxes finished before the stop",
            report
                .sandboxes
                .iter()
                .filter(|s| s.status != FleetSandboxStatus::Interrupted as i32)
                .count(),
            report.sandboxes.len()
        ))),
        None => Ok(fleet::exit_status(&report)),
    }
}

/// Prints the aggregate (the last JSON line, or the summary on stdout) and writes `--report`.
fn finish(plan: &CheckPlan, report: &FleetReport) -> CliResult<()> {
    match plan.output {
        OutputMode::Json { .. } => write_json_line(
            "the fleet report",
            &FleetEvent {
                slot: 0,
                sandbox_id: String::new(),
                kind: Some(fleet_event::Kind::FleetReport(report.clone())),
            },
        )?,
        OutputMode::Human { .. } => {
            write_stdout(&fleet::summary(report, render::stdout_width()))?;
        }
    }
    if let Some(path) = &plan.report_path {
        super::write_report_file(path, report)?;
    }
    super::show_pictures(plan, &crate::pictures::fleet_reports(report), Some(report))
}

/// One sandbox of the fan-out, from opening it to its outcome.
async fn run_slot(
    backend: &dyn Backend,
    plan: &CheckPlan,
    slot: u32,
    run_id: &str,
    shared: &Shared,
    stopping: &AtomicBool,
) {
    if stopping.load(Ordering::SeqCst) {
        return; // Not begun: the record stays unfinished, reported as interrupted.
    }
    let plan = plan.for_slot(slot);
    let mut view = SlotView::new(slot, Arc::clone(shared), &plan);
    let result = check_in(backend, &plan, &mut view, run_id).await;
    view.finish(result);
}

/// One sandbox's part of the display and of the records: its events are labelled with its slot
/// and, once known, its sandbox id.
struct SlotView {
    slot: u32,
    shared: Shared,
    sandbox_id: Option<String>,
    /// Events from before the sandbox had an id (JSON lines carry it).
    held: Vec<Event>,
    started: Instant,
    /// Plain lines, when there is no terminal.
    plain: Option<Renderer>,
}

impl SlotView {
    fn new(slot: u32, shared: Shared, plan: &CheckPlan) -> Self {
        let plain = {
            let mut board = lock(&shared);
            let record = &mut board.records[index(slot)];
            record.started_at = Some(SystemTime::now());
            record.hostname = plan.hostname.clone().unwrap_or_default();
            let label = sandbox_label(slot, "", "");
            match &mut board.display {
                Display::Live(progress) => {
                    progress.label(slot, &label);
                    None
                }
                Display::Plain { verbose, quiet } => {
                    Some(Renderer::plain(*verbose, *quiet, &format!("[{label}] ")))
                }
                Display::Json { .. } => None,
            }
        };
        Self {
            slot,
            shared,
            sandbox_id: None,
            held: Vec::new(),
            started: Instant::now(),
            plain,
        }
    }

    fn label(&self) -> String {
        sandbox_label(self.slot, self.sandbox_id.as_deref().unwrap_or(""), "")
    }

    /// Records what the aggregate needs from `event`.
    fn record(&self, board: &mut Board, event: &Event) {
        let record = &mut board.records[index(self.slot)];
        match &event.kind {
            Some(event::Kind::PhaseFinished(finished)) if event.seq == 0 => {
                record.controller_phases.push(PhaseTiming {
                    phase: finished.phase,
                    status: finished.status,
                    duration: finished.duration,
                });
            }
            Some(event::Kind::Check(check))
                if check.name == "login" && check.status == CheckStatus::Pass as i32 =>
            {
                record.time_to_running = Some(self.started.elapsed());
            }
            _ => {}
        }
    }

    /// Writes one FleetEvent line.
    fn json_line(&self, kind: fleet_event::Kind) -> Result<(), OutputError> {
        write_json_line(
            "an event",
            &FleetEvent {
                slot: self.slot,
                sandbox_id: self.sandbox_id.clone().unwrap_or_default(),
                kind: Some(kind),
            },
        )
    }

    /// The live line follows the sandbox's phases; failures and warnings print above.
    fn live(&self, progress: &mut FleetProgress, event: &Event) {
        match &event.kind {
            Some(event::Kind::PhaseStarted(started)) => progress.phase(
                self.slot,
                phase_name(Phase::try_from(started.phase).unwrap_or(Phase::Unspecified)),
            ),
            Some(event::Kind::Check(check))
                if check.status == CheckStatus::Fail as i32
                    || check.status == CheckStatus::Warn as i32 =>
            {
                let mark = if check.status == CheckStatus::Fail as i32 {
                    "✗"
                } else {
                    "!"
                };
                progress.println(&crate::secret::redact_urls(&format!(
                    "{mark} {} {} {}: {}",
                    self.label(),
                    check.name,
                    check.target,
                    check.detail
                )));
            }
            _ => {}
        }
    }

    /// The work ended: record the outcome, flush what was held, and say how it went.
    fn finish(mut self, result: CliResult<Report>) {
        let outcome = match result {
            Ok(report) => SlotOutcome::Report(Box::new(report)),
            Err(err) => SlotOutcome::Error {
                error: std::iter::once(err.message.clone())
                    .chain(err.causes.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(": "),
                hint: err.hint.clone().unwrap_or_default(),
            },
        };
        let shared = Arc::clone(&self.shared);
        let mut board = lock(&shared);
        let record = &mut board.records[index(self.slot)];
        record.finished_at = Some(SystemTime::now());
        record.outcome = outcome;
        if let Some(id) = &self.sandbox_id {
            record.sandbox_id.clone_from(id);
        }
        let entry = fleet::sandbox_entry(record, false);
        let held = std::mem::take(&mut self.held);
        match &mut board.display {
            Display::Json { .. } => {
                for event in held {
                    let _ = self.json_line(fleet_event::Kind::Event(event));
                }
                let _ = self.json_line(fleet_event::Kind::Sandbox(entry));
            }
            Display::Live(progress) => progress.finish(self.slot, &done_line(&entry)),
            Display::Plain { .. } => {
                if let Some(plain) = &mut self.plain {
                    plain.note(&done_line(&entry));
                }
            }
        }
    }
}

/// `✓ #3 sb-… (modal-sb-…) passed in 4.2s`, or what failed.
fn done_line(entry: &FleetSandbox) -> String {
    let label = sandbox_label(entry.slot, &entry.sandbox_id, &entry.hostname);
    let wall = entry
        .wall_time
        .as_ref()
        .map(|d| format!(" in {}", render::format_duration(d)))
        .unwrap_or_default();
    match FleetSandboxStatus::try_from(entry.status).unwrap_or(FleetSandboxStatus::Unspecified) {
        FleetSandboxStatus::Passed => format!("✓ {label}  passed{wall}"),
        FleetSandboxStatus::Failed => {
            format!("✗ {label}  FAILED{wall}: {}", fleet::outcome_text(entry))
        }
        FleetSandboxStatus::Error => {
            format!("✗ {label}  ERROR{wall}: {}", fleet::outcome_text(entry))
        }
        _ => format!("- {label}  interrupted{wall}"),
    }
}

fn index(slot: u32) -> usize {
    usize::try_from(slot.saturating_sub(1)).unwrap_or(0)
}

impl Observer for SlotView {
    fn event(&mut self, event: &Event) -> Result<(), OutputError> {
        let shared = Arc::clone(&self.shared);
        let mut board = lock(&shared);
        self.record(&mut board, event);
        match &mut board.display {
            Display::Json { .. } if self.sandbox_id.is_none() => {
                self.held.push(event.clone());
                Ok(())
            }
            Display::Json { .. } => self.json_line(fleet_event::Kind::Event(event.clone())),
            Display::Live(progress) => {
                self.live(progress, event);
                Ok(())
            }
            Display::Plain { .. } => match &mut self.plain {
                Some(plain) => plain.event(event),
                None => Ok(()),
            },
        }
    }

    fn agent_stderr(&mut self, line: &str) {
        let label = self.label();
        let board = lock(&self.shared);
        match &board.display {
            Display::Json { verbose: true } => {
                eprintln!("agent {label}: {}", crate::secret::redact_urls(line));
            }
            Display::Plain { verbose: true, .. } => {
                if let Some(plain) = &self.plain {
                    plain.agent_stderr(line);
                }
            }
            _ => {}
        }
    }
}

impl Shows for SlotView {
    fn note(&mut self, text: &str) {
        if let Some(plain) = &mut self.plain {
            plain.note(text);
        }
    }

    fn sandbox_opened(&mut self, id: &str) {
        self.sandbox_id = Some(id.to_owned());
        let label = self.label();
        if let Some(plain) = &mut self.plain {
            plain.set_prefix(&format!("[{label}] "));
        }
        let shared = Arc::clone(&self.shared);
        let mut board = lock(&shared);
        board.records[index(self.slot)].sandbox_id = id.to_owned();
        match &mut board.display {
            Display::Live(progress) => progress.label(self.slot, &label),
            Display::Json { .. } => {
                for event in std::mem::take(&mut self.held) {
                    let _ = self.json_line(fleet_event::Kind::Event(event));
                }
            }
            Display::Plain { .. } => {}
        }
    }
}
