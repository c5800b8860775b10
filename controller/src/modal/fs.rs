//! Files in the sandbox with no tools in the image: Modal's own
//! `/__modal/.bin/modal-sandbox-fs-tools '<json>'`, run through the router, with the bytes on its
//! stdin (streamed, resumable) or stdout (of which [`read_prefix`] takes only the head).
//!
//! Making a file executable: fs-tools has no chmod. Its `Stat` tells whether the mode already
//! has the execute bits (if `WriteFile` keeps the mode of the file it overwrites, or creates
//! files executable, nothing more is needed); otherwise the image's `chmod` is run (coreutils or
//! busybox, at the usual paths). An image with neither is refused with a hint: there is no way to
//! set a mode with fs-tools alone.

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;
use tonic::Status;

use super::error::{FilesProblem, ModalError, RpcStatus};
use super::router::Router;
use super::stdio::{ExecReader, Fd};
use crate::process::ProcessExit;

/// Modal's filesystem helper, present in every sandbox.
pub const FS_TOOLS: &str = "/__modal/.bin/modal-sandbox-fs-tools";

/// What a finished exec produced.
#[derive(Debug)]
pub struct ExecOutput {
    /// How it exited.
    pub exit: ProcessExit,
    /// All of its stdout.
    pub stdout: Vec<u8>,
    /// All of its stderr.
    pub stderr: Vec<u8>,
}

/// Runs `argv` to completion with `stdin` (closed at once when `None`), collecting its output.
pub async fn run(
    router: &Router,
    argv: Vec<String>,
    stdin: Option<Bytes>,
) -> Result<ExecOutput, Status> {
    let exec_id = uuid::Uuid::new_v4().to_string();
    router.exec_start(&exec_id, argv, HashMap::new()).await?;
    let read = |fd| {
        let mut reader = ExecReader::new(router.clone(), exec_id.clone(), fd);
        async move {
            let mut buf = Vec::new();
            match reader.read_to_end(&mut buf).await {
                Ok(_) => Ok(buf),
                Err(e) => Err(Status::unavailable(format!("reading the output: {e}"))),
            }
        }
    };
    let feed = async {
        match stdin {
            Some(data) => router.stdin_upload(&exec_id, data).await.map(|_| ()),
            None => close_stdin(router, &exec_id).await,
        }
    };
    // The first failure wins: a process whose stdin never closes would never exit.
    let ((), stdout, stderr, exit) = tokio::try_join!(
        feed,
        read(Fd::Stdout),
        read(Fd::Stderr),
        router.wait(&exec_id)
    )?;
    Ok(ExecOutput {
        exit,
        stdout,
        stderr,
    })
}

/// Closes an exec's stdin at once; a process that already exited is fine.
async fn close_stdin(router: &Router, exec_id: &str) -> Result<(), Status> {
    match router.stdin_write(exec_id, 0, Bytes::new(), true).await {
        Err(s)
            if !matches!(
                s.code(),
                tonic::Code::FailedPrecondition | tonic::Code::Aborted
            ) =>
        {
            Err(s)
        }
        _ => Ok(()),
    }
}

/// `ReadFile`, but only the first `len` bytes (fewer if the file is shorter): the stdout stream
/// is dropped once they are in, so a large file is not transferred.
pub async fn read_prefix(router: &Router, path: &str, len: usize) -> Result<Vec<u8>, ModalError> {
    let action = format!("read {path} in the sandbox");
    let exec_id = uuid::Uuid::new_v4().to_string();
    let read = async {
        let argv = command(serde_json::json!({"ReadFile": {"path": path}}));
        router.exec_start(&exec_id, argv, HashMap::new()).await?;
        // Both at once: each is a round trip to the router, and neither waits for the other.
        let read = async {
            let mut prefix = Vec::with_capacity(len);
            ExecReader::new(router.clone(), exec_id.clone(), Fd::Stdout)
                .take(len as u64)
                .read_to_end(&mut prefix)
                .await
                .map_err(|e| Status::unavailable(format!("reading the output: {e}")))?;
            Ok::<_, Status>(prefix)
        };
        let ((), prefix) = tokio::try_join!(close_stdin(router, &exec_id), read)?;
        Ok::<_, Status>(prefix)
    };
    let prefix = read.await.map_err(exec_failed(&action))?;
    if prefix.len() == len {
        return Ok(prefix);
    }
    // Short: either the file is, or fs-tools failed and says why on stderr.
    let finished = async {
        let mut stderr = Vec::new();
        ExecReader::new(router.clone(), exec_id.clone(), Fd::Stderr)
            .read_to_end(&mut stderr)
            .await
            .map_err(|e| Status::unavailable(format!("reading the output: {e}")))?;
        Ok::<_, Status>((router.wait(&exec_id).await?, stderr))
    };
    let (exit, stderr) = finished.await.map_err(exec_failed(&action))?;
    let output = ExecOutput {
        exit,
        stdout: prefix,
        stderr,
    };
    if output.exit.success() {
        Ok(output.stdout)
    } else {
        Err(fs_failure(action, &output))
    }
}

/// fs-tools' description of a file (the fields tailbox reads).
#[derive(Debug, Clone, Deserialize)]
pub struct FileInfo {
    /// `file`, `directory` or `symlink`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Mode bits (a number, or an octal string).
    #[serde(default)]
    pub mode: Option<serde_json::Value>,
    /// Permissions (e.g. `rwxr-xr-x` or `0755`).
    #[serde(default)]
    pub permissions: Option<serde_json::Value>,
}

impl FileInfo {
    /// Whether the owner may execute it; `None` when fs-tools' answer does not say.
    pub fn executable(&self) -> Option<bool> {
        let from_value = |v: &serde_json::Value| -> Option<bool> {
            if let Some(n) = v.as_u64() {
                return Some(n & 0o100 != 0);
            }
            let s = v.as_str()?.trim();
            if let Ok(n) = u32::from_str_radix(s.trim_start_matches("0o"), 8) {
                return Some(n & 0o100 != 0);
            }
            // rwxr-xr-x, or ls-style -rwxr-xr-x (as bytes: the text is fs-tools', any UTF-8).
            let perms = s.as_bytes();
            let perms = if perms.len() == 10 {
                &perms[1..]
            } else {
                perms
            };
            (perms.len() == 9).then(|| perms[2] == b'x' || perms[2] == b's')
        };
        self.mode
            .as_ref()
            .and_then(from_value)
            .or_else(|| self.permissions.as_ref().and_then(from_value))
    }
}

/// fs-tools' error payload on stderr.
#[derive(Debug, Deserialize)]
struct FsToolsError {
    #[serde(default)]
    error_kind: String,
    #[serde(default)]
    message: String,
}

impl FsToolsError {
    /// The error fs-tools printed on stderr, if it printed one.
    fn of(output: &ExecOutput) -> Option<Self> {
        serde_json::from_str(String::from_utf8_lossy(&output.stderr).trim()).ok()
    }
}

fn fs_failure(action: String, output: &ExecOutput) -> ModalError {
    let reason = match FsToolsError::of(output) {
        Some(e) => format!("{}: {}", e.error_kind, e.message),
        None => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    };
    files_error(
        action,
        FilesProblem::Tool {
            exit: output.exit.to_string(),
            reason,
        },
    )
}

fn files_error(action: String, source: FilesProblem) -> ModalError {
    ModalError::Files { action, source }
}

fn exec_failed(action: &str) -> impl FnOnce(Status) -> ModalError + '_ {
    move |status| files_error(action.to_owned(), FilesProblem::Exec(RpcStatus(status)))
}

fn command(op: serde_json::Value) -> Vec<String> {
    vec![FS_TOOLS.to_owned(), op.to_string()]
}

/// `Stat`; `None` when nothing is at `path`.
pub async fn stat(router: &Router, path: &str) -> Result<Option<FileInfo>, ModalError> {
    let action = format!("inspect {path} in the sandbox");
    let output = run(
        router,
        command(serde_json::json!({"Stat": {"path": path}})),
        None,
    )
    .await
    .map_err(exec_failed(&action))?;
    stat_answer(action, &output)
}

/// What fs-tools' `Stat` said: the file's description, `None` for nothing there, or its error.
pub(crate) fn stat_answer(
    action: String,
    output: &ExecOutput,
) -> Result<Option<FileInfo>, ModalError> {
    if !output.exit.success() {
        if FsToolsError::of(output).is_some_and(|e| e.error_kind == "NotFound") {
            return Ok(None);
        }
        return Err(fs_failure(action, output));
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .map_err(|err| files_error(action, FilesProblem::Garbled(err.to_string())))
}

/// `WriteFile`: creates parent directories and writes `data` (replacing any file there).
pub async fn write_file(router: &Router, path: &str, data: Bytes) -> Result<(), ModalError> {
    let action = format!("write {path} in the sandbox");
    let output = run(
        router,
        command(serde_json::json!({"WriteFile": {"path": path}})),
        Some(data),
    )
    .await
    .map_err(exec_failed(&action))?;
    if output.exit.success() {
        Ok(())
    } else {
        Err(fs_failure(action, &output))
    }
}

/// `chmod` commands tried in turn when fs-tools wrote a file without execute bits.
const CHMODS: &[&[&str]] = &[
    &["chmod"],
    &["/bin/chmod"],
    &["/usr/bin/chmod"],
    &["/bin/busybox", "chmod"],
];

/// Makes `path` executable (0755) when it is not already; see the module docs. Whether a chmod
/// ran.
async fn ensure_executable(
    router: &Router,
    path: &str,
    info: &FileInfo,
) -> Result<bool, ModalError> {
    if info.executable() == Some(true) {
        return Ok(false);
    }
    let mut tried = Vec::new();
    for chmod in CHMODS {
        let mut argv: Vec<String> = chmod.iter().map(|s| (*s).to_owned()).collect();
        argv.extend(["0755".to_owned(), path.to_owned()]);
        match run(router, argv, None).await {
            Ok(output) if output.exit.success() => return Ok(true),
            Ok(output) => tried.push(format!("{}: {}", chmod.join(" "), output.exit)),
            Err(status) => tried.push(format!("{}: {}", chmod.join(" "), status.message())),
        }
    }
    Err(files_error(
        format!("make {path} executable in the sandbox"),
        FilesProblem::NoChmod {
            tried: tried.join("; "),
        },
    ))
}

/// Puts `data` at `path` as an executable, unless a file of that size is already there and
/// executable; returns the bytes sent (0 when the same content was already there). The path
/// names the content's sha256, so the size check guards against an interrupted earlier upload;
/// the agent's handshake (its own sha256) is the real proof.
pub async fn push_executable(router: &Router, path: &str, data: Bytes) -> Result<u64, ModalError> {
    let len = data.len() as u64;
    if let Some(info) = stat(router, path).await?
        && info.kind == "file"
        && info.size == len
    {
        ensure_executable(router, path, &info).await?;
        return Ok(0);
    }
    write_file(router, path, data).await?;
    let short = |arrived| {
        files_error(
            format!("write {path} in the sandbox"),
            FilesProblem::Short {
                arrived,
                expected: len,
            },
        )
    };
    let info = stat(router, path).await?.ok_or_else(|| short(0))?;
    if info.size != len {
        return Err(short(info.size));
    }
    // A chmod that succeeded without effect is caught here rather than when the file is run.
    if ensure_executable(router, path, &info).await?
        && let Some(after) = stat(router, path).await?
        && after.executable() == Some(false)
    {
        return Err(files_error(
            format!("make {path} executable in the sandbox"),
            FilesProblem::NoExecuteBit,
        ));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(mode: serde_json::Value) -> FileInfo {
        FileInfo {
            kind: "file".into(),
            size: 1,
            mode: Some(mode),
            permissions: None,
        }
    }

    #[test]
    fn execute_bit_in_every_shape_fs_tools_may_use() {
        assert_eq!(info(serde_json::json!(0o100755)).executable(), Some(true));
        assert_eq!(info(serde_json::json!(0o100644)).executable(), Some(false));
        assert_eq!(info(serde_json::json!("0755")).executable(), Some(true));
        assert_eq!(
            info(serde_json::json!("rw-r--r--")).executable(),
            Some(false)
        );
        assert_eq!(
            info(serde_json::json!("-rwxr-xr-x")).executable(),
            Some(true)
        );
        assert_eq!(info(serde_json::json!(null)).executable(), None);
        let parsed: FileInfo = serde_json::from_str(
            r#"{"name":"a","type":"file","size":3,"permissions":"rwxr-x---"}"#,
        )
        .unwrap();
        assert_eq!(parsed.executable(), Some(true));
    }

    #[test]
    fn a_ten_byte_mode_that_starts_with_a_multibyte_character_is_no_panic() {
        // Found while writing the fs_tools_json fuzz target (and now a seed of its corpus): the
        // ls-style shape was cut at byte 1, inside `é`.
        // Read as bytes: `é` is two, so this is an ls-style shape whose owner bits are `12`.
        assert_eq!(
            info(serde_json::json!("é12345678")).executable(),
            Some(false)
        );
        assert_eq!(
            info(serde_json::json!("éwxr-xr-x")).executable(),
            Some(true)
        );
    }
}
