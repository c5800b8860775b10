//! Processes in a fake sandbox: an exec's command, or the sandbox's entrypoint.
//!
//! Each runs in the sandbox's network namespace and in a private mount namespace in which the
//! sandbox's own `/tmp` (its root's `tmp/`) is mounted over this machine's. The rest of the
//! filesystem is this machine's (the fake "image"), except that `argv[0]` is looked up in the
//! sandbox's root first, so a program pushed anywhere with fs-tools runs.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use tailbox_proto::arch::Arch;

use super::State;
use super::sandbox::Sandbox;
use super::tools::map_path;

/// Sandbox directories processes see at their sandbox paths: the sandbox's own `/tmp` hides
/// this machine's, as a real sandbox's does.
const SANDBOX_DIRS: &[&str] = &["/tmp"];

/// Where a process's output goes.
pub(crate) enum Output {
    /// Discarded (`/dev/null`).
    Null,
    /// The write end of a pipe the fake reads.
    Pipe(io::PipeWriter),
}

impl From<Output> for std::process::Stdio {
    fn from(output: Output) -> Self {
        match output {
            Output::Null => Self::null(),
            Output::Pipe(writer) => writer.into(),
        }
    }
}

/// What to run and with what, before namespaces are applied.
pub(crate) struct Spec<'a> {
    pub(crate) argv: &'a [String],
    /// Added to (and overriding) the sandbox's own environment.
    pub(crate) env: HashMap<String, String>,
    /// Absolute sandbox path; `/` when unset.
    pub(crate) workdir: Option<&'a str>,
}

/// A command for `spec` inside `sandbox`; its own process group. The caller sets stdio.
pub(crate) fn command(
    state: &State,
    sandbox: &Sandbox,
    spec: Spec<'_>,
) -> Result<tokio::process::Command, String> {
    let Some(first) = spec.argv.first() else {
        return Err("empty command".into());
    };
    let mut env = sandbox.env.clone();
    if let Some(home) = env.get("HOME").cloned()
        && !in_sandbox_dirs(&home)
        && let Ok(mapped) = map_path(&sandbox.root, &home)
    {
        let _ = std::fs::create_dir_all(&mapped);
        env.insert("HOME".into(), mapped.display().to_string());
    }
    let path = state
        .config
        .path
        .clone()
        .unwrap_or_else(|| std::env::var("PATH").unwrap_or_default());
    env.insert("PATH".into(), path);
    env.extend(spec.env);

    let mut binds = Vec::new();
    for dir in SANDBOX_DIRS {
        let source = map_path(&sandbox.root, dir)?;
        std::fs::create_dir_all(&source).map_err(|e| format!("{}: {e}", source.display()))?;
        binds.push((c_path(&source)?, c_path(Path::new(dir))?));
    }
    let workdir = c_path(Path::new(spec.workdir.unwrap_or("/")))?;
    let join_netns = sandbox.network.netns.join_in_child();

    let mut command = tokio::process::Command::new(program(&sandbox.root, first));
    command
        .args(&spec.argv[1..])
        .env_clear()
        .envs(&env)
        .process_group(0);
    // SAFETY: the closure makes only async-signal-safe system calls on data prepared before
    // the fork.
    unsafe {
        command.pre_exec(move || {
            join_netns()?;
            private_mounts(&binds)?;
            if libc::chdir(workdir.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// A pipe whose read end the fake reads (as a tokio pipe) and whose write end a process gets.
pub(crate) fn pipe() -> io::Result<(tokio::net::unix::pipe::Receiver, io::PipeWriter)> {
    let (reader, writer) = io::pipe()?;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    Ok((reader, writer))
}

fn in_sandbox_dirs(path: &str) -> bool {
    SANDBOX_DIRS
        .iter()
        .any(|dir| Path::new(path).starts_with(dir))
}

/// `argv[0]` as this machine runs it: a path the sandbox's root has (outside the directories
/// processes see anyway) maps into the root; anything else is looked up as given.
fn program(root: &Path, first: &str) -> std::path::PathBuf {
    if first.starts_with('/')
        && !in_sandbox_dirs(first)
        && let Ok(mapped) = map_path(root, first)
        && mapped.exists()
    {
        return mapped;
    }
    first.into()
}

/// Why `argv[0]` cannot run in a sandbox of the fake's architecture, the way the kernel refuses
/// it: an ELF for another machine is an `Exec format error`. Scripts, missing and unreadable
/// files are left to the spawn.
pub(crate) fn foreign_executable(state: &State, sandbox: &Sandbox, first: &str) -> Option<String> {
    let arch = state.config.arch;
    let mut header = [0u8; tailbox_proto::arch::ELF_MACHINE_PREFIX_LEN];
    let mut file = std::fs::File::open(program(&sandbox.root, first)).ok()?;
    std::io::Read::read_exact(&mut file, &mut header).ok()?;
    if !header.starts_with(b"\x7fELF") {
        return None;
    }
    match Arch::from_elf_header(&header) {
        Ok(found) if found == arch => None,
        Ok(found) => Some(format!(
            "Exec format error (an {found} executable in an {arch} sandbox)"
        )),
        Err(why) => Some(format!("Exec format error ({why})")),
    }
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))
}

/// In a forked child: a private mount namespace with each `(source, target)` bind-mounted.
fn private_mounts(binds: &[(CString, CString)]) -> io::Result<()> {
    // SAFETY: plain system calls on NUL-terminated strings prepared before the fork.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        for (source, target) in binds {
            if libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
