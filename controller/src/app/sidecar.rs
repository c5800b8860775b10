//! `tailbox up`, `status` and `down`: the agent's long-lived sidecar in a sandbox, and `check`
//! over it. The sidecar is started by one exec (`tailbox-agent sidecar`, which detaches and
//! returns) and reached by later ones (`tailbox-agent attach`, which bridges the exec's stdio to
//! its socket), with the same session code as a one-shot run.

use std::collections::BTreeMap;
use std::time::Duration;

use tailbox_proto::agent::v1::{
    CheckStatus, DownRequest, EnvRequest, HelloResponse, Phase, SandboxInfo, ServeMode,
    SidecarState, SidecarStatus, StatusRequest, UpRequest, event,
};
use tailbox_proto::describe::{human_status, state_name};
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

use super::{interrupted, show_released};
use crate::backend::{Backend, ProcessExit, Released, Sandbox};
use crate::cli::{DownArgs, StatusArgs, UpArgs};
use crate::env::Env;
use crate::error::{CliError, CliResult, ExitStatus};
use crate::modal::config;
use crate::output::{write_json_line, write_stdout};
use crate::plan::{CheckPlan, OutputMode};
use crate::render::{Renderer, Shows};
use crate::session::{Observer, Session, controller_event};

/// `tailbox-agent`'s exit code when no sidecar answers in the state directory.
const AGENT_EXIT_NO_SIDECAR: i32 = 3;
/// `tailbox-agent`'s exit code when a sidecar of another version holds the state directory.
const AGENT_EXIT_OTHER_SIDECAR: i32 = 4;
/// The feature a sidecar announces in its handshake.
const SIDECAR_FEATURE: &str = "sidecar";
/// How long `status` and `down` may take to reach the sidecar and hear back.
const CALL_BUDGET: Duration = Duration::from_secs(60);
/// How long the sidecar may take to serve once started.
const SIDECAR_START_TIMEOUT: &str = "20s";

/// A session with a running sidecar, and how its build compares with ours.
pub struct Attached {
    /// The open session.
    pub session: Session,
    /// Set when the sidecar runs another build than the agent this tailbox installed.
    pub other_build: Option<String>,
}

/// Reaches the sidecar in `state_dir` through a new `attach` exec. `None` when no sidecar runs
/// there. A sidecar of another build is used (fields are only ever added to the contract) and
/// reported; one that lacks the sidecar contract altogether is refused.
pub async fn attach(
    sandbox: &dyn Sandbox,
    state_dir: &str,
    observer: &mut dyn Observer,
) -> CliResult<Option<Attached>> {
    let mut agent = sandbox
        .exec_agent(&["attach", "--state-dir", state_dir])
        .await?;
    // The sidecar answers the handshake with its own sha256, which may be another build's.
    let ours = agent.expected_sha256.take();
    let session = match Session::open(agent, observer).await {
        Ok(session) => session,
        Err(err) if err.exit == Some(ProcessExit::Code(AGENT_EXIT_NO_SIDECAR)) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    require_sidecar(session.hello(), state_dir)?;
    let other_build = ours
        .filter(|ours| !ours.is_empty() && *ours != session.hello().agent_sha256)
        .map(|ours| {
            let hello = session.hello();
            format!(
                "the sidecar runs tailbox-agent {} (sha256 {}, proto {}), not the agent this tailbox installed (sha256 {}); it is used as it is (`tailbox up --replace` switches it)",
                hello.agent_version,
                short(&hello.agent_sha256),
                hello.proto_version,
                short(&ours)
            )
        });
    Ok(Some(Attached {
        session,
        other_build,
    }))
}

/// Refuses an agent that answered `attach` without being a sidecar (a build from before the
/// sidecar existed cannot serve `Up`, `Status` or `Check`).
fn require_sidecar(hello: &HelloResponse, state_dir: &str) -> CliResult<()> {
    let is_sidecar = hello.serve_mode == ServeMode::Sidecar as i32
        && hello.features.iter().any(|f| f == SIDECAR_FEATURE);
    if is_sidecar {
        return Ok(());
    }
    Err(CliError::infra(format!(
        "The agent answering in {state_dir} (version {}) does not serve the sidecar contract",
        hello.agent_version
    ))
    .with_hint("Run `tailbox up --replace` to start a sidecar of this build in its place."))
}

/// `tailbox up`.
pub async fn up(args: &UpArgs, env: &dyn Env) -> CliResult<ExitStatus> {
    let output = OutputMode::from_flags(args.json, args.verbose, false);
    let (plan, modal) = plan_for(
        &args.sandbox,
        Some(&args.tailnet),
        output,
        args.timeout,
        env,
    )?;
    let mut plan = plan;
    plan.keep = args.keep;
    if plan.auth_key.is_none() {
        return Err(
            CliError::usage("`tailbox up` needs a Tailscale auth key").with_hint(
                "Set `TS_AUTHKEY` (an ephemeral, pre-authorized key) or pass `--auth-key-file PATH`.",
            ),
        );
    }
    let run_id = uuid::Uuid::new_v4().to_string();
    let backend = plan.open_backend(modal, &run_id, Some(args.lifetime))?;
    let mut renderer = Renderer::new(plan.output);
    renderer.note(&format!(
        "sandbox: {} ({})",
        backend.kind(),
        plan.backend.reason
    ));

    let result = {
        let work = up_in(backend.as_ref(), &plan, args.replace, &mut renderer);
        tokio::select! {
            result = work => result,
            () = interrupted() => Err(CliError::interrupted()),
        }
    };
    match result {
        Ok(summary) => {
            renderer.clear();
            let running = summary.status.state == SidecarState::Running as i32;
            if args.json {
                write_json_line("the sidecar's summary", &summary.json())?;
            } else {
                write_stdout(&summary.human())?;
            }
            Ok(if running {
                ExitStatus::Passed
            } else {
                ExitStatus::CheckFailed
            })
        }
        Err(err) => {
            // A failed `up` leaves nothing behind that it created (unless --keep).
            let released = backend.release(super::cleanup_budget(&err)).await;
            show_released(&mut renderer, released, super::cleanup_budget(&err));
            renderer.clear();
            Err(err)
        }
    }
}

/// What `up` did, for people and for tools.
struct UpSummary {
    sandbox: SandboxInfo,
    state_dir: String,
    status: SidecarStatus,
    already_up: bool,
    env: BTreeMap<String, String>,
    other_build: Option<String>,
    remote: bool,
}

impl UpSummary {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "sandbox_id": self.sandbox.sandbox_id,
            "backend": self.sandbox.backend,
            "state_dir": self.state_dir,
            "state": state_name(self.status.state),
            "hostname": self.status.hostname,
            "dns_name": self.status.dns_name,
            "tailnet_ips": self.status.tailnet_ips,
            "proxy_url": self.status.proxy_url,
            "http_proxy_url": self.status.http_proxy_url,
            "env": self.env,
            "already_up": self.already_up,
            "other_build": self.other_build,
            "status": self.status,
        })
    }

    fn human(&self) -> String {
        let id = &self.sandbox.sandbox_id;
        let running = self.status.state == SidecarState::Running as i32;
        let mut text = if running {
            format!(
                "sidecar {} in sandbox {id}: {} as {} ({})\n",
                if self.already_up {
                    "was already up"
                } else {
                    "is up"
                },
                state_name(self.status.state),
                self.status.hostname,
                self.status.tailnet_ips.join(", "),
            )
        } else {
            format!(
                "sidecar in sandbox {id} is {}: {}\n",
                state_name(self.status.state),
                if self.status.last_error.is_empty() {
                    "the node did not come up"
                } else {
                    &self.status.last_error
                }
            )
        };
        if let Some(note) = &self.other_build {
            text.push_str(&format!("note: {note}\n"));
        }
        if running {
            let addressing = if self.remote {
                format!("--sandbox-id {id}")
            } else {
                format!("--sandbox local --state-dir {}", self.state_dir)
            };
            text.push_str(&format!(
                "proxy: {} (HTTP: {})\n\
                 Programs in the sandbox reach the tailnet with these variables \
                 (or `eval \"$(tailbox-agent env --state-dir {})\"` there):\n",
                self.status.proxy_url, self.status.http_proxy_url, self.state_dir
            ));
            for (name, value) in &self.env {
                text.push_str(&format!("  export {name}={value}\n"));
            }
            text.push_str(&format!(
                "next: `tailbox check {addressing} --ping …`, `tailbox status {addressing}`, `tailbox down {addressing}`\n"
            ));
        }
        text
    }
}

/// One sandbox: open it, install the agent, start the sidecar, bring the node up.
async fn up_in(
    backend: &dyn Backend,
    plan: &CheckPlan,
    replace: bool,
    renderer: &mut Renderer,
) -> CliResult<UpSummary> {
    let deadline = Instant::now() + plan.timeout;
    let (mut sandbox, installed, _timings) =
        super::open_and_install(backend, plan, renderer).await?;

    let started = std::time::Instant::now();
    renderer.controller_phase_started(Phase::Daemon)?;
    start_sidecar(sandbox.as_mut(), &plan.state_dir, replace, plan).await?;
    let Some(Attached {
        mut session,
        other_build,
    }) = attach(sandbox.as_ref(), &plan.state_dir, renderer).await?
    else {
        return Err(CliError::infra(format!(
            "The sidecar started in {} but does not answer",
            plan.state_dir
        ))
        .with_hint("Its log is sidecar.log in that directory; run `tailbox up` again."));
    };
    if let Some(note) = &other_build {
        renderer.note(note);
    }
    renderer.controller_phase_finished(Phase::Daemon, CheckStatus::Pass, started.elapsed())?;

    let started = std::time::Instant::now();
    renderer.controller_phase_started(Phase::Login)?;
    let mut tailnet = plan.tailnet_config(installed.pushed_tailscaled.as_deref());
    if let Some(tailnet) = tailnet.as_mut()
        && tailnet.hostname.is_empty()
        && let Some(hostname) = sandbox.default_hostname()
    {
        tailnet.hostname = hostname;
    }
    let mut client = session.sidecar();
    let up = session
        .call(
            "Up",
            client.up(UpRequest {
                tailnet,
                sandbox_id: sandbox.id().to_owned(),
                deadlines: Some(plan.deadlines),
            }),
            deadline,
        )
        .await?;
    for check in &up.checks {
        renderer.event(&controller_event(event::Kind::Check(check.clone())))?;
    }
    let status = up.status.unwrap_or_default();
    let running = status.state == SidecarState::Running as i32;
    renderer.controller_phase_finished(
        Phase::Login,
        if running {
            CheckStatus::Pass
        } else {
            CheckStatus::Fail
        },
        started.elapsed(),
    )?;
    let env = if running {
        session
            .call("Env", client.env(EnvRequest {}), deadline)
            .await?
            .vars
            .into_iter()
            .collect()
    } else {
        // The node is not up, so taking the idle sidecar down loses nothing.
        let _ = session
            .call(
                "Down",
                client.down(DownRequest {
                    grace: Some(tailbox_proto::convert::duration(Duration::from_secs(5))),
                }),
                deadline,
            )
            .await;
        BTreeMap::new()
    };
    drop(client);
    session.close().await;
    Ok(UpSummary {
        sandbox: sandbox.info(),
        state_dir: plan.state_dir.clone(),
        status,
        already_up: up.already_up,
        env,
        other_build,
        remote: sandbox.remote(),
    })
}

/// Runs `tailbox-agent sidecar` in the sandbox: it starts the sidecar detached (or finds the
/// running one) and returns once it serves.
async fn start_sidecar(
    sandbox: &mut dyn Sandbox,
    state_dir: &str,
    replace: bool,
    plan: &CheckPlan,
) -> CliResult<()> {
    let mut argv = vec![
        "sidecar",
        "--state-dir",
        state_dir,
        "--timeout",
        SIDECAR_START_TIMEOUT,
        "--log",
        super::agent_log_filter(plan),
    ];
    if replace {
        argv.push("--replace");
    }
    let agent = sandbox.exec_agent(&argv).await?;
    // Nothing is spoken on its stdio; its notes and errors are on stderr.
    drop(agent.io);
    let mut stderr = String::new();
    let mut reader = agent.stderr;
    let (read, exit) = tokio::join!(reader.read_to_string(&mut stderr), agent.exit);
    if let Err(err) = read {
        tracing::debug!("reading the sidecar starter's stderr: {err}");
    }
    let stderr = tailbox_proto::redact::redact_urls(stderr.trim_end());
    match exit {
        ProcessExit::Code(0) => Ok(()),
        ProcessExit::Code(AGENT_EXIT_OTHER_SIDECAR) => Err(CliError::infra(format!(
            "A sidecar of another version already runs in {state_dir}"
        ))
        .with_detail(stderr)
        .with_hint(
            "Run `tailbox up --replace` to take it down (its node logs out) and start this build's.",
        )),
        other => Err(CliError::infra(format!(
            "Failed to start the sidecar in {state_dir} ({other})"
        ))
        .with_detail(stderr)
        .with_hint("The sidecar's own log is sidecar.log in its state directory.")),
    }
}

/// `tailbox status`.
pub async fn status(args: &StatusArgs, env: &dyn Env) -> CliResult<ExitStatus> {
    let output = OutputMode::Json { verbose: false };
    let (plan, modal) = plan_for(&args.sandbox, None, output, CALL_BUDGET, env)?;
    let backend = plan.open_backend(modal, &uuid::Uuid::new_v4().to_string(), None)?;
    let deadline = Instant::now() + CALL_BUDGET;
    let work = async {
        let (sandbox, _) = super::open_quietly(backend.as_ref(), &plan).await?;
        let Some(Attached {
            mut session,
            other_build,
        }) = attach(sandbox.as_ref(), &plan.state_dir, &mut Quiet).await?
        else {
            return Err(no_sidecar(&plan, sandbox.as_ref()));
        };
        let mut client = session.sidecar();
        let status = session
            .call("Status", client.status(StatusRequest {}), deadline)
            .await?;
        drop(client);
        session.close().await;
        Ok((sandbox.info(), status, other_build))
    };
    let result = tokio::select! {
        result = work => result,
        () = interrupted() => Err(CliError::interrupted()),
    };
    let released = backend.release(super::CLEANUP_BUDGET).await;
    show_released(&mut Renderer::new(output), released, super::CLEANUP_BUDGET);
    let (sandbox, status, other_build) = result?;
    if args.json {
        write_json_line(
            "the sidecar's status",
            &serde_json::json!({
                "sandbox_id": sandbox.sandbox_id,
                "backend": sandbox.backend,
                "state": state_name(status.state),
                "other_build": other_build,
                "status": status,
            }),
        )?;
    } else {
        let mut text = format!("{:<14} {}\n", "sandbox", sandbox.sandbox_id);
        text.push_str(&human_status(&status));
        if let Some(note) = other_build {
            text.push_str(&format!("note: {note}\n"));
        }
        write_stdout(&text)?;
    }
    Ok(if status.state == SidecarState::Running as i32 {
        ExitStatus::Passed
    } else {
        ExitStatus::CheckFailed
    })
}

/// `tailbox down`.
pub async fn down(args: &DownArgs, env: &dyn Env) -> CliResult<ExitStatus> {
    let output = OutputMode::Json { verbose: false };
    let (plan, modal) = plan_for(&args.sandbox, None, output, CALL_BUDGET, env)?;
    let backend = plan.open_backend(modal, &uuid::Uuid::new_v4().to_string(), None)?;
    let deadline = Instant::now() + CALL_BUDGET + args.grace;
    let work = async {
        let (sandbox, _) = super::open_quietly(backend.as_ref(), &plan).await?;
        let teardown = match attach(sandbox.as_ref(), &plan.state_dir, &mut Quiet).await? {
            Some(Attached { mut session, .. }) => {
                let mut client = session.sidecar();
                let down = session
                    .call(
                        "Down",
                        client.down(DownRequest {
                            grace: Some(tailbox_proto::convert::duration(args.grace)),
                        }),
                        deadline,
                    )
                    .await?;
                drop(client);
                session.close().await;
                Some(down.teardown.unwrap_or_default())
            }
            None => None,
        };
        Ok::<_, CliError>((sandbox.info(), teardown))
    };
    let result = tokio::select! {
        result = work => result,
        () = interrupted() => Err(CliError::interrupted()),
    };
    let (sandbox, teardown) = match result {
        Ok(done) => done,
        Err(err) => {
            let released = backend.release(super::cleanup_budget(&err)).await;
            show_released(
                &mut Renderer::new(output),
                released,
                super::cleanup_budget(&err),
            );
            return Err(err);
        }
    };
    // The sidecar is gone; a sandbox tailbox created goes too, unless kept.
    let terminated = if args.keep {
        None
    } else {
        backend.terminate_created(&sandbox.sandbox_id).await
    };
    let mut failed_terminate = None;
    let sandbox_outcome = match &terminated {
        None if args.keep && sandbox.backend != "local" => "kept",
        None => "none",
        Some(Released::Terminated(_)) => "terminated",
        Some(Released::NotOurs(_)) => "not created by tailbox; left running",
        Some(Released::Failed(id, _)) | Some(Released::TimedOut(Some(id))) => {
            failed_terminate = Some(id.clone());
            "terminate failed"
        }
        Some(_) => "terminate failed",
    };
    let logged_out = teardown.as_ref().is_some_and(|t| t.logged_out);
    if args.json {
        write_json_line(
            "the outcome of `down`",
            &serde_json::json!({
                "sandbox_id": sandbox.sandbox_id,
                "backend": sandbox.backend,
                "sidecar_was_running": teardown.is_some(),
                "logged_out": logged_out,
                "teardown": teardown,
                "sandbox": sandbox_outcome,
            }),
        )?;
    } else {
        let sidecar = match &teardown {
            None => format!("no sidecar ran in {}", plan.state_dir),
            Some(t) if t.logged_out => "the node logged out and the sidecar stopped".to_owned(),
            Some(t) if !t.logout_attempted => {
                "the sidecar stopped (its node was not logged in)".to_owned()
            }
            Some(t) => format!(
                "the sidecar stopped; the node did not log out{}",
                if t.logout_error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", t.logout_error)
                }
            ),
        };
        write_stdout(&format!(
            "sandbox {}: {sidecar}; sandbox {sandbox_outcome}\n",
            sandbox.sandbox_id
        ))?;
    }
    if let Some(id) = failed_terminate {
        return Err(CliError::infra(format!("Failed to terminate sandbox {id}"))
            .with_hint(format!(
                "Terminate it with `tailbox sandbox terminate {id}`; Modal also stops it at its lifetime."
            )));
    }
    Ok(match teardown {
        Some(t) if t.logout_attempted && !t.logged_out => ExitStatus::CheckFailed,
        _ => ExitStatus::Passed,
    })
}

/// The error when `status` finds no sidecar.
fn no_sidecar(plan: &CheckPlan, sandbox: &dyn Sandbox) -> CliError {
    let addressing = if sandbox.remote() {
        format!("--sandbox-id {}", sandbox.id())
    } else {
        format!("--sandbox local --state-dir {}", plan.state_dir)
    };
    CliError::infra(format!(
        "No sidecar runs in {} in sandbox {}",
        plan.state_dir,
        sandbox.id()
    ))
    .with_hint(format!("Start one with `tailbox up {addressing}`."))
}

/// The plan for a sidecar command, and the Modal config when Modal may be used.
fn plan_for(
    sandbox: &crate::cli::SandboxArgs,
    tailnet: Option<&crate::cli::TailnetArgs>,
    output: OutputMode,
    timeout: Duration,
    env: &dyn Env,
) -> CliResult<(CheckPlan, Option<config::ModalConfig>)> {
    let modal = super::modal_config_for(sandbox.sandbox, env)?;
    if sandbox.sandbox_id.len() > 1 {
        return Err(CliError::usage("`--sandbox-id` was given more than once")
            .with_hint("Name one sandbox here; only `tailbox check` takes several."));
    }
    if sandbox.sandbox_id.is_empty()
        && tailnet.is_none()
        && (sandbox.sandbox == crate::cli::SandboxKind::Modal
            || (sandbox.sandbox == crate::cli::SandboxKind::Auto && modal.is_some()))
    {
        return Err(
            CliError::usage("Which Modal sandbox? `--sandbox-id` is needed here").with_hint(
                "Pass the id `tailbox up` printed (`--sandbox-id sb-…`), or use `--sandbox local`.",
            ),
        );
    }
    let plan = CheckPlan::base(sandbox, tailnet, output, timeout, env, modal.is_some())?;
    Ok((plan, modal))
}

/// An observer that shows nothing (status and down print one summary at the end).
struct Quiet;

impl Observer for Quiet {
    fn event(
        &mut self,
        _event: &tailbox_proto::agent::v1::Event,
    ) -> Result<(), crate::output::OutputError> {
        Ok(())
    }

    fn agent_stderr(&mut self, _line: &str) {}
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}
