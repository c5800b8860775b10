//! A real `tailscaled` in userspace mode, hermetic, plus the real `tailscale` CLI to drive it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use tempfile::TempDir;

use super::bins::Binaries;
use super::process::{self, LabProcess, Spawn, Stream};

/// How long a node may take to open its LocalAPI and SOCKS5 listener.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// One `tailscaled --tun=userspace-networking` with its own state dir, socket and SOCKS5 port.
/// Dropping it kills the daemon (its process group) and reaps it.
pub struct Node {
    hostname: String,
    dir: PathBuf,
    socket: PathBuf,
    socks5: SocketAddr,
    tailscale: PathBuf,
    process: LabProcess,
    // Declared last so the directory outlives the process using it.
    _owned_dir: Option<TempDir>,
}

/// The parts of `tailscale status --json` the lab looks at; `raw` has the rest.
#[derive(Debug, Clone)]
pub struct Status {
    /// `NoState`, `NeedsLogin`, `NeedsMachineAuth`, `Stopped`, `Starting` or `Running`.
    pub backend_state: String,
    /// Tailnet addresses of this node, IPv4 first.
    pub tailscale_ips: Vec<IpAddr>,
    /// Human-readable health warnings (they carry the last login error, for example).
    pub health: Vec<String>,
    pub raw: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawStatus {
    backend_state: String,
    #[serde(rename = "TailscaleIPs", default)]
    tailscale_ips: Option<Vec<IpAddr>>,
    #[serde(default)]
    health: Option<Vec<String>>,
}

impl Node {
    /// Starts a node in a fresh temp dir. `env` is the lab's hermetic set
    /// ([`super::Lab::tailscaled_env`]). The node is not logged in; drive it with
    /// [`Node::tailscale`] or [`Node::up`].
    pub async fn start(
        bins: &Binaries,
        hostname: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tailbox-node-")
            .tempdir()
            .context("creating a node temp dir")?;
        let path = dir.path().to_owned();
        let mut node = Self::start_in(bins, hostname, env, path).await?;
        node._owned_dir = Some(dir);
        Ok(node)
    }

    /// Starts a node whose files live under `dir` (created if needed), which the caller owns.
    pub async fn start_in(
        bins: &Binaries,
        hostname: &str,
        env: &BTreeMap<String, String>,
        dir: PathBuf,
    ) -> Result<Self> {
        let state = dir.join("state");
        let logs = dir.join("logs");
        for d in [&state, &logs] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let socket = dir.join("tailscaled.sock");

        let mut command = std::process::Command::new(bins.tailscaled());
        command
            .arg("--tun=userspace-networking")
            .arg("--state=mem:")
            .arg(format!("--statedir={}", state.display()))
            .arg(format!("--socket={}", socket.display()))
            // Port 0 and the log line below, rather than picking a "free" port and racing
            // other tests for it.
            .arg("--socks5-server=127.0.0.1:0")
            .arg("--port=0")
            .arg("--no-logs-no-support")
            // Ignore any device policy on the host (/etc/tailscale/syspolicy.json).
            .arg("--syspolicy-file=")
            .current_dir(&dir);
        scrub_env(&mut command);
        command.envs(env).env("TS_LOGS_DIR", &logs);

        let (socks_watch, socks_seen) = process::watch(Stream::Stderr, "SOCKS5 listening on ");
        let mut process = LabProcess::spawn(Spawn {
            name: format!("tailscaled[{hostname}]"),
            command,
            log_path: dir.join("tailscaled.log"),
            watches: vec![socks_watch],
            hold_stdin: false,
            parent_death_fd: true,
        })?;

        let line = process.wait_for(socks_seen, START_DEADLINE).await?;
        let socks5 = line
            .rsplit("SOCKS5 listening on ")
            .next()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            .with_context(|| format!("unexpected SOCKS5 log line {line:?}"))?;

        let node = Self {
            hostname: hostname.to_owned(),
            dir,
            socket,
            socks5,
            tailscale: bins.tailscale(),
            process,
            _owned_dir: None,
        };
        node.await_local_api().await?;
        Ok(node)
    }

    /// Waits until the LocalAPI answers. The socket appears before the backend exists and
    /// requests block until it does, so one successful `status` means ready.
    async fn await_local_api(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "tailscaled[{}] socket {} never accepted a connection\n{}",
                    self.hostname,
                    self.socket.display(),
                    self.process.log_tail()
                );
            }
            // Nothing announces the socket; Tailscale's own tests poll it the same way.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::timeout(left, self.status())
            .await
            .map_err(|_| {
                anyhow!(
                    "LocalAPI status did not answer\n{}",
                    self.process.log_tail()
                )
            })?
            .map(|_| ())
    }

    /// The `tailscale` CLI aimed at this node's socket, with a hermetic environment. Killed if
    /// dropped before it finishes.
    pub fn tailscale(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.tailscale);
        cmd.arg(format!("--socket={}", self.socket.display()))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        scrub_env(cmd.as_std_mut());
        cmd.env("TS_LOGS_DIR", self.dir.join("logs"));
        cmd
    }

    /// `tailscale up` against `control_url` with `auth_key`, waiting (up to `timeout`) until
    /// the node is Running, and returns that Running status. The key reaches the CLI as
    /// `--auth-key=file:<0600 file>`, never on argv; the file is removed afterwards. On failure
    /// the error holds the CLI's output (e.g. `backend error: invalid authkey`).
    pub async fn up(&self, control_url: &str, auth_key: &str, timeout: Duration) -> Result<Status> {
        let key_file = self.dir.join("up.authkey");
        write_secret(&key_file, auth_key)?;
        let result = self.up_with_key_file(control_url, &key_file, timeout).await;
        let _ = std::fs::remove_file(&key_file);
        result
    }

    /// Like [`Node::up`], with the key already in a file.
    pub async fn up_with_key_file(
        &self,
        control_url: &str,
        key_file: &Path,
        timeout: Duration,
    ) -> Result<Status> {
        let output = self
            .tailscale()
            .arg("up")
            .arg(format!("--login-server={control_url}"))
            .arg(format!("--auth-key=file:{}", key_file.display()))
            .arg(format!("--hostname={}", self.hostname))
            .arg("--accept-dns=false")
            .arg("--reset")
            .arg(format!("--timeout={}s", timeout.as_secs().max(1)))
            .output()
            .await
            .context("running tailscale up")?;
        if !output.status.success() {
            bail!(
                "tailscale up for {} failed ({}): {}{}",
                self.hostname,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim(),
            );
        }
        // `up` returns once the backend reports Running; confirm it from the status side.
        self.wait_for_state("Running", Duration::from_secs(10))
            .await
    }

    /// `tailscale status --json`, parsed.
    pub async fn status(&self) -> Result<Status> {
        let output = self
            .tailscale()
            .args(["status", "--json"])
            .output()
            .await
            .context("running tailscale status")?;
        // status exits non-zero when not Running but still prints the JSON.
        let raw: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "tailscale status --json printed no JSON ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
        let parsed: RawStatus =
            serde_json::from_value(raw.clone()).context("parsing tailscale status --json")?;
        Ok(Status {
            backend_state: parsed.backend_state,
            tailscale_ips: parsed.tailscale_ips.unwrap_or_default(),
            health: parsed.health.unwrap_or_default(),
            raw,
        })
    }

    /// Polls the LocalAPI until `BackendState == want`, up to `deadline`.
    pub async fn wait_for_state(&self, want: &str, deadline: Duration) -> Result<Status> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let status = self.status().await?;
            if status.backend_state == want {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "tailscaled[{}] stayed in {} (wanted {want}); health: {:?}",
                    self.hostname,
                    status.backend_state,
                    status.health
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The node's directory (state, socket, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The LocalAPI unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The node's SOCKS5 proxy (no auth; `socks5h://` lets tailscaled resolve names).
    pub fn socks5_addr(&self) -> SocketAddr {
        self.socks5
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// tailscaled's combined stdout/stderr.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last lines of tailscaled's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// `Err` (with the log tail) if tailscaled has exited.
    pub fn check_alive(&self) -> Result<()> {
        self.process.check_alive()
    }

    /// Kills tailscaled now (SIGKILL to its group) and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// Drops inherited `TS_*` variables (a developer's `TS_AUTHKEY`, debug knobs, ...) so only the
/// lab decides how lab daemons behave.
fn scrub_env(cmd: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TS_") {
            cmd.env_remove(&k);
        }
    }
}

/// Writes a secret to a new file readable only by us.
pub(crate) fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(secret.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
