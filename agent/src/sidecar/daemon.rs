//! The sidecar process: `tailbox-agent sidecar --foreground`, which the starter runs detached.
//!
//! 1. The state directory is made private (0700) and its lock taken (flock, for the process's
//!    whole life): a second sidecar in the same directory exits with [`super::exit::OTHER_SIDECAR`].
//! 2. Holding the lock proves any socket or pidfile left behind is stale (a SIGKILLed sidecar):
//!    they are replaced, and a tailscaled still serving the old default socket is waited for
//!    (it exits on its own, through `TS_PARENT_DEATH_FD`) and killed if it lingers.
//! 3. gRPC on `sidecar.sock` (0600): `Agent` (Hello), `Sidecar`, and `grpc.health.v1`.
//! 4. SIGTERM and SIGINT mean Down: a bounded logout, tailscaled stopped, then exit 0. SIGHUP is
//!    ignored, so the end of a terminal or exec session does not end the sidecar.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tailbox_proto::agent::v1::agent_server::AgentServer;
use tailbox_proto::agent::v1::sidecar_server::SidecarServer;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use super::node::{DEFAULT_DOWN_GRACE, Node};
use super::service::SidecarService;
use super::{StateDir, exit};
use crate::preflight::Host;
use crate::run::RunContext;
use crate::service::{AgentService, own_sha256};

/// How long a tailscaled left by a killed sidecar gets to exit before it is killed.
const STALE_DAEMON_GRACE: Duration = Duration::from_secs(5);
/// How long open connections get to finish once the node is down.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory could not be made private.
    #[error("Failed to prepare the state directory {}", dir.display())]
    Prepare {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// Another sidecar holds the lock.
    #[error("Another sidecar already runs in {}{}", dir.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// Its pid, from the pidfile.
        pid: Option<u32>,
    },
    /// A file of the state directory could not be written.
    #[error("Failed to write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be bound.
    #[error("Failed to listen on {}", socket.display())]
    Bind {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("The sidecar's gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

impl DaemonError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Locked { .. } => exit::OTHER_SIDECAR,
            _ => exit::FAILED,
        }
    }
}

/// Runs the sidecar until Down or SIGTERM (logging must be set up first).
pub async fn run(state_dir: StateDir) -> Result<(), DaemonError> {
    let prepare = |source| DaemonError::Prepare {
        dir: state_dir.dir().to_path_buf(),
        source,
    };
    state_dir.prepare().map_err(prepare)?;
    let lock = take_lock(&state_dir)?;
    let socket = state_dir.socket();
    let _ = std::fs::remove_file(&socket);
    write_private(&state_dir.pidfile(), &format!("{}\n", std::process::id()))?;
    recover_stale_tailscaled(&state_dir.tailscaled_dir().join("tailscaled.sock")).await;

    let listener = bind_private(&socket)?;
    let ctx = RunContext {
        agent_sha256: own_sha256(),
        host: Host::default(),
        ssl_cert_file: std::env::var("SSL_CERT_FILE").ok(),
        path_var: std::env::var("PATH").ok(),
        run_root: state_dir.dir().to_path_buf(),
        ..Default::default()
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let node = Node::new(ctx.clone(), state_dir.clone(), health);
    node.init_health().await;
    tokio::spawn(handle_signals(node.clone()));
    tracing::info!(
        version = crate::AGENT_VERSION,
        pid = std::process::id(),
        socket = %socket.display(),
        "sidecar serving"
    );

    let finished = node.finished();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(AgentServer::new(AgentService::sidecar(ctx)))
        .add_service(SidecarServer::new(SidecarService::new(node)))
        .add_service(health_service)
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            finished.clone().cancelled_owned(),
        );
    tokio::pin!(server);
    let served = tokio::select! {
        served = &mut server => served,
        () = async {
            finished.cancelled().await;
            tokio::time::sleep(DRAIN_GRACE).await;
        } => {
            tracing::warn!("connections still open {DRAIN_GRACE:?} after the node went down; exiting anyway");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(state_dir.pidfile());
    drop(lock);
    tracing::info!("sidecar stopped");
    served.map_err(DaemonError::Serve)
}

/// SIGTERM/SIGINT: Down. SIGHUP: ignored (logged).
async fn handle_signals(node: Node) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot listen for signals; SIGTERM will end the sidecar without a logout");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: logging out and stopping"),
            _ = int.recv() => tracing::info!("SIGINT: logging out and stopping"),
            _ = hup.recv() => {
                tracing::info!("SIGHUP ignored: the sidecar outlives the session that started it");
                continue;
            }
        }
        node.down(DEFAULT_DOWN_GRACE).await;
        return;
    }
}

/// Takes the state directory's lock, or says who holds it.
fn take_lock(state_dir: &StateDir) -> Result<Flock<File>, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = state_dir.lock();
    // std opens with O_CLOEXEC, so tailscaled never inherits the lock and cannot keep it after
    // we die.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| DaemonError::Write {
            path: path.clone(),
            source,
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            DaemonError::Locked {
                dir: state_dir.dir().to_path_buf(),
                pid: read_pid(&state_dir.pidfile()),
            }
        } else {
            DaemonError::Write {
                path,
                source: errno.into(),
            }
        }
    })
}

/// The pid in a pidfile, if it holds one.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes `text` to `path` atomically (a temp file renamed over it), readable by us only.
fn write_private(path: &Path, text: &str) -> Result<(), DaemonError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|source| DaemonError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Binds the socket and makes it 0600. The directory is 0700 already, so no other user could
/// reach the socket in the moment before the chmod.
fn bind_private(socket: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    use std::os::unix::fs::PermissionsExt as _;
    let bind = || -> std::io::Result<tokio::net::UnixListener> {
        let listener = tokio::net::UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    };
    bind().map_err(|source| DaemonError::Bind {
        socket: socket.to_path_buf(),
        source,
    })
}

/// Waits for a tailscaled that still serves `socket` (left by a sidecar that was killed) to
/// exit, and kills it if it does not: it would hold the proxy port the next Up needs. It is
/// found by its unique `--socket=` argument, never by name.
async fn recover_stale_tailscaled(socket: &Path) {
    let needle = format!("--socket={}", socket.display());
    let deadline = tokio::time::Instant::now() + STALE_DAEMON_GRACE;
    loop {
        let stale = processes_with_arg(&needle);
        if stale.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            for pid in stale {
                tracing::warn!(
                    pid,
                    "a tailscaled left by the previous sidecar is still running; killing it"
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pids of our processes with `arg` as one of their arguments.
fn processes_with_arg(arg: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|&b| b == 0)
                .any(|a| a == arg.as_bytes())
                .then_some(pid)
        })
        .filter(|&pid| pid != std::process::id())
        .collect()
}
