//! The one place the controller writes to stdout: data (JSON lines, the results table, ids).
//!
//! A closed stdout (the reader went away, as `tailbox check --json | head -1` does) is the
//! reader's choice, not a failure: the first `EPIPE` marks stdout closed, later data is dropped,
//! and [`closed`] resolves so the command can stop its work the way Ctrl-C does and exit with
//! 141 (128 + SIGPIPE, what a shell reports for a program a closed pipe stopped) without a word.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

static CLOSED: AtomicBool = AtomicBool::new(false);
static CLOSED_NOTIFY: Notify = Notify::const_new();

/// Writing data to stdout failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The write itself failed (a full disk, say; a closed pipe is not an error).
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

/// Writes `text` to stdout and flushes, so JSON lines reach a pipe as they happen. Once the
/// reader has closed stdout, this drops `text` and succeeds.
pub fn write_stdout(text: &str) -> Result<(), OutputError> {
    if is_closed() {
        return Ok(());
    }
    #[allow(clippy::disallowed_methods)] // This module is the sanctioned stdout writer.
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
            mark_closed();
            Ok(())
        }
        Err(err) => Err(OutputError::Write(err)),
    }
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

/// Whether the reader has closed stdout.
pub fn is_closed() -> bool {
    CLOSED.load(Ordering::SeqCst)
}

/// Resolves once the reader has closed stdout (never, if it keeps reading).
pub async fn closed() {
    loop {
        let notified = CLOSED_NOTIFY.notified();
        if is_closed() {
            return;
        }
        notified.await;
    }
}

fn mark_closed() {
    CLOSED.store(true, Ordering::SeqCst);
    CLOSED_NOTIFY.notify_waiters();
}
