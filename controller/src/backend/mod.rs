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
