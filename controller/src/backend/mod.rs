//! Where the agent runs. Every backend hands back the same thing: a byte stream to the agent's
//! stdin/stdout, its stderr, and a future for its exit, so the session code is backend-agnostic.

pub mod local;
pub mod modal;

use std::fmt;
use std::pin::Pin;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

/// A duplex byte stream to the agent (its stdout to read, its stdin to write).
pub trait AgentIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentIo for T {}

/// A launched agent.
pub struct AgentProcess {
    /// The gRPC wire.
    pub io: Box<dyn AgentIo>,
    /// The agent's stderr (its logs), read concurrently with the wire.
    pub stderr: Pin<Box<dyn AsyncRead + Send>>,
    /// Resolves when the agent process has exited. Dropping it kills the agent.
    pub exit: BoxFuture<'static, AgentExit>,
    /// sha256 the agent must report in its handshake, when the backend knows it.
    pub expected_sha256: Option<String>,
    /// Local process id, when the agent is a child of this process.
    pub pid: Option<u32>,
}

/// How the agent process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentExit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// The backend could not tell (for example the sandbox vanished).
    Unknown(String),
}

impl AgentExit {
    /// Whether this is a clean exit.
    pub fn success(&self) -> bool {
        matches!(self, AgentExit::Code(0))
    }
}

impl fmt::Display for AgentExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentExit::Code(code) => write!(f, "exit status {code}"),
            AgentExit::Signal(signal) => write!(f, "killed by signal {signal}"),
            AgentExit::Unknown(why) => write!(f, "unknown exit ({why})"),
        }
    }
}

/// Directories where `tailbox` looks for agents when none is named: its own (a release archive,
/// or a cargo profile directory; test binaries sit one level deeper in `deps/`), then the
/// target directory above, where `cargo xtask static-agent` puts `<target>/release/tailbox-agent`.
pub fn default_agent_dirs() -> Vec<std::path::PathBuf> {
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
