//! Starting, watching, restarting and stopping tailscaled.
//!
//! - Ready means the LocalAPI answers `status`: no sleeps and no socket-file polling (a stale
//!   socket file survives a crash, so its existence proves nothing).
//! - tailscaled gets `TS_PARENT_DEATH_FD`, so it exits if the agent dies without stopping it.
//! - Its output goes to a ring buffer (attached to failures) and, without ever blocking it, to
//!   the event stream.
//! - If it dies, it is restarted with bounded backoff and logged in again; each restart is an
//!   event. The PID is tracked; nothing is ever killed by name.
//! - The restart budget is for crash loops, not for a lifetime: once a (re)started tailscaled has
//!   stayed up for [`SupervisorConfig::healthy_period`], its next death starts a fresh budget
//!   (and a fresh backoff). A sidecar that lives for days therefore survives a crash every few
//!   hours, while a daemon that keeps dying within minutes is still given up on.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tailbox_proto::agent::v1::{
    DaemonEvidence, DaemonRestart, Layer, LogSource, Teardown, Warning,
};
use tokio::io::AsyncRead;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use super::backoff::Backoff;
use super::provision::DaemonBinary;
use crate::checks::tailnet::humanize;
use crate::checks::{Daemon, DaemonState, HEALTH_PROBE, Health};
use crate::events::{EventSink, duration};
use crate::localapi::{LocalApi, LocalApiError};
use crate::redact::Secrets;

/// Lines of tailscaled output kept for failure reports.
const LOG_RING_LINES: usize = 200;
/// Lines attached to a failure.
pub const LOG_TAIL_LINES: usize = 40;
/// Log lines buffered for the event stream before new ones are dropped (tailscaled must never
/// block on its stderr because the controller reads slowly).
const LOG_FORWARD_BUFFER: usize = 2048;
/// How long to wait before trying tailscaled's socket again while it does not accept yet.
const SOCKET_RETRY: Duration = Duration::from_millis(3);

/// How to run tailscaled.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The binary.
    pub binary: DaemonBinary,
    /// LocalAPI socket path.
    pub socket: PathBuf,
    /// `--state` value.
    pub state: String,
    /// `--statedir` value.
    pub state_dir: PathBuf,
    /// Listener shared by the SOCKS5 server and the HTTP proxy; port 0 means "pick one".
    pub proxy_listen: SocketAddr,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Restarts allowed after unexpected deaths.
    pub max_restarts: u32,
    /// Uptime after which a death no longer counts against the restart budget: the budget and
    /// the backoff start over (see the module docs).
    pub healthy_period: Duration,
    /// Time for a (re)started daemon to answer the LocalAPI.
    pub ready_timeout: Duration,
    /// Strings to scrub from every log line (the auth key).
    pub secrets: Vec<String>,
}

/// Why tailscaled could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Spawning failed.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// Binary path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// It exited before it was ready.
    #[error("tailscaled exited before its LocalAPI answered ({exit})")]
    Exited {
        /// How it exited.
        exit: String,
    },
    /// It did not become ready in time.
    #[error("tailscaled's LocalAPI did not answer within {after:?}: {last_error}")]
    NotReady {
        /// The limit.
        after: Duration,
        /// The last probe error.
        last_error: String,
    },
    /// Preparing directories failed.
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        /// The directory.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Called after a restart to log the fresh daemon in again.
pub type ReloginHook =
    Arc<dyn Fn(LocalApi) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The running supervisor.
pub struct Supervisor {
    state: watch::Receiver<DaemonState>,
    logs: LogRing,
    /// The proxy listeners, fixed for the supervisor's life (restarts reuse them).
    listeners: Listeners,
    counters: Arc<Counters>,
    stop_tx: mpsc::Sender<StopRequest>,
    relogin: Arc<Mutex<Option<ReloginHook>>>,
    api: LocalApi,
    /// What the checks see and found out about it.
    daemon: Daemon,
}

/// Where tailscaled's SOCKS5 server and HTTP proxy listen. They share one listener when the
/// configured address has a port; with port 0, tailscaled opens two and announces each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listeners {
    socks: SocketAddr,
    http: SocketAddr,
}

/// What the watcher task updates and the supervisor's owner reads.
#[derive(Default)]
struct Counters {
    /// Pid of the current tailscaled; 0 while none runs.
    pid: AtomicU32,
    /// Restarts over the supervisor's life.
    restarts: AtomicU32,
}

/// A running tailscaled process with its parent-death pipe.
struct Running {
    child: Child,
    /// Closing this (by dropping it) tells tailscaled its parent is gone.
    _parent_death_write: OwnedFd,
}

impl Supervisor {
    /// Starts tailscaled and waits until its LocalAPI answers.
    pub async fn start(
        config: SupervisorConfig,
        sink: EventSink,
    ) -> Result<(Self, DaemonEvidence), (StartError, Vec<String>)> {
        let logs = LogRing::default();
        let fail = |err: StartError, logs: &LogRing| (err, logs.tail(LOG_TAIL_LINES));
        for dir in [
            Some(config.state_dir.clone()),
            config.socket.parent().map(PathBuf::from),
        ]
        .into_iter()
        .flatten()
        {
            std::fs::create_dir_all(&dir).map_err(|source| {
                fail(
                    StartError::Prepare {
                        path: dir.clone(),
                        source,
                    },
                    &logs,
                )
            })?;
        }
        let (announced, mut announced_rx) = watch::channel(Announced::default());
        let output = OutputReader {
            ring: logs.clone(),
            forwarder: LogForwarder::start(sink.clone()),
            secrets: Arc::new(Secrets::new(config.secrets.clone())),
            announced,
        };
        let api = LocalApi::new(&config.socket);
        let started = Instant::now();
        let requested = Listeners {
            socks: config.proxy_listen,
            http: config.proxy_listen,
        };
        let mut running = spawn(&config, requested, &output).map_err(|e| fail(e, &logs))?;
        if let Err(err) = wait_ready(&api, &mut running.child, config.ready_timeout).await {
            let _ = running.child.start_kill();
            let _ = running.child.wait().await;
            return Err(fail(err, &logs));
        }
        let time_to_ready = started.elapsed();
        let listeners = match wait_listeners(requested, &mut announced_rx, config.ready_timeout)
            .await
        {
            Some(listeners) => listeners,
            None => {
                let _ = running.child.start_kill();
                let _ = running.child.wait().await;
                return Err(fail(
                    StartError::NotReady {
                        after: config.ready_timeout,
                        last_error: "tailscaled never reported its SOCKS5 and HTTP proxy listeners"
                            .into(),
                    },
                    &logs,
                ));
            }
        };
        let proxy = listeners.socks;
        let pid = running.child.id().unwrap_or_default();
        let evidence = DaemonEvidence {
            source: config.binary.source as i32,
            path: config.binary.path.display().to_string(),
            // `tailscaled --version` runs beside this start; its caller fills the version in.
            version: String::new(),
            loader: config
                .binary
                .loader
                .as_ref()
                .map(|l| l.display().to_string())
                .unwrap_or_default(),
            socket_path: config.socket.display().to_string(),
            proxy_address: proxy.to_string(),
            pid,
            state: config.state.clone(),
            time_to_ready: Some(duration(time_to_ready)),
        };

        // Restarts listen where this process did, so checks holding the address keep working.
        let (state_tx, state) = watch::channel(DaemonState::Ready);
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let relogin: Arc<Mutex<Option<ReloginHook>>> = Arc::default();
        let counters = Arc::new(Counters::default());
        counters.pid.store(pid, Ordering::Relaxed);
        let watcher = Watcher {
            config,
            listeners,
            output,
            sink,
            state_tx,
            relogin: Arc::clone(&relogin),
            api: api.clone(),
            counters: Arc::clone(&counters),
        };
        tokio::spawn(watcher.run(running, stop_rx));
        Ok((
            Self {
                daemon: Daemon::new(state.clone(), api.clone()),
                state,
                logs,
                listeners,
                counters,
                stop_tx,
                relogin,
                api,
            },
            evidence,
        ))
    }

    /// The LocalAPI of the supervised daemon.
    pub fn api(&self) -> &LocalApi {
        &self.api
    }

    /// The daemon as the checks see it: readiness (to wait out a restart) and its LocalAPI.
    pub fn daemon(&self) -> Daemon {
        self.daemon.clone()
    }

    /// The SOCKS5 listener (fixed for the supervisor's life: restarts reuse the same address).
    pub fn proxy(&self) -> SocketAddr {
        self.listeners.socks
    }

    /// The HTTP proxy listener: the SOCKS5 one unless tailscaled was asked for port 0.
    pub fn http_proxy(&self) -> SocketAddr {
        self.listeners.http
    }

    /// tailscaled's state as the supervisor sees it, to follow its changes.
    pub fn state_changes(&self) -> watch::Receiver<DaemonState> {
        self.state.clone()
    }

    /// Pid of the current tailscaled; `None` while none runs (between a death and its restart).
    pub fn pid(&self) -> Option<u32> {
        Some(self.counters.pid.load(Ordering::Relaxed)).filter(|&pid| pid != 0)
    }

    /// Restarts over the supervisor's life (budget resets do not clear it).
    pub fn restarts(&self) -> u32 {
        self.counters.restarts.load(Ordering::Relaxed)
    }

    /// The last `n` lines tailscaled wrote.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        self.logs.tail(n)
    }

    /// Installs the hook that logs a restarted daemon in again.
    pub fn set_relogin(&self, hook: ReloginHook) {
        if let Ok(mut slot) = self.relogin.lock() {
            *slot = Some(hook);
        }
    }

    /// Leaves the tailnet within `grace`: logs the node out (in at most half of it), then stops
    /// tailscaled (SIGTERM, SIGKILL after the other half). A tailscaled whose LocalAPI does not
    /// answer (a check found so, or a health probe now) is stuck: it is neither logged out nor
    /// given a grace but killed at once, so it cannot hold up the end of the run.
    pub async fn leave_tailnet(self, grace: Duration) -> Teardown {
        let mut teardown = Teardown::default();
        if self.daemon.found_stuck() || self.daemon.health().await == Health::Unresponsive {
            tracing::warn!("tailscaled's LocalAPI does not answer; killing it without a logout");
            teardown.logout_error = format!(
                "tailscaled's LocalAPI did not answer within {}, so it was killed without a \
                 logout",
                humanize(HEALTH_PROBE)
            );
            teardown.daemon_stop = self.stop(Duration::ZERO).await.to_owned();
            return teardown;
        }
        teardown.logout_attempted = true;
        match tokio::time::timeout(grace / 2, self.api.logout()).await {
            Ok(Ok(())) => teardown.logged_out = true,
            Ok(Err(err)) => teardown.logout_error = err.to_string(),
            Err(_) => teardown.logout_error = format!("no answer within {}", humanize(grace / 2)),
        }
        teardown.daemon_stop = self.stop(grace / 2).await.to_owned();
        teardown
    }

    /// Stops tailscaled: SIGTERM, then SIGKILL after `grace` (at once for a zero grace); always
    /// reaps. Returns "sigterm", "sigkill" or "not running".
    pub async fn stop(self, grace: Duration) -> &'static str {
        let (reply_tx, reply_rx) = oneshot::channel();
        if self.stop_tx.send((grace, reply_tx)).await.is_err() {
            return "not running";
        }
        reply_rx.await.unwrap_or("not running")
    }
}

/// The task that owns the child.
struct Watcher {
    config: SupervisorConfig,
    listeners: Listeners,
    output: OutputReader,
    sink: EventSink,
    state_tx: watch::Sender<DaemonState>,
    relogin: Arc<Mutex<Option<ReloginHook>>>,
    api: LocalApi,
    counters: Arc<Counters>,
}

impl Watcher {
    async fn run(self, running: Running, mut stop_rx: mpsc::Receiver<StopRequest>) {
        let backoff = match Backoff::try_new(Duration::from_millis(250), Duration::from_secs(10)) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!("{err}");
                return;
            }
        };
        let mut running = Some(running);
        let mut restarts = 0u32;
        let mut ready_since = Instant::now();
        loop {
            // Wait for the current process to die (or for a stop request).
            let exit = match running.as_mut() {
                Some(current) => tokio::select! {
                    status = current.child.wait() => describe_exit(&status),
                    request = stop_rx.recv() => {
                        let grace = request.as_ref().map_or(DEFAULT_STOP_GRACE, |r| r.0);
                        let how = terminate(&mut current.child, grace).await;
                        self.finish(request, how);
                        return;
                    }
                },
                None => "it could not be started again".to_owned(),
            };
            running = None;
            self.counters.pid.store(0, Ordering::Relaxed);
            let _ = self.state_tx.send(DaemonState::NotReady);
            if ready_since.elapsed() >= self.config.healthy_period && restarts > 0 {
                tracing::info!(
                    "tailscaled ran for {:?} since its last restart; the restart budget starts over",
                    ready_since.elapsed()
                );
                restarts = 0;
            }
            restarts += 1;
            if restarts > self.config.max_restarts {
                tracing::error!(
                    "tailscaled died ({exit}); giving up after {} restarts",
                    restarts - 1
                );
                self.sink
                    .warning(Warning {
                        code: "daemon-gone".into(),
                        message: format!(
                            "tailscaled died ({exit}) and the restart budget ({}) is spent",
                            self.config.max_restarts
                        ),
                        layer: Layer::Daemon as i32,
                    })
                    .await;
                let _ = self.state_tx.send(DaemonState::Gone);
                while let Some((_, reply)) = stop_rx.recv().await {
                    let _ = reply.send("not running");
                }
                return;
            }
            let delay = backoff.delay(restarts);
            let total = self.counters.restarts.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!("tailscaled died ({exit}); restart #{restarts} in {delay:?}");
            self.sink
                .daemon_restart(DaemonRestart {
                    attempt: restarts,
                    exit,
                    backoff: Some(duration(delay)),
                    log_tail: self.output.ring.tail(LOG_TAIL_LINES),
                    total,
                })
                .await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                request = stop_rx.recv() => {
                    self.finish(request, "not running");
                    return;
                }
            }
            let mut fresh = match spawn(&self.config, self.listeners, &self.output) {
                Ok(fresh) => fresh,
                Err(err) => {
                    tracing::warn!("restarting tailscaled failed: {err}");
                    continue;
                }
            };
            if let Err(err) =
                wait_ready(&self.api, &mut fresh.child, self.config.ready_timeout).await
            {
                tracing::warn!("restarted tailscaled is not ready: {err}");
                let _ = fresh.child.start_kill();
                let _ = fresh.child.wait().await;
                continue;
            }
            self.counters
                .pid
                .store(fresh.child.id().unwrap_or_default(), Ordering::Relaxed);
            running = Some(fresh);
            let hook = self.relogin.lock().ok().and_then(|h| h.clone());
            if let Some(hook) = hook
                && let Err(err) = hook(self.api.clone()).await
            {
                tracing::warn!("logging the restarted tailscaled in failed: {err}");
            }
            ready_since = Instant::now();
            let _ = self.state_tx.send(DaemonState::Ready);
        }
    }

    fn finish(&self, request: Option<StopRequest>, how: &'static str) {
        self.counters.pid.store(0, Ordering::Relaxed);
        let _ = self.state_tx.send(DaemonState::Gone);
        if let Some((_, reply)) = request {
            let _ = reply.send(how);
        }
    }
}

/// A stop request: the SIGTERM grace period and where to report how it ended.
type StopRequest = (Duration, oneshot::Sender<&'static str>);

/// Grace used if the stop channel closes without a request (the supervisor was dropped).
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM, wait, SIGKILL, reap. tailscaled logs an ephemeral node out on SIGTERM.
async fn terminate(child: &mut Child, grace: Duration) -> &'static str {
    let Some(pid) = child.id() else {
        return "not running";
    };
    let pid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    if grace.is_zero() {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return "sigkill";
    }
    if kill(pid, Signal::SIGTERM).is_err() {
        let _ = child.wait().await;
        return "not running";
    }
    if tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return "sigterm";
    }
    tracing::warn!("tailscaled ignored SIGTERM for {grace:?}; sending SIGKILL");
    let _ = child.start_kill();
    let _ = child.wait().await;
    "sigkill"
}

fn describe_exit(status: &std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => status.to_string(),
        },
        Err(err) => format!("wait failed: {err}"),
    }
}

fn spawn(
    config: &SupervisorConfig,
    listeners: Listeners,
    output: &OutputReader,
) -> Result<Running, StartError> {
    let spawn_error = |source| StartError::Spawn {
        path: config.binary.path.clone(),
        source,
    };
    let (death_read, death_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_error(e.into()))?;
    let death_fd = death_read.as_raw_fd();
    let logs_dir = config.state_dir.join("logs");
    let _ = std::fs::create_dir_all(&logs_dir);

    let mut cmd: Command = config.binary.command();
    cmd.arg("--tun=userspace-networking")
        .arg(format!("--socket={}", config.socket.display()))
        .arg(format!("--state={}", config.state))
        .arg(format!("--statedir={}", config.state_dir.display()))
        .arg(format!("--socks5-server={}", listeners.socks))
        .arg(format!("--outbound-http-proxy-listen={}", listeners.http))
        .envs(&config.env)
        .env("TS_PARENT_DEATH_FD", death_fd.to_string())
        .env("TS_LOGS_DIR", &logs_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: signals aimed at the agent's group do not hit it directly.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: only fcntl(2), which is async-signal-safe, runs between fork and exec; it makes the
    // parent-death pipe's read end survive exec at the same descriptor number.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(death_fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(spawn_error)?;
    drop(death_read);
    tracing::info!(pid = child.id(), "started tailscaled");
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(output.clone().read(stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(output.clone().read(stderr));
    }
    Ok(Running {
        child,
        _parent_death_write: death_write,
    })
}

/// Waits until the LocalAPI answers `status`, failing fast if the process exits.
async fn wait_ready(api: &LocalApi, child: &mut Child, limit: Duration) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_error = String::from("no answer yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError::Exited {
                exit: describe_exit(&Ok(status)),
            });
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(StartError::NotReady {
                after: limit,
                last_error,
            });
        }
        // Requests that arrive before the backend exists block inside tailscaled, so a probe is
        // bounded and retried rather than trusted to fail fast.
        let probe = tokio::time::timeout(remaining.min(Duration::from_secs(2)), api.status(false));
        match probe.await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(LocalApiError::Connect { source, .. })) => {
                last_error = format!("socket not accepting connections: {source}");
                // The socket appears within milliseconds of start, and every millisecond
                // waited past that is start-up time (B2); a pause of a few between connect
                // attempts keeps this from spinning.
                tokio::select! {
                    () = tokio::time::sleep(SOCKET_RETRY) => {}
                    status = child.wait() => {
                        return Err(StartError::Exited { exit: describe_exit(&status) });
                    }
                }
            }
            Ok(Err(err)) => last_error = err.to_string(),
            Err(_) => last_error = "status request still waiting for the backend".into(),
        }
    }
}

/// Waits for the listeners: the requested ones, or those tailscaled announces for port 0.
async fn wait_listeners(
    requested: Listeners,
    announced: &mut watch::Receiver<Announced>,
    limit: Duration,
) -> Option<Listeners> {
    if requested.socks.port() != 0 {
        return Some(requested);
    }
    let announced = tokio::time::timeout(
        limit,
        announced.wait_for(|a| a.socks.is_some() && a.http.is_some()),
    )
    .await;
    let announced = *announced.ok()?.ok()?;
    Some(Listeners {
        socks: announced.socks?,
        http: announced.http?,
    })
}

/// The listeners tailscaled announced (it does so only for port 0).
#[derive(Debug, Clone, Copy, Default)]
struct Announced {
    socks: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

/// The longest line of tailscaled's output the agent keeps.
const MAX_LOG_LINE: usize = 16 << 10;

/// Where tailscaled's output goes: scrubbed of secrets, into the ring and (without blocking)
/// the event stream; the listeners it announces are published for a port-0 request.
#[derive(Clone)]
struct OutputReader {
    ring: LogRing,
    forwarder: LogForwarder,
    secrets: Arc<Secrets>,
    announced: watch::Sender<Announced>,
}

impl OutputReader {
    async fn read(self, stream: impl AsyncRead + Unpin) {
        use futures::StreamExt as _;
        use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
        // Bounded: a line longer than this is cut (the codec skips to the next newline), so a
        // runaway tailscaled cannot grow the agent's memory through its log.
        let mut lines = FramedRead::new(stream, LinesCodec::new_with_max_length(MAX_LOG_LINE));
        while let Some(next) = lines.next().await {
            let line = match next {
                Ok(line) => line,
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    format!("(a tailscaled log line longer than {MAX_LOG_LINE} bytes was cut)")
                }
                Err(LinesCodecError::Io(_)) => break,
            };
            let line = self.secrets.scrub(&line);
            let socks = announced_listener(&line, "SOCKS5 listening on ");
            let http = announced_listener(&line, "HTTP proxy listening on ");
            if socks.is_some() || http.is_some() {
                // The first announcement wins; a restart pins the same addresses anyway.
                self.announced.send_if_modified(|slot| {
                    let before = *slot;
                    slot.socks = slot.socks.or(socks);
                    slot.http = slot.http.or(http);
                    before.socks != slot.socks || before.http != slot.http
                });
            }
            self.ring.push(line.clone());
            self.forwarder.forward(line);
        }
    }
}

/// The address after `prefix` in a line of tailscaled's log, e.g. `SOCKS5 listening on ADDR`.
fn announced_listener(line: &str, prefix: &str) -> Option<SocketAddr> {
    line.split_once(prefix)
        .and_then(|(_, rest)| rest.trim().parse::<SocketAddr>().ok())
}

/// Shared ring buffer of tailscaled's output.
#[derive(Clone, Default)]
pub struct LogRing(Arc<Mutex<VecDeque<String>>>);

impl LogRing {
    fn push(&self, line: String) {
        if let Ok(mut ring) = self.0.lock() {
            if ring.len() == LOG_RING_LINES {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.0
            .lock()
            .map(|ring| {
                ring.iter()
                    .skip(ring.len().saturating_sub(n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Forwards log lines to the event stream without ever blocking the reader.
#[derive(Clone)]
struct LogForwarder {
    tx: mpsc::Sender<String>,
}

impl LogForwarder {
    fn start(sink: EventSink) -> Self {
        let (tx, mut rx) = mpsc::channel::<String>(LOG_FORWARD_BUFFER);
        tokio::spawn(async move {
            let mut warned_udp = false;
            while let Some(line) = rx.recv().await {
                if !warned_udp && line.contains("failed to force-set UDP") {
                    warned_udp = true;
                    sink.warning(Warning {
                        code: "udp-buffer".into(),
                        message: "tailscaled could not enlarge its UDP buffers (no CAP_NET_ADMIN); this limits throughput only".into(),
                        layer: Layer::Daemon as i32,
                    })
                    .await;
                }
                sink.log(LogSource::Tailscaled, line).await;
            }
        });
        Self { tx }
    }

    fn forward(&self, line: String) {
        // Dropping lines under pressure is better than stalling tailscaled; the ring keeps them.
        let _ = self.tx.try_send(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_lines() {
        let ring = LogRing::default();
        for i in 0..(LOG_RING_LINES + 5) {
            ring.push(format!("line {i}"));
        }
        let tail = ring.tail(3);
        assert_eq!(
            tail,
            vec![
                format!("line {}", LOG_RING_LINES + 2),
                format!("line {}", LOG_RING_LINES + 3),
                format!("line {}", LOG_RING_LINES + 4)
            ]
        );
    }
}
