//! Subcommands, from a parsed command line to an exit status.

use std::time::Instant;

use tailbox_proto::agent::v1::{CheckStatus, Phase, Report, event};

use crate::backend::local::LocalSandbox;
use crate::cli::{CheckArgs, Cli, Command, SandboxCommand, SandboxKind};
use crate::env::Env;
use crate::error::{CliError, CliResult, ExitStatus};
use crate::output::write_stdout;
use crate::plan::{CheckPlan, OutputMode};
use crate::render::{self, Renderer, controller_event};
use crate::session;

/// Runs a parsed command line.
pub async fn run(cli: Cli, env: &dyn Env) -> CliResult<ExitStatus> {
    match cli.command {
        Command::Check(args) => check(&args, env).await,
        Command::Sandbox(SandboxCommand::Sweep(_)) => Err(CliError::usage(
            "`tailbox sandbox sweep` needs the Modal backend, which this build does not have yet",
        )),
    }
}

async fn check(args: &CheckArgs, env: &dyn Env) -> CliResult<ExitStatus> {
    let plan = CheckPlan::from_args(args, env, false)?;
    let mut renderer = Renderer::new(plan.output);
    let kind = match plan.backend.kind {
        SandboxKind::Local => "local",
        _ => "modal",
    };
    renderer.note(&format!("sandbox: {kind} ({})", plan.backend.reason));

    let result = tokio::select! {
        result = check_with_backend(&plan, &mut renderer) => result,
        () = interrupted() => Err(CliError::interrupted()),
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

async fn check_with_backend(plan: &CheckPlan, renderer: &mut Renderer) -> CliResult<Report> {
    match plan.backend.kind {
        SandboxKind::Local => check_local(plan, renderer).await,
        _ => Err(
            CliError::usage("the Modal backend is not available in this build yet")
                .with_hint("run with --sandbox local"),
        ),
    }
}

async fn check_local(plan: &CheckPlan, renderer: &mut Renderer) -> CliResult<Report> {
    let started = Instant::now();
    renderer.controller_phase_started(Phase::Sandbox)?;
    let sandbox = LocalSandbox::prepare(plan.agent_path.as_deref())?;
    let agent = sandbox.launch_agent(agent_log_filter(plan))?;
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
const TEARDOWN_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(30);

fn agent_log_filter(plan: &CheckPlan) -> &'static str {
    match plan.output {
        OutputMode::Human { verbose: true, .. } => "info,tailbox_agent=debug",
        _ => "warn,tailbox_agent=info",
    }
}

/// Prints the report (last, in JSON mode) and writes --report.
fn finish(plan: &CheckPlan, renderer: &mut Renderer, report: &Report) -> CliResult<()> {
    match plan.output {
        OutputMode::Json => {
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
