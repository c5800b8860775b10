//! The sidecar: one long-lived agent per sandbox that keeps the sandbox on the tailnet.
//!
//! - [`start`]: `tailbox-agent sidecar` as typed in an exec: finds a running sidecar (and reuses
//!   or replaces it), or starts one detached and waits until it answers `Hello` on its socket.
//! - [`daemon`]: the sidecar process itself: the lock, the pidfile, the socket (mode 0600), the
//!   gRPC server (`Agent`, `Sidecar`, `grpc.health.v1`) and the signals.
//! - [`node`]: the node's life: `Up`, `Status`, `Watch`, `Check`, `Env` and `Down`;
//!   [`service`] serves it as `tailbox.agent.v1.Sidecar`.
//! - [`client`]: a gRPC client over the socket, for the commands and the starter.
//!
//! Everything lives in one state directory (mode 0700), so one sandbox has one sidecar:
//! `sidecar.lock` (flock, held for the sidecar's life), `sidecar.pid`, `sidecar.sock`,
//! `sidecar.log`, and tailscaled's own socket and state.

pub mod client;
pub mod daemon;
pub mod node;
pub mod service;
pub mod start;

use std::path::{Path, PathBuf};

/// Exit codes of `sidecar`, `attach`, `status`, `env` and `down` (the README and `--help` list
/// them).
pub mod exit {
    /// Done: the sidecar serves, the node is Running, the variables were printed, it is down.
    pub const OK: u8 = 0;
    /// It did not work: the sidecar failed to start, the node is not Running (or did not get
    /// there in time), the node is not up, the logout failed.
    pub const FAILED: u8 = 1;
    /// Usage error (from the argument parser).
    pub const USAGE: u8 = 2;
    /// No sidecar answers on the socket.
    pub const NO_SIDECAR: u8 = 3;
    /// Another sidecar holds the state directory: another version (start it with `--replace`),
    /// or, for `--foreground`, any other sidecar.
    pub const OTHER_SIDECAR: u8 = 4;
}

/// Where the sidecar lives unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/tmp/tailbox/sidecar";

/// The files of one sidecar.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The sidecar whose state directory is `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("sidecar.sock")
    }

    /// The lock file: whoever holds its flock is the sidecar.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("sidecar.lock")
    }

    /// The sidecar's pid, as text.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("sidecar.pid")
    }

    /// The detached sidecar's stdout and stderr.
    pub fn log(&self) -> PathBuf {
        self.dir.join("sidecar.log")
    }

    /// Where tailscaled's socket and state go unless `Up` says otherwise.
    pub fn tailscaled_dir(&self) -> PathBuf {
        self.dir.join("tailscaled")
    }

    /// Creates the directory (and its parents) if needed, and makes sure only its owner, who
    /// must be us, can enter it: the socket's 0600 mode is then not the only guard.
    pub fn prepare(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let meta = std::fs::metadata(&self.dir)?;
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to uid {}, not to this user",
                    self.dir.display(),
                    meta.uid()
                ),
            ));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }
}
