//! How a process ended: an agent on this machine, or an exec in a sandbox. Lives below both
//! the Modal client and the backends, which both report it.

use std::fmt;

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It could not be told (for example the sandbox vanished).
    Unknown(String),
}

impl ProcessExit {
    /// Whether this is a clean exit.
    pub fn success(&self) -> bool {
        matches!(self, ProcessExit::Code(0))
    }
}

impl From<std::process::ExitStatus> for ProcessExit {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        match (status.code(), status.signal()) {
            (Some(code), _) => ProcessExit::Code(code),
            (None, Some(signal)) => ProcessExit::Signal(signal),
            (None, None) => ProcessExit::Unknown(status.to_string()),
        }
    }
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessExit::Code(code) => write!(f, "exit status {code}"),
            ProcessExit::Signal(signal) => write!(f, "killed by signal {signal}"),
            ProcessExit::Unknown(why) => write!(f, "unknown exit ({why})"),
        }
    }
}
