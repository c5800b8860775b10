//! Every buffer the agent fills from outside has a limit. A LocalAPI that streams one endless
//! IPN-bus line (100 MiB, no newline) or an endless answer is refused with a clear error, and
//! the agent's memory stays bounded while it reads.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;

use tailbox_agent::localapi::{LocalApi, LocalApiError, MAX_MESSAGE_BYTES};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;

const ONE_MIB: usize = 1 << 20;
/// What the fake tailscaled sends: 100 MiB without a newline.
const SENT: usize = 100 * ONE_MIB;

/// A LocalAPI socket that answers every request with 200 and a chunked body of `SENT` bytes of
/// JSON-ish text and no newline, as fast as it is read.
fn serve_endless_line(socket: &Path) {
    let listener = UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let _ = conn.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                            Transfer-Encoding: chunked\r\n\r\n";
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'a'; ONE_MIB];
                for _ in 0..SENT / ONE_MIB {
                    let frame = format!("{:x}\r\n", chunk.len());
                    if conn.write_all(frame.as_bytes()).await.is_err()
                        || conn.write_all(&chunk).await.is_err()
                        || conn.write_all(b"\r\n").await.is_err()
                    {
                        return;
                    }
                }
                let _ = conn.write_all(b"0\r\n\r\n").await;
            });
        }
    });
}

/// This process's resident set now and its high-water mark, in bytes.
fn memory() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<usize>().ok())
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the high-water mark so the next reading covers only what follows (Linux: writing 5 to
/// clear_refs).
fn reset_high_water_mark() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_100_mib_ipn_bus_line_or_answer_is_refused_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tailscaled.sock");
    serve_endless_line(&socket);
    let api = LocalApi::new(&socket);

    reset_high_water_mark();
    let (before, _) = memory();
    let mut bus = api.watch_ipn_bus(0).await.unwrap();
    let err = bus.next().await.unwrap_err();
    let (_, peak) = memory();
    assert!(
        matches!(err, LocalApiError::TooLarge { limit, .. } if limit == MAX_MESSAGE_BYTES),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("LocalAPI watch-ipn-bus message sent more than {MAX_MESSAGE_BYTES} bytes")
    );
    let grew = peak.saturating_sub(before);
    eprintln!(
        "reading a {} MiB line: RSS grew by at most {} MiB (limit {} MiB)",
        SENT / ONE_MIB,
        grew / ONE_MIB,
        MAX_MESSAGE_BYTES / ONE_MIB
    );
    // The buffer holds at most the limit; growing it copies once more. Reading it all would
    // take the 100 MiB (and more while the buffer doubles).
    assert!(
        grew < 2 * MAX_MESSAGE_BYTES + 8 * ONE_MIB,
        "RSS grew by {} MiB while reading a {} MiB line",
        grew / ONE_MIB,
        SENT / ONE_MIB
    );

    // A plain answer as long is refused the same way (after the measurement: one test, so no
    // other reader shares this process's memory while it is measured).
    let err = api.status(true).await.unwrap_err();
    assert!(
        matches!(err, LocalApiError::TooLarge { limit, .. } if limit == MAX_MESSAGE_BYTES),
        "{err:?}"
    );
}
