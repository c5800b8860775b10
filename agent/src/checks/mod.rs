//! The connectivity checks. Each check returns a [`CheckResult`] with typed evidence and, on
//! failure, a failure class, the layer, and a hint; none of them returns an error.

pub mod git;
pub mod http;
pub mod tailnet;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tailbox_proto::agent::v1::{CheckResult, CheckStatus, FailureClass, Layer, check_result};
use tokio::sync::watch;

use crate::events::duration;

/// What a check that goes through tailscaled's proxy needs from the run.
#[derive(Clone, Debug)]
pub struct ProxyContext {
    /// tailscaled's SOCKS5 (and HTTP proxy) listener.
    pub socks_addr: SocketAddr,
    /// When the check must give up.
    pub deadline: tokio::time::Instant,
    /// Readiness of the supervised tailscaled, for retrying after a daemon restart.
    pub daemon: DaemonReady,
}

impl ProxyContext {
    /// The proxy URL in socks5h form (names are resolved by tailscaled, which knows MagicDNS).
    pub fn proxy_url(&self) -> String {
        format!("socks5h://{}", self.socks_addr)
    }

    /// Time left before the deadline (zero when it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(tokio::time::Instant::now())
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

/// A handle to wait for tailscaled to be (again) ready.
#[derive(Clone, Debug)]
pub struct DaemonReady(watch::Receiver<DaemonState>);

impl DaemonReady {
    /// Wraps the supervisor's state channel.
    pub fn new(rx: watch::Receiver<DaemonState>) -> Self {
        Self(rx)
    }

    /// A handle that is always ready (tests of a single check).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(DaemonState::Ready);
        // Keep the sender alive for the life of the process so the state never reads as closed.
        std::mem::forget(tx);
        Self(rx)
    }

    /// Whether tailscaled is ready right now.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow() == DaemonState::Ready
    }

    /// Waits until the supervisor has noticed that tailscaled is down (true), or `until` passes
    /// (false).
    pub async fn wait_not_ready(&self, until: tokio::time::Instant) -> bool {
        let mut rx = self.0.clone();
        matches!(
            tokio::time::timeout_at(until, rx.wait_for(|s| *s != DaemonState::Ready)).await,
            Ok(Ok(_))
        )
    }

    /// Waits until tailscaled is ready (true) or gone for good (false).
    pub async fn wait(&self) -> bool {
        let mut rx = self.0.clone();
        match rx
            .wait_for(|s| matches!(s, DaemonState::Ready | DaemonState::Gone))
            .await
        {
            Ok(state) => *state == DaemonState::Ready,
            Err(_) => false,
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
