//! One run: from the request to the final report.
//!
//! Phases: preflight → daemon (find and start tailscaled) → login → checks (netmap then ping,
//! with HTTP and git beside them) → teardown (logout, stop tailscaled). Every phase is bounded;
//! a failure skips what depends on it, and the report is always sent. Bring-up and teardown live
//! in [`crate::bringup`] and the checks runner in [`crate::targets`], which the sidecar shares.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tailbox_proto::agent::v1::{
    AgentInfo, Deadlines, Phase, Report, RunRequest, TailnetInfo, Teardown, event,
};
use tailbox_proto::{PROTO_VERSION, REPORT_SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;

use crate::bringup::{self, Bringup};
use crate::events::{EventSink, RunRecord, run_phase, timestamp, to_std_duration};
use crate::preflight;
use crate::targets::{CheckBudget, Targets, skip_reason};

/// What the run needs from its surroundings, passed in so tests can control it.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// sha256 of the agent binary, for the report.
    pub agent_sha256: String,
    /// Root for preflight facts.
    pub host: preflight::Host,
    /// SSL_CERT_FILE of the sandbox, a preflight fact.
    pub ssl_cert_file: Option<String>,
    /// PATH of the sandbox, searched for tailscaled.
    pub path_var: Option<String>,
    /// Directory for per-run state (sockets, state dirs); empty means `$TMPDIR/tailbox`.
    pub run_root: PathBuf,
    /// Cancelled when the controller goes away or the agent is told to stop: the run then skips
    /// to teardown, so the node still logs out.
    pub cancel: CancellationToken,
}

/// Time budgets with defaults filled in (unset or zero means the default).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// The whole run, teardown excluded.
    pub total: Duration,
    /// For tailscaled to answer its LocalAPI.
    pub daemon_start: Duration,
    /// To reach Running.
    pub login: Duration,
    /// For a target peer to appear online.
    pub netmap: Duration,
    /// For each ping check.
    pub ping: Duration,
    /// For each HTTP check.
    pub http: Duration,
    /// For each git check.
    pub git: Duration,
    /// For logout and stopping tailscaled.
    pub teardown: Duration,
}

/// The longest any budget may be: a request asking for more gets this. No run needs a week,
/// and a deadline past the clock's range would panic the agent.
pub const MAX_BUDGET: Duration = Duration::from_secs(7 * 24 * 3600);

impl Budget {
    /// The budgets `deadlines` asks for, with defaults filled in, none longer than
    /// [`MAX_BUDGET`].
    pub fn from(deadlines: Option<&Deadlines>) -> Self {
        let d = deadlines.cloned().unwrap_or_default();
        let pick = |value: &Option<pbjson_types::Duration>, default: u64| {
            to_std_duration(value.as_ref())
                .unwrap_or(Duration::from_secs(default))
                .min(MAX_BUDGET)
        };
        Self {
            total: pick(&d.total, 15 * 60),
            daemon_start: pick(&d.daemon_start, 30),
            login: pick(&d.login, 120),
            netmap: pick(&d.netmap, 30),
            ping: pick(&d.ping, 60),
            http: pick(&d.http, 30),
            git: pick(&d.git, 60),
            teardown: pick(&d.teardown, 15),
        }
    }

    /// When the whole run must end, if it starts now.
    pub fn deadline_from_now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.total
    }

    /// The checks' budgets, none running past `deadline`.
    pub fn checks(&self, deadline: tokio::time::Instant) -> CheckBudget {
        CheckBudget {
            netmap: self.netmap,
            ping: self.ping,
            http: self.http,
            git: self.git,
            deadline,
        }
    }
}

/// Executes the run, emitting events as it goes, and always finishing with the report event.
pub async fn execute(request: RunRequest, sink: EventSink, ctx: RunContext) {
    let started_at = SystemTime::now();
    let budget = Budget::from(request.deadlines.as_ref());
    let total_deadline = budget.deadline_from_now();

    preflight_phase(&sink, &ctx).await;

    let targets = Targets {
        ping: &request.ping_targets,
        http: &request.http_targets,
        git: &request.git_targets,
    };
    let (tailnet_info, teardown) = match request.tailnet.as_ref() {
        Some(tailnet) if !tailnet.auth_key.is_empty() => {
            let run_dir = run_dir(&ctx.run_root, &request.run_id);
            let bringup = Bringup {
                tailnet,
                sandbox_id: &request.sandbox_id,
                run_dir: &run_dir,
                path_var: ctx.path_var.as_deref(),
                host: &ctx.host,
                sink: &sink,
                daemon_events: sink.clone(),
                daemon_start: budget.daemon_start,
                login: budget.login,
                deadline: total_deadline,
                cancel: &ctx.cancel,
            };
            let outcome = tailnet_run(&bringup, targets, budget, total_deadline, &ctx).await;
            let _ = std::fs::remove_dir_all(&run_dir);
            outcome
        }
        _ => {
            targets
                .skip_all(
                    &sink,
                    skip_reason::NO_AUTH_KEY,
                    "Set `TS_AUTHKEY` (an ephemeral, pre-authorized key) to join the tailnet.",
                )
                .await;
            (None, None)
        }
    };

    let record = sink.record().await;
    let tailnet = tailnet_info.map(|mut info| {
        info.daemon_restarts = record.daemon_restarts;
        info
    });
    let report = report(&request.run_id, started_at, &ctx, record, tailnet, teardown);
    sink.emit(event::Kind::Report(report)).await;
}

/// The preflight phase: facts about the sandbox.
pub async fn preflight_phase(sink: &EventSink, ctx: &RunContext) {
    run_phase(sink, Phase::Preflight, async {
        let (result, warnings) = preflight::check(&ctx.host, ctx.ssl_cert_file.as_deref());
        for warning in warnings {
            sink.warning(warning).await;
        }
        sink.check(result).await;
    })
    .await;
}

/// The final report of a run (or of a sidecar's check) from what its sink recorded.
pub fn report(
    run_id: &str,
    started_at: SystemTime,
    ctx: &RunContext,
    record: RunRecord,
    tailnet: Option<TailnetInfo>,
    teardown: Option<Teardown>,
) -> Report {
    Report {
        schema_version: REPORT_SCHEMA_VERSION,
        run_id: run_id.to_owned(),
        agent: Some(AgentInfo {
            version: crate::AGENT_VERSION.into(),
            sha256: ctx.agent_sha256.clone(),
            proto_version: PROTO_VERSION,
        }),
        verdict: Some(crate::verdict::verdict(&record.checks))
            .map(|v| crate::verdict::interrupted_if(v, ctx.cancel.is_cancelled())),
        checks: record.checks,
        phases: record.phases,
        warnings: record.warnings,
        started_at: Some(timestamp(started_at)),
        finished_at: Some(timestamp(SystemTime::now())),
        tailnet,
        teardown,
        sandbox: None,
    }
}

/// The tailnet part of a run: daemon, login, checks and teardown.
async fn tailnet_run(
    bringup: &Bringup<'_>,
    targets: Targets<'_>,
    budget: Budget,
    deadline: tokio::time::Instant,
    ctx: &RunContext,
) -> (Option<TailnetInfo>, Option<Teardown>) {
    let sink = bringup.sink;
    let Some(mut started) = bringup.start_daemon().await else {
        let (reason, hint) = if ctx.cancel.is_cancelled() {
            (skip_reason::INTERRUPTED, "")
        } else {
            (skip_reason::DAEMON_FAILED, skip_reason::FIX_DAEMON)
        };
        targets.skip_all(sink, reason, hint).await;
        return (None, None);
    };
    let logged_in =
        !ctx.cancel.is_cancelled() && bringup.login(&started.supervisor, &mut started.info).await;
    if logged_in && !ctx.cancel.is_cancelled() {
        let checks = budget.checks(deadline);
        targets
            .check(&started.supervisor, checks, sink, &ctx.cancel, async {})
            .await;
    } else {
        let (reason, hint) = if logged_in || ctx.cancel.is_cancelled() {
            (skip_reason::INTERRUPTED, "")
        } else {
            (skip_reason::LOGIN_FAILED, skip_reason::FIX_LOGIN)
        };
        targets.skip_all(sink, reason, hint).await;
    }
    let teardown = bringup::teardown(started.supervisor, budget.teardown, sink).await;
    (Some(started.info), Some(teardown))
}

/// This run's private directory under `run_root` (default `$TMPDIR/tailbox`), after sweeping
/// those of dead agents.
fn run_dir(run_root: &Path, run_id: &str) -> PathBuf {
    let root = if run_root.as_os_str().is_empty() {
        std::env::temp_dir().join("tailbox")
    } else {
        run_root.to_path_buf()
    };
    sweep_stale_run_dirs(&root);
    let id: String = run_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    root.join(format!("run-{}-{id}", std::process::id()))
}

/// Removes `run-<pid>-…` directories whose agent is gone (killed before it could clean up), so
/// sockets and state do not pile up in a long-lived sandbox.
fn sweep_stale_run_dirs(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive && pid != std::process::id() {
            tracing::debug!(
                "removing the stale run directory {}",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::duration;

    #[test]
    fn stale_run_dirs_of_dead_agents_are_swept() {
        let root = tempfile::tempdir().unwrap();
        // PIDs above the kernel's maximum (2^22) are never alive.
        let dead = root.path().join("run-4194999-abc");
        let ours = root.path().join(format!("run-{}-def", std::process::id()));
        let other = root.path().join("keep-me");
        for dir in [&dead, &ours, &other] {
            std::fs::create_dir_all(dir.join("state")).unwrap();
        }
        sweep_stale_run_dirs(root.path());
        assert!(!dead.exists());
        assert!(ours.exists());
        assert!(other.exists());
    }

    #[test]
    fn a_budget_past_the_clock_is_cut_to_a_week() {
        // Found by the agent_request fuzz target's corpus: a total of i64::MAX seconds made the
        // run's deadline overflow the clock, and the agent panicked.
        let d = Deadlines {
            total: Some(pbjson_types::Duration {
                seconds: i64::MAX,
                nanos: 999_999_999,
            }),
            ..Default::default()
        };
        let b = Budget::from(Some(&d));
        assert_eq!(b.total, MAX_BUDGET);
        assert!(b.deadline_from_now() > tokio::time::Instant::now());
    }

    #[test]
    fn budgets_default_and_override() {
        let b = Budget::from(None);
        assert_eq!(b.login, Duration::from_secs(120));
        assert_eq!(b.total, Duration::from_secs(900));
        let d = Deadlines {
            login: Some(duration(Duration::from_secs(7))),
            ping: Some(duration(Duration::ZERO)),
            ..Default::default()
        };
        let b = Budget::from(Some(&d));
        assert_eq!(b.login, Duration::from_secs(7));
        assert_eq!(b.ping, Duration::from_secs(60), "zero means default");
    }
}
