//! A real tailnet on loopback, one per test.
//!
//! [`Lab::start`] brings up, in a fresh temp dir and on ports the kernel picks:
//!
//! - Tailscale's own test control server with DERP and STUN (`tailbox-lab control`), requiring
//!   an auth key;
//! - the dev host (`tailbox-lab devhost`): an HTTP server (`/health`, `/status/<code>`,
//!   `/slow?ms=N`, `/large?bytes=N`, `/redirect/<n>`) and the real `git http-backend` serving a
//!   bare repo with known refs, also from a protocol-v0-only server and behind basic auth;
//! - the dev-host peer: a real `tailscaled --tun=userspace-networking` logged in with the real
//!   `tailscale up`. Tailnet TCP to the peer's port P reaches 127.0.0.1:P, so the dev host's
//!   servers are reachable from other nodes at `http://<peer tailnet IPv4>:<port>`.
//!
//! Everything runs in its own process group and is killed and reaped when the [`Lab`] drops,
//! panics included; the lab programs also exit when the test process dies (stdin EOF,
//! `TS_PARENT_DEATH_FD`). Nothing talks to the internet: nodes get [`Lab::tailscaled_env`],
//! the knobs Tailscale's own integration tests use, and an HTTP proxy that refuses and counts
//! every request ([`Lab::trap_hits`]).
//!
//! Binaries come from `lab/build.sh` (see [`Binaries::locate`]); a missing lab is an error,
//! never a skip.

mod bins;
mod node;
mod process;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use bins::{BIN_DIR_ENV, Binaries, build_script};
pub use node::{Node, Status};
pub use process::processes_mentioning;

use crate::fake_modal::Uplink;
use process::{LabProcess, Spawn, Stream};

/// How long each lab program may take to print its listening line.
const ANNOUNCE_DEADLINE: Duration = Duration::from_secs(30);
/// How long the peer may take to log in and reach Running.
const LOGIN_DEADLINE: Duration = Duration::from_secs(60);
/// Hostname of the dev-host peer on the tailnet.
pub const PEER_HOSTNAME: &str = "devhost";

/// Options for [`Lab::start_with`].
#[derive(Clone, Debug, Default)]
pub struct LabConfig {
    auth_key: Option<String>,
    verbose_control: bool,
}

impl LabConfig {
    /// Makes the control server require exactly this key (default: a fresh random one). Two
    /// labs with different keys let a test hand one lab's key to the other's control.
    pub fn auth_key(mut self, key: impl Into<String>) -> Self {
        self.auth_key = Some(key.into());
        self
    }

    /// Makes the control server log every request it receives (`tailbox-lab control
    /// --verbose`), so a test can see what a node told control, e.g. a logout
    /// ([`Lab::control_log`]). The log then holds the lab's auth key.
    pub fn verbose_control(mut self) -> Self {
        self.verbose_control = true;
        self
    }
}

/// What `tailbox-lab control` prints.
#[derive(Deserialize, Debug, Clone)]
struct ControlInfo {
    control_url: String,
    /// `https://127.0.0.1:P`.
    derp_url: String,
    /// `127.0.0.1:S`.
    stun_addr: String,
    trap_url: String,
    magic_dns_suffix: String,
}

impl ControlInfo {
    /// The control server, DERP and STUN as addresses (the lab announces them on 127.0.0.1).
    fn uplinks(&self) -> Result<Vec<Uplink>> {
        let addr = |text: &str| -> Result<SocketAddrV4> {
            let host_port = text.rsplit("://").next().unwrap_or(text);
            host_port
                .trim_end_matches('/')
                .parse()
                .with_context(|| format!("the lab announced {text:?}, not an IPv4 address:port"))
        };
        Ok(vec![
            Uplink::Tcp(addr(&self.control_url)?),
            Uplink::Tcp(addr(&self.derp_url)?),
            Uplink::Udp(addr(&self.stun_addr)?),
        ])
    }
}

/// What `tailbox-lab devhost` prints.
#[derive(Deserialize, Debug, Clone)]
struct DevhostInfo {
    http_port: u16,
    git_port: u16,
    git_path: String,
    git_v0_path: String,
    git_auth_path: String,
    repo_dir: PathBuf,
}

/// The user of the dev host's git server behind basic authentication.
pub const GIT_AUTH_USER: &str = "lab-user";

/// A running lab. See the module docs.
pub struct Lab {
    // Teardown order is explicit in Drop; the temp dir field goes last.
    peer: Node,
    devhost: LabProcess,
    control: Option<LabProcess>,
    bins: Binaries,
    auth_key: String,
    auth_key_file: PathBuf,
    git_password: String,
    control_info: ControlInfo,
    uplinks: Vec<Uplink>,
    devhost_info: DevhostInfo,
    peer_ipv4: Ipv4Addr,
    peer_ipv6: Ipv6Addr,
    git_refs: BTreeMap<String, String>,
    dir: TempDir,
}

impl Lab {
    /// Starts a lab whose control requires a fresh random auth key ([`Lab::auth_key`]).
    pub async fn start() -> Result<Self> {
        Self::start_with(LabConfig::default()).await
    }

    /// Starts a lab with options.
    pub async fn start_with(config: LabConfig) -> Result<Self> {
        let bins = Binaries::locate().await?;
        let dir = tempfile::Builder::new()
            .prefix("tailbox-lab-")
            .tempdir()
            .context("creating the lab temp dir")?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("logs")).context("creating the lab log dir")?;

        let auth_key = config.auth_key.unwrap_or_else(random_auth_key);
        let auth_key_file = root.join("authkey");
        node::write_secret(&auth_key_file, &auth_key)?;
        // Like the auth key, the git password reaches the dev host in a file, not on argv.
        let git_password = format!("lab-pw-{}", uuid::Uuid::new_v4().simple());
        let git_auth_file = root.join("git-auth");
        node::write_secret(&git_auth_file, &format!("{GIT_AUTH_USER}:{git_password}"))?;

        // Control and dev host start side by side; each announces itself with a JSON line.
        let mut control_flags = vec![format!("--auth-key-file={}", auth_key_file.display())];
        if config.verbose_control {
            control_flags.push("--verbose".into());
        }
        let devhost_flags = [
            format!("--dir={}", root.join("devhost").display()),
            format!("--git-auth-file={}", git_auth_file.display()),
        ];
        let (control, devhost) = tokio::join!(
            start_lab_program::<ControlInfo>(&bins, root, "control", &control_flags),
            start_lab_program::<DevhostInfo>(&bins, root, "devhost", &devhost_flags),
        );
        let (control, control_info) = control?;
        let (devhost, devhost_info) = devhost?;
        let uplinks = control_info.uplinks()?;
        let git_refs = read_git_refs(&devhost_info.repo_dir).await?;

        let env = hermetic_env(&control_info);
        let peer = Node::start_in(&bins, PEER_HOSTNAME, &env, root.join("peer")).await?;
        let status = peer
            .up_with_key_file(&control_info.control_url, &auth_key_file, LOGIN_DEADLINE)
            .await
            .map_err(|e| anyhow!("{e:#}\n{}\n{}", peer.log_tail(), control.log_tail()))
            .context("logging the dev-host peer in to the lab control")?;
        let peer_ipv4 = status
            .tailscale_ips
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .context("the peer is Running but has no tailnet IPv4")?;
        let peer_ipv6 = status
            .tailscale_ips
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            })
            .context("the peer is Running but has no tailnet IPv6")?;

        Ok(Self {
            peer,
            devhost,
            control: Some(control),
            bins,
            auth_key,
            auth_key_file,
            git_password,
            control_info,
            uplinks,
            devhost_info,
            peer_ipv4,
            peer_ipv6,
            git_refs,
            dir,
        })
    }

    /// The control server, e.g. `http://127.0.0.1:41234` (pass as `--login-server`).
    pub fn control_url(&self) -> &str {
        &self.control_info.control_url
    }

    /// What a fake Modal sandbox must reach to join this tailnet, as a real sandbox reaches
    /// Tailscale's: the control server and DERP (TCP) and STUN (UDP), all on loopback.
    pub fn sandbox_uplinks(&self) -> Vec<Uplink> {
        self.uplinks.clone()
    }

    /// The DERP server among [`Lab::sandbox_uplinks`] (leave it out to take DERP away from a
    /// sandbox).
    pub fn derp_uplink(&self) -> Result<Uplink> {
        let port = self
            .control_info
            .derp_url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .with_context(|| format!("no port in the DERP URL {}", self.control_info.derp_url))?;
        self.uplinks
            .iter()
            .copied()
            .find(|u| matches!(u, Uplink::Tcp(a) if a.port() == port))
            .with_context(|| {
                format!(
                    "the DERP server {} is not an uplink",
                    self.control_info.derp_url
                )
            })
    }

    /// The control server's pid (with DERP and STUN in it), while it runs: to stop it
    /// (SIGSTOP) and hold a login where it is.
    pub fn control_pid(&self) -> Option<u32> {
        self.control.as_ref().map(LabProcess::pid)
    }

    /// The auth key this lab's control accepts. Throwaway: it only works against this lab.
    pub fn auth_key(&self) -> &str {
        &self.auth_key
    }

    /// A 0600 file holding [`Lab::auth_key`], for `tailscale up --auth-key=file:<path>`.
    pub fn auth_key_file(&self) -> &Path {
        &self.auth_key_file
    }

    /// The dev-host peer's tailnet IPv4 (ping this; build URLs from it).
    pub fn peer_ipv4(&self) -> Ipv4Addr {
        self.peer_ipv4
    }

    /// The dev-host peer's tailnet IPv6.
    pub fn peer_ipv6(&self) -> Ipv6Addr {
        self.peer_ipv6
    }

    /// `http://<peer IPv4>:<port>`: the dev host's HTTP server as tailnet nodes see it.
    pub fn http_base_url(&self) -> String {
        format!("http://{}:{}", self.peer_ipv4, self.devhost_info.http_port)
    }

    /// `<http_base_url>/health`, which answers 200 `ok`.
    pub fn health_url(&self) -> String {
        format!("{}/health", self.http_base_url())
    }

    /// The lab repository over git smart HTTP, as tailnet nodes see it.
    pub fn git_url(&self) -> String {
        format!(
            "http://{}:{}{}",
            self.peer_ipv4, self.devhost_info.git_port, self.devhost_info.git_path
        )
    }

    /// The lab repository's path on [`Lab::git_port`] (the path of [`Lab::git_url`]).
    pub fn git_path(&self) -> &str {
        &self.devhost_info.git_path
    }

    /// The lab repository from a git server that ignores the `Git-Protocol` header, so it
    /// speaks protocol version 0 only.
    pub fn git_v0_url(&self) -> String {
        format!(
            "http://{}:{}{}",
            self.peer_ipv4, self.devhost_info.git_port, self.devhost_info.git_v0_path
        )
    }

    /// The lab repository behind HTTP basic authentication, without credentials in the URL;
    /// [`GIT_AUTH_USER`] and [`Lab::git_password`] open it.
    pub fn git_auth_url(&self) -> String {
        format!(
            "http://{}:{}{}",
            self.peer_ipv4, self.devhost_info.git_port, self.devhost_info.git_auth_path
        )
    }

    /// The password of [`Lab::git_auth_url`] (random per lab).
    pub fn git_password(&self) -> &str {
        &self.git_password
    }

    /// `<http_base_url>/redirect/<n>`: a chain of `n` 302 redirects that ends at `/health`.
    pub fn redirect_url(&self, n: u32) -> String {
        format!("{}/redirect/{n}", self.http_base_url())
    }

    /// The dev-host peer's MagicDNS name (FQDN), e.g. `devhost.tailbox-lab.test`.
    pub fn peer_fqdn(&self) -> String {
        format!("{PEER_HOSTNAME}.{}", self.control_info.magic_dns_suffix)
    }

    /// Every ref of the lab repository with its sha, as `git show-ref --head` reports it in the
    /// bare repo: `HEAD`, `refs/heads/main`, `refs/heads/feature`, `refs/tags/v0.1.0` (the tag
    /// object; ls-remote shows the commit as `refs/tags/v0.1.0^{}`).
    pub fn git_refs(&self) -> &BTreeMap<String, String> {
        &self.git_refs
    }

    /// The sha of one ref (full name, or `HEAD`).
    pub fn git_ref(&self, name: &str) -> Option<&str> {
        self.git_refs.get(name).map(String::as_str)
    }

    /// The bare repository on disk.
    pub fn git_repo_dir(&self) -> &Path {
        &self.devhost_info.repo_dir
    }

    /// The dev host's HTTP port (on 127.0.0.1 locally, on the peer's tailnet IP remotely).
    pub fn http_port(&self) -> u16 {
        self.devhost_info.http_port
    }

    /// The dev host's git port.
    pub fn git_port(&self) -> u16 {
        self.devhost_info.git_port
    }

    /// The dev-host peer's SOCKS5 proxy (loopback, no auth).
    pub fn peer_socks5_addr(&self) -> SocketAddr {
        self.peer.socks5_addr()
    }

    /// The dev-host peer itself, e.g. to run the CLI against it.
    pub fn peer(&self) -> &Node {
        &self.peer
    }

    /// The environment any other tailscaled joining this lab must get, on top of its own
    /// flags (`--tun=userspace-networking --statedir=… --socket=…`, and ideally
    /// `--no-logs-no-support`) and a per-node `TS_LOGS_DIR`. It keeps the daemon off the
    /// internet: netcheck's captive-portal probe goes to this lab's control, the port mapper is
    /// off, log upload is off, hitting Tailscale's real control panics, and HTTP(S)_PROXY points
    /// at a trap that refuses everything.
    pub fn tailscaled_env(&self) -> BTreeMap<String, String> {
        hermetic_env(&self.control_info)
    }

    /// What `tailbox` needs to run a tailscaled on this lab: [`Lab::tailscaled_env`] as
    /// `TAILBOX_TAILSCALED_ENV`. Key, control and targets are then given as flags.
    pub fn tailbox_env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "TAILBOX_TAILSCALED_ENV",
            serde_json::to_string(&self.tailscaled_env()).expect("a map of strings is JSON"),
        )]
    }

    /// [`Lab::tailbox_env`] and everything else in the environment, as a developer using the
    /// spike's names would set it: the key, the control URL and every target (the dev host's
    /// tailnet IP, its health URL, its git repository).
    pub fn developer_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.tailbox_env();
        env.extend([
            ("TS_AUTHKEY", self.auth_key().to_owned()),
            ("TS_CONTROL_URL", self.control_url().to_owned()),
            ("COOK_TAIL_IP", self.peer_ipv4().to_string()),
            ("COOK_HTTP_URL", self.health_url()),
            ("COOK_GIT_URL", self.git_url()),
        ]);
        env
    }

    /// The flags that aim a check at every target of this lab: `--ping` the dev host,
    /// `--http` its health URL, `--git` its repository with `--expect-ref` main's sha.
    pub fn every_target_flags(&self) -> Vec<String> {
        let main_sha = self.git_ref("refs/heads/main").unwrap_or_default();
        vec![
            "--ping".into(),
            self.peer_ipv4().to_string(),
            "--http".into(),
            self.health_url(),
            "--git".into(),
            self.git_url(),
            "--expect-ref".into(),
            format!("main={main_sha}"),
        ]
    }

    /// The flags that run `agent` locally against this lab: `--agent`, this lab's
    /// `--tailscaled` and `--control-url`, and `--auth-key-file key_file`.
    pub fn local_agent_flags(&self, agent: &Path, key_file: &Path) -> Vec<String> {
        vec![
            "--agent".into(),
            agent.display().to_string(),
            "--tailscaled".into(),
            self.bins().tailscaled().display().to_string(),
            "--control-url".into(),
            self.control_url().into(),
            "--auth-key-file".into(),
            key_file.display().to_string(),
        ]
    }

    /// The tailnet config that joins this lab as `hostname`, as a sidecar's `Up` or a run
    /// sends it: the lab's key and control, the lab's tailscaled with [`Lab::tailscaled_env`],
    /// and a proxy on a port tailscaled picks (tests run side by side).
    pub fn tailnet_config(&self, hostname: &str) -> tailbox_proto::agent::v1::TailnetConfig {
        use tailbox_proto::agent::v1::{DaemonConfig, TailnetConfig};
        TailnetConfig {
            auth_key: self.auth_key().into(),
            hostname: hostname.into(),
            control_url: self.control_url().into(),
            daemon: Some(DaemonConfig {
                tailscaled_path: self.bins().tailscaled().display().to_string(),
                proxy_listen: "127.0.0.1:0".into(),
                env: self.tailscaled_env().into_iter().collect(),
                ..Default::default()
            }),
            advertise_tags: Vec::new(),
        }
    }

    /// Starts another node with [`Lab::tailscaled_env`], not logged in.
    pub async fn start_node(&self, hostname: &str) -> Result<Node> {
        Node::start(&self.bins, hostname, &self.tailscaled_env()).await
    }

    /// Starts another node, logs it in with the lab's key, and waits until the dev-host peer is
    /// in its netmap, so a failure through it in a test means what the test says, not "too
    /// early". It stands in for the sandbox's tailscaled in tests of single checks.
    pub async fn start_logged_in_node(&self, hostname: &str) -> Result<Node> {
        let node = self.start_node(hostname).await?;
        node.up(self.control_url(), self.auth_key(), LOGIN_DEADLINE)
            .await
            .context("log the node in")?;
        let peer = self.peer_ipv4().to_string();
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = node.status().await?;
            let seen = status.raw["Peer"].as_object().is_some_and(|peers| {
                peers.values().any(|p| {
                    p["TailscaleIPs"]
                        .as_array()
                        .is_some_and(|ips| ips.iter().any(|ip| ip.as_str() == Some(peer.as_str())))
                })
            });
            if seen {
                return Ok(node);
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "the dev-host peer never appeared in {hostname}'s netmap: {}",
                    status.raw
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The binaries this lab runs.
    pub fn bins(&self) -> &Binaries {
        &self.bins
    }

    /// The lab's temp dir (logs under `logs/`, the peer under `peer/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Pids of every long-lived process the lab started (control, dev host, peer tailscaled).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.devhost.pid(), self.peer.pid()];
        pids.extend(self.control.as_ref().map(LabProcess::pid));
        pids
    }

    /// `Err` naming the first lab process that has exited (with its log tail). A stopped
    /// control ([`Lab::stop_control`]) is not an error.
    pub fn check_alive(&self) -> Result<()> {
        self.peer.check_alive()?;
        self.devhost.check_alive()?;
        match &self.control {
            Some(c) => c.check_alive(),
            None => Ok(()),
        }
    }

    /// Stops the control server (and its DERP and STUN) now; the control URL then refuses
    /// connections. For "control went away" tests. Idempotent.
    pub fn stop_control(&mut self) {
        if let Some(mut control) = self.control.take() {
            control.kill();
        }
    }

    /// How many requests the egress trap has refused: anything above 0 means a lab process
    /// tried to reach the internet over HTTP(S).
    pub async fn trap_hits(&self) -> Result<u64> {
        let addr = self
            .control_info
            .trap_url
            .strip_prefix("http://")
            .context("trap URL is not http")?;
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .context("connecting to the egress trap")?;
        conn.write_all(b"GET /hits HTTP/1.0\r\nHost: trap\r\n\r\n")
            .await?;
        let mut response = String::new();
        conn.read_to_string(&mut response).await?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim())
            .context("malformed trap response")?;
        body.parse()
            .with_context(|| format!("trap answered {body:?}"))
    }

    /// Everything the control server has logged so far (every request it received, with
    /// [`LabConfig::verbose_control`]).
    pub fn control_log(&self) -> Result<String> {
        let path = self.dir.path().join("logs").join("control.log");
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Everything the lab logged so far (control, dev host, peer), for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = vec![self.peer.log_tail(), self.devhost.log_tail()];
        if let Some(c) = &self.control {
            out.push(c.log_tail());
        }
        out.join("\n")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The peer first, so it never watches its control vanish and starts retrying.
        self.peer.kill();
        self.devhost.kill();
        self.stop_control();
    }
}

/// A fresh key in the shape Tailscale uses. Good as a "wrong key" for any lab but the one
/// configured with it.
pub fn random_auth_key() -> String {
    format!("tskey-auth-lab{}", uuid::Uuid::new_v4().simple())
}

/// Starts `tailbox-lab <subcommand> <flags>` in `root`, logging to `logs/<subcommand>.log`, and
/// waits for the JSON line it prints once it listens.
async fn start_lab_program<T: DeserializeOwned>(
    bins: &Binaries,
    root: &Path,
    subcommand: &str,
    flags: &[String],
) -> Result<(LabProcess, T)> {
    let mut command = std::process::Command::new(bins.lab());
    command.arg(subcommand).args(flags).current_dir(root);
    let (watch, seen) = process::watch(Stream::Stdout, "{");
    let mut program = LabProcess::spawn(Spawn {
        name: subcommand.into(),
        command,
        log_path: root.join("logs").join(format!("{subcommand}.log")),
        watches: vec![watch],
        hold_stdin: true,
        parent_death_fd: false,
    })?;
    let line = program.wait_for(seen, ANNOUNCE_DEADLINE).await?;
    let info = serde_json::from_str(&line)
        .with_context(|| format!("parsing tailbox-lab {subcommand}'s announcement"))?;
    Ok((program, info))
}

fn hermetic_env(control: &ControlInfo) -> BTreeMap<String, String> {
    let url = control.control_url.trim_end_matches('/');
    [
        // Netcheck's captive-portal probe, normally a Tailscale host.
        (
            "TS_NETCHECK_GENERATE_204_URL",
            format!("{url}/generate_204"),
        ),
        // Don't pause the control client because the machine looks offline.
        ("TS_ASSUME_NETWORK_UP_FOR_TEST", "1".into()),
        // A node that tries Tailscale's real control server dies loudly instead.
        ("TS_PANIC_IF_HIT_MAIN_CONTROL", "1".into()),
        // No UPnP/NAT-PMP/PCP probing of the LAN.
        ("TS_DISABLE_PORTMAPPER", "1".into()),
        // The lab's control speaks plain HTTP.
        ("TS_DEBUG_PERMIT_HTTP_C2N", "1".into()),
        // No log upload to log.tailscale.com.
        ("TS_NO_LOGS_NO_SUPPORT", "true".into()),
        // Any other HTTP(S) egress lands in the trap; loopback (control, DERP) bypasses it.
        ("HTTP_PROXY", control.trap_url.clone()),
        ("HTTPS_PROXY", control.trap_url.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Every ref of the bare repo, and `HEAD`, with its sha as `git show-ref --head` reports it.
async fn read_git_refs(repo: &Path) -> Result<BTreeMap<String, String>> {
    let out = tokio::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["show-ref", "--head"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .kill_on_drop(true)
        .output()
        .await
        .context("running git show-ref")?;
    if !out.status.success() {
        bail!(
            "git show-ref in {} failed: {}",
            repo.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|line| {
            let (sha, name) = line
                .split_once(' ')
                .with_context(|| format!("unexpected git show-ref line {line:?}"))?;
            Ok((name.to_owned(), sha.to_owned()))
        })
        .collect()
}
