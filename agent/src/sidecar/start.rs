//! `tailbox-agent sidecar`: make sure a sidecar of this binary serves the state directory, then
//! return, so the exec that ran it can end while the sidecar lives on.
//!
//! - A sidecar that answers `Hello` with this binary's sha256 is reused. One of another version
//!   is reported, or with `--replace` taken down through its own `Down` (a bounded logout, its
//!   tailscaled stopped) before this one starts: tailscaled's state is in memory, so a node
//!   cannot pass from one sidecar to the next, and the caller brings the new one up.
//! - Otherwise this binary is started again as `sidecar --foreground` in a new session, with
//!   stdin from /dev/null and stdout and stderr appended to `sidecar.log`: nothing of the exec's
//!   (its pipes, its session, its SIGHUP) reaches it, and the exec's stdout ends at once.
//! - Ready means the new sidecar answered `Hello` on its socket, which is exactly what a later
//!   `attach` needs. If two starts race, the loser's sidecar finds the lock taken and exits
//!   with [`exit::OTHER_SIDECAR`], and its starter reuses the winner.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tailbox_proto::agent::v1::{DownRequest, HelloResponse};

use super::client::{self, Clients};
use super::{StateDir, exit};
use crate::events::duration;

/// Environment variables a sidecar never needs and must not carry into its own process (or
/// tailscaled's): the key only ever arrives in `Up`.
const SECRET_VARS: &[&str] = &["TS_AUTHKEY", "TS_AUTH_KEY"];
/// How often the starter looks for its sidecar.
const POLL: Duration = Duration::from_millis(20);
/// Lines of the sidecar's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 20;

/// What `tailbox-agent sidecar` was asked.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The state directory.
    pub state_dir: StateDir,
    /// Take down a sidecar of another version first.
    pub replace: bool,
    /// The sidecar's log filter.
    pub log: String,
    /// How long the sidecar may take to serve (and a replaced one to exit).
    pub timeout: Duration,
}

/// The sidecar that serves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// One of this binary was already running.
    Reused {
        /// Its pid.
        pid: u32,
    },
    /// This start launched it.
    Started {
        /// Its pid.
        pid: u32,
    },
}

/// Why no sidecar of this binary serves.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory could not be prepared.
    #[error("Failed to prepare the state directory {}", dir.display())]
    Prepare {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A sidecar of another binary runs.
    #[error(
        "Another version of the sidecar runs in {} (pid {pid}, version {version}, sha256 {})",
        dir.display(),
        short(sha256)
    )]
    OtherVersion {
        /// The directory.
        dir: PathBuf,
        /// Its pid.
        pid: u32,
        /// Its version.
        version: String,
        /// Its binary's sha256.
        sha256: String,
    },
    /// The running sidecar refused to go down.
    #[error("Failed to take down the running sidecar (pid {pid})")]
    Replace {
        /// Its pid.
        pid: u32,
        /// Its answer.
        #[source]
        source: tonic::Status,
    },
    /// The running sidecar went down but did not exit.
    #[error("The replaced sidecar (pid {pid}) did not exit within {}", humanize(*timeout))]
    ReplaceTimeout {
        /// Its pid.
        pid: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// The sidecar could not be launched.
    #[error("Failed to launch the sidecar")]
    Spawn(#[source] std::io::Error),
    /// It exited before it served.
    #[error("The sidecar exited before it served ({status})")]
    Exited {
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of its log.
        log_tail: Vec<String>,
    },
    /// It did not answer in time.
    #[error("The sidecar did not answer on {} within {}", socket.display(), humanize(*timeout))]
    Timeout {
        /// Its socket.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// The end of its log.
        log_tail: Vec<String>,
    },
}

impl StartError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::OtherVersion { .. } => exit::OTHER_SIDECAR,
            _ => exit::FAILED,
        }
    }

    /// The end of the sidecar's log, when it failed to start.
    pub fn log_tail(&self) -> &[String] {
        match self {
            Self::Exited { log_tail, .. } | Self::Timeout { log_tail, .. } => log_tail,
            _ => &[],
        }
    }
}

fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

fn humanize(d: Duration) -> String {
    crate::checks::tailnet::humanize(d)
}

/// Makes sure a sidecar of this binary serves `options.state_dir`.
pub async fn start(options: &StartOptions) -> Result<Serving, StartError> {
    let state_dir = &options.state_dir;
    state_dir.prepare().map_err(|source| StartError::Prepare {
        dir: state_dir.dir().to_path_buf(),
        source,
    })?;
    let own_sha256 = crate::service::own_sha256();
    let socket = state_dir.socket();
    if let Ok((clients, hello)) = client::hello(&socket).await {
        if hello.agent_sha256 == own_sha256 {
            return Ok(Serving::Reused { pid: hello.pid });
        }
        if !options.replace {
            return Err(other_version(state_dir, hello));
        }
        replace(state_dir, clients, hello.pid, options.timeout).await?;
    }
    launch(options, &own_sha256).await
}

fn other_version(state_dir: &StateDir, hello: HelloResponse) -> StartError {
    StartError::OtherVersion {
        dir: state_dir.dir().to_path_buf(),
        pid: hello.pid,
        version: hello.agent_version,
        sha256: hello.agent_sha256,
    }
}

/// Takes the running sidecar down and waits until it has let go of the lock.
async fn replace(
    state_dir: &StateDir,
    mut clients: Clients,
    pid: u32,
    timeout: Duration,
) -> Result<(), StartError> {
    tracing::info!(pid, "taking down the sidecar of another version");
    clients
        .sidecar
        .down(DownRequest {
            grace: Some(duration(timeout)),
        })
        .await
        .map_err(|source| StartError::Replace { pid, source })?;
    let deadline = tokio::time::Instant::now() + timeout;
    while lock_is_held(state_dir) {
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::ReplaceTimeout { pid, timeout });
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Whether a sidecar holds the state directory's lock right now.
pub fn lock_is_held(state_dir: &StateDir) -> bool {
    let Ok(file) = File::open(state_dir.lock()) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_released_on_drop) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// Starts the sidecar detached and waits until it answers.
async fn launch(options: &StartOptions, own_sha256: &str) -> Result<Serving, StartError> {
    let state_dir = &options.state_dir;
    let log_path = state_dir.log();
    let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let mut child = spawn_detached(options).map_err(StartError::Spawn)?;
    let socket = state_dir.socket();
    let deadline = tokio::time::Instant::now() + options.timeout;
    let log_tail = || read_log_tail(&log_path, log_start);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            if status.code() == Some(i32::from(exit::OTHER_SIDECAR)) {
                // Another start won the race: use its sidecar.
                return wait_for_other(&socket, own_sha256, state_dir, deadline, options).await;
            }
            return Err(StartError::Exited {
                status,
                log_tail: log_tail(),
            });
        }
        if let Ok((_, hello)) = client::hello(&socket).await {
            if hello.pid == child.id() {
                return Ok(Serving::Started { pid: hello.pid });
            }
            // Someone else's sidecar took the directory first; ours will exit.
            return judge(hello, own_sha256, state_dir);
        }
        if tokio::time::Instant::now() >= deadline {
            stop(&mut child);
            return Err(StartError::Timeout {
                socket,
                timeout: options.timeout,
                log_tail: log_tail(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The sidecar that won a race answers: reuse it if it is this binary.
async fn wait_for_other(
    socket: &std::path::Path,
    own_sha256: &str,
    state_dir: &StateDir,
    deadline: tokio::time::Instant,
    options: &StartOptions,
) -> Result<Serving, StartError> {
    loop {
        if let Ok((_, hello)) = client::hello(socket).await {
            return judge(hello, own_sha256, state_dir);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::Timeout {
                socket: socket.to_path_buf(),
                timeout: options.timeout,
                log_tail: Vec::new(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn judge(
    hello: HelloResponse,
    own_sha256: &str,
    state_dir: &StateDir,
) -> Result<Serving, StartError> {
    if hello.agent_sha256 == own_sha256 {
        Ok(Serving::Reused { pid: hello.pid })
    } else {
        Err(other_version(state_dir, hello))
    }
}

/// `sidecar --foreground` of this very binary, in a new session, with stdio off the exec.
fn spawn_detached(options: &StartOptions) -> std::io::Result<Child> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(options.state_dir.log())?;
    let mut command = std::process::Command::new("/proc/self/exe");
    if let Some(argv0) = std::env::args_os().next() {
        command.arg0(argv0);
    }
    command
        .arg("sidecar")
        .arg("--foreground")
        .arg("--state-dir")
        .arg(options.state_dir.dir())
        .arg("--log")
        .arg(&options.log)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for name in SECRET_VARS {
        command.env_remove(name);
    }
    // SAFETY: setsid(2) is async-signal-safe; between fork and exec it only detaches the child
    // from our session and process group, so the exec's SIGHUP and process-group signals miss it.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    command.spawn()
}

/// Stops a sidecar that never answered (SIGTERM lets it clean up) and reaps it.
fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..100 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last lines the sidecar logged since `from` (a byte offset).
fn read_log_tail(path: &std::path::Path, from: u64) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}
