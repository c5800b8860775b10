//! Subcommands, from a parsed command line to an exit status. Backend-agnostic: the work goes
//! through [`Backend`] and [`Sandbox`], which keep their own ways of stopping and cleaning up.

use std::time::{Duration, Instant};

use tailbox_proto::agent::v1::{
    CheckStatus, Phase, PhaseTiming, Report, SidecarState, StatusRequest, event,
};
use tailbox_proto::describe;

use crate::backend::modal::CREATED_BY_TAG;
use crate::backend::{Backend, Installed, Interrupt, Released, Sandbox};
use crate::cli::{
    CheckArgs, Cli, Command, CompletionsArgs, SandboxCommand, SandboxKind, SweepArgs,
};
use crate::env::{self, Env};
use crate::error::{CliError, CliResult, ExitStatus};
use crate::modal::client::ModalClient;
use crate::modal::config;
use crate::output::{self, write_stdout};
use crate::pictures;
use crate::plan::{CheckPlan, DEFAULT_MODAL_APP, OutputMode};
use crate::render::{self, Renderer, Shows};
use crate::session::{self, controller_event};

mod fleet;
mod sidecar;

/// Time beyond `--timeout` for the agent to log out and stop tailscaled.
const TEARDOWN_ALLOWANCE: Duration = Duration::from_secs(30);
/// How long cleanup may take after Ctrl-C (the promise is "terminated within 3 s").
const INTERRUPTED_CLEANUP_BUDGET: Duration = Duration::from_millis(2500);
/// How long cleanup may take otherwise.
const CLEANUP_BUDGET: Duration = Duration::from_secs(20);

/// Runs a parsed command line, prints its error if it fails, and gives the exit status.
pub async fn run_and_report(cli: Cli, env: &dyn Env) -> ExitStatus {
    render::apply_color(cli.color, env);
    match run(cli, env).await {
        // A reader that closed stdout gets what a shell expects of a program it stopped.
        Ok(_) if output::is_closed() => ExitStatus::ClosedStdout,
        Ok(status) => status,
        Err(err) => {
            eprint!("{}", err.render());
            err.exit_status()
        }
    }
}

/// What to print when the async runtime cannot start.
pub fn runtime_error(err: std::io::Error) -> String {
    CliError::infra("Failed to start the async runtime")
        .with_source(err)
        .with_hint("The machine may be out of threads or memory; try again.")
        .render()
}

/// Runs a parsed command line.
async fn run(cli: Cli, env: &dyn Env) -> CliResult<ExitStatus> {
    match cli.command {
        Command::Check(args) => check(&args, env).await,
        Command::Up(args) => sidecar::up(&args, env).await,
        Command::Status(args) => sidecar::status(&args, env).await,
        Command::Down(args) => sidecar::down(&args, env).await,
        Command::Sandbox(SandboxCommand::Sweep(args)) => sweep(&args, env).await,
        Command::Sandbox(SandboxCommand::Terminate(args)) => terminate(&args.ids, env).await,
        Command::Completions(args) => completions(&args),
    }
}

/// `tailbox completions <SHELL>`: the completion script, from the same clap definitions.
fn completions(args: &CompletionsArgs) -> CliResult<ExitStatus> {
    let mut script = Vec::new();
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(args.shell, &mut command, "tailbox", &mut script);
    write_stdout(&String::from_utf8_lossy(&script))?;
    Ok(ExitStatus::Passed)
}

/// How the check's work ended.
enum Ended {
    /// It ran to the end (or failed).
    Done(CliResult<Report>),
    /// Ctrl-C, SIGTERM or a closed stdout; the report, if the agent sent one in time.
    Interrupted(Option<Report>, Stop),
}

/// What stopped a run before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Ctrl-C or SIGTERM.
    Signal,
    /// The reader closed stdout: nobody is left to read the results.
    ClosedStdout,
}

/// Resolves when the run should stop early, saying why.
async fn stop_requested() -> Stop {
    tokio::select! {
        () = interrupted() => Stop::Signal,
        () = output::closed() => Stop::ClosedStdout,
    }
}

async fn check(args: &CheckArgs, env: &dyn Env) -> CliResult<ExitStatus> {
    let modal = modal_config_for(args.sandbox.sandbox, env)?;
    let plan = CheckPlan::from_args(args, env, modal.is_some())?;
    let run_id = uuid::Uuid::new_v4().to_string();
    let backend = plan.open_backend(modal, &run_id, None)?;
    let mut renderer = Renderer::new(plan.output);
    renderer.note(&format!(
        "sandbox: {} ({})",
        backend.kind(),
        plan.backend.reason
    ));
    if plan.is_fleet() {
        renderer.note(&format!(
            "checking {} sandboxes, up to {} at once",
            plan.count, plan.parallel
        ));
        drop(renderer);
        return fleet::check_fleet(backend.as_ref(), &plan, &run_id).await;
    }

    let ended = {
        let mut work = Box::pin(check_in(backend.as_ref(), &plan, &mut renderer, &run_id));
        tokio::select! {
            result = &mut work => Ended::Done(result),
            stop = stop_requested() => match backend.interrupt() {
                Interrupt::AwaitReports(grace) => tokio::select! {
                    result = tokio::time::timeout(grace, &mut work) => {
                        Ended::Interrupted(result.ok().and_then(Result::ok), stop)
                    }
                    // A second Ctrl-C stops waiting.
                    () = interrupted() => Ended::Interrupted(None, stop),
                },
                Interrupt::Abandon => Ended::Interrupted(None, stop),
            },
        }
    };
    // The work is gone (dropped mid-flight on Ctrl-C); what it created, the backend knows.
    let budget = match ended {
        Ended::Interrupted(..) => INTERRUPTED_CLEANUP_BUDGET,
        Ended::Done(_) => CLEANUP_BUDGET,
    };
    let released = backend.release(budget).await;
    show_released(&mut renderer, released, budget);

    match ended {
        Ended::Done(Ok(report)) => {
            finish(&plan, &mut renderer, &report)?;
            if render::report_failed(&report) {
                return Ok(ExitStatus::CheckFailed);
            }
            // Not a failure (exit 0), but not a bare success either: say what went unchecked.
            // The node is on the tailnet if the agent logged in, or a sidecar's node was checked.
            if !plan.has_targets() {
                renderer.block(&render::unchecked_guidance(report.tailnet.is_some(), false));
            }
            Ok(ExitStatus::Passed)
        }
        Ended::Done(Err(err)) => {
            renderer.clear();
            Err(err)
        }
        Ended::Interrupted(report, Stop::ClosedStdout) => {
            // Quietly: the reader chose to stop reading. `--report` is still written.
            if let Some(mut report) = report {
                render::mark_interrupted(&mut report);
                finish(&plan, &mut renderer, &report)?;
            }
            renderer.clear();
            Ok(ExitStatus::ClosedStdout)
        }
        Ended::Interrupted(report, Stop::Signal) => {
            let mut err = CliError::interrupted();
            if let Some(mut report) = report {
                render::mark_interrupted(&mut report);
                let logged_out = report.teardown.as_ref().is_some_and(|t| t.logged_out);
                finish(&plan, &mut renderer, &report)?;
                err = err.with_detail(if logged_out {
                    "the agent stopped its run and logged the node out of the tailnet"
                } else {
                    "the agent stopped its run"
                });
            } else {
                renderer.clear();
            }
            Err(err)
        }
    }
}

/// One sandbox, from opening it to the agent's report.
async fn check_in(
    backend: &dyn Backend,
    plan: &CheckPlan,
    renderer: &mut dyn Shows,
    run_id: &str,
) -> CliResult<Report> {
    let (sandbox, installed, lead) = open_and_install(backend, plan, renderer).await?;
    let deadline = tokio::time::Instant::now() + plan.timeout + TEARDOWN_ALLOWANCE;

    // A sidecar already keeps this sandbox on the tailnet: check over its node rather than
    // start a second tailscaled. Only an existing sandbox can have one.
    let may_have_sidecar = !sandbox.remote() || plan.sandbox_id.is_some();
    if plan.use_sidecar
        && may_have_sidecar
        && let Some(attached) = sidecar::attach(sandbox.as_ref(), &plan.state_dir, renderer).await?
    {
        if let Some(note) = &attached.other_build {
            renderer.note(note);
        }
        let mut session = attached.session;
        let mut client = session.sidecar();
        let status = session
            .call("Status", client.status(StatusRequest {}), deadline)
            .await?;
        drop(client);
        let usable = [SidecarState::Running, SidecarState::Degraded]
            .iter()
            .any(|s| *s as i32 == status.state);
        if !usable {
            session.close().await;
            let addressing = if sandbox.remote() {
                format!("--sandbox-id {}", sandbox.id())
            } else {
                format!("--sandbox local --state-dir {}", plan.state_dir)
            };
            return Err(CliError::infra(format!(
                "The sidecar in {} is {}, so its node cannot be checked",
                plan.state_dir,
                describe::state_name(status.state)
            ))
            .with_hint(format!(
                "Bring it up with `tailbox up {addressing}`, or check with a one-shot agent: `tailbox check --no-sidecar`."
            )));
        }
        renderer.note(&format!(
            "checking over the sidecar's node {} ({})",
            status.hostname,
            status.tailnet_ips.join(", ")
        ));
        let outcome = session
            .check(plan.check_request(run_id), renderer, deadline)
            .await?;
        let mut report = outcome.report;
        report.sandbox = Some(sandbox.info());
        report.phases.splice(0..0, lead);
        return Ok(report);
    }

    let agent = sandbox
        .exec_agent(&["serve", "--stdio", "--log", agent_log_filter(plan)])
        .await?;
    let mut request =
        plan.run_request(run_id, sandbox.id(), installed.pushed_tailscaled.as_deref());
    if let Some(tailnet) = request.tailnet.as_mut()
        && tailnet.hostname.is_empty()
        && let Some(hostname) = sandbox.default_hostname()
    {
        tailnet.hostname = hostname;
    }
    let outcome = session::run(agent, request, renderer, deadline).await?;
    let mut report = outcome.report;
    report.sandbox = Some(sandbox.info());
    report.phases.splice(0..0, lead);
    Ok(report)
}

/// Opens the plan's sandbox (creating one, or attaching to `--sandbox-id`) within `--timeout`
/// and puts the agent in it, showing both phases; their timings lead the report's phases.
async fn open_and_install(
    backend: &dyn Backend,
    plan: &CheckPlan,
    renderer: &mut dyn Shows,
) -> CliResult<(Box<dyn Sandbox>, Installed, Vec<PhaseTiming>)> {
    let mut timings = Vec::new();
    let mut timed = |phase: Phase, took: Duration| {
        timings.push(PhaseTiming {
            phase: phase as i32,
            status: CheckStatus::Pass as i32,
            duration: Some(tailbox_proto::convert::duration(took)),
        });
        took
    };
    let started = Instant::now();
    renderer.controller_phase_started(Phase::Sandbox)?;
    let mut sandbox = open_sandbox(backend, plan).await?;
    renderer.sandbox_opened(sandbox.id());
    if sandbox.remote() {
        renderer.note(&format!("sandbox {} is running", sandbox.id()));
    }
    let took = timed(Phase::Sandbox, started.elapsed());
    renderer.controller_phase_finished(Phase::Sandbox, CheckStatus::Pass, took)?;

    let installed = if sandbox.remote() {
        let started = Instant::now();
        renderer.controller_phase_started(Phase::Upload)?;
        let installed = sandbox.install().await?;
        let arch = installed
            .arch
            .map(|arch| format!("{arch} sandbox, {arch} agent: "))
            .unwrap_or_default();
        renderer.note(&format!(
            "{arch}uploaded {} bytes{}",
            installed.uploaded_bytes,
            if installed.uploaded_bytes == 0 {
                " (the same binaries were already there)"
            } else {
                ""
            }
        ));
        let took = timed(Phase::Upload, started.elapsed());
        renderer.controller_phase_finished(Phase::Upload, CheckStatus::Pass, took)?;
        installed
    } else {
        sandbox.install().await?
    };
    Ok((sandbox, installed, timings))
}

/// The same, showing nothing (for `status` and `down`).
async fn open_quietly(
    backend: &dyn Backend,
    plan: &CheckPlan,
) -> CliResult<(Box<dyn Sandbox>, Installed)> {
    let mut sandbox = open_sandbox(backend, plan).await?;
    let installed = sandbox.install().await?;
    Ok((sandbox, installed))
}

async fn open_sandbox(backend: &dyn Backend, plan: &CheckPlan) -> CliResult<Box<dyn Sandbox>> {
    Ok(
        tokio::time::timeout(plan.timeout, backend.open(plan.sandbox_id.as_deref()))
            .await
            .map_err(|_| {
                CliError::infra("The sandbox was not ready within `--timeout`").with_hint(
                    "Modal may be slow to pull the image or short of capacity; raise `--timeout`.",
                )
            })??,
    )
}

/// How long cleanup may take after `err` (short after Ctrl-C: the promise is 3 s).
fn cleanup_budget(err: &CliError) -> Duration {
    if err.exit_status() == ExitStatus::Interrupted {
        INTERRUPTED_CLEANUP_BUDGET
    } else {
        CLEANUP_BUDGET
    }
}

/// Tells people what happened to each sandbox at the end.
fn show_released(renderer: &mut Renderer, released: Vec<Released>, budget: Duration) {
    for outcome in released {
        match outcome {
            Released::Terminated(id) => renderer.note(&format!("sandbox {id} terminated")),
            Released::NotOurs(id) => renderer.note(&format!(
                "sandbox {id} was already running, so it is left running; terminate it with `tailbox sandbox terminate {id}`"
            )),
            // On stderr even in JSON mode: this is for the person, not the pipe.
            Released::Kept(id) => eprintln!(
                "kept sandbox {id}: run again in it with `tailbox check --sandbox-id {id}`; terminate it with `tailbox sandbox terminate {id}` (or `tailbox sandbox sweep`)"
            ),
            Released::Failed(id, err) => {
                let warning = CliError::infra(format!("Failed to terminate sandbox {id}"))
                    .with_source(err)
                    .with_hint(format!(
                        "Terminate it with `tailbox sandbox terminate {id}`; Modal also stops it at its timeout."
                    ));
                renderer.clear();
                eprint!("{}", warning.render_warning());
            }
            Released::TimedOut(id) => {
                let id = id.unwrap_or_else(|| "(id unknown)".into());
                let warning = CliError::infra(format!(
                    "Terminating sandbox {id} took longer than {}s",
                    budget.as_secs_f32()
                ))
                .with_hint("Run `tailbox sandbox sweep` to stop leftovers.");
                renderer.clear();
                eprint!("{}", warning.render_warning());
            }
        }
    }
}

/// `tailbox sandbox sweep`: terminates every sandbox tagged created-by=tailbox in the app.
async fn sweep(args: &SweepArgs, env: &dyn Env) -> CliResult<ExitStatus> {
    let client = modal_client(env)?;
    let app_name = env
        .non_empty(env::MODAL_APP_NAME)
        .unwrap_or_else(|| DEFAULT_MODAL_APP.to_owned());
    let Some(app_id) = client.app_lookup(&app_name).await? else {
        eprintln!("no Modal app {app_name:?}, so no sandboxes to sweep");
        return Ok(ExitStatus::Passed);
    };
    let tags = [(CREATED_BY_TAG.0.to_owned(), CREATED_BY_TAG.1.to_owned())];
    let found = client.sandbox_list(&app_id, &tags).await?;
    let mut failed = 0usize;
    for sandbox in &found {
        if !args.dry_run
            && let Err(err) = client.sandbox_terminate(&sandbox.id).await
        {
            // One line per failure as a warning; the summary below is the one error.
            eprint!("{}", CliError::from(err).render_warning());
            failed += 1;
            continue;
        }
        write_stdout(&format!("{}\n", sandbox.id))?;
    }
    let verb = if args.dry_run {
        "would terminate"
    } else {
        "terminated"
    };
    eprintln!(
        "{verb} {} sandbox(es) tagged {}={} in app {app_name:?}",
        found.len() - failed,
        CREATED_BY_TAG.0,
        CREATED_BY_TAG.1
    );
    if failed > 0 {
        return Err(
            CliError::infra(format!("Failed to terminate {failed} sandbox(es)")).with_hint(
                "Run `tailbox sandbox sweep` again; Modal also stops each sandbox at its timeout.",
            ),
        );
    }
    Ok(ExitStatus::Passed)
}

/// `tailbox sandbox terminate <ID>…`.
async fn terminate(ids: &[String], env: &dyn Env) -> CliResult<ExitStatus> {
    let client = modal_client(env)?;
    for id in ids {
        client.sandbox_terminate(id).await?;
        eprintln!("sandbox {id} terminated");
    }
    Ok(ExitStatus::Passed)
}

/// The Modal config, when there is one. A broken one only matters when Modal may be used.
fn modal_config_for(kind: SandboxKind, env: &dyn Env) -> CliResult<Option<config::ModalConfig>> {
    match config::resolve(env) {
        Ok(modal) => Ok(modal),
        Err(_) if kind == SandboxKind::Local => Ok(None),
        Err(err) => Err(err.into()),
    }
}

fn modal_client(env: &dyn Env) -> CliResult<ModalClient> {
    let config = config::resolve(env)?.ok_or_else(|| {
        CliError::usage("Modal is not configured")
            .with_hint("Set `MODAL_TOKEN_ID` and `MODAL_TOKEN_SECRET`, or run `modal token new`.")
    })?;
    Ok(ModalClient::new(config)?)
}

fn agent_log_filter(plan: &CheckPlan) -> &'static str {
    match plan.output {
        OutputMode::Human { verbose: true, .. } => "info,tailbox_agent=debug",
        _ => "warn,tailbox_agent=info",
    }
}

/// Prints the report (last, in JSON mode) and writes `--report`.
fn finish(plan: &CheckPlan, renderer: &mut Renderer, report: &Report) -> CliResult<()> {
    renderer.event(&controller_event(event::Kind::Report(report.clone())))?;
    if let OutputMode::Human { .. } = plan.output {
        write_stdout(&render::report_table(report, render::stdout_width()))?;
    }
    if let Some(path) = &plan.report_path {
        write_report_file(path, report)?;
    }
    show_pictures(plan, std::slice::from_ref(report), None)
}

/// `--timeline` on stderr and `--report-html`, for the reports of one run (one per sandbox;
/// with the aggregate, for a fan-out).
fn show_pictures(
    plan: &CheckPlan,
    reports: &[Report],
    fleet: Option<&tailbox_proto::agent::v1::FleetReport>,
) -> CliResult<()> {
    if plan.timeline {
        let term = console::Term::stderr();
        let width = term
            .is_term()
            .then(|| term.size_checked())
            .flatten()
            .map(|(_rows, cols)| usize::from(cols));
        let waterfall = pictures::waterfall(reports);
        eprint!(
            "\n{}",
            pictures::timeline::render(&waterfall, width, console::colors_enabled_stderr())
        );
    }
    if let Some(path) = &plan.report_html {
        let page = match fleet {
            Some(fleet) => pictures::html::render_fleet(fleet),
            None => pictures::html::render(reports),
        };
        write_text(path, &page, "the HTML report")?;
    }
    Ok(())
}

/// Writes `--report`: a run's report (or a fan-out's aggregate) as pretty JSON.
fn write_report_file(path: &std::path::Path, report: &impl serde::Serialize) -> CliResult<()> {
    let json = serde_json::to_string_pretty(report).map_err(|err| {
        CliError::infra("Failed to encode the report as JSON")
            .with_source(err)
            .with_hint(crate::error::BUG_HINT)
    })?;
    write_text(path, &(json + "\n"), "the report")
}

/// Writes a file the user named; `what` it holds is in the error.
fn write_text(path: &std::path::Path, text: &str, what: &str) -> CliResult<()> {
    std::fs::write(path, text).map_err(|err| {
        CliError::usage(format!("Failed to write {what} to {}", path.display()))
            .with_source(err)
            .with_hint("Check that the directory exists and is writable.")
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!("cannot listen for SIGTERM: {err}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
