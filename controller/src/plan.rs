//! Flags and environment, validated once into a plan. Everything after this trusts the plan.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use tailbox_proto::agent::v1::{
    CheckRequest, DaemonConfig, Deadlines, ExpectedRef, GitTarget, HttpTarget, PingTarget,
    RunRequest, TailnetConfig,
};

use crate::backend::Backend;
use crate::backend::local::LocalBackend;
use crate::backend::modal::{ModalBackend, ModalOptions};
use crate::cli::{CheckArgs, SandboxArgs, SandboxKind, TailnetArgs};
use crate::env::{self, Env};
use crate::error::{CliError, CliResult};
use crate::modal::config::ModalConfig;
use crate::secret::{Secret, redact_urls};

/// Modal app of the sandboxes, when MODAL_APP_NAME is unset (cook's).
pub const DEFAULT_MODAL_APP: &str = "cook-sandbox";
/// The sidecar's state directory in the sandbox, when neither `--state-dir` nor
/// TAILBOX_SIDECAR_DIR says (the agent's own default).
pub const DEFAULT_SIDECAR_DIR: &str = "/tmp/tailbox/sidecar";
/// How many sandboxes of a fan-out run at once, at most, when `--parallel` is not given.
pub const DEFAULT_PARALLEL: u32 = 8;
/// Sandbox image, when MODAL_IMAGE is unset (cook's).
pub const DEFAULT_MODAL_IMAGE: &str = "ghcr.io/justinmoon/cook-sandbox:latest";

/// How results are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Live progress on stderr, a table on stdout.
    Human {
        /// Relay agent and tailscaled log lines.
        verbose: bool,
        /// No live progress.
        quiet: bool,
    },
    /// JSON lines on stdout.
    Json {
        /// Relay the agent's log lines to stderr.
        verbose: bool,
    },
}

impl OutputMode {
    /// The mode `--json`, `-v` and `-q` ask for.
    pub fn from_flags(json: bool, verbose: bool, quiet: bool) -> Self {
        if json {
            Self::Json { verbose }
        } else {
            Self::Human { verbose, quiet }
        }
    }
}

/// Which backend runs the agent, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// The backend.
    pub kind: SandboxKind,
    /// Why, for the "using … because …" line.
    pub reason: String,
}

/// One HTTP target: a URL and, when not any 2xx, the statuses that pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// The URL.
    pub url: String,
    /// The statuses that pass; `None` means any 2xx.
    pub expected: Option<RangeInclusive<u16>>,
}

/// A validated `tailbox check`.
#[derive(Debug, Clone)]
pub struct CheckPlan {
    /// Where the agent runs.
    pub backend: BackendChoice,
    /// How to show results.
    pub output: OutputMode,
    /// Also write the report here.
    pub report_path: Option<PathBuf>,
    /// Print the waterfall of the phases on stderr after the run.
    pub timeline: bool,
    /// Also write the report as an HTML page here.
    pub report_html: Option<PathBuf>,
    /// Tailscale auth key, if any.
    pub auth_key: Option<Secret>,
    /// Tailnet hostname override.
    pub hostname: Option<String>,
    /// Control server URL override.
    pub control_url: Option<String>,
    /// Explicit tailscaled path inside the sandbox.
    pub tailscaled_path: Option<String>,
    /// tailscaled's socket, state and state dir overrides.
    pub tailscaled_socket: Option<String>,
    /// `--state` override.
    pub tailscaled_state: Option<String>,
    /// `--statedir` override.
    pub tailscaled_statedir: Option<String>,
    /// Tags to advertise.
    pub advertise_tags: Vec<String>,
    /// Extra tailscaled environment (lab and debugging knobs).
    pub tailscaled_env: BTreeMap<String, String>,
    /// tailscaled's proxy listener override.
    pub proxy_listen: Option<std::net::SocketAddr>,
    /// Ping targets: tailnet IPs or peer names.
    pub ping: Vec<String>,
    /// HTTP targets.
    pub http: Vec<HttpCheck>,
    /// git targets.
    pub git: Vec<String>,
    /// Refs every git target must advertise.
    pub expected_refs: Vec<(String, String)>,
    /// Agents named by `--agent` or `TAILBOX_AGENT` (files or directories); empty: the default.
    pub agent_paths: Vec<PathBuf>,
    /// Tailscale release tarball to push into the sandbox.
    pub tailscale_tarball: Option<PathBuf>,
    /// Modal app of the sandbox.
    pub modal_app: String,
    /// Registry image of the sandbox.
    pub modal_image: String,
    /// Existing sandbox to attach to.
    pub sandbox_id: Option<String>,
    /// Every existing sandbox named (`check` may name several).
    pub sandbox_ids: Vec<String>,
    /// How many sandboxes `check` runs: `--count`, or the number of `--sandbox-id`.
    pub count: u32,
    /// How many of them run at once.
    pub parallel: u32,
    /// The sidecar's state directory in the sandbox.
    pub state_dir: String,
    /// Whether `check` uses a running sidecar (`--no-sidecar` turns it off).
    pub use_sidecar: bool,
    /// Leave the sandbox running.
    pub keep: bool,
    /// Whole-run budget.
    pub timeout: Duration,
    /// Per-phase budgets passed to the agent.
    pub deadlines: Deadlines,
}

impl CheckPlan {
    /// Validates flags and environment. `modal_configured` says whether Modal credentials exist.
    pub fn from_args(args: &CheckArgs, env: &dyn Env, modal_configured: bool) -> CliResult<Self> {
        let output = OutputMode::from_flags(args.json, args.verbose, args.quiet);
        let mut plan = Self::base(
            &args.sandbox,
            Some(&args.tailnet),
            output,
            args.timeout,
            env,
            modal_configured,
        )?;

        let ping_raw = values_or_env(&args.ping, env, env::COOK_TAIL_IP);
        plan.ping = ping_raw
            .iter()
            .map(|raw| validate_host(raw))
            .collect::<CliResult<Vec<_>>>()?;
        plan.http = values_or_env(&args.http, env, env::COOK_HTTP_URL)
            .iter()
            .map(|raw| parse_http_check(raw))
            .collect::<CliResult<Vec<_>>>()?;
        plan.git = values_or_env(&args.git, env, env::COOK_GIT_URL)
            .into_iter()
            .map(|u| validate_url(&u, "--git", &["http", "https", "git"]))
            .collect::<CliResult<Vec<_>>>()?;
        plan.expected_refs = args
            .expect_ref
            .iter()
            .map(|raw| parse_expected_ref(raw))
            .collect::<CliResult<Vec<_>>>()?;
        if !plan.expected_refs.is_empty() && plan.git.is_empty() {
            return Err(
                CliError::usage("`--expect-ref` was given but there is no git target")
                    .with_hint("Add `--git URL` (or set `COOK_GIT_URL`)."),
            );
        }
        plan.report_path = args.report.clone();
        plan.timeline = args.timeline;
        plan.report_html = args.report_html.clone();
        plan.keep = args.keep || env.flag(env::KEEP_SANDBOX);
        plan.use_sidecar = !args.no_sidecar;
        plan.deadlines.netmap = args.netmap_timeout.map(tailbox_proto::convert::duration);
        plan.deadlines.ping = args.ping_timeout.map(tailbox_proto::convert::duration);
        plan.deadlines.http = args.http_timeout.map(tailbox_proto::convert::duration);
        plan.deadlines.git = args.git_timeout.map(tailbox_proto::convert::duration);
        plan.count = match (args.count, plan.sandbox_ids.len()) {
            (Some(count), _) => count,
            (None, 0) => 1,
            (None, ids) => u32::try_from(ids).unwrap_or(u32::MAX),
        };
        plan.parallel = args.parallel.unwrap_or(DEFAULT_PARALLEL).min(plan.count);
        if plan.is_fleet() {
            plan.check_fleet_inputs()?;
        }
        Ok(plan)
    }

    /// Validates what `up`, `status` and `down` share with `check`: the sandbox and, for `up`, how
    /// it joins the tailnet. Targets are left empty.
    pub fn base(
        sandbox: &SandboxArgs,
        tailnet: Option<&TailnetArgs>,
        output: OutputMode,
        timeout: Duration,
        env: &dyn Env,
        modal_configured: bool,
    ) -> CliResult<Self> {
        let backend = choose_backend(sandbox, modal_configured)?;
        let default_tailnet = TailnetArgs::default();
        let given = tailnet.is_some();
        let tailnet = tailnet.unwrap_or(&default_tailnet);

        let auth_key = if given {
            read_auth_key(tailnet, env)?
        } else {
            None
        };
        let hostname = tailnet
            .hostname
            .clone()
            .or_else(|| env.non_empty(env::TS_HOSTNAME).filter(|_| given));
        if let Some(name) = &hostname {
            validate_hostname(name)?;
        }
        let control_url = match tailnet
            .control_url
            .clone()
            .or_else(|| env.non_empty(env::TS_CONTROL_URL).filter(|_| given))
        {
            Some(url) => Some(validate_url(&url, "--control-url", &["http", "https"])?),
            None => None,
        };
        let tailscaled_env = if given {
            parse_env_pairs(&env.var(env::TAILBOX_TAILSCALED_ENV).unwrap_or_default())?
        } else {
            BTreeMap::new()
        };
        let agent_paths = if sandbox.agent.is_empty() {
            env.non_empty(env::TAILBOX_AGENT)
                .map(|list| std::env::split_paths(&list).collect())
                .unwrap_or_default()
        } else {
            sandbox.agent.clone()
        };
        let tailscale_tarball = tailnet.tailscale_tarball.clone().or_else(|| {
            env.non_empty(env::TAILBOX_TAILSCALE_TARBALL)
                .filter(|_| given)
                .map(PathBuf::from)
        });
        if tailscale_tarball.is_some() && backend.kind == SandboxKind::Local {
            return Err(CliError::usage(
                "`--tailscale-tarball` pushes binaries into a Modal sandbox, but this run is local",
            )
            .with_hint("Use `--tailscaled PATH` for a local run, or `--sandbox modal`."));
        }
        if !sandbox.sandbox_id.is_empty() && backend.kind == SandboxKind::Local {
            return Err(CliError::usage(
                "`--sandbox-id` names a Modal sandbox, but this run is local",
            )
            .with_hint("Drop `--sandbox local`."));
        }
        let state_dir = sandbox
            .state_dir
            .clone()
            .or_else(|| env.non_empty(env::TAILBOX_SIDECAR_DIR))
            .unwrap_or_else(|| DEFAULT_SIDECAR_DIR.to_owned());
        if !state_dir.starts_with('/') {
            return Err(CliError::usage(format!(
                "`--state-dir` {state_dir:?} is not an absolute path"
            ))
            .with_hint(
                "Give the sidecar's directory as an absolute path, e.g. /tmp/tailbox/sidecar.",
            ));
        }
        let modal_app = env
            .non_empty(env::MODAL_APP_NAME)
            .unwrap_or_else(|| DEFAULT_MODAL_APP.to_owned());
        let modal_image = env
            .non_empty(env::MODAL_IMAGE)
            .unwrap_or_else(|| DEFAULT_MODAL_IMAGE.to_owned());

        let deadlines = Deadlines {
            total: Some(tailbox_proto::convert::duration(timeout)),
            login: tailnet.login_timeout.map(tailbox_proto::convert::duration),
            ..Default::default()
        };

        Ok(Self {
            backend,
            output,
            report_path: None,
            timeline: false,
            report_html: None,
            auth_key,
            hostname,
            control_url,
            tailscaled_path: tailnet.tailscaled.clone(),
            tailscaled_socket: tailnet
                .tailscaled_socket
                .clone()
                .or_else(|| env.non_empty(env::TS_SOCKET_PATH).filter(|_| given)),
            tailscaled_state: tailnet
                .tailscaled_state
                .clone()
                .or_else(|| env.non_empty(env::TS_STATE_PATH).filter(|_| given)),
            tailscaled_statedir: tailnet.tailscaled_statedir.clone(),
            advertise_tags: tailnet.advertise_tags.clone(),
            tailscaled_env,
            proxy_listen: tailnet.proxy_listen,
            ping: Vec::new(),
            http: Vec::new(),
            git: Vec::new(),
            expected_refs: Vec::new(),
            agent_paths,
            tailscale_tarball,
            modal_app,
            modal_image,
            sandbox_id: sandbox.sandbox_id.first().cloned(),
            sandbox_ids: sandbox.sandbox_id.clone(),
            count: 1,
            parallel: 1,
            state_dir,
            use_sidecar: true,
            keep: false,
            timeout,
            deadlines,
        })
    }

    /// Whether this is a fan-out: more than one sandbox.
    pub fn is_fleet(&self) -> bool {
        self.count > 1
    }

    /// Refuses what N sandboxes cannot share: on this machine, one proxy port or one
    /// tailscaled socket, state file or state directory.
    fn check_fleet_inputs(&self) -> CliResult<()> {
        if let Some(name) = &self.hostname {
            // Each sandbox is `<hostname>-<slot>` (`for_slot`); the longest must still be a label.
            let longest = format!("{name}-{}", self.count);
            if longest.len() > MAX_HOSTNAME {
                let room = MAX_HOSTNAME - (longest.len() - name.len());
                return Err(CliError::usage(format!(
                    "With `--count {}`, the hostname {name:?} makes names up to {longest:?}, longer than a DNS label's {MAX_HOSTNAME} characters",
                    self.count
                ))
                .with_hint(format!(
                    "Use a hostname of at most {room} characters: each sandbox is named `<hostname>-<n>`."
                )));
            }
        }
        if self.backend.kind != SandboxKind::Local {
            return Ok(());
        }
        let shared = [
            (
                "--proxy-listen",
                self.proxy_listen.filter(|a| a.port() != 0).is_some(),
            ),
            ("--tailscaled-socket", self.tailscaled_socket.is_some()),
            (
                "--tailscaled-state",
                self.tailscaled_state
                    .as_deref()
                    .is_some_and(|s| !s.starts_with("mem:")),
            ),
            ("--tailscaled-statedir", self.tailscaled_statedir.is_some()),
        ];
        if let Some((flag, _)) = shared.iter().find(|(_, given)| *given) {
            return Err(CliError::usage(format!(
                "`{flag}` names one place, but {} local agents would share it",
                self.count
            ))
            .with_hint(
                "Drop it: with `--count`, each local agent gets its own state directory, socket and proxy port.",
            ));
        }
        Ok(())
    }

    /// The plan for sandbox `slot` (1 to N) of a fan-out: its own sandbox id, hostname, and on
    /// this machine its own proxy port, and a one-shot agent (a sidecar is one node).
    pub fn for_slot(&self, slot: u32) -> Self {
        let mut plan = self.clone();
        let index = usize::try_from(slot.saturating_sub(1)).unwrap_or(usize::MAX);
        plan.sandbox_id = self.sandbox_ids.get(index).cloned();
        plan.hostname = self.hostname.as_ref().map(|h| format!("{h}-{slot}"));
        if self.backend.kind == SandboxKind::Local {
            plan.use_sidecar = false;
            plan.proxy_listen = Some(
                self.proxy_listen
                    .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            );
        }
        plan
    }

    /// Whether anything on the dev host is to be checked (ping, HTTP or git).
    pub fn has_targets(&self) -> bool {
        !(self.ping.is_empty() && self.http.is_empty() && self.git.is_empty())
    }

    /// The backend the plan chose, with its local inputs checked before anything is created.
    /// `lifetime` overrides how long a created Modal sandbox lives.
    pub fn open_backend(
        &self,
        modal: Option<ModalConfig>,
        run_id: &str,
        lifetime: Option<Duration>,
    ) -> CliResult<Box<dyn Backend>> {
        Ok(match self.backend.kind {
            SandboxKind::Local => Box::new(LocalBackend::new(&self.agent_paths)?),
            _ => {
                let config = modal.ok_or_else(|| {
                    CliError::usage("Modal is not configured").with_hint(
                        "Set `MODAL_TOKEN_ID` and `MODAL_TOKEN_SECRET`, or run `modal token new`; or use `--sandbox local`.",
                    )
                })?;
                let options = ModalOptions {
                    app_name: self.modal_app.clone(),
                    image: self.modal_image.clone(),
                    run_timeout: self.timeout,
                    keep: self.keep,
                    run_id: run_id.to_owned(),
                    agents: self.agent_paths.clone(),
                    tailscale_tarball: self.tailscale_tarball.clone(),
                    lifetime,
                };
                Box::new(ModalBackend::new(config, options)?)
            }
        })
    }

    /// The tailnet part of a request. It carries the auth key: never log it.
    pub fn tailnet_config(&self, pushed_tailscaled: Option<&str>) -> Option<TailnetConfig> {
        self.auth_key.as_ref().map(|key| TailnetConfig {
            auth_key: key.expose().to_owned(),
            hostname: self.hostname.clone().unwrap_or_default(),
            control_url: self.control_url.clone().unwrap_or_default(),
            daemon: Some(DaemonConfig {
                tailscaled_path: self.tailscaled_path.clone().unwrap_or_default(),
                socket_path: self.tailscaled_socket.clone().unwrap_or_default(),
                state: self.tailscaled_state.clone().unwrap_or_default(),
                state_dir: self.tailscaled_statedir.clone().unwrap_or_default(),
                pushed_tailscaled_path: pushed_tailscaled.unwrap_or_default().to_owned(),
                env: self.tailscaled_env.clone().into_iter().collect(),
                proxy_listen: self.proxy_listen.map(|a| a.to_string()).unwrap_or_default(),
                ..Default::default()
            }),
            advertise_tags: self.advertise_tags.clone(),
        })
    }

    /// The targets as a sidecar `Check` request.
    pub fn check_request(&self, run_id: &str) -> CheckRequest {
        let run = self.run_request(run_id, "", None);
        CheckRequest {
            run_id: run.run_id,
            ping_targets: run.ping_targets,
            http_targets: run.http_targets,
            git_targets: run.git_targets,
            deadlines: run.deadlines,
        }
    }

    /// The request sent to the agent. It carries the auth key: never log it.
    pub fn run_request(
        &self,
        run_id: &str,
        sandbox_id: &str,
        pushed_tailscaled: Option<&str>,
    ) -> RunRequest {
        let tailnet = self.tailnet_config(pushed_tailscaled);
        RunRequest {
            run_id: run_id.to_owned(),
            sandbox_id: sandbox_id.to_owned(),
            tailnet,
            ping_targets: self
                .ping
                .iter()
                .map(|host| PingTarget {
                    address: host.clone(),
                })
                .collect(),
            http_targets: self
                .http
                .iter()
                .map(|check| {
                    let (low, high) = check
                        .expected
                        .as_ref()
                        .map_or((0, 0), |r| (*r.start(), *r.end()));
                    HttpTarget {
                        url: check.url.clone(),
                        expected_status: u32::from(low),
                        expected_status_max: u32::from(high),
                    }
                })
                .collect(),
            git_targets: self
                .git
                .iter()
                .map(|url| GitTarget {
                    url: url.clone(),
                    expected_refs: self
                        .expected_refs
                        .iter()
                        .map(|(name, sha)| ExpectedRef {
                            name: name.clone(),
                            sha: sha.clone(),
                        })
                        .collect(),
                })
                .collect(),
            deadlines: Some(self.deadlines),
        }
    }
}

fn choose_backend(args: &SandboxArgs, modal_configured: bool) -> CliResult<BackendChoice> {
    Ok(match args.sandbox {
        SandboxKind::Local => BackendChoice {
            kind: SandboxKind::Local,
            reason: "--sandbox local".into(),
        },
        SandboxKind::Modal => BackendChoice {
            kind: SandboxKind::Modal,
            reason: "--sandbox modal".into(),
        },
        SandboxKind::Auto if !args.sandbox_id.is_empty() => BackendChoice {
            kind: SandboxKind::Modal,
            reason: "--sandbox-id names a Modal sandbox".into(),
        },
        SandboxKind::Auto if modal_configured => BackendChoice {
            kind: SandboxKind::Modal,
            reason: "Modal credentials are configured".into(),
        },
        SandboxKind::Auto => BackendChoice {
            kind: SandboxKind::Local,
            reason: "no Modal credentials are configured".into(),
        },
    })
}

/// Flag values if any were given, else the env var's value (if set).
fn values_or_env(flags: &[String], env: &dyn Env, name: &str) -> Vec<String> {
    if !flags.is_empty() {
        return flags.to_vec();
    }
    env.non_empty(name).into_iter().collect()
}

fn validate_url(raw: &str, flag: &str, schemes: &[&str]) -> CliResult<String> {
    let shown = redact_urls(raw);
    let url = url::Url::parse(raw.trim()).map_err(|err| {
        CliError::usage(format!("`{flag}` {shown:?} is not a valid URL"))
            .with_source(err)
            .with_hint("Write a full URL such as http://100.64.0.1:7420/health.")
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(CliError::usage(format!(
            "`{flag}` {shown:?} uses the unsupported scheme {:?}",
            url.scheme()
        ))
        .with_hint(format!("Use one of: {}.", schemes.join(", "))));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(CliError::usage(format!("`{flag}` {shown:?} has no host"))
            .with_hint("Write a full URL such as http://100.64.0.1:7420/health."));
    }
    Ok(raw.trim().to_owned())
}

/// A `--ping` target: an IP address, or a name the agent looks up in the netmap.
fn validate_host(raw: &str) -> CliResult<String> {
    let host = raw.trim();
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host.to_owned());
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let name = host.trim_end_matches('.');
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok) {
        return Ok(host.to_owned());
    }
    Err(CliError::usage(format!(
        "`--ping` {raw:?} is neither an IP address nor a host name"
    ))
    .with_hint(
        "Give the dev host's tailnet IP (`tailscale ip -4` on the dev host) or its name, \
                 e.g. `devhost` or `devhost.tail1234.ts.net`.",
    ))
}

/// An `--http` value: `[STATUS=]URL`, where STATUS is a code (302) or an inclusive range
/// (200-399). A URL cannot start that way: its scheme starts with a letter.
fn parse_http_check(raw: &str) -> CliResult<HttpCheck> {
    let raw = raw.trim();
    let (expected, url) = match raw.split_once('=') {
        Some((status, url))
            if !status.is_empty() && status.bytes().all(|b| b.is_ascii_digit() || b == b'-') =>
        {
            (Some(parse_status_range(status)?), url)
        }
        _ => (None, raw),
    };
    Ok(HttpCheck {
        url: validate_url(url, "--http", &["http", "https"])?,
        expected,
    })
}

fn parse_status_range(text: &str) -> CliResult<RangeInclusive<u16>> {
    let code = |s: &str| s.parse::<u16>().ok().filter(|c| (100..=599).contains(c));
    let range = match text.split_once('-') {
        None => code(text).map(|c| c..=c),
        Some((low, high)) => match (code(low), code(high)) {
            (Some(low), Some(high)) if low <= high => Some(low..=high),
            _ => None,
        },
    };
    range.ok_or_else(|| {
        CliError::usage(format!(
            "`--http` {text:?}= is not an HTTP status or an inclusive range of them"
        ))
        .with_hint("Write a status from 100 to 599 before the URL, e.g. `--http 302=http://100.64.0.1:7420/login`, or a range such as `200-399=URL`.")
    })
}

fn parse_expected_ref(raw: &str) -> CliResult<(String, String)> {
    let usage = || {
        CliError::usage(format!("`--expect-ref` {raw:?} is not NAME=SHA"))
            .with_hint("For example `--expect-ref main=$(git rev-parse main)`.")
    };
    let (name, sha) = raw.split_once('=').ok_or_else(usage)?;
    let (name, sha) = (name.trim(), sha.trim().to_ascii_lowercase());
    if name.is_empty() {
        return Err(usage());
    }
    if !matches!(sha.len(), 40 | 64) || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CliError::usage(format!(
            "`--expect-ref` {raw:?}: {sha:?} is not a full 40- or 64-hex object id"
        ))
        .with_hint("Use the full sha, e.g. from `git rev-parse REF`."));
    }
    let name = if name == "HEAD" || name.starts_with("refs/") {
        name.to_owned()
    } else {
        format!("refs/heads/{name}")
    };
    Ok((name, sha))
}

fn read_auth_key(args: &TailnetArgs, env: &dyn Env) -> CliResult<Option<Secret>> {
    let from_file = |path: &std::path::Path, origin: &str| -> CliResult<Secret> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            CliError::usage(format!(
                "Failed to read the auth key from {} ({origin})",
                path.display()
            ))
            .with_source(err)
            .with_hint("Check the path, or set `TS_AUTHKEY` instead.")
        })?;
        let key = text.trim();
        if key.is_empty() {
            return Err(CliError::usage(format!(
                "The auth key file {} is empty ({origin})",
                path.display()
            ))
            .with_hint("Write the auth key into the file, or set `TS_AUTHKEY` instead."));
        }
        Ok(Secret::new(key))
    };
    if let Some(path) = &args.auth_key_file {
        return from_file(path, "--auth-key-file").map(Some);
    }
    match env.non_empty(env::TS_AUTHKEY) {
        // Same convention as the tailscale CLI: file:<path> reads the key from a file.
        Some(value) => match value.trim().strip_prefix("file:") {
            Some(path) => from_file(std::path::Path::new(path), "TS_AUTHKEY=file:…").map(Some),
            None => Ok(Some(Secret::new(value.trim()))),
        },
        None => Ok(None),
    }
}

/// The longest DNS label, so the longest hostname.
const MAX_HOSTNAME: usize = 63;

/// Hostnames must be DNS labels (what tailscaled's `dnsname.ValidHostname` accepts).
fn validate_hostname(name: &str) -> CliResult<()> {
    let valid = !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(
            CliError::usage(format!("The hostname {name:?} is not a valid DNS label")).with_hint(
                "Use 1-63 letters, digits and dashes, not starting or ending with a dash.",
            ),
        )
    }
}

/// Parses TAILBOX_TAILSCALED_ENV: a JSON object (what `cargo xtask lab up` prints) or
/// whitespace-separated `KEY=VALUE` words.
fn parse_env_pairs(text: &str) -> CliResult<BTreeMap<String, String>> {
    let text = text.trim();
    if text.starts_with('{') {
        return serde_json::from_str(text).map_err(|err| {
            CliError::usage(format!(
                "`{}` is not a JSON object of strings",
                env::TAILBOX_TAILSCALED_ENV
            ))
            .with_source(err)
            .with_hint("Paste the value `cargo xtask lab up` prints, or use `KEY=VALUE` words.")
        });
    }
    text.split_whitespace()
        .map(|pair| {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CliError::usage(format!(
                    "`{}` holds {pair:?}, which is not KEY=VALUE",
                    env::TAILBOX_TAILSCALED_ENV
                ))
                .with_hint("Separate `KEY=VALUE` words with spaces, or give a JSON object.")
            })?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::env::MapEnv;

    fn plan(argv: &[&str], env: &[(&str, &str)]) -> CliResult<CheckPlan> {
        let mut full = vec!["tailbox", "check"];
        full.extend_from_slice(argv);
        let Command::Check(args) = Cli::try_parse_from(full).unwrap().command else {
            panic!("not check")
        };
        CheckPlan::from_args(&args, &MapEnv::from_pairs(env.iter().copied()), false)
    }

    #[test]
    fn spike_env_names_are_fallbacks_and_flags_win() {
        let p = plan(
            &[],
            &[
                ("COOK_TAIL_IP", "100.64.0.1"),
                ("COOK_HTTP_URL", "http://100.64.0.1:7420/health"),
                ("COOK_GIT_URL", "http://100.64.0.1:7420/git/a.git"),
                ("TS_AUTHKEY", "tskey-auth-x"),
                ("TS_HOSTNAME", "box-1"),
            ],
        )
        .unwrap();
        assert_eq!(p.ping, vec!["100.64.0.1"]);
        assert_eq!(p.http[0].url, "http://100.64.0.1:7420/health");
        assert_eq!(p.git.len(), 1);
        assert_eq!(p.hostname.as_deref(), Some("box-1"));
        assert_eq!(p.auth_key.as_ref().unwrap().expose(), "tskey-auth-x");

        let p = plan(&["--ping", "100.64.0.9"], &[("COOK_TAIL_IP", "100.64.0.1")]).unwrap();
        assert_eq!(p.ping, vec!["100.64.0.9"]);
    }

    #[test]
    fn bad_input_is_a_usage_error_with_a_hint() {
        for (argv, env) in [
            (vec!["--ping", "not a host!"], vec![]),
            (vec!["--ping", "http://devhost/"], vec![]),
            (vec!["--http", "99=http://h/x"], vec![]),
            (vec!["--http", "399-300=http://h/x"], vec![]),
            (vec!["--http", "302="], vec![]),
            (vec!["--http", "not a url"], vec![]),
            (vec!["--http", "ftp://h/x"], vec![]),
            (
                vec!["--git", "http://h/r.git", "--expect-ref", "main=xyz"],
                vec![],
            ),
            (
                vec![
                    "--expect-ref",
                    "main=0123456789012345678901234567890123456789",
                ],
                vec![],
            ),
            (vec!["--hostname=-bad-"], vec![]),
            (vec![], vec![("TS_AUTHKEY", "file:/nonexistent/key")]),
        ] {
            let err = plan(&argv, &env).unwrap_err();
            assert_eq!(err.exit_status().code(), 2, "{argv:?}: {}", err.render());
        }
        let err = plan(&["--ping", "not a host!"], &[]).unwrap_err();
        assert!(err.hint.is_some());
    }

    #[test]
    fn a_fan_out_keeps_every_numbered_hostname_a_dns_label() {
        let name = "b".repeat(61);
        let hostname = format!("--hostname={name}");
        // `<61>-9` is 63 characters: every slot fits.
        let p = plan(&[&hostname, "--count", "9"], &[]).unwrap();
        assert_eq!(p.for_slot(9).hostname.map(|h| h.len()), Some(63));
        // `<61>-10` is 64: refused before any sandbox exists, with the room there is.
        let err = plan(&[&hostname, "--count", "10"], &[]).unwrap_err();
        assert_eq!(err.exit_status().code(), 2, "{}", err.render());
        assert!(
            err.render().contains(&format!("{name}-10")),
            "{}",
            err.render()
        );
        assert!(
            err.hint
                .as_deref()
                .unwrap_or_default()
                .contains("at most 60 characters"),
            "{}",
            err.render()
        );
    }

    #[test]
    fn ping_takes_ips_and_names() {
        let p = plan(
            &[
                "--ping",
                "100.64.0.1",
                "--ping",
                "devhost",
                "--ping",
                "devhost.tail1234.ts.net.",
            ],
            &[],
        )
        .unwrap();
        let request = p.run_request("r", "s", None);
        let sent: Vec<&str> = request
            .ping_targets
            .iter()
            .map(|t| t.address.as_str())
            .collect();
        assert_eq!(sent, ["100.64.0.1", "devhost", "devhost.tail1234.ts.net."]);
    }

    #[test]
    fn an_http_target_may_name_its_expected_status_or_range() {
        let p = plan(
            &[
                "--http",
                "http://h/health",
                "--http",
                "302=http://h/login",
                "--http",
                "200-399=https://h/x?a=b",
            ],
            &[],
        )
        .unwrap();
        let targets = p.run_request("r", "s", None).http_targets;
        let got: Vec<(&str, u32, u32)> = targets
            .iter()
            .map(|t| (t.url.as_str(), t.expected_status, t.expected_status_max))
            .collect();
        assert_eq!(
            got,
            [
                ("http://h/health", 0, 0),
                ("http://h/login", 302, 302),
                ("https://h/x?a=b", 200, 399),
            ]
        );
        // The same syntax in the environment.
        let p = plan(&[], &[("COOK_HTTP_URL", "401=http://h/private")]).unwrap();
        assert_eq!(p.http[0].expected, Some(401..=401));
    }

    #[test]
    fn secrets_in_urls_do_not_reach_error_messages() {
        let err = plan(&["--http", "gopher://user:hunter2@h/x"], &[]).unwrap_err();
        assert!(!err.render().contains("hunter2"), "{}", err.render());
    }

    #[test]
    fn auth_key_from_file_and_never_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "tskey-auth-secret\n").unwrap();
        let p = plan(&["--auth-key-file", path.to_str().unwrap()], &[]).unwrap();
        assert_eq!(p.auth_key.as_ref().unwrap().expose(), "tskey-auth-secret");
        assert!(!format!("{p:?}").contains("tskey-auth-secret"));

        let file_form = format!("file:{}", path.display());
        let p = plan(&[], &[("TS_AUTHKEY", &file_form)]).unwrap();
        assert_eq!(p.auth_key.unwrap().expose(), "tskey-auth-secret");
    }

    #[test]
    fn expected_refs_are_normalised() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let p = plan(
            &[
                "--git",
                "http://h/r.git",
                "--expect-ref",
                &format!("main={sha}"),
                "--expect-ref",
                &format!("refs/tags/v1={}", sha.to_uppercase()),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            p.expected_refs,
            vec![
                ("refs/heads/main".to_owned(), sha.to_owned()),
                ("refs/tags/v1".to_owned(), sha.to_owned())
            ]
        );
        let request = p.run_request("r", "s", None);
        assert_eq!(request.git_targets[0].expected_refs.len(), 2);
    }

    #[test]
    fn the_spike_defaults_are_overridable() {
        let p = plan(
            &[
                "--tailscaled-statedir",
                "/tmp/tsd",
                "--advertise-tag",
                "tag:ci",
            ],
            &[
                ("TS_AUTHKEY", "tskey-auth-x"),
                ("TS_SOCKET_PATH", "/tmp/ts.sock"),
                ("TS_STATE_PATH", "/tmp/ts.state"),
            ],
        )
        .unwrap();
        let tailnet = p.run_request("r", "s", None).tailnet.unwrap();
        let daemon = tailnet.daemon.unwrap();
        assert_eq!(daemon.socket_path, "/tmp/ts.sock");
        assert_eq!(daemon.state, "/tmp/ts.state");
        assert_eq!(daemon.state_dir, "/tmp/tsd");
        assert_eq!(tailnet.advertise_tags, ["tag:ci"]);
    }

    #[test]
    fn tailscaled_env_accepts_json_and_words() {
        let p = plan(&[], &[("TAILBOX_TAILSCALED_ENV", r#"{"A":"1","B":"x y"}"#)]).unwrap();
        assert_eq!(p.tailscaled_env["B"], "x y");
        let p = plan(&[], &[("TAILBOX_TAILSCALED_ENV", "A=1 B=2")]).unwrap();
        assert_eq!(p.tailscaled_env["B"], "2");
        assert!(plan(&[], &[("TAILBOX_TAILSCALED_ENV", "{nope")]).is_err());
    }

    #[test]
    fn backend_choice_explains_itself() {
        let Command::Check(args) = Cli::try_parse_from(["tailbox", "check"]).unwrap().command
        else {
            panic!()
        };
        let env = MapEnv::default();
        let local = CheckPlan::from_args(&args, &env, false).unwrap().backend;
        assert_eq!(local.kind, SandboxKind::Local);
        assert!(local.reason.contains("no Modal credentials"));
        let modal = CheckPlan::from_args(&args, &env, true).unwrap().backend;
        assert_eq!(modal.kind, SandboxKind::Modal);
    }
}
