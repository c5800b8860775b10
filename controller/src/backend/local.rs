//! The local backend: the agent runs as a child process of the controller.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::FutureExt as _;
use sha2::{Digest, Sha256};
use tailbox_proto::agent::v1::SandboxInfo;
use tailbox_proto::arch::Arch;
use tokio::process::Command;

use super::{AgentExit, AgentProcess};
use crate::arch::AgentSet;
use crate::error::{CliError, CliResult};

/// A "sandbox" that is this machine.
#[derive(Debug, Clone)]
pub struct LocalSandbox {
    agent_path: PathBuf,
    agent_sha256: String,
    id: String,
}

impl LocalSandbox {
    /// Finds and hashes the agent binary: the one file named, else the agent for this machine's
    /// architecture among those named (files or directories, as for Modal), else the default.
    pub fn prepare(agent_paths: &[PathBuf]) -> CliResult<Self> {
        let agent_path = match agent_paths {
            [] => default_agent_path()?,
            [path] if !path.is_dir() => path.clone(),
            paths => {
                let host = Arch::host().ok_or_else(|| {
                    CliError::usage("This machine's CPU architecture has no agent build")
                        .with_hint("Pass one agent binary with `--agent`.")
                })?;
                AgentSet::load(paths)?.for_arch(host)?.path.clone()
            }
        };
        let agent_sha256 = sha256_file(&agent_path).map_err(|err| {
            CliError::usage(format!(
                "Failed to read the agent binary {}",
                agent_path.display()
            ))
            .with_source(err)
            .with_hint("build it with `cargo build -p tailbox-agent`, or pass --agent <PATH>")
        })?;
        Ok(Self {
            agent_path,
            agent_sha256,
            id: format!("local-{}", std::process::id()),
        })
    }

    /// Identifier used in reports and the default hostname.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the report says about this sandbox.
    pub fn info(&self) -> SandboxInfo {
        SandboxInfo {
            backend: "local".into(),
            sandbox_id: self.id.clone(),
            image: String::new(),
            kept: false,
            uploaded_bytes: 0,
        }
    }

    /// Starts `tailbox-agent serve --stdio` as a child process.
    pub fn launch_agent(&self, log_filter: &str) -> CliResult<AgentProcess> {
        let mut child = Command::new(&self.agent_path)
            .args(["serve", "--stdio", "--log", log_filter])
            // Like a fresh sandbox: only harmless variables, so no secret (TS_AUTHKEY, Modal
            // tokens) reaches the agent's or tailscaled's environment.
            .env_clear()
            .envs(std::env::vars_os().filter(|(name, _)| {
                SAFE_ENV
                    .iter()
                    .any(|safe| name.as_os_str() == std::ffi::OsStr::new(safe))
            }))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches only us, and we then close its
            // stdin so it can log out of the tailnet before exiting.
            .process_group(0)
            .spawn()
            .map_err(|err| {
                CliError::infra(format!(
                    "Failed to start the agent {}",
                    self.agent_path.display()
                ))
                .with_source(err)
                .with_hint("check that the file is an executable tailbox-agent for this machine")
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(CliError::infra("Failed to open the agent's stdio pipes"));
        };
        let pid = child.id();
        let mut child = StopOnDrop(child);
        let exit = async move {
            match child.0.wait().await {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => AgentExit::Code(code),
                    (None, Some(signal)) => AgentExit::Signal(signal),
                    (None, None) => AgentExit::Unknown(status.to_string()),
                },
                Err(err) => AgentExit::Unknown(err.to_string()),
            }
        }
        .boxed();
        Ok(AgentProcess {
            io: Box::new(tokio::io::join(stdout, stdin)),
            stderr: Box::pin(stderr),
            exit,
            expected_sha256: Some(self.agent_sha256.clone()),
            pid,
        })
    }
}

/// Owns the agent process. If the session is abandoned (Ctrl-C, an error) while the agent still
/// runs, it gets SIGTERM rather than SIGKILL: it then cancels its run, logs the node out and
/// stops tailscaled on its own, in its own process group, after we are gone.
struct StopOnDrop(tokio::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait()
            && let Some(pid) = self.0.id()
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// Environment passed through to a local agent.
const SAFE_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The first agent found where `tailbox` looks by default ([`super::default_agent_dirs`]):
/// `tailbox-agent` in one of them, else the static build for this machine.
fn default_agent_path() -> CliResult<PathBuf> {
    let dirs = super::default_agent_dirs();
    let static_build = Arch::host().map(|a| format!("{}/release/tailbox-agent", a.rust_target()));
    dirs.iter()
        .map(|d| d.join("tailbox-agent"))
        .chain(dirs.iter().filter_map(|d| Some(d.join(static_build.as_ref()?))))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CliError::usage("Failed to find tailbox-agent next to tailbox")
                .with_hint("build it with `cargo xtask static-agent` (or `cargo build -p tailbox-agent`), or pass --agent <PATH> (or set TAILBOX_AGENT)")
        })
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
