//! The local backend: the "sandbox" is this machine and the agent is a child process.
//!
//! Stopping: after Ctrl-C every agent still running gets SIGTERM, cancels its run into its
//! teardown (logout, stop tailscaled) and sends its report, which tailbox waits for. An agent
//! abandoned any other way (an error) gets SIGTERM too, and finishes that teardown on its own in
//! its own process group. An agent started after the interrupt (it came while the sandbox was
//! being prepared) gets SIGTERM as soon as it starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tailbox_proto::agent::v1::SandboxInfo;
use tailbox_proto::arch::Arch;
use tokio::process::Command;

use super::agents::AgentSet;
use super::{
    AgentProcess, Backend, Installed, Interrupt, ProcessExit, Released, Sandbox, SandboxError,
};

/// After Ctrl-C: how long local agents get to log out, stop tailscaled and report.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

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

/// Runs agents on this machine.
pub struct LocalBackend {
    agent: Arc<LocalAgent>,
    /// The agents started, for the interrupt.
    agents: Arc<Mutex<Agents>>,
    opened: AtomicUsize,
}

/// The agents started and whether the run was interrupted, changed together under one lock so
/// every agent gets SIGTERM exactly once after an interrupt, whenever it started.
#[derive(Debug, Default)]
struct Agents {
    /// Process ids of the agents still running.
    pids: Vec<u32>,
    /// Set by [`Backend::interrupt`].
    interrupted: bool,
}

fn terminate(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

/// The agent binary and its hash.
#[derive(Debug)]
struct LocalAgent {
    path: PathBuf,
    sha256: String,
}

impl LocalBackend {
    /// Finds (or takes) and hashes the agent binary: the one file named (whatever its
    /// architecture: this machine may run others under qemu-user), else the agent for this
    /// machine's architecture among those named (files or directories, as for Modal), else
    /// the default.
    pub fn new(agent_paths: &[PathBuf]) -> Result<Self, SandboxError> {
        let path = match agent_paths {
            [] => default_agent_path()?,
            [path] if !path.is_dir() => path.clone(),
            paths => {
                let agents = AgentSet::load(paths)?;
                let arch = Arch::host().unwrap_or(Arch::X86_64);
                agents.for_arch(arch)?.path.clone()
            }
        };
        let sha256 = sha256_file(&path).map_err(|source| SandboxError::AgentUnreadable {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            agent: Arc::new(LocalAgent { path, sha256 }),
            agents: Arc::default(),
            opened: AtomicUsize::new(0),
        })
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn open(&self, _existing: Option<&str>) -> Result<Box<dyn Sandbox>, SandboxError> {
        // The first sandbox is `local-<pid>`; more in one run are numbered.
        let n = self.opened.fetch_add(1, Ordering::SeqCst);
        let id = match n {
            0 => format!("local-{}", std::process::id()),
            n => format!("local-{}-{n}", std::process::id()),
        };
        Ok(Box::new(LocalSandbox {
            id,
            agent: Arc::clone(&self.agent),
            agents: Arc::clone(&self.agents),
        }))
    }

    async fn terminate_created(&self, _id: &str) -> Option<Released> {
        // This machine is not terminated.
        None
    }

    fn interrupt(&self) -> Interrupt {
        if let Ok(mut agents) = self.agents.lock()
            && !agents.interrupted
        {
            agents.interrupted = true;
            agents.pids.iter().copied().for_each(terminate);
        }
        Interrupt::AwaitReports(INTERRUPT_GRACE)
    }

    async fn release(&self, _budget: Duration) -> Vec<Released> {
        // Nothing to terminate: agents end when their stdin closes (or got SIGTERM on drop).
        Vec::new()
    }
}

/// This machine, as a sandbox.
pub struct LocalSandbox {
    id: String,
    agent: Arc<LocalAgent>,
    agents: Arc<Mutex<Agents>>,
}

#[async_trait::async_trait]
impl Sandbox for LocalSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn info(&self) -> SandboxInfo {
        SandboxInfo {
            backend: "local".into(),
            sandbox_id: self.id.clone(),
            image: String::new(),
            kept: false,
            uploaded_bytes: 0,
        }
    }

    fn default_hostname(&self) -> Option<String> {
        // modal-<id> would be misleading for a local run.
        Some(format!("tailbox-{}", self.id))
    }

    fn remote(&self) -> bool {
        false
    }

    async fn install(&mut self) -> Result<Installed, SandboxError> {
        Ok(Installed::default())
    }

    async fn exec_agent(&self, args: &[&str]) -> Result<AgentProcess, SandboxError> {
        let mut child = Command::new(&self.agent.path)
            .args(args)
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
            // Its own process group: a terminal's Ctrl-C reaches only us, and we then ask it to
            // log out of the tailnet before it exits.
            .process_group(0)
            .spawn()
            .map_err(|source| SandboxError::Spawn {
                path: self.agent.path.clone(),
                source,
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(SandboxError::Spawn {
                path: self.agent.path.clone(),
                source: std::io::Error::other("the agent's stdio pipes were not opened"),
            });
        };
        let pid = child.id();
        if let Some(pid) = pid
            && let Ok(mut agents) = self.agents.lock()
        {
            agents.pids.push(pid);
            if agents.interrupted {
                terminate(pid);
            }
        }
        let agents = Arc::clone(&self.agents);
        let mut child = StopOnDrop(child);
        let exit = async move {
            let exit = match child.0.wait().await {
                Ok(status) => ProcessExit::from(status),
                Err(err) => ProcessExit::Unknown(err.to_string()),
            };
            // Reaped: its pid may be reused, so the interrupt must no longer signal it.
            if let Ok(mut agents) = agents.lock() {
                agents.pids.retain(|p| Some(*p) != pid);
            }
            exit
        }
        .boxed();
        Ok(AgentProcess {
            io: Box::new(tokio::io::join(stdout, stdin)),
            stderr: Box::pin(stderr),
            exit,
            expected_sha256: Some(self.agent.sha256.clone()),
        })
    }
}

/// Owns the agent process. If the session is abandoned (an error) while the agent still runs,
/// it gets SIGTERM rather than SIGKILL: it then cancels its run, logs the node out and stops
/// tailscaled on its own, in its own process group, after we are gone.
struct StopOnDrop(tokio::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait()
            && let Some(pid) = self.0.id()
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

/// The first agent where `tailbox` looks by default ([`super::default_agent_dirs`]):
/// `tailbox-agent` in one of them, else the static build for this machine.
fn default_agent_path() -> Result<PathBuf, SandboxError> {
    let dirs = super::default_agent_dirs();
    let static_build = Arch::host().map(|a| format!("{}/release/tailbox-agent", a.rust_target()));
    dirs.iter()
        .map(|d| d.join("tailbox-agent"))
        .chain(
            dirs.iter()
                .filter_map(|d| Some(d.join(static_build.as_ref()?))),
        )
        .find(|p| p.is_file())
        .ok_or(SandboxError::AgentMissing {
            static_needed: false,
        })
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
