//! The one place the controller writes to stdout: data (JSON lines, the results table, ids).

use std::io::{self, Write};

/// Writing data to stdout failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The write itself failed (for example the reader closed the pipe).
    #[error("Failed to write to stdout")]
    Write(#[source] io::Error),
    /// Something could not be encoded as JSON.
    #[error("Failed to encode {what} as JSON")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
}

/// Writes `text` to stdout and flushes, so JSON lines reach a pipe as they happen.
pub fn write_stdout(text: &str) -> Result<(), OutputError> {
    #[allow(clippy::disallowed_methods)] // This module is the sanctioned stdout writer.
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(OutputError::Write)
}

/// Writes `value` as one JSON line.
pub fn write_json_line(
    what: &'static str,
    value: &impl serde::Serialize,
) -> Result<(), OutputError> {
    let mut line =
        serde_json::to_string(value).map_err(|source| OutputError::Encode { what, source })?;
    line.push('\n');
    write_stdout(&line)
}
