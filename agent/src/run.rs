//! One run: from the request to the final report.
//!
//! Phases: preflight → daemon (find and start tailscaled) → login → checks (status, netmap, then
//! ping, HTTP and git concurrently) → teardown (logout, stop tailscaled). Every phase is bounded;
//! a failure skips what depends on it, and the report is always sent.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use tailbox_proto::agent::v1::{
    AgentInfo, CheckResult, CheckStatus, DaemonConfig, DaemonEvidence, Deadlines, FailureClass,
    GitTarget, HttpTarget, Layer, Phase, Report, RunRequest, TailnetConfig, TailnetInfo, Teardown,
    Warning, check_result, event,
};
use tailbox_proto::{PROTO_VERSION, REPORT_SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;

use crate::checks::tailnet::{self, Visibility};
use crate::checks::{Outcome, ProxyContext};
use crate::daemon::DaemonSettings;
use crate::daemon::provision::{self, ProvisionError};
use crate::daemon::supervisor::{LOG_TAIL_LINES, Supervisor, SupervisorConfig};
use crate::events::{EventSink, timestamp, to_std_duration};
use crate::login::{self, LoginParams};
use crate::preflight;
use crate::redact::redact_url;

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

/// Time budgets with defaults filled in.
#[derive(Debug, Clone, Copy)]
struct Budget {
    total: Duration,
    daemon_start: Duration,
    login: Duration,
    netmap: Duration,
    ping: Duration,
    http: Duration,
    git: Duration,
    teardown: Duration,
}

impl Budget {
    fn from(deadlines: Option<&Deadlines>) -> Self {
        let d = deadlines.cloned().unwrap_or_default();
        let pick = |value: &Option<pbjson_types::Duration>, default: u64| {
            to_std_duration(value.as_ref()).unwrap_or(Duration::from_secs(default))
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
}

/// Executes the run, emitting events as it goes, and always finishing with the report event.
pub async fn execute(request: RunRequest, sink: EventSink, ctx: RunContext) {
    let started_at = SystemTime::now();
    let budget = Budget::from(request.deadlines.as_ref());
    let total_deadline = tokio::time::Instant::now() + budget.total;

    run_phase(&sink, Phase::Preflight, async {
        let (result, warnings) = preflight::check(&ctx.host, ctx.ssl_cert_file.as_deref());
        for warning in warnings {
            sink.warning(warning).await;
        }
        sink.check(result).await;
    })
    .await;

    let (tailnet_info, teardown) = match request.tailnet.as_ref() {
        Some(tailnet) if !tailnet.auth_key.is_empty() => {
            let mut run = TailnetRun {
                request: &request,
                tailnet,
                sink: &sink,
                ctx: &ctx,
                budget,
                total_deadline,
            };
            run.execute().await
        }
        _ => {
            run_phase(&sink, Phase::Checks, async {
                for result in dependent_checks(
                    &request,
                    "no auth key was given, so the sandbox did not join the tailnet",
                    "Set `TS_AUTHKEY` (an ephemeral, pre-authorized key) to join the tailnet.",
                ) {
                    sink.check(result).await;
                }
            })
            .await;
            (None, None)
        }
    };

    let record = sink.record().await;
    let report = Report {
        schema_version: REPORT_SCHEMA_VERSION,
        run_id: request.run_id.clone(),
        agent: Some(AgentInfo {
            version: crate::AGENT_VERSION.into(),
            sha256: ctx.agent_sha256.clone(),
            proto_version: PROTO_VERSION,
        }),
        verdict: Some(crate::verdict::verdict(&record.checks)),
        checks: record.checks,
        phases: record.phases,
        warnings: record.warnings,
        started_at: Some(timestamp(started_at)),
        finished_at: Some(timestamp(SystemTime::now())),
        tailnet: tailnet_info.map(|mut info| {
            info.daemon_restarts = record.daemon_restarts;
            info
        }),
        teardown,
        sandbox: None,
    };
    sink.emit(event::Kind::Report(report)).await;
}

/// The tailnet part of a run.
struct TailnetRun<'a> {
    request: &'a RunRequest,
    tailnet: &'a TailnetConfig,
    sink: &'a EventSink,
    ctx: &'a RunContext,
    budget: Budget,
    total_deadline: tokio::time::Instant,
}

impl TailnetRun<'_> {
    /// Runs daemon, login, checks and teardown.
    async fn execute(&mut self) -> (Option<TailnetInfo>, Option<Teardown>) {
        let run_dir = self.run_dir();
        let started = self.start_daemon(&run_dir).await;
        let Some((supervisor, daemon)) = started else {
            self.skip_rest(
                "tailscaled is not running, so nothing could be checked over the tailnet",
            )
            .await;
            let _ = std::fs::remove_dir_all(&run_dir);
            return (None, None);
        };
        let proxy = supervisor.proxy();
        let mut info = TailnetInfo {
            tailscale_version: daemon.version.clone(),
            daemon_source: daemon.source,
            mode: "userspace".into(),
            proxy_url: format!("socks5h://{proxy}"),
            hostname: self.hostname(),
            self_ips: Vec::new(),
            daemon_restarts: 0,
        };

        let logged_in = if self.ctx.cancel.is_cancelled() {
            false
        } else {
            self.login(&supervisor, &mut info).await
        };
        if logged_in && !self.ctx.cancel.is_cancelled() {
            self.checks(&supervisor, proxy).await;
        } else if logged_in {
            self.skip_rest("the run was cancelled before the checks")
                .await;
        } else {
            self.skip_rest("the sandbox did not join the tailnet").await;
        }

        let teardown = self.teardown(supervisor).await;
        let _ = std::fs::remove_dir_all(&run_dir);
        (Some(info), Some(teardown))
    }

    fn run_dir(&self) -> PathBuf {
        let root = if self.ctx.run_root.as_os_str().is_empty() {
            std::env::temp_dir().join("tailbox")
        } else {
            self.ctx.run_root.clone()
        };
        sweep_stale_run_dirs(&root);
        let id: String = self
            .request
            .run_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        root.join(format!("run-{}-{id}", std::process::id()))
    }

    fn hostname(&self) -> String {
        if self.tailnet.hostname.is_empty() {
            login::default_hostname(&self.request.sandbox_id)
        } else {
            login::sanitize_label(&self.tailnet.hostname)
        }
    }

    fn remaining(&self, phase_budget: Duration) -> Duration {
        phase_budget.min(
            self.total_deadline
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }

    async fn start_daemon(
        &self,
        run_dir: &std::path::Path,
    ) -> Option<(Supervisor, DaemonEvidence)> {
        let sink = self.sink;
        let mut outcome_holder = None;
        run_phase(sink, Phase::Daemon, async {
            let outcome = Outcome::start("daemon", "", Layer::Daemon);
            let config = self.tailnet.daemon.clone().unwrap_or_default();
            let result = self.start_daemon_inner(&config, run_dir, &outcome).await;
            match result {
                Ok((supervisor, evidence)) => {
                    let mut detail = format!(
                        "tailscaled {} ({}) pid {}, ready in {}, proxy {}",
                        evidence.version,
                        source_name(evidence.source),
                        evidence.pid,
                        evidence
                            .time_to_ready
                            .as_ref()
                            .and_then(|d| to_std_duration(Some(d)))
                            .map(tailnet::humanize)
                            .unwrap_or_default(),
                        evidence.proxy_address
                    );
                    if !evidence.loader.is_empty() {
                        detail.push_str(&format!(", run through the loader {}", evidence.loader));
                        sink.warning(Warning {
                            code: "glibc-loader".into(),
                            message: format!(
                                "{} is dynamically linked and its interpreter is missing; running it through {}",
                                evidence.path, evidence.loader
                            ),
                            layer: Layer::Daemon as i32,
                        })
                        .await;
                    }
                    sink.check(outcome.pass(detail, check_result::Evidence::Daemon(evidence.clone())))
                        .await;
                    outcome_holder = Some((supervisor, evidence));
                }
                Err(result) => sink.check(*result).await,
            }
        })
        .await;
        outcome_holder
    }

    async fn start_daemon_inner(
        &self,
        config: &DaemonConfig,
        run_dir: &std::path::Path,
        outcome: &Outcome,
    ) -> Result<(Supervisor, DaemonEvidence), Box<CheckResult>> {
        let settings = DaemonSettings::resolve(config, run_dir).map_err(|why| {
            Box::new(outcome.fail(
                FailureClass::InvalidInput,
                Layer::Daemon,
                why,
                "Pass the proxy listener as IP:port, e.g. `127.0.0.1:1055`.",
                None,
            ))
        })?;
        let binary = provision::find(config, self.ctx.path_var.as_deref(), &self.ctx.host)
            .await
            .map_err(|err| {
                let hint = match err {
                    ProvisionError::NotFound { .. } => "Bake tailscale into the sandbox image, pass `--tailscaled PATH`, or let tailbox push the binaries (`--tailscale-tarball`).",
                    ProvisionError::Unusable { .. } => "Use a static tailscaled (the official tarballs are static) or one built for this sandbox.",
                };
                Box::new(outcome.fail(FailureClass::DaemonNotFound, Layer::Daemon, err.to_string(), hint, None))
            })?;
        let supervisor_config = SupervisorConfig {
            binary,
            socket: settings.socket,
            state: settings.state,
            state_dir: settings.state_dir,
            proxy_listen: settings.proxy_listen,
            env: config.env.clone().into_iter().collect(),
            max_restarts: settings.max_restarts,
            ready_timeout: self.remaining(self.budget.daemon_start),
            secrets: vec![self.tailnet.auth_key.clone()],
        };
        Supervisor::start(supervisor_config, self.sink.clone())
            .await
            .map_err(|(err, log_tail)| {
                let mut result = outcome.fail(
                    FailureClass::DaemonFailed,
                    Layer::Daemon,
                    err.to_string(),
                    "See tailscaled's log tail below; in a restricted sandbox, netlink or the state directory may be unavailable.",
                    None,
                );
                result.log_tail = log_tail;
                Box::new(result)
            })
    }

    async fn login(&self, supervisor: &Supervisor, info: &mut TailnetInfo) -> bool {
        let sink = self.sink;
        let params = LoginParams {
            auth_key: self.tailnet.auth_key.clone(),
            hostname: info.hostname.clone(),
            control_url: Some(self.tailnet.control_url.clone()).filter(|u| !u.is_empty()),
            advertise_tags: self.tailnet.advertise_tags.clone(),
        };
        let mut ok = false;
        run_phase(sink, Phase::Login, async {
            let outcome = Outcome::start(
                "login",
                redact_url(params.control_url.as_deref().unwrap_or("")),
                Layer::Login,
            );
            let limit = self.remaining(self.budget.login);
            let attempt = tokio::select! {
                attempt = login::login(supervisor.api(), &params, limit) => attempt,
                () = self.ctx.cancel.cancelled() => Err(login::LoginFailure {
                    class: FailureClass::Deadline,
                    layer: Layer::Login,
                    detail: "the run was cancelled during login".into(),
                    hint: String::new(),
                }),
            };
            match attempt {
                Ok(evidence) => {
                    info.self_ips = evidence.self_ips.clone();
                    let detail = format!(
                        "Running as {} ({}) after {}",
                        evidence.hostname,
                        evidence.self_ips.join(", "),
                        evidence
                            .time_to_running
                            .as_ref()
                            .and_then(|d| to_std_duration(Some(d)))
                            .map(tailnet::humanize)
                            .unwrap_or_default()
                    );
                    sink.check(outcome.pass(detail, check_result::Evidence::Login(evidence)))
                        .await;
                    let (status, _) = tailnet::check_status(supervisor.api()).await;
                    sink.check(status).await;
                    ok = true;
                }
                Err(failure) => {
                    let mut result = outcome.fail(
                        failure.class,
                        failure.layer,
                        failure.detail,
                        failure.hint,
                        None,
                    );
                    result.log_tail = supervisor.log_tail(LOG_TAIL_LINES);
                    sink.check(result).await;
                }
            }
        })
        .await;
        if ok {
            // A restarted daemon (state mem:) is a new node: log it in again the same way.
            let params = Arc::new(params);
            let limit = self.budget.login;
            supervisor.set_relogin(Arc::new(move |api| {
                let params = Arc::clone(&params);
                Box::pin(async move {
                    login::login(&api, &params, limit)
                        .await
                        .map(drop)
                        .map_err(|f| f.detail)
                })
            }));
        }
        ok
    }

    async fn checks(&self, supervisor: &Supervisor, proxy: SocketAddr) {
        let sink = self.sink;
        run_phase(sink, Phase::Checks, async {
            let api = supervisor.api();
            // Netmap visibility first, once per tailnet host any target names.
            let hosts: Vec<IpAddr> = self.target_hosts();
            let netmap_limit = self.remaining(self.budget.netmap);
            let netmap_results = join_all(hosts.iter().map(|&ip| async move {
                let result = tailnet::check_netmap(api, ip, netmap_limit).await;
                sink.check(result.clone()).await;
                (ip, Visibility::of(&result))
            }))
            .await;
            let visibility = |ip: IpAddr| {
                netmap_results
                    .iter()
                    .find(|(host, _)| *host == ip)
                    .map_or(Visibility::Unknown, |(_, v)| *v)
            };

            let daemon = supervisor.readiness();
            let pings = self.request.ping_targets.iter().map(|target| {
                let daemon = daemon.clone();
                async move {
                    let outcome = Outcome::start("ping", target.address.clone(), Layer::Ping);
                    let Ok(ip) = target.address.trim().parse::<IpAddr>() else {
                        sink.check(outcome.fail(
                            FailureClass::InvalidInput,
                            Layer::Ping,
                            format!("{:?} is not an IP address", target.address),
                            "ping takes the dev host's tailnet IP",
                            None,
                        ))
                        .await;
                        return;
                    };
                    let limit = self.remaining(self.budget.ping);
                    let (result, warning) =
                        tailnet::check_ping(api, ip, visibility(ip), limit, &daemon).await;
                    if let Some(warning) = warning {
                        sink.warning(warning).await;
                    }
                    sink.check(result).await;
                }
            });
            let https = self.request.http_targets.iter().map(|target| {
                let ctx = self.proxy_context(proxy, self.budget.http, supervisor);
                async move {
                    let result = crate::checks::http::check_http(target, &ctx).await;
                    sink.check(result).await;
                }
            });
            let gits = self.request.git_targets.iter().map(|target| {
                let ctx = self.proxy_context(proxy, self.budget.git, supervisor);
                async move {
                    let result = crate::checks::git::check_git(target, &ctx).await;
                    sink.check(result).await;
                }
            });
            let all = async {
                futures::join!(join_all(pings), join_all(https), join_all(gits));
            };
            tokio::select! {
                () = all => {}
                () = self.ctx.cancel.cancelled() => {
                    tracing::warn!("run cancelled during the checks");
                    // Every requested check still gets a result: the unfinished ones are skips.
                    let done = sink.record().await.checks;
                    for result in dependent_checks(self.request, "the run was cancelled before this check finished", "") {
                        if !done.iter().any(|c| c.name == result.name && c.target == result.target) {
                            sink.check(result).await;
                        }
                    }
                }
            }
        })
        .await;
    }

    fn proxy_context(
        &self,
        proxy: SocketAddr,
        budget: Duration,
        supervisor: &Supervisor,
    ) -> ProxyContext {
        ProxyContext {
            socks_addr: proxy,
            deadline: tokio::time::Instant::now() + self.remaining(budget),
            daemon: supervisor.readiness(),
        }
    }

    /// Tailnet hosts the targets name: ping addresses and IP-literal hosts of HTTP/git URLs.
    fn target_hosts(&self) -> Vec<IpAddr> {
        let mut hosts = BTreeSet::new();
        for target in &self.request.ping_targets {
            if let Ok(ip) = target.address.trim().parse::<IpAddr>() {
                hosts.insert(ip);
            }
        }
        let url_hosts = self
            .request
            .http_targets
            .iter()
            .map(|t: &HttpTarget| t.url.as_str())
            .chain(
                self.request
                    .git_targets
                    .iter()
                    .map(|t: &GitTarget| t.url.as_str()),
            );
        for url in url_hosts {
            if let Some(ip) = url::Url::parse(url).ok().and_then(|u| match u.host() {
                Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
                Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
                _ => None,
            }) && tailnet::is_tailnet_ip(ip)
            {
                hosts.insert(ip);
            }
        }
        hosts.into_iter().collect()
    }

    async fn skip_rest(&self, reason: &str) {
        run_phase(self.sink, Phase::Checks, async {
            for result in dependent_checks(self.request, reason, "Fix the failure above first.") {
                self.sink.check(result).await;
            }
        })
        .await;
    }

    async fn teardown(&self, supervisor: Supervisor) -> Teardown {
        let mut teardown = Teardown::default();
        let sink = self.sink;
        let grace = self.budget.teardown;
        run_phase(sink, Phase::Teardown, async {
            teardown.logout_attempted = true;
            let logout = tokio::time::timeout(grace / 2, supervisor.api().logout()).await;
            match logout {
                Ok(Ok(())) => teardown.logged_out = true,
                Ok(Err(err)) => teardown.logout_error = err.to_string(),
                Err(_) => teardown.logout_error = format!("no answer within {:?}", grace / 2),
            }
            if !teardown.logged_out {
                sink.warning(Warning {
                    code: "logout-failed".into(),
                    message: format!(
                        "logging the node out failed ({}); an ephemeral node is removed when tailscaled stops, otherwise control removes it later",
                        teardown.logout_error
                    ),
                    layer: Layer::Control as i32,
                })
                .await;
            }
            teardown.daemon_stop = supervisor.stop(grace / 2).await.to_owned();
        })
        .await;
        teardown
    }
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

fn source_name(source: i32) -> &'static str {
    use tailbox_proto::agent::v1::DaemonSource;
    match DaemonSource::try_from(source).unwrap_or(DaemonSource::Unspecified) {
        DaemonSource::RequestPath => "requested path",
        DaemonSource::Path => "found on PATH",
        DaemonSource::Pushed => "pushed by the controller",
        DaemonSource::Unspecified => "unknown source",
    }
}

/// Runs one phase between its started and finished events; the phase fails if any check that
/// finished during it failed.
async fn run_phase(sink: &EventSink, phase: Phase, body: impl Future<Output = ()>) {
    let failed_before = sink.failed_checks().await;
    let started = Instant::now();
    sink.phase_started(phase).await;
    body.await;
    let status = if sink.failed_checks().await > failed_before {
        CheckStatus::Fail
    } else {
        CheckStatus::Pass
    };
    sink.phase_finished(phase, status, started.elapsed()).await;
}

/// A skip result for every requested target, with the reason they could not run.
fn dependent_checks(request: &RunRequest, reason: &str, hint: &str) -> Vec<CheckResult> {
    let skip = |name: &'static str, target: String, layer: Layer| {
        Outcome::start(name, target, layer).skip(reason, hint)
    };
    let mut results = Vec::new();
    for target in &request.ping_targets {
        results.push(skip("ping", target.address.clone(), Layer::Ping));
    }
    for target in &request.http_targets {
        results.push(skip("http", redact_url(&target.url), Layer::Http));
    }
    for target in &request.git_targets {
        results.push(skip("git", redact_url(&target.url), Layer::Git));
    }
    results
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
