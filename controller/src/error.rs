//! Errors people read: what failed, why, and a `hint:` on what to do; plus the exit codes.

use std::fmt::Write as _;

use crate::secret::redact_urls;

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

/// An error with a hint, rendered as `error:`, `Caused by:`, details, then `hint:`.
#[derive(Debug)]
pub struct CliError {
    /// Which exit status this maps to.
    pub kind: ErrorKind,
    /// What failed, e.g. "Failed to start the agent".
    pub message: String,
    /// Why, as an error chain.
    pub source: Option<anyhow::Error>,
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
            source: None,
            details: Vec::new(),
            hint: None,
        }
    }

    /// Attaches the cause.
    pub fn with_source(mut self, source: impl Into<anyhow::Error>) -> Self {
        self.source = Some(source.into());
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
        let mut out = format!("error: {}\n", self.message);
        if let Some(source) = &self.source {
            for cause in source.chain() {
                let _ = writeln!(out, "  Caused by: {cause}");
            }
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

impl std::error::Error for CliError {}

/// A gRPC status as an error cause, with URL credentials removed from its message.
pub fn status_error(status: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "gRPC status {:?}: {}",
        status.code(),
        redact_urls(status.message())
    )
}

/// Shorthand for controller results.
pub type CliResult<T> = Result<T, CliError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_orders_error_causes_details_hint_and_redacts() {
        let err = CliError::infra("Failed to reach http://u:p@host/x")
            .with_source(anyhow::anyhow!("inner").context("outer"))
            .with_detail("agent stderr:\n  | boom")
            .with_hint("try again");
        let text = err.render();
        assert_eq!(
            text,
            "error: Failed to reach http://****@host/x\n  Caused by: outer\n  Caused by: inner\nagent stderr:\n  | boom\nhint: try again\n"
        );
        assert_eq!(err.exit_status().code(), 3);
    }
}
