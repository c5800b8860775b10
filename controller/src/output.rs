//! The one place the controller writes to stdout: data (JSON lines, the results table).

use std::io::{self, Write};

/// Writes `text` to stdout and flushes, so JSON lines reach a pipe as they happen.
pub fn write_stdout(text: &str) -> io::Result<()> {
    #[allow(clippy::disallowed_methods)] // This module is the sanctioned stdout writer.
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}
