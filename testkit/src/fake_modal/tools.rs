//! The in-sandbox tools the fake emulates rather than runs: Modal's
//! `/__modal/.bin/modal-sandbox-fs-tools` (`WriteFile`, `ReadFile`, `Stat`) and `chmod` on
//! sandbox paths. They work on the sandbox's root directory, where every sandbox path lives.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::Exit;
use super::State;
use super::sandbox::{Exec, Sink};

/// Modal's fs helper path.
pub(crate) const FS_TOOLS: &str = "/__modal/.bin/modal-sandbox-fs-tools";
/// A process's own executable, as procfs shows it.
const SELF_EXE: &str = "/proc/self/exe";

/// Whether `argv` is one of the tools the fake emulates rather than runs.
pub(crate) fn is_tool(argv: &[String]) -> bool {
    let first = argv.first().map(String::as_str).unwrap_or_default();
    first == FS_TOOLS || chmod_args(argv).is_some()
}

fn chmod_args(argv: &[String]) -> Option<&[String]> {
    match argv.first().map(String::as_str)? {
        "chmod" | "/bin/chmod" | "/usr/bin/chmod" => Some(&argv[1..]),
        "/bin/busybox" if argv.get(1).map(String::as_str) == Some("chmod") => Some(&argv[2..]),
        _ => None,
    }
}

/// Starts an emulated tool, or `None` when `argv` is not one.
pub(crate) fn start(state: &State, root: &Path, argv: &[String]) -> Option<Arc<Exec>> {
    if argv.first().map(String::as_str) == Some(FS_TOOLS) {
        return Some(start_fs_tools(state, root, argv.to_vec()));
    }
    let args = chmod_args(argv)?;
    if !state.config.image_has_chmod {
        let stderr = format!("{}: not found\n", argv[0]);
        return Some(Exec::exited(argv.to_vec(), 127, &stderr));
    }
    let exec = Arc::new(Exec::new(argv.to_vec(), Sink::Discard));
    chmod(root, args, &exec);
    Some(exec)
}

fn chmod(root: &Path, args: &[String], exec: &Exec) {
    let (Some(mode), Some(path)) = (args.first(), args.last()) else {
        exec.stderr.push(b"chmod: missing operand\n");
        exec.finish(Exit::Code(1));
        return;
    };
    let result = u32::from_str_radix(mode, 8)
        .map_err(|e| e.to_string())
        .and_then(|mode| {
            let host = map_path(root, path)?;
            std::fs::set_permissions(host, std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => exec.finish(Exit::Code(0)),
        Err(e) => {
            exec.stderr.push(format!("chmod: {path}: {e}\n").as_bytes());
            exec.finish(Exit::Code(1));
        }
    }
}

/// fs-tools: `Stat` and `ReadFile` answer at once; `WriteFile` completes when stdin closes.
fn start_fs_tools(state: &State, root: &Path, argv: Vec<String>) -> Arc<Exec> {
    let op: Option<serde_json::Value> = argv.get(1).and_then(|a| serde_json::from_str(a).ok());
    let path_of = |name: &str| {
        op.as_ref()
            .and_then(|o| o.get(name))
            .and_then(|w| w.get("path"))
            .and_then(|p| p.as_str())
            .map(str::to_owned)
    };
    if let Some(path) = path_of("WriteFile") {
        let host = map_path(root, &path);
        let sink = Sink::WriteFile {
            path,
            host,
            data: Vec::new(),
        };
        return Arc::new(Exec::new(argv, sink));
    }
    let exec = Arc::new(Exec::new(argv, Sink::Discard));
    if let Some(path) = path_of("Stat") {
        stat(root, &path, &exec);
    } else if let Some(path) = path_of("ReadFile") {
        read_file(state, root, &path, &exec);
    } else {
        exec.fail(
            1,
            "NotSupported",
            "the fake fs-tools knows only WriteFile, ReadFile and Stat",
        );
    }
    exec
}

fn stat(root: &Path, path: &str, exec: &Exec) {
    let host = match map_path(root, path) {
        Ok(host) => host,
        Err(e) => return exec.fail(1, "InvalidPath", &e),
    };
    match std::fs::symlink_metadata(&host) {
        Ok(meta) => {
            let mode = meta.permissions().mode();
            let kind = if meta.is_dir() {
                "directory"
            } else if meta.file_type().is_symlink() {
                "symlink"
            } else {
                "file"
            };
            let info = serde_json::json!({
                "name": Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or_default(),
                "path": path,
                "type": kind,
                "size": meta.len(),
                "mode": mode,
                "permissions": permissions_string(mode),
                "owner": "root",
                "group": "root",
                "modified_time": 0.0,
                "symlink_target": null,
            });
            exec.stdout.push(info.to_string().as_bytes());
            exec.finish(Exit::Code(0));
        }
        Err(e) => fail_io(exec, path, &e),
    }
}

/// `ReadFile`: the file's bytes on stdout. `/proc/self/exe` is fs-tools' own executable, a
/// native binary of the sandbox's CPU; the fake stands in for it with an ELF header for the
/// sandbox's architecture.
fn read_file(state: &State, root: &Path, path: &str, exec: &Exec) {
    if path == SELF_EXE {
        exec.stdout.push(&state.config.arch.elf_header());
        exec.finish(Exit::Code(0));
        return;
    }
    let host = match map_path(root, path) {
        Ok(host) => host,
        Err(e) => return exec.fail(1, "InvalidPath", &e),
    };
    if host.is_dir() {
        return exec.fail(1, "IsDirectory", &format!("{path} is a directory"));
    }
    match std::fs::read(&host) {
        Ok(data) => {
            exec.stdout.push(&data);
            exec.finish(Exit::Code(0));
        }
        Err(e) => fail_io(exec, path, &e),
    }
}

/// An fs-tools error for an I/O error on `path`, with the `error_kind` the SDKs map.
fn fail_io(exec: &Exec, path: &str, e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::NotFound {
        exec.fail(1, "NotFound", &format!("{path}: no such file or directory"));
    } else {
        exec.fail(1, "PermissionDenied", &e.to_string());
    }
}

fn permissions_string(mode: u32) -> String {
    let mut out = String::new();
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

/// `WriteFile` completes when stdin closes: writes the buffer (an existing file keeps its mode,
/// as when a file is truncated in place).
pub(crate) fn complete_write_file(
    state: &State,
    exec: &Exec,
    path: String,
    host: Result<PathBuf, String>,
    data: Vec<u8>,
) {
    let result = host.and_then(|host| {
        if let Some(parent) = host.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let existed = host.exists();
        std::fs::write(&host, &data).map_err(|e| e.to_string())?;
        if !existed {
            std::fs::set_permissions(
                &host,
                std::fs::Permissions::from_mode(state.config.write_file_mode),
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            let len = data.len() as u64;
            state.update(|r| {
                r.bytes_written += len;
                r.files_written.push(path);
            });
            exec.finish(Exit::Code(0));
        }
        Err(e) => exec.fail(1, "PermissionDenied", &e),
    }
}

/// Maps an absolute sandbox path into `root`, never above it.
pub(crate) fn map_path(root: &Path, sandbox_path: &str) -> Result<PathBuf, String> {
    let path = Path::new(sandbox_path);
    if !path.is_absolute() {
        return Err(format!("{sandbox_path:?} is not absolute"));
    }
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::ParentDir => {
                rel.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(root.join(rel))
}
