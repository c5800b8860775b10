//! The edge where errors meet people: every layer's error type becomes a [`CliError`] here, in
//! one place, with its wording, its hint (see STYLE.md) and its exit code.

use std::error::Error as StdError;
use std::fmt::Write as _;

use tailbox_proto::arch::Arch;
use tonic::Code;

use crate::backend::SandboxError;
use crate::modal::ModalError;
use crate::modal::config::ConfigError;
use crate::modal::error::{FilesProblem, Service};
use crate::output::OutputError;
use crate::secret::redact_urls;
use crate::session::{SessionError, SessionFailure};

/// How bugs ask to be reported, everywhere.
pub const BUG_HINT: &str = "This is a bug in tailbox; please report it with the output above.";

/// Process exit codes. Scripts can tell "the network is broken" (1) from "tailbox or the sandbox
/// is broken" (3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Every check passed (warnings and skips allowed).
    Passed = 0,
    /// At least one check failed.
    CheckFailed = 1,
    /// Bad flags, environment or configuration.
    Usage = 2,
    /// The sandbox, the agent, or the transport between them failed.
    Infrastructure = 3,
    /// Interrupted by Ctrl-C or SIGTERM; cleanup still ran.
    Interrupted = 130,
    /// The reader closed stdout (e.g. `| head -1`); the run stopped as after Ctrl-C, cleanup
    /// still ran, and nothing was said about it: 128 + SIGPIPE, as a shell expects.
    ClosedStdout = 141,
}

impl ExitStatus {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Which exit status an error maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user asked for something invalid.
    Usage,
    /// Something outside the user's request failed.
    Infrastructure,
    /// The user interrupted the run.
    Interrupted,
}

/// An error for people, rendered as `error:`, `Caused by:` lines, details, then `hint:`.
#[derive(Debug)]
pub struct CliError {
    /// Which exit status this maps to.
    pub kind: ErrorKind,
    /// What failed, e.g. "Failed to start the agent".
    pub message: String,
    /// Why, outermost first; one `Caused by:` line each.
    pub causes: Vec<String>,
    /// Extra context blocks, e.g. the agent's stderr tail.
    pub details: Vec<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl CliError {
    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }

    /// An infrastructure error.
    pub fn infra(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Infrastructure, message)
    }

    /// The run was interrupted.
    pub fn interrupted() -> Self {
        Self::new(ErrorKind::Interrupted, "Interrupted")
    }

    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            causes: Vec::new(),
            details: Vec::new(),
            hint: None,
        }
    }

    /// An error whose headline is `err` itself and whose causes are its sources.
    fn of(kind: ErrorKind, err: &(dyn StdError + 'static)) -> Self {
        let mut this = Self::new(kind, err.to_string());
        this.causes = chain(err.source());
        this
    }

    /// Attaches `source` and its own sources as causes.
    pub fn with_source(mut self, source: impl StdError + 'static) -> Self {
        self.causes.push(source.to_string());
        self.causes.extend(chain(source.source()));
        self
    }

    /// Attaches a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Attaches a detail block.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.details.push(detail.into());
        self
    }

    /// The exit status for this error.
    pub fn exit_status(&self) -> ExitStatus {
        match self.kind {
            ErrorKind::Usage => ExitStatus::Usage,
            ErrorKind::Infrastructure => ExitStatus::Infrastructure,
            ErrorKind::Interrupted => ExitStatus::Interrupted,
        }
    }

    /// The text printed on stderr, with URL credentials removed.
    pub fn render(&self) -> String {
        self.render_as("error")
    }

    /// The same, as a `warning:` (something failed, but the command goes on).
    pub fn render_warning(&self) -> String {
        self.render_as("warning")
    }

    fn render_as(&self, prefix: &str) -> String {
        let mut out = format!("{prefix}: {}\n", self.message);
        for cause in &self.causes {
            let _ = writeln!(out, "  Caused by: {cause}");
        }
        for detail in &self.details {
            out.push_str(detail.trim_end());
            out.push('\n');
        }
        if let Some(hint) = &self.hint {
            let _ = writeln!(out, "hint: {hint}");
        }
        redact_urls(&out)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for CliError {}

/// Shorthand for results at the CLI layer.
pub type CliResult<T> = Result<T, CliError>;

/// The messages of `source` and everything below it.
fn chain(mut source: Option<&(dyn StdError + 'static)>) -> Vec<String> {
    let mut causes = Vec::new();
    while let Some(err) = source {
        causes.push(err.to_string());
        source = err.source();
    }
    causes
}

impl From<ConfigError> for CliError {
    fn from(err: ConfigError) -> Self {
        let hint = match &err {
            ConfigError::HalfToken { missing, .. } => format!(
                "Set `MODAL_TOKEN_{}` too, or run `modal token new`.",
                missing.to_ascii_uppercase()
            ),
            ConfigError::ServerUrl { .. } => "Use an `https://` URL, or unset `MODAL_SERVER_URL` to use https://api.modal.com:443. Plain http is only accepted for 127.0.0.1 and localhost.".into(),
            ConfigError::ThrottleWait { .. } => "Set it to a number of seconds, e.g. `60`, or unset it to wait as long as Modal asks.".into(),
            ConfigError::Unreadable { .. } => "Check `MODAL_CONFIG_PATH`, or unset it to use `~/.modal.toml`.".into(),
            ConfigError::Unparsable { .. } => "Fix the TOML, or run `modal token new` to rewrite it.".into(),
            ConfigError::NoSuchProfile { .. } => "Unset `MODAL_PROFILE`, or run `modal profile list` to see the profiles.".into(),
        };
        CliError::of(ErrorKind::Usage, &err).with_hint(hint)
    }
}

impl From<ModalError> for CliError {
    fn from(err: ModalError) -> Self {
        let mut kind = ErrorKind::Infrastructure;
        let hint: Option<String> = match &err {
            ModalError::Rpc {
                rpc,
                service,
                status,
                credentials,
                server_url,
                ..
            } => match (service, status.code()) {
                (Service::ControlPlane, Code::Unauthenticated | Code::PermissionDenied) => {
                    kind = ErrorKind::Usage;
                    Some(format!(
                        "Modal refused the credentials from {credentials}. Check `MODAL_TOKEN_ID` and `MODAL_TOKEN_SECRET`, or run `modal token new`."
                    ))
                }
                (Service::ControlPlane, Code::Unavailable | Code::DeadlineExceeded) => Some(format!(
                    "Modal did not answer at {server_url}. Check the network and `MODAL_SERVER_URL`."
                )),
                (_, Code::NotFound) if *rpc == "SandboxGetTaskId" => Some(
                    "Check the sandbox id; `tailbox sandbox sweep --dry-run` lists the sandboxes tailbox left running.".into(),
                ),
                (Service::Router, Code::NotFound) => {
                    Some("The sandbox may have stopped (timed out or terminated).".into())
                }
                _ => None,
            },
            ModalError::Endpoint { handed_out, .. } => Some(if *handed_out {
                BUG_HINT.into()
            } else {
                kind = ErrorKind::Usage;
                "Use an `https://` URL in `MODAL_SERVER_URL`.".into()
            }),
            ModalError::NoImageBuilderVersion => {
                Some("Set `MODAL_IMAGE_BUILDER_VERSION` (e.g. `2024.10`).".into())
            }
            ModalError::ImageBuild { .. } => {
                Some("Check that `MODAL_IMAGE` names a public image Modal can pull.".into())
            }
            ModalError::SandboxFinished { .. } => {
                Some("Run without `--sandbox-id` to create a new sandbox.".into())
            }
            ModalError::NotScheduled { .. } => {
                Some("Modal may be short of capacity; try again later.".into())
            }
            ModalError::Files { source, .. } => match source {
                FilesProblem::NoChmod { .. } => Some(
                    "Use an image that has `chmod` (coreutils or busybox), such as the default `MODAL_IMAGE`.".into(),
                ),
                FilesProblem::NoExecuteBit => {
                    Some("The sandbox's `/tmp` may be mounted noexec.".into())
                }
                FilesProblem::Short { .. } => {
                    Some("Run again; the upload starts afresh.".into())
                }
                FilesProblem::Exec(status) if status.code() == Code::NotFound => {
                    Some("The sandbox may have stopped (timed out or terminated).".into())
                }
                _ => None,
            },
        };
        let mut cli = CliError::of(kind, &err);
        if let ModalError::ImageBuild { log_tail, .. } = &err
            && !log_tail.is_empty()
        {
            cli = cli.with_detail(format!(
                "build log (last lines):\n  | {}",
                log_tail.join("\n  | ")
            ));
        }
        match hint {
            Some(hint) => cli.with_hint(hint),
            None => cli,
        }
    }
}

impl From<SandboxError> for CliError {
    fn from(err: SandboxError) -> Self {
        match err {
            SandboxError::Modal(modal) => modal.into(),
            other => {
                let (kind, hint) = sandbox_wording(&other);
                CliError::of(kind, &other).with_hint(hint)
            }
        }
    }
}

/// The command that builds the static agent for `arch`, for hints.
fn static_build_command(arch: Arch) -> String {
    format!("cargo xtask static-agent --target {}", arch.rust_target())
}

fn sandbox_wording(err: &SandboxError) -> (ErrorKind, String) {
    let usage = |hint: &str| (ErrorKind::Usage, hint.to_owned());
    match err {
        SandboxError::AgentMissing {
            static_needed: false,
        }
        | SandboxError::AgentUnreadable { .. } => usage(
            "Build it with `cargo build -p tailbox-agent` (or `cargo xtask static-agent`), or pass `--agent PATH` (or set `TAILBOX_AGENT`).",
        ),
        SandboxError::AgentMissing {
            static_needed: true,
        }
        | SandboxError::AgentNotStatic { .. }
        | SandboxError::NoAgentInDirectory { .. } => usage(
            "Build it with `cargo xtask static-agent` (add `--target aarch64-unknown-linux-musl` for aarch64 sandboxes), or pass `--agent PATH` (or set `TAILBOX_AGENT`).",
        ),
        SandboxError::DuplicateAgent { arch, .. } => {
            (ErrorKind::Usage, format!("Pass one `--agent` for {arch}."))
        }
        SandboxError::NoAgentFor { sandbox, .. } => (
            ErrorKind::Usage,
            format!(
                "Build the {sandbox} agent with `{}` and pass it with `--agent` (a directory holding one agent per architecture, such as `--agent target`, works too).",
                static_build_command(*sandbox)
            ),
        ),
        SandboxError::SandboxArch { .. } => (
            ErrorKind::Infrastructure,
            "Use a sandbox image for x86_64 or aarch64: tailbox builds agents for those only."
                .to_owned(),
        ),
        SandboxError::Tarball { .. }
        | SandboxError::TarballWithoutTailscaled { .. }
        | SandboxError::TarballNotElf { .. }
        | SandboxError::TarballMixed { .. } => usage(
            "Pass a release tarball such as `tailscale_1.x.y_amd64.tgz` or `tailscale_1.x.y_arm64.tgz` from pkgs.tailscale.com.",
        ),
        SandboxError::TarballArch { sandbox, .. } => (
            ErrorKind::Usage,
            format!(
                "The sandbox is {sandbox}: pass the {sandbox} tarball, `tailscale_<version>_{}.tgz` from pkgs.tailscale.com.",
                sandbox.go_arch()
            ),
        ),
        SandboxError::Spawn { .. } => (
            ErrorKind::Infrastructure,
            "Check that the file is an executable tailbox-agent for this machine.".to_owned(),
        ),
        // Converted through `From<ModalError>` before this is asked.
        SandboxError::NotInstalled | SandboxError::Modal(_) => {
            (ErrorKind::Infrastructure, BUG_HINT.to_owned())
        }
    }
}

impl From<SessionError> for CliError {
    fn from(err: SessionError) -> Self {
        let SessionError {
            failure,
            exit,
            stderr_tail,
        } = err;
        let failure = match failure {
            SessionFailure::Output(output) => return output.into(),
            other => other,
        };
        let mut cli = CliError::of(ErrorKind::Infrastructure, &failure);
        if let Some(exit) = &exit {
            cli = cli.with_detail(format!("the agent process ended: {exit}"));
        }
        cli.with_detail(stderr_block(&stderr_tail))
            .with_hint(session_hint(&failure))
    }
}

fn session_hint(failure: &SessionFailure) -> &'static str {
    match failure {
        SessionFailure::Connect(_) | SessionFailure::Hello(_) => {
            "The agent may have exited at once; its stderr is above."
        }
        SessionFailure::ExitedBeforeHello => {
            "The agent binary may not run in this sandbox; its stderr is above."
        }
        SessionFailure::HelloTimeout(_) => {
            "Check that the agent's stdout is not redirected or buffered."
        }
        SessionFailure::WrongAgent { .. } => {
            "The uploaded copy may be corrupt; run again to upload it afresh."
        }
        SessionFailure::Unsupported { .. } => {
            "Use a tailbox-agent built from the same version as tailbox (`cargo xtask static-agent`)."
        }
        SessionFailure::Died(_) | SessionFailure::Broke(_) => {
            "This is a sandbox or agent problem, not a tailnet one; the agent's stderr is above."
        }
        SessionFailure::Timeout => {
            "Raise `--timeout`, or run with `--verbose` to see where it stalls."
        }
        SessionFailure::Call { .. } => {
            "The sidecar's log (sidecar.log in its state directory) says more; `tailbox-agent status` in the sandbox shows its state."
        }
        // Converted through `From<OutputError>` before this is asked.
        SessionFailure::Refused(_) | SessionFailure::NoReport | SessionFailure::Output(_) => {
            BUG_HINT
        }
    }
}

impl From<OutputError> for CliError {
    fn from(err: OutputError) -> Self {
        CliError::of(ErrorKind::Infrastructure, &err)
    }
}

/// The agent's last stderr lines, indented.
fn stderr_block(lines: &[String]) -> String {
    if lines.is_empty() {
        return "agent stderr: (empty)".into();
    }
    let mut out = format!("agent stderr (last {} lines):\n", lines.len());
    for line in lines {
        let _ = writeln!(out, "  | {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ElfProblem, ProcessExit};
    use crate::env::MapEnv;
    use crate::modal::config::{TomlReason, resolve};
    use crate::modal::error::{EndpointProblem, Finished, RpcStatus};
    use tailbox_proto::arch::ElfArchError;

    fn rpc(rpc: &'static str, service: Service, code: Code, action: &str) -> ModalError {
        ModalError::Rpc {
            action: action.into(),
            rpc,
            service,
            status: RpcStatus(tonic::Status::new(code, "the server's message")),
            credentials: "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET".into(),
            server_url: "https://api.modal.com:443".into(),
        }
    }

    fn session(failure: SessionFailure) -> SessionError {
        SessionError {
            failure,
            exit: Some(ProcessExit::Signal(9)),
            stderr_tail: vec!["serving tailbox.agent.v1 on stdio".into()],
        }
    }

    /// Every error the CLI can print, as a person sees it.
    fn catalogue() -> Vec<(&'static str, CliError)> {
        let io = || std::io::Error::from_raw_os_error(2);
        let status = |code| RpcStatus(tonic::Status::new(code, "the agent's message"));
        vec![
            (
                "config: half a token",
                ConfigError::HalfToken {
                    present: "id",
                    missing: "secret",
                    source_name: "MODAL_TOKEN_ID".into(),
                }
                .into(),
            ),
            (
                "config: server URL",
                ConfigError::ServerUrl {
                    url: "http://api.example.com".into(),
                    problem: "is plain http on a non-local host".into(),
                }
                .into(),
            ),
            (
                "config: throttle wait",
                ConfigError::ThrottleWait {
                    value: "soon".into(),
                }
                .into(),
            ),
            (
                "config: unreadable file",
                ConfigError::Unreadable {
                    path: "/home/me/.modal.toml".into(),
                    source: io(),
                }
                .into(),
            ),
            (
                "config: unparsable file",
                ConfigError::Unparsable {
                    path: "/home/me/.modal.toml".into(),
                    reason: TomlReason("invalid string at line 2".into()),
                }
                .into(),
            ),
            (
                "config: no such profile",
                ConfigError::NoSuchProfile {
                    name: "work".into(),
                    path: "/home/me/.modal.toml".into(),
                }
                .into(),
            ),
            (
                "modal: refused credentials",
                rpc(
                    "SandboxCreate",
                    Service::ControlPlane,
                    Code::Unauthenticated,
                    "create the Modal sandbox",
                )
                .into(),
            ),
            (
                "modal: unreachable",
                rpc(
                    "AppGetOrCreate",
                    Service::ControlPlane,
                    Code::Unavailable,
                    "look up the Modal app \"cook-sandbox\"",
                )
                .into(),
            ),
            (
                "modal: unknown sandbox id",
                rpc(
                    "SandboxGetTaskId",
                    Service::ControlPlane,
                    Code::NotFound,
                    "find the task of sandbox sb-123",
                )
                .into(),
            ),
            (
                "modal: sandbox gone under the router",
                rpc(
                    "TaskExecStart",
                    Service::Router,
                    Code::NotFound,
                    "start the agent in the sandbox",
                )
                .into(),
            ),
            (
                "modal: other failure",
                rpc(
                    "SandboxList",
                    Service::ControlPlane,
                    Code::Internal,
                    "list Modal sandboxes",
                )
                .into(),
            ),
            (
                "modal: bad server URL",
                ModalError::Endpoint {
                    url: "ftp://x".into(),
                    source: EndpointProblem::Scheme("ftp".into()),
                    handed_out: false,
                }
                .into(),
            ),
            (
                "modal: bad router URL",
                ModalError::Endpoint {
                    url: "http://10.0.0.1:443".into(),
                    source: EndpointProblem::Plaintext,
                    handed_out: true,
                }
                .into(),
            ),
            (
                "modal: no image builder version",
                ModalError::NoImageBuilderVersion.into(),
            ),
            (
                "modal: image build",
                ModalError::ImageBuild {
                    tag: "ghcr.io/me/img:1".into(),
                    outcome: Finished {
                        status: "GENERIC_STATUS_FAILURE".into(),
                        exception: "manifest unknown".into(),
                    },
                    log_tail: vec!["pulling".into(), "manifest unknown".into()],
                }
                .into(),
            ),
            (
                "modal: sandbox finished",
                ModalError::SandboxFinished {
                    sandbox_id: "sb-123".into(),
                    outcome: Finished {
                        status: "GENERIC_STATUS_TIMEOUT".into(),
                        exception: String::new(),
                    },
                }
                .into(),
            ),
            (
                "modal: not scheduled",
                ModalError::NotScheduled {
                    sandbox_id: "sb-123".into(),
                    seconds: 300,
                }
                .into(),
            ),
            (
                "modal: no chmod",
                ModalError::Files {
                    action: "make /tmp/tailbox/bin/tailbox-agent-ab executable in the sandbox"
                        .into(),
                    source: FilesProblem::NoChmod {
                        tried: "chmod: exit status 127".into(),
                    },
                }
                .into(),
            ),
            (
                "modal: noexec",
                ModalError::Files {
                    action: "make /tmp/tailbox/bin/tailbox-agent-ab executable in the sandbox"
                        .into(),
                    source: FilesProblem::NoExecuteBit,
                }
                .into(),
            ),
            (
                "modal: short upload",
                ModalError::Files {
                    action: "write /tmp/tailbox/bin/tailbox-agent-ab in the sandbox".into(),
                    source: FilesProblem::Short {
                        arrived: 10,
                        expected: 20,
                    },
                }
                .into(),
            ),
            (
                "sandbox: no local agent",
                SandboxError::AgentMissing {
                    static_needed: false,
                }
                .into(),
            ),
            (
                "sandbox: no static agent",
                SandboxError::AgentMissing {
                    static_needed: true,
                }
                .into(),
            ),
            (
                "sandbox: unreadable agent",
                SandboxError::AgentUnreadable {
                    path: "/x/tailbox-agent".into(),
                    source: io(),
                }
                .into(),
            ),
            (
                "sandbox: dynamic agent",
                SandboxError::AgentNotStatic {
                    path: "/x/tailbox-agent".into(),
                    problem: ElfProblem::Dynamic("/lib64/ld-linux-x86-64.so.2".into()),
                }
                .into(),
            ),
            (
                "sandbox: not an agent build's machine",
                SandboxError::AgentNotStatic {
                    path: "/x/tailbox-agent".into(),
                    problem: ElfProblem::Machine(ElfArchError::UnknownMachine(243)),
                }
                .into(),
            ),
            (
                "sandbox: two agents for one architecture",
                SandboxError::DuplicateAgent {
                    arch: Arch::Aarch64,
                    first: "/x/tailbox-agent-aarch64".into(),
                    second: "/y/tailbox-agent".into(),
                }
                .into(),
            ),
            (
                "sandbox: a directory without an agent",
                SandboxError::NoAgentInDirectory { dir: "/x".into() }.into(),
            ),
            (
                "sandbox: no agent for the sandbox's architecture",
                SandboxError::NoAgentFor {
                    sandbox: Arch::Aarch64,
                    have: vec![Arch::X86_64],
                }
                .into(),
            ),
            (
                "sandbox: unknown sandbox architecture",
                SandboxError::SandboxArch {
                    file: "/proc/self/exe",
                    problem: ElfArchError::UnknownMachine(243),
                }
                .into(),
            ),
            (
                "sandbox: unreadable tarball",
                SandboxError::Tarball {
                    path: "/x/ts.tgz".into(),
                    source: io(),
                }
                .into(),
            ),
            (
                "sandbox: tarball without tailscaled",
                SandboxError::TarballWithoutTailscaled {
                    path: "/x/ts.tgz".into(),
                }
                .into(),
            ),
            (
                "sandbox: tarball binary not an ELF",
                SandboxError::TarballNotElf {
                    path: "/x/ts.tgz".into(),
                    name: "tailscaled",
                    problem: ElfArchError::NotElf,
                }
                .into(),
            ),
            (
                "sandbox: tarball of mixed architectures",
                SandboxError::TarballMixed {
                    path: "/x/ts.tgz".into(),
                    tailscaled: Arch::X86_64,
                    tailscale: Arch::Aarch64,
                }
                .into(),
            ),
            (
                "sandbox: tarball for another architecture",
                SandboxError::TarballArch {
                    path: "/x/tailscale_1.2.3_amd64.tgz".into(),
                    found: Arch::X86_64,
                    sandbox: Arch::Aarch64,
                }
                .into(),
            ),
            (
                "sandbox: agent not installed",
                SandboxError::NotInstalled.into(),
            ),
            (
                "sandbox: spawn",
                SandboxError::Spawn {
                    path: "/x/tailbox-agent".into(),
                    source: io(),
                }
                .into(),
            ),
            (
                "session: exited before the handshake",
                session(SessionFailure::ExitedBeforeHello).into(),
            ),
            (
                "session: no handshake",
                session(SessionFailure::HelloTimeout(60)).into(),
            ),
            (
                "session: handshake failed",
                session(SessionFailure::Hello(status(Code::Unavailable))).into(),
            ),
            (
                "session: wrong agent",
                session(SessionFailure::WrongAgent {
                    got: "cdcdcdcdcdcd".into(),
                    expected: "abababababab".into(),
                })
                .into(),
            ),
            (
                "session: missing feature",
                session(SessionFailure::Unsupported {
                    agent_version: "0.0.9".into(),
                    missing: "git".into(),
                })
                .into(),
            ),
            (
                "session: run refused",
                session(SessionFailure::Refused(status(Code::FailedPrecondition))).into(),
            ),
            (
                "session: no report",
                session(SessionFailure::NoReport).into(),
            ),
            (
                "session: agent died",
                session(SessionFailure::Died(Some(status(Code::Unknown)))).into(),
            ),
            (
                "session: link broke",
                session(SessionFailure::Broke(status(Code::Unavailable))).into(),
            ),
            ("session: timeout", session(SessionFailure::Timeout).into()),
            (
                "session: sidecar call failed",
                session(SessionFailure::Call {
                    what: "Up",
                    status: status(Code::FailedPrecondition),
                })
                .into(),
            ),
            (
                "output: stdout failed",
                OutputError::Write(std::io::Error::from_raw_os_error(28)).into(),
            ),
        ]
    }

    #[test]
    fn every_error_follows_style_md_and_its_wording_is_pinned() {
        let mut out = String::new();
        for (name, err) in catalogue() {
            let text = err.render();
            let headline = text.lines().next().unwrap_or_default();
            assert!(headline.starts_with("error: "), "{name}: {text}");
            let message = &headline["error: ".len()..];
            assert!(
                message.starts_with(|c: char| c.is_ascii_uppercase() || c == '`')
                    && !message.ends_with('.'),
                "{name}: the error line starts with a capital (or a `name`) and has no final period: {message}"
            );
            for cause in text.lines().filter(|l| l.starts_with("  Caused by: ")) {
                assert!(
                    !message.contains(&cause["  Caused by: ".len()..]),
                    "{name}: cause repeated in the error line"
                );
            }
            if let Some(hint) = &err.hint {
                assert!(
                    hint.starts_with(|c: char| c.is_ascii_uppercase()) && hint.ends_with('.'),
                    "{name}: a hint is a sentence: {hint}"
                );
            }
            let _ = writeln!(out, "## {name} (exit {})\n{text}", err.exit_status().code());
        }
        insta::assert_snapshot!(out);
    }

    #[test]
    fn render_orders_error_causes_details_hint_and_redacts() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("inner")]
        struct Inner;
        let err = CliError::infra("Failed to reach http://u:p@host/x")
            .with_source(Outer(Inner))
            .with_detail("agent stderr:\n  | boom")
            .with_hint("Try again.");
        let text = err.render();
        assert_eq!(
            text,
            "error: Failed to reach http://****@host/x\n  Caused by: outer\n  Caused by: inner\nagent stderr:\n  | boom\nhint: Try again.\n"
        );
        assert_eq!(err.exit_status().code(), 3);
    }

    #[test]
    fn a_layer_error_is_its_headline_and_its_sources_are_causes_never_repeated() {
        let err = CliError::from(SandboxError::Spawn {
            path: "/x/tailbox-agent".into(),
            source: std::io::Error::from_raw_os_error(2),
        });
        let text = err.render();
        assert!(
            text.starts_with("error: Failed to start the agent /x/tailbox-agent\n  Caused by: No such file or directory (os error 2)\nhint: "),
            "{text}"
        );
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
    }

    #[test]
    fn half_a_modal_token_is_a_usage_error_naming_the_missing_half() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().display().to_string();
        let err = CliError::from(
            resolve(&MapEnv::from_pairs([
                ("HOME", home.as_str()),
                ("MODAL_TOKEN_ID", "ak-x"),
            ]))
            .unwrap_err(),
        );
        assert_eq!(err.exit_status().code(), 2);
        assert!(err.hint.unwrap().contains("MODAL_TOKEN_SECRET"));
    }

    #[test]
    fn bad_modal_config_is_a_usage_error_without_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("modal.toml");
        std::fs::write(&path, "[p]\ntoken_secret = \"as-hunter2\nactive = true\n").unwrap();
        let path = path.display().to_string();
        let err = CliError::from(
            resolve(&MapEnv::from_pairs([("MODAL_CONFIG_PATH", path.as_str())])).unwrap_err(),
        );
        assert_eq!(err.exit_status().code(), 2);
        assert!(!err.render().contains("hunter2"), "{}", err.render());

        let err = CliError::from(
            resolve(&MapEnv::from_pairs([
                ("MODAL_TOKEN_ID", "ak"),
                ("MODAL_TOKEN_SECRET", "as"),
                ("MODAL_SERVER_URL", "http://api.example.com"),
            ]))
            .unwrap_err(),
        );
        assert_eq!(err.exit_status().code(), 2);
    }
}
