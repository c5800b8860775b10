//! A fake Modal for tests: the control plane (`modal.client.ModalClient`) and the Task Command
//! Router (`modal.task_command_router.TaskCommandRouter`) on loopback, over real tonic, built on
//! the server traits of our proto subset (RPCs we do not implement answer Unimplemented). Modal's
//! own Python client drives it too (`controller/tests/modal_official_client.rs`). The README next to
//! this file lists every behaviour it models, the source of each, and what is out of scope.
//!
//! - **Sandboxes** are local process trees, each in a network namespace of its own that reaches
//!   only the [`Uplink`]s it is given ([`network`]), with a root directory where every sandbox
//!   path lives (fs-tools, `argv[0]`) and whose `tmp/` its processes see as `/tmp`
//!   ([`process`]). The rest of their filesystem is this machine's. Creating namespaces needs
//!   root: [`FakeModal::start`] fails without it.
//! - **Strict** like the real server: control-plane calls need `x-modal-token-id`/`-secret` and
//!   a client identity an official SDK sends; an `x-modal-auth-token`, when sent, must be one it
//!   issued and unexpired; router calls need `authorization: Bearer <jwt>` for that task,
//!   unexpired; bad or out-of-range offsets, argv over 64 KiB and execs in finished sandboxes are
//!   rejected.
//! - **Faults** ([`Faults`]): latency per RPC, UNAVAILABLE for the next N calls, stdio read
//!   streams cut after N bytes every time, streamed stdin writes cut after N bytes, short-lived
//!   router JWTs, slow scheduling, and a slow link to the router (a round trip per call and a
//!   bandwidth cap).
//! - **Records** ([`Record`]): every call with its (redacted) headers, sandboxes created and
//!   finished, execs, bytes written, refusals.

mod client;
mod control;
mod network;
mod process;
mod router;
mod sandbox;
mod tools;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use tailbox_proto::arch::Arch;
use tailbox_proto::modal::client::modal_client_server::ModalClientServer;
use tailbox_proto::modal::task_command_router::task_command_router_server::TaskCommandRouterServer;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataMap;

pub use client::{ExecOutput, FakeClient, piped};
pub use network::{IsolatedNetwork, Uplink};

use crate::lab::Lab;

/// The token id the fake accepts.
pub const TOKEN_ID: &str = "ak-faketailboxtoken";
/// The token secret the fake accepts.
pub const TOKEN_SECRET: &str = "as-fakesecretnevershown";

/// Behaviour fixed at start.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Whether `chmod` exists in the "image" (at chmod, /bin/chmod, /usr/bin/chmod).
    pub image_has_chmod: bool,
    /// Mode of files fs-tools' `WriteFile` creates (an overwritten file keeps its mode).
    pub write_file_mode: u32,
    /// Lifetime of control-plane auth tokens.
    pub auth_token_ttl: Duration,
    /// Page size of `SandboxList`.
    pub list_page_size: usize,
    /// PATH of processes in sandboxes; `None` is this machine's PATH.
    pub path: Option<String>,
    /// What sandboxes may reach on this machine (at the same address); nothing else.
    pub uplinks: Vec<Uplink>,
    /// The sandboxes' CPU architecture (default: this machine's). fs-tools' own binary
    /// (`ReadFile` of `/proc/self/exe`) is an ELF for it, and only ELF executables for it run as
    /// execs: others fail as the kernel fails them (`Exec format error`). Executables for it
    /// that are not this machine's run under qemu-user through binfmt_misc ([`crate::qemu`]).
    pub arch: Arch,
}

impl FakeConfig {
    /// Sandboxes reach `lab`'s control, DERP and STUN servers, as real ones reach Tailscale's.
    pub fn reaching(self, lab: &Lab) -> Self {
        Self {
            uplinks: lab.sandbox_uplinks(),
            ..self
        }
    }
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            image_has_chmod: true,
            write_file_mode: 0o644,
            auth_token_ttl: Duration::from_secs(3600),
            list_page_size: 100,
            path: None,
            uplinks: Vec::new(),
            arch: Arch::host().unwrap_or(Arch::X86_64),
        }
    }
}

/// Faults to inject; change them at any time with [`FakeModal::set_faults`].
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Delay before handling each call of an RPC (by name, e.g. `SandboxGetTaskId`). For
    /// `SandboxCreate` the sandbox is created first and the *response* is delayed; for
    /// `TaskExecStdioRead` and `TaskExecStart` the delay applies only to execs that are not
    /// `modal-sandbox-fs-tools` or `chmod` (i.e. to the agent).
    pub latency: HashMap<String, Duration>,
    /// Fail the next N calls of an RPC with UNAVAILABLE (after recording them).
    pub unavailable: HashMap<String, u32>,
    /// End every `TaskExecStdioRead` stream with UNAVAILABLE after this many bytes.
    pub cut_stdio_after: Option<usize>,
    /// End the agent's stdout streams with UNAVAILABLE when they reach each of these byte
    /// offsets of its output (absolute; each once, since the resumed read starts there).
    pub cut_stdout_at: Vec<usize>,
    /// End every `TaskExecStdinWriteStream` with UNAVAILABLE after this many data bytes.
    pub cut_stdin_stream_after: Option<usize>,
    /// Lifetime of router JWTs (default one hour); expired ones get UNAUTHENTICATED.
    pub router_jwt_ttl: Option<Duration>,
    /// `SandboxGetTaskId` answers "not scheduled yet" this many times per sandbox.
    pub unscheduled_polls: u32,
    /// A network round trip added to every router call, as a link to a distant worker adds it:
    /// a unary call answers this much later, a stdio read stream sends its first bytes this much
    /// later, and a streamed stdin write is acknowledged this much after its last message.
    pub router_rtt: Option<Duration>,
    /// The router link's speed in bytes per second, each way: stdin bytes (streamed or not) are
    /// taken in, and stdout and stderr bytes sent out, no faster than this, one message after the
    /// other across every exec of every sandbox (a shared link, with no burst allowance).
    pub router_bandwidth: Option<u64>,
}

/// One call the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    /// `control` or `router`.
    pub service: &'static str,
    /// RPC name, e.g. `SandboxCreate`.
    pub rpc: String,
    /// Request headers; secret values (token secret, auth token, bearer JWT) read `<redacted>`.
    pub headers: HashMap<String, String>,
    /// When it arrived.
    pub at: Instant,
}

/// A sandbox as the fake saw it.
#[derive(Debug, Clone)]
pub struct SandboxRecord {
    /// `sb-…`.
    pub id: String,
    /// Its app.
    pub app_id: String,
    /// Its task (`ta-…`).
    pub task_id: String,
    /// Tags it was created with.
    pub tags: Vec<(String, String)>,
    /// Environment from its secrets.
    pub env: HashMap<String, String>,
    /// `timeout_secs` of the definition.
    pub timeout_secs: u32,
    /// Its temp root on this machine.
    pub root: PathBuf,
    /// When it was created.
    pub created_at: Instant,
    /// When it finished (terminated, timed out, or its entrypoint exited), if it has.
    pub terminated_at: Option<Instant>,
}

/// An exec as the fake saw it.
#[derive(Debug, Clone)]
pub struct ExecRecord {
    /// Its sandbox.
    pub sandbox_id: String,
    /// Client-chosen id.
    pub exec_id: String,
    /// argv as sent.
    pub argv: Vec<String>,
    /// Whether stdout was PIPE (DEVNULL discards it).
    pub stdout_piped: bool,
    /// stdin bytes received.
    pub stdin_bytes: u64,
    /// stdout bytes it produced, once it has exited.
    pub stdout_bytes: u64,
    /// How it ended, once it has.
    pub exit: Option<Exit>,
}

/// How an exec ended (`TaskExecWait`'s answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

/// Everything the fake recorded.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Every call, in order.
    pub calls: Vec<Call>,
    /// Every sandbox.
    pub sandboxes: Vec<SandboxRecord>,
    /// Every exec.
    pub execs: Vec<ExecRecord>,
    /// Bytes fs-tools `WriteFile` wrote, in total.
    pub bytes_written: u64,
    /// Files fs-tools `WriteFile` wrote (sandbox paths, in order).
    pub files_written: Vec<String>,
    /// Router JWTs handed out.
    pub router_grants: u32,
    /// Control-plane auth tokens handed out.
    pub auth_tokens: u32,
    /// Calls refused for strictness reasons: (rpc, reason).
    pub refusals: Vec<(String, String)>,
    /// Stdio read streams cut by [`Faults::cut_stdio_after`].
    pub stdio_cuts: u32,
}

impl Record {
    /// Calls of one RPC.
    pub fn calls_of(&self, rpc: &str) -> Vec<&Call> {
        self.calls.iter().filter(|c| c.rpc == rpc).collect()
    }

    /// The sandbox with this id.
    pub fn sandbox(&self, id: &str) -> Option<&SandboxRecord> {
        self.sandboxes.iter().find(|s| s.id == id)
    }

    /// The sandboxes among `sandboxes` that were not terminated within `limit` of `since` (a
    /// Ctrl-C), each said in words; empty when every one was.
    pub fn late_terminations(
        sandboxes: &[SandboxRecord],
        since: std::time::Instant,
        limit: std::time::Duration,
    ) -> Vec<String> {
        sandboxes
            .iter()
            .filter_map(|sandbox| match sandbox.terminated_at {
                None => Some(format!("{} was not terminated", sandbox.id)),
                Some(at) => {
                    let took = at.saturating_duration_since(since);
                    (took >= limit).then(|| format!("{} was terminated after {took:?}", sandbox.id))
                }
            })
            .collect()
    }

    /// Where `secret` showed up in what a client can be seen sending: an exec's argv, a
    /// call's headers, a sandbox's environment. Empty when it travelled only inside a body (an
    /// auth key inside the agent's gRPC stream).
    pub fn places_holding(&self, secret: &str) -> Vec<String> {
        let execs = self
            .execs
            .iter()
            .filter(|e| e.argv.iter().any(|a| a.contains(secret)))
            .map(|e| format!("the argv of exec {}", e.exec_id));
        let calls = self
            .calls
            .iter()
            .filter(|c| c.headers.values().any(|v| v.contains(secret)))
            .map(|c| format!("the headers of a {} call", c.rpc));
        let sandboxes = self
            .sandboxes
            .iter()
            .filter(|s| s.env.values().any(|v| v.contains(secret)))
            .map(|s| format!("the environment of sandbox {}", s.id));
        execs.chain(calls).chain(sandboxes).collect()
    }

    /// Execs whose argv[0] is not fs-tools or chmod.
    pub fn agent_execs(&self) -> Vec<&ExecRecord> {
        self.execs
            .iter()
            .filter(|e| !tools::is_tool(&e.argv))
            .collect()
    }
}

/// Shared state of the fake.
pub(crate) struct State {
    pub(crate) config: FakeConfig,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) record: Mutex<Record>,
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) world: Mutex<sandbox::World>,
    pub(crate) router_url: Mutex<String>,
    pub(crate) dir: tempfile::TempDir,
    /// When the router link is next free, each way ([`Faults::router_bandwidth`]).
    pub(crate) link: [tokio::sync::Mutex<tokio::time::Instant>; 2],
}

/// A direction on the router link.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Way {
    /// Toward the sandbox: stdin.
    Up = 0,
    /// From the sandbox: stdout and stderr.
    Down = 1,
}

impl State {
    pub(crate) fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut Record)) {
        change(&mut lock(&self.record));
        self.changed.send_modify(|n| *n += 1);
    }

    /// Records a call; returns Err(UNAVAILABLE) when a fault says so.
    pub(crate) fn call(
        &self,
        service: &'static str,
        rpc: &str,
        metadata: &MetadataMap,
    ) -> Result<(), tonic::Status> {
        let headers = metadata
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    let key = k.as_str().to_owned();
                    let value = if matches!(
                        key.as_str(),
                        "x-modal-token-secret" | "x-modal-auth-token" | "authorization"
                    ) {
                        "<redacted>".to_owned()
                    } else {
                        v.to_str().unwrap_or_default().to_owned()
                    };
                    Some((key, value))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        self.update(|r| {
            r.calls.push(Call {
                service,
                rpc: rpc.to_owned(),
                headers,
                at: Instant::now(),
            })
        });
        let mut faults = lock(&self.faults);
        if let Some(n) = faults.unavailable.get_mut(rpc)
            && *n > 0
        {
            *n -= 1;
            return Err(tonic::Status::unavailable(format!(
                "fake: injected UNAVAILABLE for {rpc}"
            )));
        }
        Ok(())
    }

    pub(crate) fn refuse(&self, rpc: &str, status: tonic::Status) -> tonic::Status {
        self.update(|r| {
            r.refusals
                .push((rpc.to_owned(), status.message().to_owned()))
        });
        status
    }

    pub(crate) async fn latency(&self, rpc: &str) {
        let delay = self.faults().latency.get(rpc).copied();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }

    /// One router call with the link's round trip around it ([`Faults::router_rtt`]): half
    /// before the server sees the request, half before the client sees the answer.
    pub(crate) async fn round_trip<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        let half = self.faults().router_rtt.map(|rtt| rtt / 2);
        if let Some(half) = half {
            tokio::time::sleep(half).await;
        }
        let answer = call.await;
        if let Some(half) = half {
            tokio::time::sleep(half).await;
        }
        answer
    }

    /// Waits until `bytes` have crossed the router link `way` ([`Faults::router_bandwidth`]):
    /// each message takes its turn on the link, for `bytes / bandwidth`.
    pub(crate) async fn transmit(&self, way: Way, bytes: usize) {
        let Some(rate) = self.faults().router_bandwidth.filter(|&r| r > 0) else {
            return;
        };
        let takes = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let done = {
            let mut free_at = self.link[way as usize].lock().await;
            let start = (*free_at).max(tokio::time::Instant::now());
            *free_at = start + takes;
            *free_at
        };
        tokio::time::sleep_until(done).await;
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A running fake Modal. Dropping it stops both servers and kills every sandbox's processes.
pub struct FakeModal {
    state: Arc<State>,
    control_addr: SocketAddr,
    router_addr: SocketAddr,
    stop: Vec<oneshot::Sender<()>>,
}

impl FakeModal {
    /// Starts with the default configuration.
    pub async fn start() -> Result<Self> {
        Self::start_with(FakeConfig::default()).await
    }

    /// Starts both servers on loopback ports the kernel picks. Fails unless sandboxes can get
    /// their own network and mount namespaces (root, and `ip` from iproute2).
    pub async fn start_with(config: FakeConfig) -> Result<Self> {
        network::SandboxNetwork::create(&[]).await.context(
            "fake Modal sandboxes need network and mount namespaces of their own: run the \
                 tests as root (CI does), with iproute2 installed (scripts/setup does)",
        )?;
        // Not under /tmp: sandbox processes get their own /tmp, which hides this machine's.
        let dir = tempfile::Builder::new()
            .prefix("tailbox-fake-modal-")
            .tempdir_in("/var/tmp")
            .context("creating the fake Modal's directory in /var/tmp")?;
        let (changed, _) = watch::channel(0);
        let state = Arc::new(State {
            config,
            faults: Mutex::new(Faults::default()),
            record: Mutex::new(Record::default()),
            changed,
            world: Mutex::new(sandbox::World::default()),
            router_url: Mutex::new(String::new()),
            dir,
            link: std::array::from_fn(|_| tokio::sync::Mutex::new(tokio::time::Instant::now())),
        });
        let control_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake control plane")?;
        let router_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake command router")?;
        let control_addr = control_listener.local_addr()?;
        let router_addr = router_listener.local_addr()?;
        *lock(&state.router_url) = format!("http://{router_addr}");

        let (stop_control, control_stopped) = oneshot::channel::<()>();
        let (stop_router, router_stopped) = oneshot::channel::<()>();
        let control = ModalClientServer::new(control::ControlPlane {
            state: Arc::clone(&state),
        })
        .max_decoding_message_size(100 * 1024 * 1024);
        let router = TaskCommandRouterServer::new(router::CommandRouter {
            state: Arc::clone(&state),
        })
        .max_decoding_message_size(100 * 1024 * 1024);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(control)
                .serve_with_incoming_shutdown(TcpListenerStream::new(control_listener), async {
                    let _ = control_stopped.await;
                }),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(router)
                .serve_with_incoming_shutdown(TcpListenerStream::new(router_listener), async {
                    let _ = router_stopped.await;
                }),
        );
        Ok(Self {
            state,
            control_addr,
            router_addr,
            stop: vec![stop_control, stop_router],
        })
    }

    /// The control-plane URL (`MODAL_SERVER_URL`).
    pub fn server_url(&self) -> String {
        format!("http://{}", self.control_addr)
    }

    /// The router URL it hands out.
    pub fn router_url(&self) -> String {
        format!("http://{}", self.router_addr)
    }

    /// `MODAL_SERVER_URL`, `MODAL_TOKEN_ID` and `MODAL_TOKEN_SECRET` for a client of this fake.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("MODAL_SERVER_URL".into(), self.server_url()),
            ("MODAL_TOKEN_ID".into(), TOKEN_ID.into()),
            ("MODAL_TOKEN_SECRET".into(), TOKEN_SECRET.into()),
        ]
    }

    /// Replaces the faults.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.state.faults) = faults;
    }

    /// The faults as they stand (counters such as [`Faults::unavailable`] count down as they
    /// fire).
    pub fn faults(&self) -> Faults {
        self.state.faults()
    }

    /// Changes the faults in place.
    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut lock(&self.state.faults));
    }

    /// A snapshot of what happened so far.
    pub fn record(&self) -> Record {
        lock(&self.state.record).clone()
    }

    /// Waits until `done` holds for the record (checked on every change), up to `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        done: impl Fn(&Record) -> bool,
    ) -> Result<Record> {
        let mut changes = self.state.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let record = self.record();
            if done(&record) {
                return Ok(record);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => anyhow::bail!("the fake Modal stopped"),
                Err(_) => anyhow::bail!(
                    "the fake Modal did not reach the expected state within {limit:?}; calls: {:?}",
                    record
                        .calls
                        .iter()
                        .map(|c| c.rpc.as_str())
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Creates a sandbox directly (as if another client had), returning its id.
    pub async fn create_sandbox_directly(&self, tags: &[(&str, &str)]) -> Result<String> {
        let definition = sandbox::Definition {
            app_id: "ap-direct".into(),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            env: HashMap::new(),
            timeout_secs: 300,
            entrypoint: Vec::new(),
        };
        sandbox::create(&self.state, definition)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
    }

    /// Pids of the processes running in a sandbox (its network namespace's), whatever started
    /// them; empty once it has finished.
    pub fn sandbox_processes(&self, sandbox_id: &str) -> Vec<i32> {
        let sandbox = lock(&self.state.world).sandboxes.get(sandbox_id).cloned();
        let Some(inode) = sandbox.and_then(|s| s.network.netns.inode().ok()) else {
            return Vec::new();
        };
        network::processes_with_netns(&format!("net:[{inode}]"))
    }

    /// The newest unexpired router JWT granted for `task_id` (to build raw requests in tests).
    pub fn router_jwt(&self, task_id: &str) -> Option<String> {
        let world = lock(&self.state.world);
        world
            .router_jwts
            .iter()
            .filter(|(_, (task, exp))| task == task_id && SystemTime::now() < *exp)
            .max_by_key(|(_, (_, exp))| *exp)
            .map(|(jwt, _)| jwt.clone())
    }

    /// Where a sandbox path lives on this machine.
    pub fn host_path(&self, sandbox_id: &str, sandbox_path: &str) -> Option<PathBuf> {
        let record = self.record();
        let root = &record.sandbox(sandbox_id)?.root;
        tools::map_path(root, sandbox_path).ok()
    }
}

impl Drop for FakeModal {
    fn drop(&mut self) {
        for stop in self.stop.drain(..) {
            let _ = stop.send(());
        }
        sandbox::kill_all(&self.state);
    }
}

/// A JWT-shaped token (unsigned: only the fake reads it) expiring after `ttl`.
pub(crate) fn make_jwt(subject: &str, ttl: Duration) -> (String, SystemTime) {
    let exp = SystemTime::now() + ttl;
    let secs = exp
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = serde_json::json!({
        "sub": subject,
        "exp": secs,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    (
        format!(
            "{}.{}.fake-signature",
            enc(r#"{"alg":"none","typ":"JWT"}"#),
            enc(&payload.to_string())
        ),
        exp,
    )
}
