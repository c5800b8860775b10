//! The sidecar's node for the sidecar's whole life: brought up by `Up`, watched, checked, and
//! taken down by `Down` (or SIGTERM).
//!
//! - Bring-up, checks and teardown are [`crate::bringup`] and [`crate::targets`], as in `Run`.
//! - A monitor follows tailscaled: the supervisor's state (restarting, gone) and the IPN bus, on
//!   whose every message the status is read again. Each change updates the status snapshot,
//!   the gRPC health (SERVING only while Running) and the Watch stream.
//! - The supervisor's restarts, warnings and log lines reach Watch through a hub that numbers
//!   them in one sequence with the status changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tailbox_proto::agent::v1::{
    CheckRequest, CheckStatus, DaemonRestart, EnvResponse, Event, SidecarState, SidecarStatus,
    TailnetConfig, TailnetInfo, Teardown, UpRequest, UpResponse, WatchEvent, event, watch_event,
};
use tokio::sync::{Mutex as AsyncMutex, OwnedRwLockReadGuard, RwLock, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::StateDir;
use crate::bringup::{self, Bringup, Started};
use crate::checks::DaemonState;
use crate::checks::tailnet;
use crate::daemon::supervisor::Supervisor;
use crate::events::{EventItem, EventSink, duration, timestamp};
use crate::localapi::LocalApi;
use crate::run::{self, Budget, RunContext};
use crate::targets::Targets;
use tailbox_proto::redact::redact_url;

/// `NO_PROXY`: what must never go through the proxy.
const NO_PROXY: &str = "localhost,127.0.0.1,::1";
/// IPN bus mask for the monitor: NotifyInitialState | NotifyInitialHealthState | NotifyNoNetMap.
/// Any message is only a cue to read the status again; older daemons ignore unknown bits.
const BUS_MASK_MONITOR: u64 = 2 | 128 | 8192;
/// Read the status at least this often, in case a change never reaches the bus.
const STATUS_REFRESH: Duration = Duration::from_secs(15);
/// A status read that takes longer than this counts as "tailscaled does not answer".
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Watch events kept for slow readers before the oldest are dropped.
const WATCH_BUFFER: usize = 1024;
/// Backend states in which Up logs the node in again rather than answering "already up".
const LOGGED_OUT_STATES: &[&str] = &["NeedsLogin", "NoState", "Stopped"];
/// Grace for Down when the request does not say.
pub const DEFAULT_DOWN_GRACE: Duration = Duration::from_secs(10);

/// The node and everything that follows it. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: RunContext,
    state_dir: StateDir,
    /// The node, once up. Up and Down write; Check and Env read, so Down waits for (cancelled)
    /// checks and a check never sees a half-started node.
    slot: Arc<RwLock<Option<UpNode>>>,
    status: watch::Sender<SidecarStatus>,
    health: tonic_health::server::HealthReporter,
    /// Numbers Watch events and sends them in that order.
    watch: std::sync::Mutex<WatchHub>,
    /// The supervisor's events (restarts, warnings, logs), drained into the hub.
    daemon_events: EventSink,
    started: Instant,
    stopping: AtomicBool,
    /// Serialises Down with itself (SIGTERM and a Down call may race).
    down: AsyncMutex<Option<Teardown>>,
    /// Fired when Down has finished: the server stops and the process exits.
    finished: CancellationToken,
}

struct WatchHub {
    seq: u64,
    tx: broadcast::Sender<WatchEvent>,
}

/// A node that is up.
struct UpNode {
    supervisor: Supervisor,
    info: TailnetInfo,
    /// The Up settings without the auth key: a second Up with the same ones is a no-op.
    settings: TailnetConfig,
    /// Stops the monitor.
    monitor: CancellationToken,
}

impl Node {
    /// A node that is not up yet. `ctx.cancel` is fired by Down, cutting checks short.
    pub fn new(
        ctx: RunContext,
        state_dir: StateDir,
        health: tonic_health::server::HealthReporter,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(256);
        let status = SidecarStatus {
            state: SidecarState::Idle as i32,
            agent_version: crate::AGENT_VERSION.into(),
            agent_sha256: ctx.agent_sha256.clone(),
            pid: std::process::id(),
            state_dir: state_dir.dir().display().to_string(),
            ..Default::default()
        };
        let node = Self {
            inner: Arc::new(Inner {
                ctx,
                state_dir,
                slot: Arc::new(RwLock::new(None)),
                status: watch::Sender::new(status),
                health,
                watch: std::sync::Mutex::new(WatchHub {
                    seq: 0,
                    tx: broadcast::Sender::new(WATCH_BUFFER),
                }),
                daemon_events: EventSink::new(events_tx),
                started: Instant::now(),
                stopping: AtomicBool::new(false),
                down: AsyncMutex::new(None),
                finished: CancellationToken::new(),
            }),
        };
        tokio::spawn(node.clone().drain_daemon_events(events_rx));
        node
    }

    /// Fired once Down (or SIGTERM) has taken the node down.
    pub fn finished(&self) -> CancellationToken {
        self.inner.finished.clone()
    }

    /// Sets the health to match the state (NOT_SERVING until the node is Running: tonic-health
    /// starts out SERVING).
    pub async fn init_health(&self) {
        let state = self.inner.status.borrow().state;
        self.set_health(state).await;
    }

    /// The current status.
    pub fn status(&self) -> SidecarStatus {
        let mut status = self.inner.status.borrow().clone();
        status.uptime = Some(duration(self.inner.started.elapsed()));
        status
    }

    /// `Up`: brings the node up, or returns it if it is already up with the same settings.
    pub async fn up(&self, request: UpRequest) -> Result<UpResponse, Status> {
        let tailnet = request
            .tailnet
            .filter(|t| !t.auth_key.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument("Up needs a tailnet config with an auth key")
            })?;
        self.refuse_if_stopping()?;
        let hostname = Bringup::hostname_for(&tailnet, &request.sandbox_id);
        let settings = TailnetConfig {
            auth_key: String::new(),
            hostname: hostname.clone(),
            ..tailnet.clone()
        };
        let mut slot = self.inner.slot.clone().write_owned().await;
        self.refuse_if_stopping()?;
        let budget = Budget::from(request.deadlines.as_ref());
        let sink = EventSink::recording();
        let run_dir = self.inner.state_dir.tailscaled_dir();
        let bringup = Bringup {
            tailnet: &tailnet,
            sandbox_id: &request.sandbox_id,
            run_dir: &run_dir,
            path_var: self.inner.ctx.path_var.as_deref(),
            host: &self.inner.ctx.host,
            sink: &sink,
            daemon_events: self.inner.daemon_events.clone(),
            daemon_start: budget.daemon_start,
            login: budget.login,
            deadline: tokio::time::Instant::now() + budget.daemon_start + budget.login,
            cancel: &self.inner.ctx.cancel,
        };
        if let Some(up) = slot.as_mut() {
            if up.settings != settings {
                return Err(Status::failed_precondition(format!(
                    "the node is already up as {} with other settings; call Down first (`tailbox-agent down`)",
                    up.info.hostname
                )));
            }
            let daemon = *up.supervisor.state_changes().borrow();
            let backend = self.inner.status.borrow().backend_state.clone();
            if daemon == DaemonState::Ready && LOGGED_OUT_STATES.contains(&backend.as_str()) {
                // Logged out behind our back (or expired): log the same node in again.
                tracing::info!(backend_state = %backend, "Up on a logged-out node: logging in again");
                let api = up.supervisor.api().clone();
                bringup.login(&up.supervisor, &mut up.info).await;
                drop(slot);
                self.refresh(&api).await;
                return Ok(UpResponse {
                    status: Some(self.status()),
                    already_up: false,
                    checks: sink.record().await.checks,
                });
            }
            if daemon != DaemonState::Gone {
                return Ok(UpResponse {
                    status: Some(self.status()),
                    already_up: true,
                    checks: Vec::new(),
                });
            }
            // tailscaled is gone for good (restart budget spent): start over.
            if let Some(gone) = slot.take() {
                gone.monitor.cancel();
                let _ = gone.supervisor.stop(Duration::from_secs(1)).await;
            }
        }

        self.update(|s| {
            s.state = SidecarState::Starting as i32;
            s.last_error.clear();
            s.hostname.clone_from(&hostname);
            s.control_url = redact_url(&tailnet.control_url);
        })
        .await;
        let logged_in = match bringup.start_daemon().await {
            Some(mut started) => {
                let ok = bringup.login(&started.supervisor, &mut started.info).await;
                if ok {
                    let api = started.supervisor.api().clone();
                    *slot = Some(self.adopt(started, settings));
                    drop(slot);
                    // The answer says Running only once tailscaled says so.
                    self.refresh(&api).await;
                } else {
                    bringup::teardown(started.supervisor, budget.teardown, &sink).await;
                }
                ok
            }
            None => false,
        };
        let checks = sink.record().await.checks;
        if !logged_in {
            let why = checks
                .iter()
                .rev()
                .find(|c| c.status == CheckStatus::Fail as i32)
                .map_or_else(
                    || "the node did not come up".to_owned(),
                    |c| c.detail.clone(),
                );
            self.update(|s| {
                // Down may have cut this Up short: then the sidecar is stopping, not idle.
                if s.state != SidecarState::Stopping as i32 {
                    s.state = SidecarState::Idle as i32;
                }
                s.last_error = why;
            })
            .await;
        }
        Ok(UpResponse {
            status: Some(self.status()),
            already_up: false,
            checks,
        })
    }

    /// Takes over a node that is up and starts following it.
    fn adopt(&self, started: Started, settings: TailnetConfig) -> UpNode {
        let monitor = self.inner.ctx.cancel.child_token();
        let supervisor = started.supervisor;
        let proxy = supervisor.proxy();
        let http_proxy = supervisor.http_proxy();
        let (version, pid) = (started.daemon.version.clone(), started.daemon.pid);
        self.inner.status.send_modify(|s| {
            s.proxy_url = socks_url(proxy);
            s.http_proxy_url = http_url(http_proxy);
            s.tailscale_version = version;
            s.tailscaled_pid = pid;
        });
        tokio::spawn(self.clone().monitor(
            supervisor.api().clone(),
            supervisor.state_changes(),
            monitor.clone(),
        ));
        UpNode {
            supervisor,
            info: started.info,
            settings,
            monitor,
        }
    }

    /// `Env`: the proxy variables, once the node is up.
    pub async fn env(&self) -> Result<EnvResponse, Status> {
        let slot = self.inner.slot.read().await;
        let up = slot.as_ref().ok_or_else(not_up)?;
        let (socks, http) = (up.supervisor.proxy(), up.supervisor.http_proxy());
        Ok(EnvResponse {
            vars: proxy_env(socks, http).into_iter().collect(),
            proxy_url: socks_url(socks),
            http_proxy_url: http_url(http),
        })
    }

    /// `Check`: checks `request`'s targets over the node, streaming events that end with a
    /// report. Fails at once if the node is not up.
    pub async fn check(&self, request: CheckRequest) -> Result<mpsc::Receiver<EventItem>, Status> {
        self.refuse_if_stopping()?;
        let slot = self.inner.slot.clone().read_owned().await;
        if slot.is_none() {
            return Err(not_up());
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().check_over(slot, request, EventSink::new(tx)));
        Ok(rx)
    }

    async fn check_over(
        self,
        slot: OwnedRwLockReadGuard<Option<UpNode>>,
        request: CheckRequest,
        sink: EventSink,
    ) {
        let Some(up) = slot.as_ref() else {
            return;
        };
        let ctx = &self.inner.ctx;
        let started_at = SystemTime::now();
        let budget = Budget::from(request.deadlines.as_ref());
        let deadline = budget.deadline_from_now();
        run::preflight_phase(&sink, ctx).await;
        let targets = Targets {
            ping: &request.ping_targets,
            http: &request.http_targets,
            git: &request.git_targets,
        };
        let api = up.supervisor.api();
        let status_first = async {
            let (status, _) = tailnet::check_status(api).await;
            sink.check(status).await;
        };
        targets
            .check(
                &up.supervisor,
                budget.checks(deadline),
                &sink,
                &ctx.cancel,
                status_first,
            )
            .await;
        let status = self.status();
        let info = TailnetInfo {
            self_ips: status.tailnet_ips.clone(),
            daemon_restarts: up.supervisor.restarts(),
            ..up.info.clone()
        };
        drop(slot);
        let record = sink.record().await;
        let report = run::report(&request.run_id, started_at, ctx, record, Some(info), None);
        sink.emit(event::Kind::Report(report)).await;
    }

    /// `Watch`: the current status, then every event until the sidecar stops.
    pub fn watch(&self, include_logs: bool) -> mpsc::Receiver<Result<WatchEvent, Status>> {
        let (mut events, opening) = {
            let hub = self.lock_hub();
            (hub.tx.subscribe(), self.status())
        };
        let (tx, rx) = mpsc::channel(64);
        let finished = self.inner.finished.clone();
        tokio::spawn(async move {
            let opening = WatchEvent {
                seq: 0,
                time: Some(timestamp(SystemTime::now())),
                kind: Some(watch_event::Kind::Status(opening)),
            };
            if tx.send(Ok(opening)).await.is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = finished.cancelled() => break,
                };
                let event = match event {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(dropped)) => WatchEvent {
                        seq: 0,
                        time: Some(timestamp(SystemTime::now())),
                        kind: Some(watch_event::Kind::Dropped(dropped)),
                    },
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if !include_logs && matches!(event.kind, Some(watch_event::Kind::Log(_))) {
                    continue;
                }
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            // The last status (STOPPING) went out before `finished` fired: pass on what is queued.
            while let Ok(event) = events.try_recv() {
                if include_logs || !matches!(event.kind, Some(watch_event::Kind::Log(_))) {
                    let _ = tx.send(Ok(event)).await;
                }
            }
        });
        rx
    }

    /// `Down` (and SIGTERM): cancels checks, logs the node out, stops tailscaled, and fires
    /// [`Node::finished`]. A second call waits for the first and returns its teardown.
    pub async fn down(&self, grace: Duration) -> Teardown {
        let mut done = self.inner.down.lock().await;
        if let Some(teardown) = done.as_ref() {
            return teardown.clone();
        }
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.update(|s| s.state = SidecarState::Stopping as i32)
            .await;
        self.inner.ctx.cancel.cancel();
        let up = self.inner.slot.write().await.take();
        let teardown = match up {
            Some(up) => {
                up.monitor.cancel();
                let sink = EventSink::recording();
                let teardown = bringup::teardown(up.supervisor, grace, &sink).await;
                for warning in sink.record().await.warnings {
                    self.publish(watch_event::Kind::Warning(warning));
                }
                teardown
            }
            None => Teardown {
                daemon_stop: "not running".into(),
                ..Default::default()
            },
        };
        tracing::info!(
            logged_out = teardown.logged_out,
            daemon_stop = %teardown.daemon_stop,
            "the node is down"
        );
        self.update(|s| {
            s.backend_state.clear();
            s.tailscaled_pid = 0;
        })
        .await;
        *done = Some(teardown.clone());
        self.inner.finished.cancel();
        teardown
    }

    fn refuse_if_stopping(&self) -> Result<(), Status> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the sidecar is stopping"));
        }
        Ok(())
    }

    fn lock_hub(&self) -> std::sync::MutexGuard<'_, WatchHub> {
        // A panic while holding this lock cannot leave the hub inconsistent: take it anyway.
        self.inner
            .watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends one event to every Watch reader, numbered in the one sequence (log lines are not
    /// numbered: readers filter them, and a gap must only ever mean a loss).
    fn publish(&self, kind: watch_event::Kind) {
        let mut hub = self.lock_hub();
        let seq = if matches!(kind, watch_event::Kind::Log(_)) {
            0
        } else {
            hub.seq += 1;
            hub.seq
        };
        let event = WatchEvent {
            seq,
            time: Some(timestamp(SystemTime::now())),
            kind: Some(kind),
        };
        // No reader is fine: the event is only for readers that are there.
        let _ = hub.tx.send(event);
    }

    /// Changes the status; a change that matters goes to Watch and to the health service.
    async fn update(&self, change: impl FnOnce(&mut SidecarStatus)) {
        let mut changed = None;
        self.inner.status.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            if status.state == SidecarState::Running as i32
                && before.state != SidecarState::Running as i32
            {
                status.running_since = Some(timestamp(SystemTime::now()));
            }
            let differs = *status != before;
            if differs {
                changed = Some((before.state, status.state));
            }
            differs
        });
        if let Some((before, after)) = changed {
            if before != after {
                tracing::info!(
                    from = ?SidecarState::try_from(before).unwrap_or_default(),
                    to = ?SidecarState::try_from(after).unwrap_or_default(),
                    "sidecar state changed"
                );
                self.set_health(after).await;
            }
            self.publish(watch_event::Kind::Status(self.status()));
        }
    }

    async fn set_health(&self, state: i32) {
        let serving = if state == SidecarState::Running as i32 {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        let health = &self.inner.health;
        health.set_service_status("", serving).await;
        health
            .set_service_status(super::service::SIDECAR_SERVICE_NAME, serving)
            .await;
    }

    /// Turns the supervisor's events into Watch events, and counts restarts into the status.
    async fn drain_daemon_events(self, mut events: mpsc::Receiver<EventItem>) {
        while let Some(Ok(Event { kind, .. })) = events.recv().await {
            match kind {
                Some(event::Kind::Log(line)) => self.publish(watch_event::Kind::Log(line)),
                Some(event::Kind::Warning(warning)) => {
                    self.publish(watch_event::Kind::Warning(warning));
                }
                Some(event::Kind::DaemonRestart(restart)) => self.restarted(restart).await,
                _ => {}
            }
        }
    }

    async fn restarted(&self, restart: DaemonRestart) {
        let total = restart.total;
        self.publish(watch_event::Kind::DaemonRestart(restart));
        self.update(|s| {
            s.daemon_restarts = total;
            s.tailscaled_pid = 0;
            if s.state == SidecarState::Running as i32 {
                s.state = SidecarState::Degraded as i32;
            }
        })
        .await;
    }

    /// Follows tailscaled until `stop`: the supervisor's state and the IPN bus, re-reading the
    /// status on every change.
    async fn monitor(
        self,
        api: LocalApi,
        mut daemon: watch::Receiver<DaemonState>,
        stop: CancellationToken,
    ) {
        let mut bus = None;
        let mut refresh = tokio::time::interval(STATUS_REFRESH);
        loop {
            // Down stops the monitor before it stops tailscaled: that end is not a failure.
            if stop.is_cancelled() {
                return;
            }
            let state = *daemon.borrow_and_update();
            match state {
                DaemonState::Ready => {
                    if bus.is_none() {
                        let open = tokio::time::timeout(
                            STATUS_TIMEOUT,
                            api.watch_ipn_bus(BUS_MASK_MONITOR),
                        );
                        bus = open.await.ok().and_then(Result::ok);
                    }
                    self.refresh(&api).await;
                }
                DaemonState::NotReady => {
                    bus = None;
                    self.update(|s| {
                        if s.state == SidecarState::Running as i32 {
                            s.state = SidecarState::Degraded as i32;
                        }
                        s.backend_state.clear();
                    })
                    .await;
                }
                DaemonState::Gone => {
                    let restarts = self.inner.status.borrow().daemon_restarts;
                    self.update(|s| {
                        s.state = SidecarState::Failed as i32;
                        s.backend_state.clear();
                        s.tailscaled_pid = 0;
                        s.last_error = format!(
                            "tailscaled kept dying ({restarts} restarts) and the restart budget is spent; call Up to start it again"
                        );
                    })
                    .await;
                    return;
                }
            }
            let next_bus_message = async {
                match bus.as_mut() {
                    Some(bus) => bus.next().await.ok().flatten().is_some(),
                    None => std::future::pending().await,
                }
            };
            let bus_alive = tokio::select! {
                changed = daemon.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
                alive = next_bus_message => alive,
                _ = refresh.tick() => true,
                () = stop.cancelled() => return,
            };
            if !bus_alive {
                // tailscaled closed the bus (it died, or we fell behind): open it again.
                bus = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Reads tailscaled's status into ours.
    async fn refresh(&self, api: &LocalApi) {
        let read = tokio::time::timeout(STATUS_TIMEOUT, api.status(false)).await;
        let pid = self
            .inner
            .slot
            .try_read()
            .ok()
            .and_then(|slot| slot.as_ref().and_then(|up| up.supervisor.pid()));
        match read {
            Ok(Ok(status)) => {
                let running = status.backend_state == "Running";
                let mut ips = status.tailscale_ips.unwrap_or_default();
                ips.sort_by_key(|ip| ip.contains(':'));
                let dns_name = status
                    .self_node
                    .map(|n| n.dns_name.trim_end_matches('.').to_owned())
                    .unwrap_or_default();
                let health = status.health.unwrap_or_default();
                self.update(|s| {
                    s.backend_state = status.backend_state;
                    s.tailnet_ips = ips;
                    s.dns_name = dns_name;
                    s.health = health;
                    if let Some(pid) = pid {
                        s.tailscaled_pid = pid;
                    }
                    if s.state != SidecarState::Stopping as i32 {
                        s.state = if running {
                            SidecarState::Running
                        } else {
                            SidecarState::Degraded
                        } as i32;
                    }
                })
                .await;
            }
            Ok(Err(err)) => tracing::debug!("reading tailscaled's status failed: {err}"),
            Err(_) => {
                tracing::warn!("tailscaled's status did not answer within {STATUS_TIMEOUT:?}")
            }
        }
    }
}

fn not_up() -> Status {
    Status::failed_precondition(
        "the sidecar's node is not up: call Up first (`tailbox up`, or the Sidecar.Up RPC)",
    )
}

fn socks_url(addr: SocketAddr) -> String {
    format!("socks5h://{addr}")
}

fn http_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// The variables that send a non-Tailscale-aware process through the node: `ALL_PROXY` for
/// SOCKS-aware tools (socks5h, so tailscaled resolves names), the `HTTP(S)_PROXY` pair for the
/// rest, both spellings because tools disagree, and loopback excluded.
pub fn proxy_env(socks: SocketAddr, http: SocketAddr) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for (names, value) in [
        (&["ALL_PROXY", "all_proxy"][..], socks_url(socks)),
        (
            &["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"][..],
            http_url(http),
        ),
        (&["NO_PROXY", "no_proxy"][..], NO_PROXY.to_owned()),
    ] {
        for name in names {
            vars.insert((*name).to_owned(), value.clone());
        }
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_env_covers_both_spellings_and_excludes_loopback() {
        let addr: SocketAddr = "127.0.0.1:1055".parse().unwrap();
        let vars = proxy_env(addr, addr);
        assert_eq!(vars.len(), 8);
        assert_eq!(vars["ALL_PROXY"], "socks5h://127.0.0.1:1055");
        assert_eq!(vars["all_proxy"], vars["ALL_PROXY"]);
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            assert_eq!(vars[name], "http://127.0.0.1:1055", "{name}");
        }
        assert_eq!(vars["NO_PROXY"], "localhost,127.0.0.1,::1");
        assert_eq!(vars["no_proxy"], vars["NO_PROXY"]);

        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(proxy_env(v6, v6)["ALL_PROXY"], "socks5h://[::1]:9");
    }
}
