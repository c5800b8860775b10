//! Bringing a node up and taking it down: start tailscaled (the daemon phase), log it in (the
//! login phase), and later log out and stop it (the teardown). The one-shot `Run` and the
//! sidecar's `Up`/`Down` share this code, so both report the same checks.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tailbox_proto::agent::v1::{
    CheckResult, DaemonConfig, DaemonEvidence, FailureClass, Layer, Phase, TailnetConfig,
    TailnetInfo, Teardown, Warning, check_result,
};
use tokio_util::sync::CancellationToken;

use crate::checks::Outcome;
use crate::checks::tailnet;
use crate::daemon::provision::{self, ProvisionError, Unusable};
use crate::daemon::supervisor::{LOG_TAIL_LINES, StartError, Supervisor, SupervisorConfig};
use crate::daemon::{DEFAULT_HEALTHY_PERIOD, DaemonSettings};
use crate::events::{EventSink, run_phase, to_std_duration};
use crate::login::{self, LoginParams};
use crate::preflight;
use tailbox_proto::redact::redact_url;

/// How long a daemon started from a binary that turned out unusable gets to exit on SIGTERM.
const UNUSABLE_STOP_GRACE: Duration = Duration::from_secs(2);

/// What bringing a node up needs.
pub struct Bringup<'a> {
    /// How to join, auth key included.
    pub tailnet: &'a TailnetConfig,
    /// The sandbox id, from which the default hostname derives.
    pub sandbox_id: &'a str,
    /// Where tailscaled's socket and state go unless the request says otherwise.
    pub run_dir: &'a Path,
    /// PATH of the sandbox, searched for tailscaled.
    pub path_var: Option<&'a str>,
    /// Root for finding binaries and loaders.
    pub host: &'a preflight::Host,
    /// Phases and their checks go here.
    pub sink: &'a EventSink,
    /// The supervisor's restarts, warnings and log lines go here for the daemon's whole life
    /// (the run's own stream for `Run`; the sidecar's Watch hub).
    pub daemon_events: EventSink,
    /// Time for tailscaled to answer its LocalAPI.
    pub daemon_start: Duration,
    /// Time to reach Running, and for each re-login after a restart.
    pub login: Duration,
    /// Nothing may run past this.
    pub deadline: tokio::time::Instant,
    /// Cancelling skips what has not started and cuts login short.
    pub cancel: &'a CancellationToken,
}

/// A started tailscaled and what is known about its node.
pub struct Started {
    /// The supervisor that owns tailscaled.
    pub supervisor: Supervisor,
    /// The node, for reports; `self_ips` is filled in by login.
    pub info: TailnetInfo,
    /// How tailscaled was found and started.
    pub daemon: DaemonEvidence,
}

impl Bringup<'_> {
    /// The hostname the node registers with.
    pub fn hostname(&self) -> String {
        Self::hostname_for(self.tailnet, self.sandbox_id)
    }

    /// The hostname a node joining with `tailnet` in sandbox `sandbox_id` registers with.
    pub fn hostname_for(tailnet: &TailnetConfig, sandbox_id: &str) -> String {
        if tailnet.hostname.is_empty() {
            login::default_hostname(sandbox_id)
        } else {
            login::sanitize_label(&tailnet.hostname)
        }
    }

    fn remaining(&self, phase_budget: Duration) -> Duration {
        phase_budget.min(
            self.deadline
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }

    /// The daemon phase: finds and starts tailscaled. `None` means it failed (the phase's check
    /// says why).
    pub async fn start_daemon(&self) -> Option<Started> {
        let sink = self.sink;
        let mut started = None;
        run_phase(sink, Phase::Daemon, async {
            let outcome = Outcome::start("daemon", "", Layer::Daemon);
            sink.check_started("daemon", "", self.remaining(self.daemon_start))
                .await;
            let config = self.tailnet.daemon.clone().unwrap_or_default();
            // Ctrl-C while tailscaled starts (a slow one may take its whole budget) ends the
            // phase at once; dropping the start kills the half-started tailscaled.
            let spawned = tokio::select! {
                spawned = self.spawn_daemon(&config, &outcome) => spawned,
                () = self.cancel.cancelled() => Err(Box::new(
                    outcome.skip(crate::targets::skip_reason::INTERRUPTED_MID_CHECK, ""),
                )),
            };
            match spawned {
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
                    let info = TailnetInfo {
                        tailscale_version: evidence.version.clone(),
                        daemon_source: evidence.source,
                        mode: "userspace".into(),
                        proxy_url: format!("socks5h://{}", supervisor.proxy()),
                        hostname: self.hostname(),
                        self_ips: Vec::new(),
                        daemon_restarts: 0,
                    };
                    started = Some(Started {
                        supervisor,
                        info,
                        daemon: evidence,
                    });
                }
                Err(result) => sink.check(*result).await,
            }
        })
        .await;
        started
    }

    async fn spawn_daemon(
        &self,
        config: &DaemonConfig,
        outcome: &Outcome,
    ) -> Result<(Supervisor, DaemonEvidence), Box<CheckResult>> {
        let settings = DaemonSettings::resolve(config, self.run_dir).map_err(|why| {
            Box::new(outcome.fail(
                FailureClass::InvalidInput,
                Layer::Daemon,
                why,
                "Pass the proxy listener as IP:port, e.g. `127.0.0.1:1055`.",
                None,
            ))
        })?;
        let not_found = |err: ProvisionError| {
            let hint = match err {
                ProvisionError::NotFound { .. } => {
                    "Bake tailscale into the sandbox image, pass `--tailscaled PATH`, or let tailbox push the binaries (`--tailscale-tarball`)."
                }
                ProvisionError::Unusable { because, .. } => match because {
                    Unusable::Missing => {
                        "`--tailscaled` is a path inside the sandbox, not on the dev host: check it there, or let tailbox push the binaries (`--tailscale-tarball`)."
                    }
                    Unusable::NotExecutable => {
                        "Make it executable in the sandbox image (`chmod 0755`), or let tailbox push the binaries (`--tailscale-tarball`)."
                    }
                    Unusable::NotRunnable => {
                        "Use a static tailscaled (the official tarballs are static) or one built for this sandbox."
                    }
                    Unusable::VersionFailed => {
                        "Run `tailscaled --version` in the sandbox to see why it fails (a truncated or damaged binary does this); replace it, or let tailbox push the binaries (`--tailscale-tarball`)."
                    }
                },
            };
            Box::new(outcome.fail(
                FailureClass::DaemonNotFound,
                Layer::Daemon,
                err.to_string(),
                hint,
                None,
            ))
        };
        let binary = provision::find(config, self.path_var, self.host)
            .await
            .map_err(not_found)?;
        let supervisor_config = SupervisorConfig {
            binary: binary.clone(),
            socket: settings.socket,
            state: settings.state,
            state_dir: settings.state_dir,
            proxy_listen: settings.proxy_listen,
            env: config.env.clone().into_iter().collect(),
            max_restarts: settings.max_restarts,
            healthy_period: DEFAULT_HEALTHY_PERIOD,
            ready_timeout: self.remaining(self.daemon_start),
            secrets: vec![self.tailnet.auth_key.clone()],
        };
        // `tailscaled --version` runs beside the start rather than before it: it is a Go
        // program's start-up (about 9 ms) that start to Running would otherwise wait for
        // (docs/benchmarks.md, B2). Its failure still decides: a binary that cannot say its
        // version is unusable, and the daemon it may have started is stopped.
        let (version, started) = tokio::join!(
            provision::version_of(&binary),
            Supervisor::start(supervisor_config, self.daemon_events.clone()),
        );
        let version = match version {
            Ok(version) => version,
            Err(err) => {
                if let Ok((supervisor, _)) = started {
                    supervisor.stop(UNUSABLE_STOP_GRACE).await;
                }
                return Err(not_found(err));
            }
        };
        started
            .map(|(supervisor, mut evidence)| {
                evidence.version = version;
                (supervisor, evidence)
            })
            .map_err(|(err, log_tail)| {
                let hint = daemon_failure_hint(&err, &log_tail);
                let mut result = outcome.fail(
                    FailureClass::DaemonFailed,
                    Layer::Daemon,
                    err.to_string(),
                    hint,
                    None,
                );
                result.log_tail = log_tail;
                Box::new(result)
            })
    }

    /// The login phase: logs the node in, reports login and status, and on success installs the
    /// hook that logs a restarted tailscaled in again with the same settings. Returns whether the
    /// node is Running.
    pub async fn login(&self, supervisor: &Supervisor, info: &mut TailnetInfo) -> bool {
        let sink = self.sink;
        let params = LoginParams {
            auth_key: self.tailnet.auth_key.clone(),
            hostname: info.hostname.clone(),
            control_url: Some(self.tailnet.control_url.clone()).filter(|u| !u.is_empty()),
            advertise_tags: self.tailnet.advertise_tags.clone(),
        };
        let mut ok = false;
        let mut self_ips = Vec::new();
        run_phase(sink, Phase::Login, async {
            let outcome = Outcome::start(
                "login",
                redact_url(params.control_url.as_deref().unwrap_or("")),
                Layer::Login,
            );
            let limit = self.remaining(self.login);
            sink.check_started("login", outcome.target(), limit).await;
            let attempt = tokio::select! {
                attempt = login::login(supervisor.api(), &params, limit) => attempt,
                () = self.cancel.cancelled() => Err(login::LoginFailure {
                    class: FailureClass::Deadline,
                    layer: Layer::Login,
                    detail: "the run was cancelled during login".into(),
                    hint: String::new(),
                }),
            };
            match attempt {
                Ok(evidence) => {
                    self_ips.clone_from(&evidence.self_ips);
                    if evidence.home_derp_region == 0 {
                        sink.warning(Warning {
                            code: "no-home-derp".into(),
                            message: "control has not yet given this node's home DERP region to \
                                      its peers; a peer may not answer the node's first \
                                      connection for about 5 s"
                                .into(),
                            layer: Layer::Control as i32,
                        })
                        .await;
                    }
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
        info.self_ips = self_ips;
        if ok {
            // A restarted daemon (state mem:) is a new node: log it in again the same way.
            let params = Arc::new(params);
            let limit = self.login;
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
}

/// The teardown phase: logs the node out (half of `grace`) and stops tailscaled (the other
/// half). A failed logout is a warning: an ephemeral node is removed when tailscaled stops.
pub async fn teardown(supervisor: Supervisor, grace: Duration, sink: &EventSink) -> Teardown {
    let mut teardown = Teardown::default();
    run_phase(sink, Phase::Teardown, async {
        teardown = supervisor.leave_tailnet(grace).await;
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
    })
    .await;
    teardown
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

/// What to do about a tailscaled that did not start, from what went wrong and its last words.
fn daemon_failure_hint(err: &StartError, log_tail: &[String]) -> &'static str {
    let said = |text: &str| log_tail.iter().any(|line| line.contains(text));
    if matches!(err, StartError::Prepare { .. }) {
        "The directory of tailscaled's socket or state cannot be created here; pass writable \
         paths with `--tailscaled-socket` and `--tailscaled-state`."
    } else if said("flag provided but not defined")
        || said("Connect to Tailscale, logging in if needed")
    {
        "This program rejected tailscaled's flags, so it is not tailscaled (the `tailscale` \
         CLI?); pass the path of `tailscaled` with `--tailscaled`."
    } else if said("address already in use") {
        "Something else already listens on the proxy address; pass a free one with \
         `--proxy-listen`, or `127.0.0.1:0` to let tailscaled pick one."
    } else {
        "See tailscaled's log tail below; in a restricted sandbox, netlink or the state \
         directory may be unavailable."
    }
}
