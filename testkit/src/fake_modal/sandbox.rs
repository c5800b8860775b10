//! Fake sandboxes: a root directory, a network of their own, an optional entrypoint, and execs
//! (local processes or emulated tools) with offset-tracked stdio. What each behaviour models,
//! and where that fact comes from, is in the fake's README.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tailbox_proto::modal::client::GenericResult;
use tailbox_proto::modal::client::generic_result::GenericStatus;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::ChildStdin;
use tokio::sync::watch;
use tonic::Status;

use super::network::{self, SandboxNetwork};
use super::process::{self, Output as ProcessOutput, Spec};
use super::tools;
use super::{Exit, SandboxRecord, State, lock};

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

impl World {
    /// The variables of a secret the fake made.
    pub(crate) fn secret(&self, id: &str) -> Result<&HashMap<String, String>, Status> {
        self.secrets
            .get(id)
            .ok_or_else(|| Status::invalid_argument(format!("secret {id} not found")))
    }
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
    pub(crate) network: SandboxNetwork,
    /// Set first when it ends: no exec may start from then on.
    ending: AtomicBool,
    /// How it ended, published once its processes are gone; `None` while it runs.
    pub(crate) result: watch::Sender<Option<GenericResult>>,
    pub(crate) execs: Mutex<HashMap<String, Arc<Exec>>>,
}

impl Sandbox {
    pub(crate) fn is_finished(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }
}

/// What a sandbox is created with.
pub(crate) struct Definition {
    pub(crate) app_id: String,
    pub(crate) tags: Vec<(String, String)>,
    pub(crate) env: HashMap<String, String>,
    /// Its lifetime; at the end it finishes with TIMEOUT.
    pub(crate) timeout_secs: u32,
    /// Its main process; empty keeps it running until terminated or timed out.
    pub(crate) entrypoint: Vec<String>,
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

    pub(crate) fn push(&self, bytes: &[u8]) {
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

/// Where an exec's stdin goes.
pub(crate) enum Sink {
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
}

impl Exec {
    pub(crate) fn new(argv: Vec<String>, sink: Sink) -> Self {
        Self {
            tool: tools::is_tool(&argv),
            argv,
            stdin: tokio::sync::Mutex::new(Stdin {
                written: 0,
                closed: false,
                sink,
            }),
            stdout: Output::new(),
            stderr: Output::new(),
            exit: watch::channel(None).0,
        }
    }

    pub(crate) fn finish(&self, exit: Exit) {
        self.stdout.finish();
        self.stderr.finish();
        self.exit.send_replace(Some(exit));
    }

    /// An exec that ended at once with `code`, having printed `stderr`.
    pub(crate) fn exited(argv: Vec<String>, code: i32, stderr: &str) -> Arc<Self> {
        let exec = Arc::new(Self::new(argv, Sink::Discard));
        exec.stderr.push(stderr.as_bytes());
        exec.finish(Exit::Code(code));
        exec
    }

    /// An fs-tools failure: exit `code` with Modal's JSON error on stderr.
    pub(crate) fn fail(&self, code: i32, error_kind: &str, message: &str) {
        let payload =
            serde_json::json!({"error_kind": error_kind, "message": message, "detail": null});
        self.stderr.push(payload.to_string().as_bytes());
        self.finish(Exit::Code(code));
    }
}

/// How an exec was asked to run (from `TaskExecStartRequest`).
pub(crate) struct ExecSpec {
    pub(crate) argv: Vec<String>,
    pub(crate) env: HashMap<String, String>,
    pub(crate) workdir: Option<String>,
    /// stdout to a pipe the client reads (PIPE) or discarded (DEVNULL).
    pub(crate) stdout: bool,
    pub(crate) stderr: StderrTo,
    /// Killed after this long.
    pub(crate) timeout: Option<Duration>,
}

/// `TaskExecStderrConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StderrTo {
    Devnull,
    Pipe,
    Stdout,
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

fn result(status: GenericStatus, exitcode: i32, exception: &str) -> GenericResult {
    GenericResult {
        status: status as i32,
        exception: exception.to_owned(),
        exitcode,
        traceback: String::new(),
    }
}

/// The result of a sandbox terminated from outside (exit code 137 in the SDKs).
pub(crate) fn terminated_result() -> GenericResult {
    result(GenericStatus::Terminated, 137, "terminated")
}

/// Creates a sandbox: its root, its network, its lifetime and its entrypoint.
pub(crate) async fn create(state: &Arc<State>, definition: Definition) -> Result<String, Status> {
    let id = short_id("sb");
    let task_id = short_id("ta");
    let root = state.dir.path().join(&id);
    std::fs::create_dir_all(root.join("tmp"))
        .map_err(|e| Status::internal(format!("fake: creating the sandbox root: {e}")))?;
    let network = SandboxNetwork::create(&state.config.uplinks)
        .await
        .map_err(|e| Status::internal(format!("fake: creating the sandbox network: {e}")))?;
    let sandbox = {
        let mut world = lock(&state.world);
        // Strictly increasing, so paging by created_at never sees ties.
        let created_at = now_secs().max(world.last_created_at + 0.001);
        world.last_created_at = created_at;
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            task_id: task_id.clone(),
            app_id: definition.app_id.clone(),
            tags: definition.tags.clone(),
            env: definition.env.clone(),
            root: root.clone(),
            created_at,
            network,
            ending: AtomicBool::new(false),
            result: watch::channel(None).0,
            execs: Mutex::new(HashMap::new()),
        });
        world.sandboxes.insert(id.clone(), Arc::clone(&sandbox));
        world.tasks.insert(task_id.clone(), id.clone());
        sandbox
    };
    state.update(|r| {
        r.sandboxes.push(SandboxRecord {
            id: id.clone(),
            app_id: definition.app_id,
            task_id,
            tags: definition.tags,
            env: definition.env,
            timeout_secs: definition.timeout_secs,
            root,
            created_at: Instant::now(),
            terminated_at: None,
        })
    });
    expire_after(
        state,
        &sandbox,
        Duration::from_secs(definition.timeout_secs.into()),
    );
    if !definition.entrypoint.is_empty() {
        run_entrypoint(state, &sandbox, &definition.entrypoint);
    }
    Ok(id)
}

/// Finishes the sandbox with TIMEOUT once its lifetime is over.
fn expire_after(state: &Arc<State>, sandbox: &Arc<Sandbox>, lifetime: Duration) {
    let (state, sandbox) = (Arc::clone(state), Arc::clone(sandbox));
    let mut finished = sandbox.result.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(lifetime) => {
                let timed_out = result(GenericStatus::Timeout, 124, "sandbox timed out");
                finish(&state, &sandbox, timed_out);
            }
            _ = finished.wait_for(Option::is_some) => {}
        }
    });
}

/// Runs the sandbox's main process; when it exits, the sandbox finishes with its exit code.
fn run_entrypoint(state: &Arc<State>, sandbox: &Arc<Sandbox>, argv: &[String]) {
    let spec = Spec {
        argv,
        env: HashMap::new(),
        workdir: None,
    };
    let spawned = process::command(state, sandbox, spec).and_then(|mut command| {
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", argv[0]))
    });
    let (state, sandbox) = (Arc::clone(state), Arc::clone(sandbox));
    tokio::spawn(async move {
        let ended = match spawned {
            Ok(mut child) => match child.wait().await.map(|s| s.code()) {
                Ok(Some(0)) => result(GenericStatus::Success, 0, ""),
                Ok(Some(code)) => result(GenericStatus::Failure, code, "the entrypoint failed"),
                // Killed by a signal: terminated (from outside, or by the fake itself).
                Ok(None) | Err(_) => terminated_result(),
            },
            Err(e) => result(GenericStatus::InitFailure, 0, &e),
        };
        finish(&state, &sandbox, ended);
    });
}

/// Terminates a sandbox from outside. False if it had already finished.
pub(crate) fn terminate(state: &State, sandbox: &Sandbox) -> bool {
    finish(state, sandbox, terminated_result())
}

/// Ends a sandbox with `result` (unless it already ended): every process in it is killed,
/// detached ones included, and its emulated tools stop; then the result is published. False if
/// it had already finished.
pub(crate) fn finish(state: &State, sandbox: &Sandbox, ended: GenericResult) -> bool {
    if sandbox.ending.swap(true, Ordering::SeqCst) {
        return false;
    }
    kill_processes(sandbox);
    sandbox.network.disconnect();
    sandbox.result.send_replace(Some(ended));
    state.update(|r| {
        if let Some(s) = r.sandboxes.iter_mut().find(|s| s.id == sandbox.id) {
            s.terminated_at = Some(Instant::now());
        }
    });
    true
}

fn kill_processes(sandbox: &Sandbox) {
    network::kill_processes_in(&sandbox.network.netns);
    let execs: Vec<Arc<Exec>> = lock(&sandbox.execs).values().cloned().collect();
    for exec in execs {
        if exec.exit.borrow().is_none() && exec.tool {
            exec.finish(Exit::Signal(libc::SIGKILL));
        }
    }
}

/// Kills every process of every sandbox (the fake is going away).
pub(crate) fn kill_all(state: &State) {
    let sandboxes: Vec<Arc<Sandbox>> = lock(&state.world).sandboxes.values().cloned().collect();
    for sandbox in sandboxes {
        kill_processes(&sandbox);
    }
}

/// Starts an exec; idempotent per exec id.
pub(crate) fn start_exec(
    state: &Arc<State>,
    sandbox: &Arc<Sandbox>,
    exec_id: &str,
    spec: ExecSpec,
) -> Result<(), Status> {
    {
        let execs = lock(&sandbox.execs);
        if let Some(existing) = execs.get(exec_id) {
            return if existing.argv == spec.argv {
                Ok(())
            } else {
                Err(Status::already_exists(format!(
                    "exec {exec_id} exists with another command"
                )))
            };
        }
    }
    let stdout_piped = spec.stdout;
    let exec = match tools::start(state, &sandbox.root, &spec.argv) {
        Some(exec) => exec,
        None => spawn_exec(state, sandbox, spec),
    };
    lock(&sandbox.execs).insert(exec_id.to_owned(), Arc::clone(&exec));
    state.update(|r| {
        r.execs.push(super::ExecRecord {
            sandbox_id: sandbox.id.clone(),
            exec_id: exec_id.to_owned(),
            argv: exec.argv.clone(),
            stdout_piped,
            stdin_bytes: 0,
            stdout_bytes: 0,
            exit: None,
        })
    });
    let (state, exec_id) = (Arc::clone(state), exec_id.to_owned());
    let mut exit = exec.exit.subscribe();
    let stdout = exec.stdout.watch();
    tokio::spawn(async move {
        let Ok(status) = exit.wait_for(Option::is_some).await.map(|e| *e) else {
            return;
        };
        let produced = stdout.borrow().0 as u64;
        state.update(|r| {
            if let Some(e) = r.execs.iter_mut().find(|e| e.exec_id == exec_id) {
                e.exit = status;
                e.stdout_bytes = produced;
            }
        });
    });
    Ok(())
}

/// Runs an exec as a process in the sandbox: its stdout and stderr are pipes the fake reads
/// until every holder has closed them (a background child that keeps them keeps the streams
/// open); its exit is its own, whenever its output ends.
fn spawn_exec(state: &State, sandbox: &Sandbox, spec: ExecSpec) -> Arc<Exec> {
    if let Some(first) = spec.argv.first()
        && let Some(why) = process::foreign_executable(state, sandbox, first)
    {
        let stderr = format!("{first}: cannot execute binary file: {why}\n");
        return Exec::exited(spec.argv, 126, &stderr);
    }
    let spawned = (|| {
        let mut command = process::command(
            state,
            sandbox,
            Spec {
                argv: &spec.argv,
                env: spec.env,
                workdir: spec.workdir.as_deref(),
            },
        )?;
        let io = |e: std::io::Error| e.to_string();
        let (stdout_reader, stdout) = if spec.stdout {
            let (reader, writer) = process::pipe().map_err(io)?;
            (Some(reader), ProcessOutput::Pipe(writer))
        } else {
            (None, ProcessOutput::Null)
        };
        let (stderr_reader, stderr) = match (spec.stderr, &stdout) {
            (StderrTo::Pipe, _) => {
                let (reader, writer) = process::pipe().map_err(io)?;
                (Some(reader), ProcessOutput::Pipe(writer))
            }
            (StderrTo::Stdout, ProcessOutput::Pipe(writer)) => {
                (None, ProcessOutput::Pipe(writer.try_clone().map_err(io)?))
            }
            (StderrTo::Stdout | StderrTo::Devnull, _) => (None, ProcessOutput::Null),
        };
        command
            .stdin(std::process::Stdio::piped())
            .stdout(stdout)
            .stderr(stderr);
        let child = command.spawn().map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::PermissionDenied {
                126
            } else {
                127
            };
            (code, format!("{}: {e}\n", spec.argv[0]))
        });
        // `command` (and with it our copies of the pipes' write ends) is dropped here, so the
        // pipes end when the processes that hold them do.
        Ok::<_, String>((child, stdout_reader, stderr_reader))
    })();
    let (mut child, stdout_reader, stderr_reader) = match spawned {
        Ok((Ok(child), stdout, stderr)) => (child, stdout, stderr),
        Ok((Err((code, message)), ..)) => return Exec::exited(spec.argv, code, &message),
        Err(message) => return Exec::exited(spec.argv, 127, &format!("{message}\n")),
    };
    let stdin = child.stdin.take().map_or(Sink::Discard, Sink::Child);
    let exec = Arc::new(Exec::new(spec.argv, stdin));
    let pgid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let out_task = tokio::spawn(pump(Arc::clone(&exec), Fd::Stdout, stdout_reader));
    let err_task = tokio::spawn(pump(Arc::clone(&exec), Fd::Stderr, stderr_reader));
    if let (Some(timeout), Some(pgid)) = (spec.timeout, pgid) {
        kill_after(&exec, pgid, timeout);
    }
    let waiter = Arc::clone(&exec);
    tokio::spawn(async move {
        use std::os::unix::process::ExitStatusExt as _;
        let status = child.wait().await;
        // Output already in the pipes belongs before the exit (a background child still
        // holding them does not hold the exit back for long).
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
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

/// `timeout_secs`: SIGKILL to the exec's process group once `timeout` has passed, if it still
/// runs. Processes that left the group (`setsid`) are not the exec's any more and survive.
fn kill_after(exec: &Exec, pgid: i32, timeout: Duration) {
    let mut exit = exec.exit.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(timeout) => {
                // SAFETY: kill(2) on the exec's own process group; no memory is involved.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            _ = exit.wait_for(Option::is_some) => {}
        }
    });
}

/// Which output of an exec.
#[derive(Clone, Copy)]
enum Fd {
    Stdout,
    Stderr,
}

/// Copies a process's pipe into the exec's output, then marks that output finished. The pipe
/// ends only when every process holding its write end has closed it.
async fn pump(exec: Arc<Exec>, fd: Fd, pipe: Option<tokio::net::unix::pipe::Receiver>) {
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
            tools::complete_write_file(state, exec, path, host, data);
        }
    }
    Ok(())
}
