//! Fake sandboxes: a temp root each, execs as local processes (or emulated tools), offset-tracked
//! stdio.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tailbox_proto::arch::Arch;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::ChildStdin;
use tokio::sync::watch;
use tonic::Status;

use super::{SandboxRecord, State, lock};

/// Modal's fs helper path.
pub(crate) const FS_TOOLS: &str = "/__modal/.bin/modal-sandbox-fs-tools";

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

/// Everything the control plane knows.
#[derive(Default)]
pub(crate) struct World {
    pub(crate) apps: HashMap<(String, String), String>,
    pub(crate) images: HashMap<String, String>,
    pub(crate) built_images: HashSet<String>,
    pub(crate) secrets: HashMap<String, HashMap<String, String>>,
    pub(crate) sandboxes: HashMap<String, Arc<Sandbox>>,
    pub(crate) tasks: HashMap<String, String>,
    pub(crate) auth_tokens: HashMap<String, SystemTime>,
    pub(crate) router_jwts: HashMap<String, (String, SystemTime)>,
    pub(crate) task_polls: HashMap<String, u32>,
    pub(crate) last_created_at: f64,
}

/// One fake sandbox.
pub(crate) struct Sandbox {
    pub(crate) id: String,
    pub(crate) task_id: String,
    pub(crate) app_id: String,
    pub(crate) tags: Vec<(String, String)>,
    pub(crate) env: HashMap<String, String>,
    pub(crate) root: PathBuf,
    pub(crate) created_at: f64,
    pub(crate) terminated: AtomicBool,
    pub(crate) execs: Mutex<HashMap<String, Arc<Exec>>>,
}

impl Sandbox {
    pub(crate) fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
}

/// An output stream: everything ever written (for offset reads) and its progress.
pub(crate) struct Output {
    data: Mutex<Vec<u8>>,
    progress: watch::Sender<(usize, bool)>,
}

impl Output {
    fn new() -> Self {
        Self {
            data: Mutex::new(Vec::new()),
            progress: watch::channel((0, false)).0,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let len = {
            let mut data = lock(&self.data);
            data.extend_from_slice(bytes);
            data.len()
        };
        self.progress.send_modify(|p| p.0 = len);
    }

    fn finish(&self) {
        self.progress.send_modify(|p| p.1 = true);
    }

    /// Bytes from `offset`, at most `max`.
    pub(crate) fn slice(&self, offset: usize, max: usize) -> Vec<u8> {
        let data = lock(&self.data);
        let end = data.len().min(offset.saturating_add(max));
        data.get(offset..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    pub(crate) fn watch(&self) -> watch::Receiver<(usize, bool)> {
        self.progress.subscribe()
    }
}

enum Sink {
    Child(ChildStdin),
    /// fs-tools `WriteFile` of the sandbox path `path` (`host` on this machine): the bytes
    /// arrive here and are written when stdin closes.
    WriteFile {
        path: String,
        host: Result<PathBuf, String>,
        data: Vec<u8>,
    },
    Discard,
}

pub(crate) struct Stdin {
    pub(crate) written: u64,
    pub(crate) closed: bool,
    sink: Sink,
}

/// One exec.
pub(crate) struct Exec {
    pub(crate) argv: Vec<String>,
    pub(crate) tool: bool,
    pub(crate) stdin: tokio::sync::Mutex<Stdin>,
    pub(crate) stdout: Output,
    pub(crate) stderr: Output,
    pub(crate) exit: watch::Sender<Option<Exit>>,
    pgid: Mutex<Option<i32>>,
}

impl Exec {
    fn new(argv: Vec<String>, sink: Sink) -> Self {
        Self {
            tool: is_tool(&argv),
            argv,
            stdin: tokio::sync::Mutex::new(Stdin {
                written: 0,
                closed: false,
                sink,
            }),
            stdout: Output::new(),
            stderr: Output::new(),
            exit: watch::channel(None).0,
            pgid: Mutex::new(None),
        }
    }

    fn finish(&self, exit: Exit) {
        self.stdout.finish();
        self.stderr.finish();
        self.exit.send_replace(Some(exit));
    }

    /// An exec that ended at once with `code`, having printed `stderr`.
    fn exited(argv: Vec<String>, code: i32, stderr: &str) -> Arc<Self> {
        let exec = Arc::new(Self::new(argv, Sink::Discard));
        exec.stderr.push(stderr.as_bytes());
        exec.finish(Exit::Code(code));
        exec
    }

    fn fail(&self, code: i32, error_kind: &str, message: &str) {
        let payload =
            serde_json::json!({"error_kind": error_kind, "message": message, "detail": null});
        self.stderr.push(payload.to_string().as_bytes());
        self.finish(Exit::Code(code));
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

pub(crate) fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A Modal-shaped object id, e.g. `sb-` and 22 hex digits.
pub(crate) fn short_id(prefix: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &hex[..22])
}

/// Creates a sandbox.
pub(crate) fn create(
    state: &State,
    app_id: &str,
    tags: Vec<(String, String)>,
    env: HashMap<String, String>,
    timeout_secs: u32,
) -> Result<String, Status> {
    let id = short_id("sb");
    let task_id = short_id("ta");
    let root = state.dir.path().join(&id);
    std::fs::create_dir_all(root.join("tmp"))
        .map_err(|e| Status::internal(format!("fake: creating the sandbox root: {e}")))?;
    {
        let mut world = lock(&state.world);
        // Strictly increasing, so paging by created_at never sees ties.
        let created_at = now_secs().max(world.last_created_at + 0.001);
        world.last_created_at = created_at;
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            task_id: task_id.clone(),
            app_id: app_id.to_owned(),
            tags: tags.clone(),
            env: env.clone(),
            root: root.clone(),
            created_at,
            terminated: AtomicBool::new(false),
            execs: Mutex::new(HashMap::new()),
        });
        world.sandboxes.insert(id.clone(), sandbox);
        world.tasks.insert(task_id.clone(), id.clone());
    }
    state.update(|r| {
        r.sandboxes.push(SandboxRecord {
            id: id.clone(),
            app_id: app_id.to_owned(),
            task_id,
            tags,
            env,
            timeout_secs,
            root,
            created_at: Instant::now(),
            terminated_at: None,
        })
    });
    Ok(id)
}

/// Terminates a sandbox: kills its processes and marks it gone. False if it already was.
pub(crate) fn terminate(state: &State, sandbox: &Sandbox) -> bool {
    if sandbox.terminated.swap(true, Ordering::SeqCst) {
        return false;
    }
    kill_execs(sandbox);
    state.update(|r| {
        if let Some(s) = r.sandboxes.iter_mut().find(|s| s.id == sandbox.id) {
            s.terminated_at = Some(Instant::now());
        }
    });
    true
}

fn kill_execs(sandbox: &Sandbox) {
    let execs: Vec<Arc<Exec>> = lock(&sandbox.execs).values().cloned().collect();
    for exec in execs {
        if let Some(pgid) = *lock(&exec.pgid) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        if exec.exit.borrow().is_none() && exec.tool {
            exec.finish(Exit::Signal(9));
        }
    }
}

/// Kills every process of every sandbox (the fake is going away).
pub(crate) fn kill_all(state: &State) {
    let sandboxes: Vec<Arc<Sandbox>> = lock(&state.world).sandboxes.values().cloned().collect();
    for sandbox in sandboxes {
        kill_execs(&sandbox);
    }
}

/// Starts an exec; idempotent per exec id.
pub(crate) fn start_exec(
    state: &State,
    sandbox: &Arc<Sandbox>,
    exec_id: &str,
    argv: Vec<String>,
    env: HashMap<String, String>,
) -> Result<(), Status> {
    {
        let execs = lock(&sandbox.execs);
        if let Some(existing) = execs.get(exec_id) {
            return if existing.argv == argv {
                Ok(())
            } else {
                Err(Status::already_exists(format!(
                    "exec {exec_id} exists with another command"
                )))
            };
        }
    }
    let exec = if argv.first().map(String::as_str) == Some(FS_TOOLS) {
        start_fs_tools(state, sandbox, argv)
    } else if let Some(args) = chmod_args(&argv) {
        if state.config.image_has_chmod {
            let exec = Arc::new(Exec::new(argv.clone(), Sink::Discard));
            chmod(&sandbox.root, args, &exec);
            exec
        } else {
            let stderr = format!("{}: not found\n", argv[0]);
            Exec::exited(argv, 127, &stderr)
        }
    } else {
        spawn_process(state, sandbox, argv, env)
    };
    lock(&sandbox.execs).insert(exec_id.to_owned(), Arc::clone(&exec));
    state.update(|r| {
        r.execs.push(super::ExecRecord {
            sandbox_id: sandbox.id.clone(),
            exec_id: exec_id.to_owned(),
            argv: exec.argv.clone(),
            stdin_bytes: 0,
        })
    });
    Ok(())
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

/// The fs-tools operations tailbox uses: `Stat` and `ReadFile` at once, `WriteFile` when stdin
/// closes.
fn start_fs_tools(state: &State, sandbox: &Sandbox, argv: Vec<String>) -> Arc<Exec> {
    let op: Option<serde_json::Value> = argv.get(1).and_then(|a| serde_json::from_str(a).ok());
    let path_of = |name: &str| {
        op.as_ref()
            .and_then(|o| o.get(name))
            .and_then(|w| w.get("path"))
            .and_then(|p| p.as_str())
            .map(str::to_owned)
    };
    if let Some(path) = path_of("WriteFile") {
        let host = map_path(&sandbox.root, &path);
        let sink = Sink::WriteFile {
            path,
            host,
            data: Vec::new(),
        };
        return Arc::new(Exec::new(argv, sink));
    }
    let (stat_path, read_path) = (path_of("Stat"), path_of("ReadFile"));
    let exec = Arc::new(Exec::new(argv, Sink::Discard));
    match (stat_path, read_path) {
        (Some(path), _) => stat(&sandbox.root, &path, &exec),
        (None, Some(path)) => read_file(state.config.arch, &sandbox.root, &path, &exec),
        (None, None) => exec.fail(
            1,
            "NotSupported",
            "the fake fs-tools knows only WriteFile, ReadFile and Stat",
        ),
    }
    exec
}

/// `ReadFile`: the file's bytes on stdout. `/proc/self/exe` is fs-tools' own binary, which the
/// fake stands in for with an ELF header for the sandbox's architecture.
fn read_file(arch: Arch, root: &Path, path: &str, exec: &Exec) {
    if path == "/proc/self/exe" {
        exec.stdout.push(&arch.elf_header());
        exec.finish(Exit::Code(0));
        return;
    }
    let host = match map_path(root, path) {
        Ok(host) => host,
        Err(e) => return exec.fail(1, "InvalidPath", &e),
    };
    match std::fs::read(&host) {
        Ok(bytes) => {
            exec.stdout.push(&bytes);
            exec.finish(Exit::Code(0));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            exec.fail(1, "NotFound", &format!("{path}: no such file or directory"));
        }
        Err(e) if host.is_dir() => exec.fail(1, "IsDirectory", &format!("{path}: {e}")),
        Err(e) => exec.fail(1, "PermissionDenied", &e.to_string()),
    }
}

/// Why `program` cannot run in a sandbox of `arch`, the way the kernel refuses it: an ELF for
/// another machine is an `Exec format error`. Scripts and unreadable files are left to spawn.
fn foreign_executable(arch: Arch, program: &Path) -> Option<String> {
    let mut header = [0u8; tailbox_proto::arch::ELF_MACHINE_PREFIX_LEN];
    let mut file = std::fs::File::open(program).ok()?;
    std::io::Read::read_exact(&mut file, &mut header).ok()?;
    if !header.starts_with(b"\x7fELF") {
        return None;
    }
    match Arch::from_elf_header(&header) {
        Ok(found) if found == arch => None,
        Ok(found) => Some(format!(
            "Exec format error (an {found} ELF in an {arch} sandbox)"
        )),
        Err(why) => Some(format!("Exec format error ({why})")),
    }
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            exec.fail(1, "NotFound", &format!("{path}: no such file or directory"));
        }
        Err(e) => exec.fail(1, "PermissionDenied", &e.to_string()),
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
fn complete_write_file(
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

/// Sandbox directories that processes see at their sandbox path (in a private mount namespace)
/// rather than only through argv[0] mapping: where tailbox pushes binaries.
pub(crate) const VISIBLE_DIRS: &[&str] = &["/tmp/tailbox"];

/// Whether this process may give children a private mount namespace (it is root and the kernel
/// allows it), probed once with `/bin/true`.
pub(crate) fn mount_namespaces_work() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    let mut probe = std::process::Command::new("/bin/true");
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut probe, || private_mounts(&[]));
    }
    probe.status().is_ok_and(|s| s.success())
}

/// In a forked child: a private mount namespace with each `(source, target)` bind-mounted.
fn private_mounts(binds: &[(std::ffi::CString, std::ffi::CString)]) -> std::io::Result<()> {
    // SAFETY: plain system calls on NUL-terminated strings prepared before the fork.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
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
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn spawn_process(
    state: &State,
    sandbox: &Sandbox,
    argv: Vec<String>,
    exec_env: HashMap<String, String>,
) -> Arc<Exec> {
    let Some(first) = argv.first() else {
        return Exec::exited(argv, 127, "empty command\n");
    };
    // Only absolute commands exist in the fake image (mapped into the root): nothing may touch
    // the host by accident.
    let program = if first.starts_with('/') {
        map_path(&sandbox.root, first).ok()
    } else {
        None
    };
    let Some(program) = program else {
        let stderr = format!("{first}: not found in the fake image\n");
        return Exec::exited(argv, 127, &stderr);
    };
    if let Some(why) = foreign_executable(state.config.arch, &program) {
        let stderr = format!("{first}: cannot execute binary file: {why}\n");
        return Exec::exited(argv, 126, &stderr);
    }
    let mut env = sandbox.env.clone();
    if let Some(home) = env.get("HOME").cloned()
        && let Ok(mapped) = map_path(&sandbox.root, &home)
    {
        let _ = std::fs::create_dir_all(&mapped);
        env.insert("HOME".into(), mapped.display().to_string());
    }
    env.insert(
        "TMPDIR".into(),
        sandbox.root.join("tmp").display().to_string(),
    );
    env.insert("PATH".into(), std::env::var("PATH").unwrap_or_default());
    env.extend(exec_env);

    let mut command = tokio::process::Command::new(&program);
    command
        .args(&argv[1..])
        .current_dir(&sandbox.root)
        .env_clear()
        .envs(&env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if state.mount_namespaces {
        let binds: Vec<(std::ffi::CString, std::ffi::CString)> = VISIBLE_DIRS
            .iter()
            .filter_map(|dir| {
                let source = map_path(&sandbox.root, dir).ok()?;
                std::fs::create_dir_all(&source).ok()?;
                // The mount point on this machine: an empty directory, shared harmlessly by
                // every fake sandbox (each mounts over it privately).
                std::fs::create_dir_all(dir).ok()?;
                Some((
                    std::ffi::CString::new(source.into_os_string().into_encoded_bytes()).ok()?,
                    std::ffi::CString::new(dir.as_bytes()).ok()?,
                ))
            })
            .collect();
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            command.pre_exec(move || private_mounts(&binds));
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::PermissionDenied {
                126
            } else {
                127
            };
            let stderr = format!("{first}: {e}\n");
            return Exec::exited(argv, code, &stderr);
        }
    };
    let stdin = child.stdin.take().map_or(Sink::Discard, Sink::Child);
    let exec = Arc::new(Exec::new(argv, stdin));
    *lock(&exec.pgid) = child.id().and_then(|pid| i32::try_from(pid).ok());
    let out_task = tokio::spawn(pump(Arc::clone(&exec), Fd::Stdout, child.stdout.take()));
    let err_task = tokio::spawn(pump(Arc::clone(&exec), Fd::Stderr, child.stderr.take()));
    let waiter = Arc::clone(&exec);
    tokio::spawn(async move {
        use std::os::unix::process::ExitStatusExt as _;
        let status = child.wait().await;
        // Output that is still in the pipes belongs before the exit.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = out_task.await;
            let _ = err_task.await;
        })
        .await;
        let exit = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(signal)) => Exit::Signal(signal),
                (None, None) => Exit::Code(-1),
            },
            Err(_) => Exit::Code(-1),
        };
        waiter.exit.send_replace(Some(exit));
    });
    exec
}

/// Which output of an exec.
#[derive(Clone, Copy)]
enum Fd {
    Stdout,
    Stderr,
}

/// Copies a process's pipe into the exec's output, then marks that output finished.
async fn pump(exec: Arc<Exec>, fd: Fd, pipe: Option<impl tokio::io::AsyncRead + Unpin>) {
    let output = match fd {
        Fd::Stdout => &exec.stdout,
        Fd::Stderr => &exec.stderr,
    };
    if let Some(mut pipe) = pipe {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            output.push(&buf[..n]);
        }
    }
    output.finish();
}

/// Writes to an exec's stdin at `offset` for `rpc`; duplicates (retries) are dropped, gaps
/// refused (and recorded as refusals).
pub(crate) async fn write_stdin(
    state: &State,
    rpc: &str,
    exec: &Exec,
    exec_id: &str,
    offset: u64,
    data: &[u8],
    eof: bool,
) -> Result<(), Status> {
    let mut stdin = exec.stdin.lock().await;
    if stdin.closed {
        if data.is_empty() && eof && offset == stdin.written {
            return Ok(()); // A retried close.
        }
        return Err(Status::failed_precondition("stdin is already closed"));
    }
    if offset > stdin.written {
        return Err(state.refuse(
            rpc,
            Status::out_of_range(format!(
                "offset {offset} is beyond the {} bytes written so far",
                stdin.written
            )),
        ));
    }
    let skip = usize::try_from(stdin.written - offset).unwrap_or(usize::MAX);
    if skip < data.len() {
        let new = &data[skip..];
        match &mut stdin.sink {
            Sink::Child(child) => {
                if child.write_all(new).await.is_err() || child.flush().await.is_err() {
                    return Err(Status::failed_precondition("the process has exited"));
                }
            }
            Sink::WriteFile { data, .. } => data.extend_from_slice(new),
            Sink::Discard => {}
        }
        stdin.written += new.len() as u64;
        let written = stdin.written;
        state.update(|r| {
            if let Some(e) = r.execs.iter_mut().find(|e| e.exec_id == exec_id) {
                e.stdin_bytes = written;
            }
        });
    }
    if eof {
        stdin.closed = true;
        let sink = std::mem::replace(&mut stdin.sink, Sink::Discard);
        if let Sink::WriteFile { path, host, data } = sink {
            complete_write_file(state, exec, path, host, data);
        }
    }
    Ok(())
}
