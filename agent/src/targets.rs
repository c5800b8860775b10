//! Checking the requested targets over a running node: netmap visibility first, then ping, HTTP
//! and git concurrently. The one-shot `Run` and the sidecar's `Check` share this runner.

use std::time::Duration;

use futures::future::join_all;
use tailbox_proto::agent::v1::{CheckResult, GitTarget, HttpTarget, Layer, Phase, PingTarget};
use tokio_util::sync::CancellationToken;

use crate::checks::tailnet;
use crate::checks::{Outcome, ProxyContext};
use crate::daemon::supervisor::Supervisor;
use crate::events::{EventSink, run_phase};
use crate::redact::Secrets;

/// How a target URL is shown in events: as its check result shows it, credentials scrubbed.
fn shown_url(url: &str) -> String {
    Secrets::from_url(url).scrub(url)
}

/// Why checks were not run, worded the same everywhere: `not run: <the cause>`. A skip caused by
/// an earlier failure names that failure, and its hint sends people to it.
pub mod skip_reason {
    /// No auth key, so no tailnet.
    pub const NO_AUTH_KEY: &str =
        "not run: no auth key was given, so the sandbox did not join the tailnet";
    /// The daemon check failed.
    pub const DAEMON_FAILED: &str = "not run: the daemon check failed (tailscaled is not running)";
    /// The login check failed.
    pub const LOGIN_FAILED: &str =
        "not run: the login check failed (the sandbox is not on the tailnet)";
    /// Stopped before the check started.
    pub const INTERRUPTED: &str = "not run: the run was interrupted";
    /// Stopped while the check ran.
    pub const INTERRUPTED_MID_CHECK: &str = "not finished: the run was interrupted";
    /// The hint of a skip caused by the daemon check.
    pub const FIX_DAEMON: &str = "Fix the `daemon` failure above first.";
    /// The hint of a skip caused by the login check.
    pub const FIX_LOGIN: &str = "Fix the `login` failure above first.";
}

/// The targets of one run or check.
#[derive(Clone, Copy)]
pub struct Targets<'a> {
    /// Addresses to ping.
    pub ping: &'a [PingTarget],
    /// URLs to fetch.
    pub http: &'a [HttpTarget],
    /// Remotes to list.
    pub git: &'a [GitTarget],
}

/// Time budgets of the checks.
#[derive(Debug, Clone, Copy)]
pub struct CheckBudget {
    /// For a target peer to appear online in the netmap.
    pub netmap: Duration,
    /// For each ping check.
    pub ping: Duration,
    /// For each HTTP check.
    pub http: Duration,
    /// For each git check.
    pub git: Duration,
    /// Nothing may run past this.
    pub deadline: tokio::time::Instant,
}

impl CheckBudget {
    fn remaining(&self, budget: Duration) -> Duration {
        budget.min(
            self.deadline
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }
}

impl Targets<'_> {
    /// Whether there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.ping.is_empty() && self.http.is_empty() && self.git.is_empty()
    }

    /// The checks phase over `supervisor`'s node. `lead` runs first inside the phase (the
    /// sidecar's status check). If `cancel` fires, unfinished checks are reported as skipped.
    pub async fn check(
        &self,
        supervisor: &Supervisor,
        budget: CheckBudget,
        sink: &EventSink,
        cancel: &CancellationToken,
        lead: impl Future<Output = ()>,
    ) {
        run_phase(sink, Phase::Checks, async {
            lead.await;
            tokio::select! {
                () = self.check_all(supervisor, budget, sink) => {}
                () = cancel.cancelled() => {
                    tracing::warn!("checks cancelled");
                    // Every requested check still gets a result: the unfinished ones are skips.
                    let done = sink.record().await.checks;
                    for result in self.skipped(skip_reason::INTERRUPTED_MID_CHECK, "") {
                        if !done.iter().any(|c| c.name == result.name && c.target == result.target) {
                            sink.check(result).await;
                        }
                    }
                }
            }
        })
        .await;
    }

    async fn check_all(&self, supervisor: &Supervisor, budget: CheckBudget, sink: &EventSink) {
        let daemon = supervisor.daemon();
        let proxy = supervisor.proxy();
        // Netmap visibility, once per tailnet host (IP or name) any target names, and then the
        // pings, which read it. HTTP and git go through the proxy and need nothing from it, so
        // they start at once: the phase is the slowest check, not the netmap plus it (B1).
        let hosts = tailnet::netmap_targets(self.ping, self.http, self.git);
        let netmap_limit = budget.remaining(budget.netmap);
        let netmap_then_pings = async {
            let daemon = &daemon;
            let netmap = join_all(hosts.into_iter().map(|host| async move {
                sink.check_started("netmap", host.to_string(), netmap_limit)
                    .await;
                let result = tailnet::check_netmap(daemon, &host, netmap_limit).await;
                sink.check(result.clone()).await;
                (host, result)
            }))
            .await;
            let netmap = &netmap;
            join_all(self.ping.iter().map(|target| async move {
                let limit = budget.remaining(budget.ping);
                sink.check_started("ping", target.address.trim(), limit)
                    .await;
                let (result, warning) =
                    tailnet::check_ping(daemon, &target.address, netmap, limit).await;
                if let Some(warning) = warning {
                    sink.warning(warning).await;
                }
                sink.check(result).await;
            }))
            .await;
        };
        let https = self.http.iter().map(|target| {
            let limit = budget.remaining(budget.http);
            let ctx = ProxyContext::new(proxy, limit, supervisor.daemon());
            async move {
                sink.check_started("http", shown_url(&target.url), limit)
                    .await;
                let result = crate::checks::http::check_http(target, &ctx).await;
                sink.check(result).await;
            }
        });
        let gits = self.git.iter().map(|target| {
            let limit = budget.remaining(budget.git);
            let ctx = ProxyContext::new(proxy, limit, supervisor.daemon());
            async move {
                sink.check_started("git", shown_url(&target.url), limit)
                    .await;
                let result = crate::checks::git::check_git(target, &ctx).await;
                sink.check(result).await;
            }
        });
        futures::join!(netmap_then_pings, join_all(https), join_all(gits));
    }

    /// A skip result for every target, with the reason they could not run.
    pub fn skipped(&self, reason: &str, hint: &str) -> Vec<CheckResult> {
        let skip = |name: &'static str, target: String, layer: Layer| {
            Outcome::start(name, target, layer).skip(reason, hint)
        };
        let mut results = Vec::new();
        for target in self.ping {
            results.push(skip("ping", target.address.clone(), Layer::Ping));
        }
        for target in self.http {
            results.push(skip("http", shown_url(&target.url), Layer::Http));
        }
        for target in self.git {
            results.push(skip("git", shown_url(&target.url), Layer::Git));
        }
        results
    }

    /// The checks phase when there is no node to check over: every target is skipped.
    pub async fn skip_all(&self, sink: &EventSink, reason: &str, hint: &str) {
        run_phase(sink, Phase::Checks, async {
            for result in self.skipped(reason, hint) {
                sink.check(result).await;
            }
        })
        .await;
    }
}
