//! The connectivity checks. Each check returns a [`CheckResult`] with typed evidence and, on
//! failure, a failure class, the layer, and a hint; none of them returns an error.
//!
//! - [`tailnet`]: status, the netmap wait and pings, answered by the LocalAPI; targets by IP or
//!   by name ([`names`] resolves names from the netmap).
//! - [`proxy`]: tunnels through tailscaled's SOCKS5 proxy and HTTP over them, with every failure
//!   classified where it happens; [`http`] and [`git`] go through it.

pub mod git;
pub mod http;
pub mod names;
pub mod proxy;
pub mod tailnet;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tailbox_proto::agent::v1::{CheckResult, CheckStatus, FailureClass, Layer, check_result};
use tokio::sync::watch;

use crate::events::duration;
use crate::localapi::{LocalApi, LocalApiError};

/// How long tailscaled's LocalAPI gets to answer a health probe. It answers `status` within
/// milliseconds even when busy; a daemon that needs longer is stuck, and the run must still end
/// within seconds of a check's deadline.
pub const HEALTH_PROBE: Duration = Duration::from_millis(750);

/// What a check that goes through tailscaled's proxy needs from the run.
#[derive(Clone, Debug)]
pub struct ProxyContext {
    /// tailscaled's SOCKS5 (and HTTP proxy) listener.
    pub socks_addr: SocketAddr,
    /// The check's whole time, for messages.
    pub budget: Duration,
    /// When the check must give up.
    pub deadline: tokio::time::Instant,
    /// The supervised tailscaled: to wait out a restart, and to ask when the check runs out of
    /// time.
    pub daemon: Daemon,
}

impl ProxyContext {
    /// A context for a check that starts now and may take `budget`.
    pub fn new(socks_addr: SocketAddr, budget: Duration, daemon: Daemon) -> Self {
        Self {
            socks_addr,
            budget,
            deadline: tokio::time::Instant::now() + budget,
            daemon,
        }
    }

    /// The proxy URL in socks5h form (names are resolved by tailscaled, which knows MagicDNS).
    pub fn proxy_url(&self) -> String {
        format!("socks5h://{}", self.socks_addr)
    }
}

/// Readiness of tailscaled as the supervisor sees it.
#[derive(Clone, Debug, Copy, PartialEq, Eq)]
pub enum DaemonState {
    /// Starting, restarting or logging in again.
    NotReady,
    /// Running and logged in.
    Ready,
    /// Gone for good (restarts exhausted or the run is tearing down).
    Gone,
}

/// tailscaled as the checks see it: what its supervisor says, and its LocalAPI to ask directly.
/// Clones share what the checks found out.
#[derive(Clone, Debug)]
pub struct Daemon {
    state: watch::Receiver<DaemonState>,
    api: LocalApi,
    /// A check found the LocalAPI not answering.
    found_stuck: Arc<AtomicBool>,
}

/// What a health probe of the LocalAPI found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The LocalAPI answered.
    Answering,
    /// The socket accepted (or the process holds it) but no answer came within [`HEALTH_PROBE`].
    Unresponsive,
    /// Nothing listens on the socket: the process is gone.
    Gone(String),
}

/// Why a check failed when tailscaled, not the target, was at fault.
#[derive(Debug, Clone)]
pub struct DaemonFault {
    /// [`FailureClass::DaemonUnresponsive`] or [`FailureClass::DaemonFailed`].
    pub class: FailureClass,
    /// What happened, for the result's detail.
    pub detail: String,
    /// What to do about it.
    pub hint: &'static str,
}

impl Daemon {
    /// The supervisor's state channel and the daemon's LocalAPI.
    pub fn new(state: watch::Receiver<DaemonState>, api: LocalApi) -> Self {
        Self {
            state,
            api,
            found_stuck: Arc::default(),
        }
    }

    /// Whether a check found the LocalAPI not answering (so teardown need not ask again).
    pub fn found_stuck(&self) -> bool {
        self.found_stuck.load(Ordering::Relaxed)
    }

    /// The daemon's LocalAPI.
    pub fn api(&self) -> &LocalApi {
        &self.api
    }

    /// Whether tailscaled is ready right now.
    pub fn is_ready(&self) -> bool {
        *self.state.borrow() == DaemonState::Ready
    }

    /// Waits until the supervisor has noticed that tailscaled is down (true), or `until` passes
    /// (false).
    pub async fn wait_not_ready(&self, until: tokio::time::Instant) -> bool {
        let mut rx = self.state.clone();
        matches!(
            tokio::time::timeout_at(until, rx.wait_for(|s| *s != DaemonState::Ready)).await,
            Ok(Ok(_))
        )
    }

    /// Waits until tailscaled is ready (true) or gone for good (false).
    pub async fn wait(&self) -> bool {
        let mut rx = self.state.clone();
        match rx
            .wait_for(|s| matches!(s, DaemonState::Ready | DaemonState::Gone))
            .await
        {
            Ok(state) => *state == DaemonState::Ready,
            Err(_) => false,
        }
    }

    /// Asks the LocalAPI for its status, bounded by [`HEALTH_PROBE`].
    pub async fn health(&self) -> Health {
        match tokio::time::timeout(HEALTH_PROBE, self.api.status(false)).await {
            Err(_) => Health::Unresponsive,
            Ok(Err(LocalApiError::Connect { source, .. })) => Health::Gone(source.to_string()),
            // Any answer, even an error status, means the daemon is alive and serving.
            Ok(_) => Health::Answering,
        }
    }

    /// After `what` ran out of time: whether tailscaled, rather than the target, is to blame.
    /// Probes the LocalAPI once; `None` when the daemon answers and its supervisor has it
    /// ready.
    pub async fn fault_after_timeout(&self, what: &str) -> Option<DaemonFault> {
        let restarting = !self.is_ready();
        match self.health().await {
            Health::Unresponsive => {
                self.found_stuck.store(true, Ordering::Relaxed);
                Some(DaemonFault {
                    class: FailureClass::DaemonUnresponsive,
                    detail: format!(
                        "{what} ran out of time, and tailscaled's LocalAPI did not answer within {}: \
                     tailscaled is stuck",
                        tailnet::humanize(HEALTH_PROBE)
                    ),
                    hint: "tailscaled stopped answering (stopped, deadlocked or starved), so \
                           the check could not finish; the target was not necessarily at fault. \
                           Check tailscaled's log, and whether something stopped it or starves \
                           it of CPU or memory.",
                })
            }
            Health::Gone(why) => Some(DaemonFault {
                class: FailureClass::DaemonFailed,
                detail: format!(
                    "{what} ran out of time while tailscaled was gone (its LocalAPI: {why})"
                ),
                hint: "tailscaled died during the check; see the daemon restarts and \
                       tailscaled's log.",
            }),
            Health::Answering if restarting => Some(DaemonFault {
                class: FailureClass::DaemonFailed,
                detail: format!("{what} ran out of time while tailscaled was being restarted"),
                hint: "tailscaled died during the check and was not back in time; see the \
                       daemon restarts and tailscaled's log.",
            }),
            Health::Answering => None,
        }
    }
}

/// Builds check results with the common fields filled in.
#[derive(Debug)]
pub struct Outcome {
    name: &'static str,
    target: String,
    layer: Layer,
    started: Instant,
}

impl Outcome {
    /// Starts timing a check.
    pub fn start(name: &'static str, target: impl Into<String>, layer: Layer) -> Self {
        Self {
            name,
            target: target.into(),
            layer,
            started: Instant::now(),
        }
    }

    fn result(
        &self,
        status: CheckStatus,
        class: FailureClass,
        layer: Layer,
        detail: String,
        hint: String,
        evidence: Option<check_result::Evidence>,
    ) -> CheckResult {
        CheckResult {
            name: self.name.into(),
            target: self.target.clone(),
            status: status as i32,
            failure_class: class as i32,
            layer: layer as i32,
            detail,
            hint,
            duration: Some(duration(self.started.elapsed())),
            log_tail: Vec::new(),
            evidence,
        }
    }

    /// A pass.
    pub fn pass(&self, detail: impl Into<String>, evidence: check_result::Evidence) -> CheckResult {
        self.result(
            CheckStatus::Pass,
            FailureClass::Unspecified,
            self.layer,
            detail.into(),
            String::new(),
            Some(evidence),
        )
    }

    /// A pass with a caveat.
    pub fn warn(
        &self,
        detail: impl Into<String>,
        hint: impl Into<String>,
        evidence: check_result::Evidence,
    ) -> CheckResult {
        self.result(
            CheckStatus::Warn,
            FailureClass::Unspecified,
            self.layer,
            detail.into(),
            hint.into(),
            Some(evidence),
        )
    }

    /// A failure at `layer` (which may be lower than the check's own layer, e.g. an HTTP check
    /// that failed to open TCP).
    pub fn fail(
        &self,
        class: FailureClass,
        layer: Layer,
        detail: impl Into<String>,
        hint: impl Into<String>,
        evidence: Option<check_result::Evidence>,
    ) -> CheckResult {
        self.result(
            CheckStatus::Fail,
            class,
            layer,
            detail.into(),
            hint.into(),
            evidence,
        )
    }

    /// What the check is about, as its result will show it.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A skip with the reason.
    pub fn skip(&self, detail: impl Into<String>, hint: impl Into<String>) -> CheckResult {
        self.result(
            CheckStatus::Skip,
            FailureClass::Unspecified,
            self.layer,
            detail.into(),
            hint.into(),
            None,
        )
    }
}
