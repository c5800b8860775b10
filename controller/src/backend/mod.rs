//! Where the agent runs: this machine ([`local`]) or a Modal sandbox ([`modal`]).
//!
//! Both give the rest of tailbox the same two things: a [`Backend`] that opens sandboxes
//! (creates one, or attaches to an existing one) and, at the end, stops and terminates what it
//! created; and a [`Sandbox`] that puts the agent in place and execs it. Each backend keeps its
//! own way of stopping: a local agent is asked to log out (SIGTERM) and waited for, a Modal
//! sandbox is terminated.

pub mod agents;
pub mod local;
pub mod modal;

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures::future::BoxFuture;
use tailbox_proto::agent::v1::SandboxInfo;
use tailbox_proto::arch::{Arch, ElfArchError};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::modal::ModalError;
pub use crate::process::ProcessExit;

/// A duplex byte stream to the agent (its stdout to read, its stdin to write).
pub trait AgentIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentIo for T {}

/// A launched agent.
pub struct AgentProcess {
    /// The gRPC wire.
    pub io: Box<dyn AgentIo>,
    /// The agent's stderr (its logs), read concurrently with the wire.
    pub stderr: Pin<Box<dyn AsyncRead + Send>>,
    /// Resolves when the agent process has exited. Dropping it does not stop the agent; the
    /// backend decides that.
    pub exit: BoxFuture<'static, ProcessExit>,
    /// sha256 the agent must report in its handshake, when the backend knows it.
    pub expected_sha256: Option<String>,
}

/// What [`Sandbox::install`] did.
#[derive(Debug, Clone, Default)]
pub struct Installed {
    /// Bytes sent into the sandbox (0 when everything was already there).
    pub uploaded_bytes: u64,
    /// Where a pushed tailscaled is in the sandbox, when tailscale binaries were pushed.
    pub pushed_tailscaled: Option<String>,
    /// The sandbox's CPU architecture, when it was learned to pick the agent (Modal).
    pub arch: Option<Arch>,
}

/// A place the agent runs.
#[async_trait::async_trait]
pub trait Sandbox: Send + Sync {
    /// Its identifier (a Modal sandbox id, or `local-<pid>`).
    fn id(&self) -> &str;

    /// What the report says about it.
    fn info(&self) -> SandboxInfo;

    /// The tailnet hostname to use when none is configured; `None` lets the agent derive one
    /// from the sandbox id (`modal-<id8>`).
    fn default_hostname(&self) -> Option<String>;

    /// Whether it is somewhere else (so creating it and uploading to it are worth showing).
    fn remote(&self) -> bool;

    /// Puts the agent for the sandbox's architecture, and any tailscale binaries to push, in
    /// place. [`Sandbox::exec_agent`] runs what this installed.
    async fn install(&mut self) -> Result<Installed, SandboxError>;

    /// Starts the installed agent with `args` (e.g. `serve --stdio`), its stdio wired as the
    /// gRPC wire.
    async fn exec_agent(&self, args: &[&str]) -> Result<AgentProcess, SandboxError>;
}

/// How a backend stops its work after Ctrl-C or SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// The agents were asked to stop (they cancel into their teardown and log out); wait up to
    /// this long for their reports.
    AwaitReports(Duration),
    /// Drop the work at once; [`Backend::release`] terminates the sandboxes.
    Abandon,
}

/// What happened to one sandbox when a backend released it.
#[derive(Debug)]
pub enum Released {
    /// It was terminated.
    Terminated(String),
    /// It was left running on purpose (`--keep`).
    Kept(String),
    /// It existed before this run (`--sandbox-id`), so it was left running.
    NotOurs(String),
    /// Terminating it failed.
    Failed(String, ModalError),
    /// Terminating it did not finish within the budget (`None`: its id was never learned).
    TimedOut(Option<String>),
}

/// Where the agent runs, and its lifecycle.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// `local` or `modal`.
    fn kind(&self) -> &'static str;

    /// Creates a sandbox, or attaches to the existing sandbox `existing`.
    async fn open(&self, existing: Option<&str>) -> Result<Box<dyn Sandbox>, SandboxError>;

    /// Terminates `id`, a sandbox that existed before this run, if tailbox created it (its
    /// `created-by=tailbox` tag) — `tailbox down` ends what `tailbox up` made. `None` where
    /// there is nothing to terminate (this machine).
    async fn terminate_created(&self, id: &str) -> Option<Released>;

    /// Stops the agents this backend started, its own way, and says how to wait for them.
    fn interrupt(&self) -> Interrupt;

    /// Terminates the sandboxes this backend created (unless kept), within `budget`, even if
    /// the work that created them was dropped mid-flight.
    async fn release(&self, budget: Duration) -> Vec<Released>;
}

/// Why a sandbox could not be prepared or the agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No agent binary was found where tailbox looks.
    #[error("Failed to find {} next to tailbox", if *static_needed { "a static tailbox-agent to upload" } else { "tailbox-agent" })]
    AgentMissing {
        /// Whether a static build is needed (a sandbox other than this machine).
        static_needed: bool,
    },
    /// The agent binary could not be read.
    #[error("Failed to read the agent binary {}", path.display())]
    AgentUnreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent binary cannot run in a sandbox.
    #[error("The agent {} cannot run in a sandbox", path.display())]
    AgentNotStatic {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        problem: ElfProblem,
    },
    /// Two different agents for one architecture were named.
    #[error("Two agents for {arch} were given: {} and {}", first.display(), second.display())]
    DuplicateAgent {
        /// The architecture.
        arch: Arch,
        /// One of them.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// A directory named by `--agent` holds no static agent.
    #[error("Failed to find a static tailbox-agent in {}", dir.display())]
    NoAgentInDirectory {
        /// The directory.
        dir: PathBuf,
    },
    /// The sandbox's architecture has no agent among those at hand.
    #[error(
        "The sandbox is {sandbox}, but no {sandbox} agent was given (have: {})",
        arch_list(have)
    )]
    NoAgentFor {
        /// The sandbox's architecture.
        sandbox: Arch,
        /// The architectures of the agents at hand.
        have: Vec<Arch>,
    },
    /// The sandbox's architecture could not be told from its ELF header.
    #[error("Failed to learn the sandbox's CPU architecture from {file}")]
    SandboxArch {
        /// The file whose header was read.
        file: &'static str,
        /// Why the header names no known architecture.
        #[source]
        problem: ElfArchError,
    },
    /// The tailscale tarball could not be used.
    #[error("Failed to read the tailscale tarball {}", path.display())]
    Tarball {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tarball has no tailscaled.
    #[error("The tarball {} has no tailscaled", path.display())]
    TarballWithoutTailscaled {
        /// The file.
        path: PathBuf,
    },
    /// A binary in the tarball is not a Linux executable for an architecture tailbox knows.
    #[error("The tailscale tarball's {name} ({}) is not a Linux binary tailbox can push", path.display())]
    TarballNotElf {
        /// The tarball.
        path: PathBuf,
        /// `tailscaled` or `tailscale`.
        name: &'static str,
        /// Why.
        #[source]
        problem: ElfArchError,
    },
    /// tailscaled and tailscale in one tarball are built for different architectures.
    #[error("The tailscale tarball {} mixes architectures: tailscaled is {tailscaled}, tailscale is {tailscale}", path.display())]
    TarballMixed {
        /// The tarball.
        path: PathBuf,
        /// tailscaled's.
        tailscaled: Arch,
        /// tailscale's.
        tailscale: Arch,
    },
    /// The tarball's binaries are for another architecture than the sandbox.
    #[error("The tailscale tarball {} holds {found} binaries, but the sandbox is {sandbox}", path.display())]
    TarballArch {
        /// The tarball.
        path: PathBuf,
        /// What its binaries are built for.
        found: Arch,
        /// The sandbox's architecture.
        sandbox: Arch,
    },
    /// The agent process could not be started on this machine.
    #[error("Failed to start the agent {}", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent was started in a sandbox before it was installed there.
    #[error("The agent was started before it was installed")]
    NotInstalled,
    /// Talking to Modal failed.
    #[error(transparent)]
    Modal(#[from] ModalError),
}

/// `x86_64, aarch64`, or `none`.
fn arch_list(archs: &[Arch]) -> String {
    if archs.is_empty() {
        return "none".into();
    }
    archs
        .iter()
        .map(|a| a.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a binary cannot be run in any Linux sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ElfProblem {
    /// Not an ELF executable at all.
    #[error("it is not an ELF executable ({0})")]
    NotElf(String),
    /// Built for a machine with no agent build, or a 32-bit or big-endian one.
    #[error(transparent)]
    Machine(#[from] ElfArchError),
    /// A library, not a program.
    #[error("it is not an executable")]
    NotExecutable,
    /// It needs a program interpreter the sandbox may lack.
    #[error(
        "it is dynamically linked (program interpreter {0}), and sandbox images need not have that loader"
    )]
    Dynamic(String),
}

/// Directories where `tailbox` looks for agents when none is named: its own (a release archive,
/// or a cargo profile directory such as `target/release`; test binaries sit one level deeper in
/// `deps/`), then the target directory above it, where `cargo xtask static-agent` puts
/// `<target>/release/tailbox-agent` for each architecture.
pub fn default_agent_dirs() -> Vec<PathBuf> {
    let Ok(exe) = std::env::current_exe() else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    let mut dir = exe.parent();
    if let Some(d) = dir {
        dirs.push(d.to_path_buf());
        if d.file_name().is_some_and(|n| n == "deps") {
            dir = d.parent();
            dirs.extend(dir.map(std::path::Path::to_path_buf));
        }
    }
    dirs.extend(
        dir.and_then(std::path::Path::parent)
            .map(std::path::Path::to_path_buf),
    );
    dirs
}
