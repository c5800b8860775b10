//! Checking the requested targets over a running node: netmap visibility first, then ping, HTTP
//! and git concurrently. The one-shot `Run` and the sidecar's `Check` share this runner.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::future::join_all;
use tailbox_proto::agent::v1::{
    CheckResult, FailureClass, GitTarget, HttpTarget, Layer, Phase, PingTarget,
};
use tokio_util::sync::CancellationToken;

use crate::checks::tailnet::{self, Visibility};
use crate::checks::{Outcome, ProxyContext};
use crate::daemon::supervisor::Supervisor;
use crate::events::{EventSink, run_phase};
use crate::redact::redact_url;

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
                    for result in self.skipped("the run was cancelled before this check finished", "") {
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
        let api = supervisor.api();
        let proxy = supervisor.proxy();
        // Netmap visibility first, once per tailnet host any target names.
        let hosts: Vec<IpAddr> = self.hosts();
        let netmap_limit = budget.remaining(budget.netmap);
        let netmap_results = join_all(hosts.iter().map(|&ip| async move {
            let result = tailnet::check_netmap(api, ip, netmap_limit).await;
            sink.check(result.clone()).await;
            (ip, Visibility::of(&result))
        }))
        .await;
        let visibility = |ip: IpAddr| {
            netmap_results
                .iter()
                .find(|(host, _)| *host == ip)
                .map_or(Visibility::Unknown, |(_, v)| *v)
        };

        let daemon = supervisor.readiness();
        let pings = self.ping.iter().map(|target| {
            let daemon = daemon.clone();
            async move {
                let outcome = Outcome::start("ping", target.address.clone(), Layer::Ping);
                let Ok(ip) = target.address.trim().parse::<IpAddr>() else {
                    sink.check(outcome.fail(
                        FailureClass::InvalidInput,
                        Layer::Ping,
                        format!("{:?} is not an IP address", target.address),
                        "ping takes the dev host's tailnet IP",
                        None,
                    ))
                    .await;
                    return;
                };
                let limit = budget.remaining(budget.ping);
                let (result, warning) =
                    tailnet::check_ping(api, ip, visibility(ip), limit, &daemon).await;
                if let Some(warning) = warning {
                    sink.warning(warning).await;
                }
                sink.check(result).await;
            }
        });
        let https = self.http.iter().map(|target| {
            let ctx = proxy_context(proxy, budget.remaining(budget.http), supervisor);
            async move {
                let result = crate::checks::http::check_http(target, &ctx).await;
                sink.check(result).await;
            }
        });
        let gits = self.git.iter().map(|target| {
            let ctx = proxy_context(proxy, budget.remaining(budget.git), supervisor);
            async move {
                let result = crate::checks::git::check_git(target, &ctx).await;
                sink.check(result).await;
            }
        });
        futures::join!(join_all(pings), join_all(https), join_all(gits));
    }

    /// Tailnet hosts the targets name: ping addresses and IP-literal hosts of HTTP/git URLs.
    fn hosts(&self) -> Vec<IpAddr> {
        let mut hosts = BTreeSet::new();
        for target in self.ping {
            if let Ok(ip) = target.address.trim().parse::<IpAddr>() {
                hosts.insert(ip);
            }
        }
        let url_hosts = self
            .http
            .iter()
            .map(|t| t.url.as_str())
            .chain(self.git.iter().map(|t| t.url.as_str()));
        for url in url_hosts {
            if let Some(ip) = url::Url::parse(url).ok().and_then(|u| match u.host() {
                Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
                Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
                _ => None,
            }) && tailnet::is_tailnet_ip(ip)
            {
                hosts.insert(ip);
            }
        }
        hosts.into_iter().collect()
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
            results.push(skip("http", redact_url(&target.url), Layer::Http));
        }
        for target in self.git {
            results.push(skip("git", redact_url(&target.url), Layer::Git));
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

fn proxy_context(proxy: SocketAddr, limit: Duration, supervisor: &Supervisor) -> ProxyContext {
    ProxyContext {
        socks_addr: proxy,
        deadline: tokio::time::Instant::now() + limit,
        daemon: supervisor.readiness(),
    }
}
