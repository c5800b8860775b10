//! The only writer of stdout for the commands meant for scripts (`status`, `env`).
//!
//! Everywhere else the agent's stdout is the gRPC wire (`serve --stdio`, `attach`), and the
//! crate's lints deny `print!` and `std::io::stdout`; this module is the one exception.

use std::io::Write as _;

/// Writes `text` to stdout and flushes it. A closed stdout (the reader went away, e.g. `| head`)
/// is the reader's choice and not an error.
pub fn data(text: &str) -> std::io::Result<()> {
    #[allow(clippy::disallowed_methods)] // The one place that writes data to stdout.
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
