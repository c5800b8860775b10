//! Subcommands, from a parsed command line to an exit status.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tailbox_proto::agent::v1::{CheckStatus, Phase, Report, event};

use crate::arch::AgentSet;
use crate::backend::local::LocalSandbox;
use crate::backend::modal::{
    self as modal_backend, CREATED_BY_TAG, ModalSandbox, RUN_TAG, SandboxSpec, TailscaleBinaries,
};
use crate::cli::{CheckArgs, Cli, Command, SandboxCommand, SandboxKind, SweepArgs};
use crate::env::{self, Env};
use crate::error::{CliError, CliResult, ExitStatus};
use crate::modal::client::ModalClient;
use crate::modal::config::{self, ModalConfig};
use crate::output::write_stdout;
use crate::plan::{CheckPlan, DEFAULT_MODAL_APP, OutputMode};
use crate::render::{self, Renderer, controller_event};
use crate::session;

/// Runs a parsed command line.
pub async fn run(cli: Cli, env: &dyn Env) -> CliResult<ExitStatus> {
    match cli.command {
        Command::Check(args) => check(&args, env).await,
        Command::Sandbox(SandboxCommand::Sweep(args)) => sweep(&args, env).await,
        Command::Sandbox(SandboxCommand::Terminate(args)) => terminate(&args.ids, env).await,
    }
}

async fn check(args: &CheckArgs, env: &dyn Env) -> CliResult<ExitStatus> {
    // A broken Modal config only matters when Modal may be used.
    let modal = match config::resolve(env) {
        Ok(modal) => modal,
        Err(_) if args.sandbox == SandboxKind::Local => None,
        Err(err) => return Err(err),
    };
    let plan = CheckPlan::from_args(args, env, modal.is_some())?;
    let mut renderer = Renderer::new(plan.output);
    let kind = match plan.backend.kind {
        SandboxKind::Local => "local",
        _ => "modal",
    };
    renderer.note(&format!("sandbox: {kind} ({})", plan.backend.reason));

    let result = match plan.backend.kind {
        SandboxKind::Local => {
            let agent_pid = AtomicU32::new(0);
            let outcome = {
                let mut work = Box::pin(check_local(&plan, &mut renderer, &agent_pid));
                tokio::select! {
                    result = &mut work => LocalOutcome::Done(result),
                    () = interrupted() => LocalOutcome::Interrupted(
                        stop_local_agent(&agent_pid, &mut work).await,
                    ),
                }
            };
            match outcome {
                LocalOutcome::Done(result) => result,
                LocalOutcome::Interrupted(report) => {
                    let mut err = CliError::interrupted();
                    if let Some(report) = report {
                        let logged_out = report.teardown.as_ref().is_some_and(|t| t.logged_out);
                        finish(&plan, &mut renderer, &report)?;
                        err = err.with_detail(if logged_out {
                            "the agent stopped its run and logged the node out of the tailnet"
                        } else {
                            "the agent stopped its run"
                        });
                    }
                    return Err(err);
                }
            }
        }
        _ => {
            let config = modal.ok_or_else(|| {
                CliError::usage("Modal is not configured")
                    .with_hint("set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or run `modal token new`; or use --sandbox local")
            })?;
            check_modal(&plan, &mut renderer, config).await
        }
    };
    match result {
        Ok(report) => {
            finish(&plan, &mut renderer, &report)?;
            Ok(if render::report_failed(&report) {
                ExitStatus::CheckFailed
            } else {
                ExitStatus::Passed
            })
        }
        Err(err) => {
            renderer.clear();
            Err(err)
        }
    }
}

/// How a local run ended.
enum LocalOutcome {
    /// It ran to the end (or failed).
    Done(CliResult<Report>),
    /// Ctrl-C or SIGTERM; the agent's report, if it managed to send one in time.
    Interrupted(Option<Report>),
}

/// After Ctrl-C: how long the local agent gets to log out, stop tailscaled and report.
const INTERRUPT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the agent to stop (SIGTERM: it cancels the run into its teardown) and waits briefly for
/// its report; a second Ctrl-C stops waiting.
async fn stop_local_agent(
    agent_pid: &AtomicU32,
    work: &mut std::pin::Pin<Box<impl Future<Output = CliResult<Report>>>>,
) -> Option<Report> {
    let pid = agent_pid.load(Ordering::SeqCst);
    let pid = i32::try_from(pid).ok().filter(|p| *p > 0)?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    tokio::select! {
        result = tokio::time::timeout(INTERRUPT_GRACE, work.as_mut()) => result.ok()?.ok(),
        () = interrupted() => None,
    }
}

async fn check_local(
    plan: &CheckPlan,
    renderer: &mut Renderer,
    agent_pid: &AtomicU32,
) -> CliResult<Report> {
    let started = Instant::now();
    renderer.controller_phase_started(Phase::Sandbox)?;
    let sandbox = LocalSandbox::prepare(&plan.agent_paths)?;
    let agent = sandbox.launch_agent(agent_log_filter(plan))?;
    agent_pid.store(agent.pid.unwrap_or(0), Ordering::SeqCst);
    renderer.controller_phase_finished(Phase::Sandbox, CheckStatus::Pass, started.elapsed())?;

    let run_id = uuid::Uuid::new_v4().to_string();
    let mut request = plan.run_request(&run_id, sandbox.id(), None);
    if let Some(tailnet) = request.tailnet.as_mut()
        && tailnet.hostname.is_empty()
    {
        // modal-<id> would be misleading for a local run.
        tailnet.hostname = format!("tailbox-{}", sandbox.id());
    }
    let deadline = tokio::time::Instant::now() + plan.timeout + TEARDOWN_ALLOWANCE;
    let outcome = session::run(agent, request, renderer, deadline).await?;
    let mut report = outcome.report;
    report.sandbox = Some(sandbox.info());
    Ok(report)
}

/// Time beyond --timeout for the agent to log out and stop tailscaled.
const TEARDOWN_ALLOWANCE: Duration = Duration::from_secs(30);
/// Sandbox lifetime beyond --timeout (image pull, upload): Modal reaps the sandbox after it even
/// if tailbox dies without cleaning up.
const SANDBOX_LIFETIME_MARGIN: Duration = Duration::from_secs(10 * 60);
/// Lifetime of a sandbox kept with --keep.
const KEPT_SANDBOX_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// How long cleanup may take after Ctrl-C (the promise is "terminated within 3 s").
const INTERRUPTED_CLEANUP_BUDGET: Duration = Duration::from_millis(2500);
/// How long cleanup may take otherwise.
const CLEANUP_BUDGET: Duration = Duration::from_secs(20);

async fn check_modal(
    plan: &CheckPlan,
    renderer: &mut Renderer,
    config: ModalConfig,
) -> CliResult<Report> {
    // Local problems (a dynamic agent, a bad tarball) are found before anything is created.
    let agents = if plan.agent_paths.is_empty() {
        AgentSet::find_default()?
    } else {
        AgentSet::load(&plan.agent_paths)?
    };
    let tailscale = plan
        .tailscale_tarball
        .as_deref()
        .map(modal_backend::unpack_tailscale_tarball)
        .transpose()?;
    let client = ModalClient::new(config)?;
    let run_id = uuid::Uuid::new_v4().to_string();
    let cleanup = Cleanup::new(client.clone(), plan, &run_id);

    let (result, interrupted) = tokio::select! {
        result = modal_run(plan, renderer, &client, &cleanup, &agents, tailscale.as_ref(), &run_id) => (result, false),
        () = interrupted() => (Err(CliError::interrupted()), true),
    };
    // The work future is gone (dropped mid-flight on Ctrl-C); what it created is in `cleanup`.
    let budget = if interrupted {
        INTERRUPTED_CLEANUP_BUDGET
    } else {
        CLEANUP_BUDGET
    };
    cleanup.finish(renderer, budget).await;
    result
}

async fn modal_run(
    plan: &CheckPlan,
    renderer: &mut Renderer,
    client: &ModalClient,
    cleanup: &Cleanup,
    agents: &AgentSet,
    tailscale: Option<&TailscaleBinaries>,
    run_id: &str,
) -> CliResult<Report> {
    let started = Instant::now();
    renderer.controller_phase_started(Phase::Sandbox)?;
    let prepare = async {
        match &plan.sandbox_id {
            Some(id) => {
                cleanup.set(|s| s.attached = Some(id.clone()));
                ModalSandbox::attach(client, id).await
            }
            None => {
                cleanup.set(|s| s.creating = true);
                ModalSandbox::create(client, &sandbox_spec(plan, run_id), |id| {
                    cleanup.set(|s| s.created = Some(id.to_owned()));
                })
                .await
            }
        }
    };
    let mut sandbox = tokio::time::timeout(plan.timeout, prepare)
        .await
        .map_err(|_| {
            CliError::infra("The sandbox was not ready within --timeout").with_hint(
                "Modal may be slow to pull the image or short of capacity; raise --timeout",
            )
        })??;
    renderer.note(&format!("sandbox {} is running", sandbox.id()));
    renderer.controller_phase_finished(Phase::Sandbox, CheckStatus::Pass, started.elapsed())?;

    let started = Instant::now();
    renderer.controller_phase_started(Phase::Upload)?;
    // The agent (and tailscale) must match the sandbox's CPU: ask it first (see arch.rs).
    let arch = sandbox.arch().await?;
    let agent = agents.for_arch(arch)?;
    renderer.note(&format!(
        "sandbox is {arch}: uploading {}",
        agent.path.display()
    ));
    let agent_in_sandbox = sandbox.push(agent, "tailbox-agent").await?;
    let pushed_tailscaled = match tailscale {
        Some(binaries) => Some(sandbox.push_tailscale(binaries, arch).await?),
        None => None,
    };
    renderer.note(&format!(
        "uploaded {} bytes{}",
        sandbox.uploaded_bytes(),
        if sandbox.uploaded_bytes() == 0 {
            " (the same binaries were already there)"
        } else {
            ""
        }
    ));
    renderer.controller_phase_finished(Phase::Upload, CheckStatus::Pass, started.elapsed())?;

    let process = sandbox
        .launch_agent(&agent_in_sandbox, &agent.sha256, agent_log_filter(plan))
        .await?;
    let request = plan.run_request(run_id, sandbox.id(), pushed_tailscaled.as_deref());
    let deadline = tokio::time::Instant::now() + plan.timeout + TEARDOWN_ALLOWANCE;
    let outcome = session::run(process, request, renderer, deadline).await?;
    let mut report = outcome.report;
    report.sandbox = Some(sandbox.info(cleanup.keeps(sandbox.id())));
    Ok(report)
}

fn sandbox_spec(plan: &CheckPlan, run_id: &str) -> SandboxSpec {
    let lifetime = if plan.keep {
        KEPT_SANDBOX_LIFETIME.max(plan.timeout + SANDBOX_LIFETIME_MARGIN)
    } else {
        plan.timeout + SANDBOX_LIFETIME_MARGIN
    };
    SandboxSpec {
        app_name: plan.modal_app.clone(),
        image: plan.modal_image.clone(),
        timeout: lifetime,
        tags: vec![
            (CREATED_BY_TAG.0.to_owned(), CREATED_BY_TAG.1.to_owned()),
            (RUN_TAG.to_owned(), run_id.to_owned()),
        ],
        env: HashMap::from([
            ("HOME".to_owned(), "/root".to_owned()),
            ("TERM".to_owned(), "xterm-256color".to_owned()),
        ]),
    }
}

/// What a Modal run left behind, recorded as it happens so that cleanup works even when the
/// run was dropped mid-flight (Ctrl-C).
struct Cleanup {
    client: ModalClient,
    keep: bool,
    app_name: String,
    run_id: String,
    state: Mutex<CleanupState>,
}

#[derive(Default, Clone)]
struct CleanupState {
    /// A create was sent: a sandbox may exist even if its id never came back.
    creating: bool,
    /// The sandbox this run created.
    created: Option<String>,
    /// The existing sandbox this run attached to (never terminated: it is not ours).
    attached: Option<String>,
}

impl Cleanup {
    fn new(client: ModalClient, plan: &CheckPlan, run_id: &str) -> Self {
        Self {
            client,
            keep: plan.keep,
            app_name: plan.modal_app.clone(),
            run_id: run_id.to_owned(),
            state: Mutex::new(CleanupState::default()),
        }
    }

    fn set(&self, change: impl FnOnce(&mut CleanupState)) {
        match self.state.lock() {
            Ok(mut state) => change(&mut state),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }

    fn snapshot(&self) -> CleanupState {
        match self.state.lock() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether `sandbox_id` stays running after this run.
    fn keeps(&self, sandbox_id: &str) -> bool {
        self.keep || self.snapshot().attached.as_deref() == Some(sandbox_id)
    }

    /// Terminates what this run created (or says how to reach what it keeps), within `budget`.
    async fn finish(&self, renderer: &mut Renderer, budget: Duration) {
        let state = self.snapshot();
        if let Some(id) = &state.attached {
            renderer.note(&format!(
                "sandbox {id} was already running, so it is left running; terminate it with `tailbox sandbox terminate {id}`"
            ));
            return;
        }
        let work = async {
            let ids = match (&state.created, state.creating) {
                (Some(id), _) => vec![id.clone()],
                // Interrupted while the create was in flight: find it by this run's tag.
                (None, true) => self.find_by_run_tag().await,
                (None, false) => Vec::new(),
            };
            for id in ids {
                if self.keep {
                    // On stderr even in JSON mode: this is for the person, not the pipe.
                    eprintln!(
                        "kept sandbox {id}: run again in it with `tailbox check --sandbox-id {id}`; terminate it with `tailbox sandbox terminate {id}` (or `tailbox sandbox sweep`)"
                    );
                    continue;
                }
                match self.client.sandbox_terminate(&id).await {
                    Ok(_) => renderer.note(&format!("sandbox {id} terminated")),
                    Err(err) => eprintln!(
                        "warning: could not terminate sandbox {id}: {}\n  terminate it with `tailbox sandbox terminate {id}`; Modal also stops it at its timeout",
                        err.message
                    ),
                }
            }
        };
        if tokio::time::timeout(budget, work).await.is_err() {
            let id = state.created.unwrap_or_else(|| "(unknown id)".into());
            eprintln!(
                "warning: terminating sandbox {id} took longer than {}s; run `tailbox sandbox sweep` to stop leftovers",
                budget.as_secs_f32()
            );
        }
    }

    async fn find_by_run_tag(&self) -> Vec<String> {
        let Ok(Some(app_id)) = self.client.app_lookup(&self.app_name).await else {
            return Vec::new();
        };
        let tags = [(RUN_TAG.to_owned(), self.run_id.clone())];
        match self.client.sandbox_list(&app_id, &tags).await {
            Ok(found) => found.into_iter().map(|s| s.id).collect(),
            Err(err) => {
                tracing::warn!("listing this run's sandboxes failed: {}", err.message);
                Vec::new()
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
            eprintln!("{}", err.render());
            failed += 1;
            continue;
        }
        write_stdout(&format!("{}\n", sandbox.id)).map_err(|err| {
            CliError::infra("Failed to write the results to stdout").with_source(err)
        })?;
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
        return Err(CliError::infra(format!(
            "Failed to terminate {failed} sandbox(es)"
        )));
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

fn modal_client(env: &dyn Env) -> CliResult<ModalClient> {
    let config = config::resolve(env)?.ok_or_else(|| {
        CliError::usage("Modal is not configured")
            .with_hint("set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or run `modal token new`")
    })?;
    ModalClient::new(config)
}

fn agent_log_filter(plan: &CheckPlan) -> &'static str {
    match plan.output {
        OutputMode::Human { verbose: true, .. } => "info,tailbox_agent=debug",
        _ => "warn,tailbox_agent=info",
    }
}

/// Prints the report (last, in JSON mode) and writes --report.
fn finish(plan: &CheckPlan, renderer: &mut Renderer, report: &Report) -> CliResult<()> {
    match plan.output {
        OutputMode::Json { .. } => {
            renderer.event(&controller_event(event::Kind::Report(report.clone())))?
        }
        OutputMode::Human { .. } => {
            renderer.event(&controller_event(event::Kind::Report(report.clone())))?;
            write_stdout(&render::report_table(report)).map_err(|err| {
                CliError::infra("Failed to write the results to stdout").with_source(err)
            })?;
        }
    }
    if let Some(path) = &plan.report_path {
        let json = serde_json::to_string_pretty(report).map_err(|err| {
            CliError::infra("Failed to encode the report as JSON").with_source(err)
        })?;
        std::fs::write(path, json + "\n").map_err(|err| {
            CliError::usage(format!("Failed to write the report to {}", path.display()))
                .with_source(err)
                .with_hint("check that the directory exists and is writable")
        })?;
    }
    Ok(())
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
