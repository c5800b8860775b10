//! The local backend: the agent runs as a child process of the controller.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::FutureExt as _;
use sha2::{Digest, Sha256};
use tailbox_proto::agent::v1::SandboxInfo;
use tokio::process::Command;

use super::{AgentExit, AgentProcess};
use crate::error::{CliError, CliResult};

/// A "sandbox" that is this machine.
#[derive(Debug, Clone)]
pub struct LocalSandbox {
    agent_path: PathBuf,
    agent_sha256: String,
    id: String,
}

impl LocalSandbox {
    /// Finds and hashes the agent binary.
    pub fn prepare(agent_override: Option<&Path>) -> CliResult<Self> {
        let agent_path = match agent_override {
            Some(path) => path.to_path_buf(),
            None => default_agent_path()?,
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
            .kill_on_drop(true)
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
        let exit = async move {
            match child.wait().await {
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
        })
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

/// `tailbox-agent` next to the running `tailbox` (where cargo and the release archive put it).
fn default_agent_path() -> CliResult<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|err| CliError::infra("Failed to find the running executable").with_source(err))?;
    // Test binaries live in target/<profile>/deps; the agent is one level up.
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [
        dir.join("tailbox-agent"),
        dir.parent()
            .map(|p| p.join("tailbox-agent"))
            .unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            CliError::usage(format!(
                "Failed to find tailbox-agent next to {}",
                exe.display()
            ))
            .with_hint("build it with `cargo build -p tailbox-agent`, or pass --agent <PATH> (or set TAILBOX_AGENT)")
        })
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
