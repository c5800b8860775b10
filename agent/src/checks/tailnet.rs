//! Checks answered by the LocalAPI: the node's status, whether a target peer is visible in the
//! netmap, and disco pings. Targets are IPs or names ([`names`]).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tailbox_proto::agent::v1::{
    CheckResult, FailureClass, GitTarget, HttpTarget, Layer, NetmapEvidence, PingEvidence,
    PingPath, PingTarget, TailnetStatusEvidence, Warning, check_result,
};

use super::names::{self, Resolution, Target};
use super::{Daemon, HEALTH_PROBE, Outcome};
use crate::events::duration;
use crate::localapi::{LocalApi, LocalApiError, PeerStatus, Status};

/// IPN bus mask for waiting on peers: NotifyInitialState | NotifyPeerChanges. Any message is
/// only a cue to re-read the status, so a daemon that ignores a bit costs nothing.
const BUS_MASK_PEERS: u64 = 2 | 4096;
/// Re-read the status at least this often while waiting (older daemons push fewer changes).
const STATUS_REFRESH: Duration = Duration::from_secs(1);
/// Per-ping timeout; tailscaled itself has none for disco pings.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// After a relayed pong, keep pinging this long to see whether a direct path comes up.
const UNTIL_DIRECT_WINDOW: Duration = Duration::from_secs(3);
/// A ping unanswered this long is joined by another (the wait doubles for each further one, up
/// to [`PING_TIMEOUT`]). A fresh node's first disco ping can be dropped by a peer that has not yet
/// learned of the node, and tailscaled never sends it again: waiting it out cost 5 s.
const HEDGE_FIRST: Duration = Duration::from_millis(200);
/// Pings in flight at once, at most.
const MAX_IN_FLIGHT: usize = 4;
/// After a relayed pong, the next ping goes out this soon (the wait doubles up to
/// [`RETRY_INTERVAL`]): a direct path often comes up within milliseconds of the first pong.
const RELAYED_FIRST: Duration = Duration::from_millis(25);
/// The longest wait between pings after an answer (a relayed pong, or an error).
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// The node's own status after login.
pub async fn check_status(api: &LocalApi) -> (CheckResult, Option<Status>) {
    let outcome = Outcome::start("status", "", Layer::Control);
    let status = match api.status(true).await {
        Ok(status) => status,
        Err(err) => {
            return (
                outcome.fail(
                    FailureClass::DaemonFailed,
                    Layer::Daemon,
                    format!("reading tailscaled's status failed: {err}"),
                    "See tailscaled's log tail.",
                    None,
                ),
                None,
            );
        }
    };
    (status_result(&outcome, &status), Some(status))
}

/// The status check's result for what tailscaled said.
pub(crate) fn status_result(outcome: &Outcome, status: &Status) -> CheckResult {
    let self_node = status.self_node.clone().unwrap_or_default();
    let evidence = TailnetStatusEvidence {
        backend_state: status.backend_state.clone(),
        self_ips: status.tailscale_ips.clone().unwrap_or_default(),
        dns_name: self_node.dns_name.trim_end_matches('.').to_owned(),
        home_derp: self_node.relay.clone(),
        health: status.health.clone().unwrap_or_default(),
        version: status.version.clone(),
        peer_count: u32::try_from(status.peer.as_ref().map_or(0, |p| p.len())).unwrap_or(u32::MAX),
    };
    let detail = format!(
        "{} as {} ({}), home DERP {}, {} peer(s)",
        evidence.backend_state,
        if evidence.dns_name.is_empty() {
            "?"
        } else {
            &evidence.dns_name
        },
        evidence.self_ips.join(", "),
        if evidence.home_derp.is_empty() {
            "none"
        } else {
            &evidence.home_derp
        },
        evidence.peer_count,
    );
    if evidence.backend_state != "Running" {
        outcome.fail(
            FailureClass::Deadline,
            Layer::Login,
            format!("the node is {}, not Running", evidence.backend_state),
            "See tailscaled's log tail.",
            Some(check_result::Evidence::TailnetStatus(evidence)),
        )
    } else if evidence.home_derp.is_empty() {
        outcome.warn(
            detail,
            "No home DERP region: relayed fallback paths will not work; outbound UDP 3478 and \
             HTTPS to DERP must be allowed.",
            check_result::Evidence::TailnetStatus(evidence),
        )
    } else {
        outcome.pass(detail, check_result::Evidence::TailnetStatus(evidence))
    }
}

/// The Tailscale address ranges: 100.64.0.0/10 and fd7a:115c:a1e0::/48.
pub fn is_tailnet_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 100 && (o[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
        }
    }
}

/// The peer that owns `ip`, if any.
fn find_peer(status: &Status, ip: IpAddr) -> Option<&PeerStatus> {
    status.peer.as_ref()?.values().find(|peer| {
        peer.tailscale_ips
            .iter()
            .flatten()
            .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
    })
}

/// Whether any peer routes `ip` (subnet routers and exit nodes make non-tailnet IPs reachable).
fn routed_by_a_peer(status: &Status, ip: IpAddr) -> bool {
    status.peer.iter().flat_map(|m| m.values()).any(|peer| {
        peer.allowed_ips
            .iter()
            .flatten()
            .any(|prefix| prefix_contains(prefix, ip))
    })
}

fn prefix_contains(prefix: &str, ip: IpAddr) -> bool {
    let Some((net, len)) = prefix.split_once('/') else {
        return prefix.parse::<IpAddr>().ok() == Some(ip);
    };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// What one look at the netmap found for a target.
pub(crate) enum Sighting<'a> {
    /// The peer the target names.
    Peer(&'a PeerStatus),
    /// A name more than one peer has.
    Ambiguous(Vec<&'a PeerStatus>),
    /// An IP no peer has or routes, outside the tailnet ranges: it never will be there.
    NotTailnet,
    /// Not there (yet).
    Absent,
}

pub(crate) fn sight<'a>(status: &'a Status, target: &Target) -> Sighting<'a> {
    match target {
        Target::Ip(ip) => match find_peer(status, *ip) {
            Some(peer) => Sighting::Peer(peer),
            None if !is_tailnet_ip(*ip) && !routed_by_a_peer(status, *ip) => Sighting::NotTailnet,
            None => Sighting::Absent,
        },
        Target::Name(name) => match names::resolve(status, name) {
            Resolution::Peer(peer) => Sighting::Peer(peer),
            Resolution::Ambiguous(peers) => Sighting::Ambiguous(peers),
            Resolution::Unknown => Sighting::Absent,
        },
    }
}

/// The hosts whose netmap visibility the run waits for: every ping target (IP or name) and the
/// tailnet IP literals of HTTP and git URLs. URL names are left to tailscaled: they may be
/// public names, which are never in the netmap.
pub fn netmap_targets(ping: &[PingTarget], http: &[HttpTarget], git: &[GitTarget]) -> Vec<Target> {
    let mut hosts = BTreeSet::new();
    for target in ping {
        if let Ok(target) = Target::parse(&target.address) {
            hosts.insert(target);
        }
    }
    let urls = http
        .iter()
        .map(|t| t.url.as_str())
        .chain(git.iter().map(|t| t.url.as_str()));
    for url in urls {
        if let Some(ip) = url::Url::parse(url).ok().and_then(|u| match u.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        }) && is_tailnet_ip(ip)
        {
            hosts.insert(Target::Ip(ip));
        }
    }
    hosts.into_iter().collect()
}

/// Waits (bounded) until the peer `target` names is in the netmap and online.
pub async fn check_netmap(daemon: &Daemon, target: &Target, limit: Duration) -> CheckResult {
    let outcome = Outcome::start("netmap", target.to_string(), Layer::PeerVisible);
    let api = daemon.api();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut bus = match tokio::time::timeout_at(deadline, api.watch_ipn_bus(BUS_MASK_PEERS)).await {
        Ok(Ok(bus)) => Some(bus),
        Ok(Err(err)) => {
            tracing::debug!("no IPN bus for the netmap wait, polling status instead: {err}");
            None
        }
        Err(_) => None,
    };
    let mut last_error = None;
    let mut last_status = None;
    let mut seen_offline: Option<PeerStatus> = None;
    loop {
        // The last look, at the deadline, still gets the time a healthy LocalAPI needs.
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining.max(HEALTH_PROBE), api.status(true)).await {
            Ok(Ok(status)) => {
                match sight(&status, target) {
                    Sighting::Peer(peer) if peer.online => {
                        return outcome.pass(
                            format!(
                                "{} is in the netmap and online (visible after {})",
                                peer_label(peer),
                                humanize(started.elapsed())
                            ),
                            check_result::Evidence::Netmap(netmap_evidence(
                                peer,
                                true,
                                started.elapsed(),
                            )),
                        );
                    }
                    Sighting::Peer(peer) => seen_offline = Some(peer.clone()),
                    Sighting::Ambiguous(peers) => {
                        let names: Vec<String> =
                            peers.iter().map(|p| names::peer_name(p)).collect();
                        return outcome.fail(
                            FailureClass::InvalidInput,
                            Layer::PeerVisible,
                            format!("{target} names {} peers: {}", names.len(), names.join(", ")),
                            "Name one peer: give its full MagicDNS name (FQDN) or its tailnet IP.",
                            Some(check_result::Evidence::Netmap(NetmapEvidence::default())),
                        );
                    }
                    Sighting::NotTailnet => {
                        return outcome.fail(
                            FailureClass::PeerNotInNetmap,
                            Layer::PeerVisible,
                            format!("{target} is not a tailnet address and no peer routes it"),
                            "Use the dev host's tailnet IP (`tailscale ip -4` on the dev host); \
                             tailnet addresses are in 100.64.0.0/10 or fd7a:115c:a1e0::/48.",
                            Some(check_result::Evidence::Netmap(NetmapEvidence::default())),
                        );
                    }
                    Sighting::Absent => {}
                }
                last_status = Some(status);
            }
            Ok(Err(err)) => last_error = Some(err.to_string()),
            Err(_) => {
                // The LocalAPI did not answer before the deadline: is tailscaled stuck?
                if let Some(fault) = daemon.fault_after_timeout("the netmap wait").await {
                    return outcome.fail(
                        fault.class,
                        Layer::Daemon,
                        fault.detail,
                        fault.hint,
                        None,
                    );
                }
                last_error = Some("the LocalAPI's status was slow to answer".into());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        // Wake on any bus message (a peer change), a refresh tick, or the deadline.
        let wake = async {
            match bus.as_mut() {
                Some(watcher) => match tokio::time::timeout(STATUS_REFRESH, watcher.next()).await {
                    Ok(Ok(Some(_))) | Err(_) => {}
                    Ok(Ok(None)) | Ok(Err(_)) => bus = None,
                },
                None => tokio::time::sleep(STATUS_REFRESH).await,
            }
        };
        tokio::select! {
            () = wake => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
    if let Some(peer) = seen_offline {
        // Present but not reported online: keep going (the ping decides), with a caveat.
        return outcome.warn(
            format!(
                "{} is in the netmap but control reports it offline",
                peer_label(&peer)
            ),
            "If the following checks fail, make sure tailscale is running on the dev host.",
            check_result::Evidence::Netmap(netmap_evidence(&peer, false, started.elapsed())),
        );
    }
    let closest = match (target, &last_status) {
        (Target::Name(name), Some(status)) => names::closest_peers(status, name),
        _ => Vec::new(),
    };
    let what = match target {
        Target::Ip(ip) => format!("no node with address {ip}"),
        Target::Name(name) => format!("no peer named {name}"),
    };
    let mut detail = format!("{what} appeared in the netmap within {}", humanize(limit));
    if let Some(err) = last_error {
        detail.push_str(&format!(" (last status error: {err})"));
    }
    if !closest.is_empty() {
        detail.push_str(&format!("; closest peers: {}", closest.join(", ")));
    }
    let hint = match target {
        Target::Ip(_) => {
            "Check the address (`tailscale ip -4` on the dev host), that the dev host \
                          is logged in to the same tailnet, and that the tailnet policy (ACLs) \
                          lets the sandbox's node see it."
        }
        Target::Name(_) => {
            "Check the name (`tailscale status` on the dev host shows its MagicDNS \
                            name), that the dev host is logged in to the same tailnet, and that \
                            the tailnet policy (ACLs) lets the sandbox's node see it."
        }
    };
    outcome.fail(
        FailureClass::PeerNotInNetmap,
        Layer::PeerVisible,
        detail,
        hint,
        Some(check_result::Evidence::Netmap(NetmapEvidence {
            closest_peers: closest,
            ..NetmapEvidence::default()
        })),
    )
}

fn netmap_evidence(peer: &PeerStatus, online: bool, waited: Duration) -> NetmapEvidence {
    NetmapEvidence {
        in_netmap: true,
        online,
        peer_hostname: peer.host_name.clone(),
        peer_dns_name: peer.dns_name.trim_end_matches('.').to_owned(),
        time_to_visible: Some(duration(waited)),
        peer_ips: peer.tailscale_ips.clone().unwrap_or_default(),
        closest_peers: Vec::new(),
    }
}

fn peer_label(peer: &PeerStatus) -> String {
    let name = peer.dns_name.trim_end_matches('.');
    if name.is_empty() {
        peer.host_name.clone()
    } else {
        name.to_owned()
    }
}

/// What the netmap check concluded about a target, used to classify a failed ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Online in the netmap.
    Online,
    /// In the netmap, reported offline.
    Offline,
    /// Not in the netmap.
    Absent,
    /// Not checked.
    Unknown,
}

impl Visibility {
    /// Reads the netmap check's result.
    pub fn of(result: &CheckResult) -> Self {
        match &result.evidence {
            Some(check_result::Evidence::Netmap(n)) if n.in_netmap && n.online => Self::Online,
            Some(check_result::Evidence::Netmap(n)) if n.in_netmap => Self::Offline,
            Some(check_result::Evidence::Netmap(_)) => Self::Absent,
            _ => Self::Unknown,
        }
    }
}

/// Pings the peer `raw` names with disco pings until a pong or the deadline; a relayed path
/// passes with a warning. A name is pinged at the address its netmap check (in `netmap`)
/// resolved it to. Errors from tailscaled ("no matching peer") are retried until the deadline,
/// because netmap propagation can lag.
pub async fn check_ping(
    daemon: &Daemon,
    raw: &str,
    netmap: &[(Target, CheckResult)],
    limit: Duration,
) -> (CheckResult, Option<Warning>) {
    let outcome = Outcome::start("ping", raw.trim(), Layer::Ping);
    let target = match Target::parse(raw) {
        Ok(target) => target,
        Err(why) => {
            let hint = "Ping takes the dev host's tailnet IP or its name (host name, MagicDNS \
                        name or FQDN).";
            return (
                outcome.fail(FailureClass::InvalidInput, Layer::Ping, why, hint, None),
                None,
            );
        }
    };
    let seen = netmap.iter().find(|(t, _)| *t == target).map(|(_, r)| r);
    let visibility = seen.map_or(Visibility::Unknown, Visibility::of);
    let ip = match &target {
        Target::Ip(ip) => *ip,
        Target::Name(name) => match seen.and_then(resolved_ip) {
            Some(ip) => ip,
            None => return (unresolved(&outcome, name, seen), None),
        },
    };
    let api = daemon.api();
    let address = ip.to_string();
    let deadline = tokio::time::Instant::now() + limit;
    let mut pace = PingPace::default();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut next_ping = tokio::time::Instant::now();
    let mut attempts = 0u32;
    let mut best: Option<crate::localapi::PingResult> = None;
    let mut first_pong: Option<tokio::time::Instant> = None;
    let mut last_problem = String::from("no pong");
    loop {
        let now = tokio::time::Instant::now();
        let mut until = deadline;
        if let Some(at) = first_pong {
            until = until.min(at + UNTIL_DIRECT_WINDOW);
        }
        if now >= until {
            break;
        }
        if now >= next_ping && in_flight.len() < MAX_IN_FLIGHT {
            attempts += 1;
            let limit = (deadline - now).min(PING_TIMEOUT);
            in_flight.push(api.ping(&address, "disco", limit));
            next_ping = now + pace.sent();
        }
        let wake = if in_flight.len() < MAX_IN_FLIGHT {
            next_ping.min(until)
        } else {
            until
        };
        let answer = tokio::select! {
            Some(answer) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => answer,
            () = tokio::time::sleep_until(wake) => continue,
        };
        let now = tokio::time::Instant::now();
        match answer {
            Ok(pong) if pong.err.is_empty() => {
                let direct = !pong.endpoint.is_empty();
                first_pong.get_or_insert(now);
                if best.as_ref().is_none_or(|b| {
                    rank(&pong) > rank(b)
                        || (rank(&pong) == rank(b) && pong.latency_seconds < b.latency_seconds)
                }) {
                    best = Some(pong);
                }
                if direct {
                    break;
                }
                next_ping = now + pace.relayed();
            }
            Ok(pong) if pong.is_local_ip => {
                return (
                    outcome.fail(
                        FailureClass::InvalidInput,
                        Layer::Ping,
                        format!("{ip} is this sandbox's own tailnet address"),
                        "Ping the dev host's tailnet IP or name instead.",
                        None,
                    ),
                    None,
                );
            }
            Ok(pong) => {
                last_problem = pong.err;
                next_ping = now + pace.answered();
            }
            Err(LocalApiError::Timeout { .. }) => {
                last_problem = format!("no pong within {PING_TIMEOUT:?}");
            }
            Err(err @ LocalApiError::Connect { .. }) => {
                // tailscaled is down; wait for the supervisor to bring it back.
                last_problem = err.to_string();
                in_flight.clear();
                if !matches!(
                    tokio::time::timeout_at(deadline, daemon.wait()).await,
                    Ok(true)
                ) {
                    break;
                }
                pace = PingPace::default();
                next_ping = tokio::time::Instant::now();
            }
            Err(err) => {
                last_problem = err.to_string();
                next_ping = now + pace.answered();
            }
        }
    }
    drop(in_flight);
    match best {
        Some(pong) => pong_result(&outcome, ip, &pong, attempts),
        None => {
            if let Some(fault) = daemon.fault_after_timeout("the ping check").await {
                let result =
                    outcome.fail(fault.class, Layer::Daemon, fault.detail, fault.hint, None);
                return (result, None);
            }
            // tailscaled's own word on its relays: a peer that answers nothing while no DERP
            // relay can be reached is cut off at the DERP layer, not at the peer.
            let derp_trouble = match visibility {
                Visibility::Absent | Visibility::Offline => None,
                _ => derp_unreachable(api).await,
            };
            if let Some(health) = derp_trouble {
                return (
                    outcome.fail(
                        FailureClass::DerpUnreachable,
                        Layer::Derp,
                        format!(
                            "no pong from {ip} in {attempts} attempt(s) over {}, and no DERP \
                             relay is reachable: {health}",
                            humanize(limit)
                        ),
                        "No direct path came up and the DERP relay cannot be reached: allow \
                         HTTPS (TCP 443) to the DERP servers from the sandbox, or UDP both ways \
                         between the sandbox and the dev host.",
                        Some(check_result::Evidence::Ping(PingEvidence {
                            attempts,
                            ..Default::default()
                        })),
                    ),
                    None,
                );
            }
            let (class, layer, hint) = match visibility {
                Visibility::Absent => (
                    FailureClass::PeerNotInNetmap,
                    Layer::PeerVisible,
                    "The address is not a node this sandbox can see in the tailnet; check it and \
                     the tailnet policy.",
                ),
                Visibility::Offline => (
                    FailureClass::PeerOffline,
                    Layer::PeerVisible,
                    "The dev host is offline on the tailnet: start tailscale there \
                     (`tailscale up`).",
                ),
                _ => (
                    FailureClass::PingNoReply,
                    Layer::Ping,
                    "The peer is in the netmap but did not answer: the dev host's tailscaled may \
                     be stuck, or UDP is blocked both ways and DERP unreachable.",
                ),
            };
            (
                outcome.fail(
                    class,
                    layer,
                    format!(
                        "no pong from {ip} in {attempts} attempt(s) over {}: {last_problem}",
                        humanize(limit)
                    ),
                    hint,
                    Some(check_result::Evidence::Ping(PingEvidence {
                        attempts,
                        ..Default::default()
                    })),
                ),
                None,
            )
        }
    }
}

/// Why no DERP relay of tailscaled's DERP map can be reached, or `None` when one can (or the
/// map is unknown): a TCP connection to each relay node, 2 s each, as the login's probe of the
/// control server does.
async fn derp_unreachable(api: &crate::localapi::LocalApi) -> Option<String> {
    let map = tokio::time::timeout(Duration::from_secs(2), api.derp_map())
        .await
        .ok()?
        .ok()?;
    let mut nodes = Vec::new();
    for region in map["Regions"].as_object()?.values() {
        for node in region["Nodes"].as_array().into_iter().flatten() {
            let host = node["IPv4"]
                .as_str()
                .filter(|h| !h.is_empty())
                .or(node["HostName"].as_str())?;
            let port = match node["DERPPort"].as_u64() {
                None | Some(0) => 443,
                Some(p) => u16::try_from(p).ok()?,
            };
            nodes.push((host.to_owned(), port));
        }
    }
    let mut failures = Vec::new();
    for (host, port) in nodes {
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(_)) => return None,
            Ok(Err(err)) => failures.push(format!("{host}:{port}: {err}")),
            Err(_) => failures.push(format!("{host}:{port}: no answer within 2s")),
        }
    }
    (!failures.is_empty()).then(|| failures.join("; "))
}

/// The address a passed netmap check resolved its peer to (IPv4 first).
fn resolved_ip(netmap: &CheckResult) -> Option<IpAddr> {
    let Some(check_result::Evidence::Netmap(evidence)) = &netmap.evidence else {
        return None;
    };
    let ips: Vec<IpAddr> = evidence
        .peer_ips
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied()
}

/// A ping of a name its netmap check did not resolve: it fails the way the netmap check did.
fn unresolved(outcome: &Outcome, name: &str, netmap: Option<&CheckResult>) -> CheckResult {
    match netmap {
        Some(seen) => outcome.fail(
            FailureClass::try_from(seen.failure_class).unwrap_or(FailureClass::PeerNotInNetmap),
            Layer::try_from(seen.layer).unwrap_or(Layer::PeerVisible),
            format!("{name} cannot be pinged: {}", seen.detail),
            seen.hint.clone(),
            None,
        ),
        None => outcome.fail(
            FailureClass::Internal,
            Layer::Ping,
            format!("{name} was never looked up in the netmap"),
            "This is a bug in tailbox; please report it with the output above.",
            None,
        ),
    }
}

/// When the ping check sends its next disco ping, relative to now.
#[derive(Debug, Clone, Copy)]
struct PingPace {
    /// Until another joins a ping that is not answered.
    hedge: Duration,
    /// Until the next ping after a relayed pong.
    relayed: Duration,
}

impl Default for PingPace {
    fn default() -> Self {
        Self {
            hedge: HEDGE_FIRST,
            relayed: RELAYED_FIRST,
        }
    }
}

impl PingPace {
    /// A ping went out: the next joins it after the hedge wait, which then doubles.
    fn sent(&mut self) -> Duration {
        let wait = self.hedge;
        self.hedge = (self.hedge * 2).min(PING_TIMEOUT);
        wait
    }

    /// A relayed pong came back: ping again soon, then less often, in case a direct path
    /// comes up. An answer also resets the hedge.
    fn relayed(&mut self) -> Duration {
        let wait = self.relayed;
        self.relayed = (self.relayed * 2).min(RETRY_INTERVAL);
        self.hedge = HEDGE_FIRST;
        wait
    }

    /// tailscaled answered with an error (e.g. the peer is not known yet): try again later.
    fn answered(&mut self) -> Duration {
        self.hedge = HEDGE_FIRST;
        RETRY_INTERVAL
    }
}

/// Direct beats a peer relay beats DERP.
fn rank(pong: &crate::localapi::PingResult) -> u8 {
    if !pong.endpoint.is_empty() {
        2
    } else if !pong.peer_relay.is_empty() {
        1
    } else {
        0
    }
}

pub(crate) fn pong_result(
    outcome: &Outcome,
    ip: IpAddr,
    pong: &crate::localapi::PingResult,
    attempts: u32,
) -> (CheckResult, Option<Warning>) {
    // tailscaled's number, trusted only as far as a Duration can hold it (1e300 would panic).
    let latency = Duration::try_from_secs_f64(pong.latency_seconds.max(0.0)).unwrap_or_default();
    let path = if !pong.endpoint.is_empty() {
        PingPath::Direct
    } else if !pong.peer_relay.is_empty() {
        PingPath::PeerRelay
    } else {
        PingPath::Derp
    };
    let via = match path {
        PingPath::Direct => pong.endpoint.clone(),
        PingPath::PeerRelay => format!("peer-relay({})", pong.peer_relay),
        _ => format!("DERP({})", pong.derp_region_code),
    };
    let evidence = PingEvidence {
        latency: Some(duration(latency)),
        path: path as i32,
        endpoint: pong.endpoint.clone(),
        derp_region: pong.derp_region_code.clone(),
        derp_region_id: pong.derp_region_id,
        node_name: pong.node_name.clone(),
        node_ip: pong.node_ip.clone(),
        attempts,
    };
    let detail = format!(
        "pong from {} ({}) via {via} in {}",
        pong.node_name,
        pong.node_ip,
        humanize(latency)
    );
    if path == PingPath::Direct {
        return (
            outcome.pass(detail, check_result::Evidence::Ping(evidence)),
            None,
        );
    }
    let warning = Warning {
        code: "relayed-path".into(),
        message: format!("pings to {ip} are relayed ({via}); it works, with extra latency"),
        layer: Layer::Ping as i32,
    };
    (
        outcome.warn(
            detail,
            "A direct path needs UDP between the sandbox and the dev host; relayed is fine for \
             git and HTTP.",
            check_result::Evidence::Ping(evidence),
        ),
        Some(warning),
    )
}

pub use tailbox_proto::describe::humanize;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tailnet_ranges() {
        assert!(is_tailnet_ip("100.64.0.1".parse().unwrap()));
        assert!(is_tailnet_ip("100.127.255.254".parse().unwrap()));
        assert!(!is_tailnet_ip("100.128.0.1".parse().unwrap()));
        assert!(!is_tailnet_ip("10.0.0.5".parse().unwrap()));
        assert!(is_tailnet_ip("fd7a:115c:a1e0::5".parse().unwrap()));
        assert!(!is_tailnet_ip("fd7a:115c:a1e1::5".parse().unwrap()));
    }

    #[test]
    fn prefixes() {
        let ip = "10.1.2.3".parse().unwrap();
        assert!(prefix_contains("10.0.0.0/8", ip));
        assert!(!prefix_contains("10.1.3.0/24", ip));
        assert!(prefix_contains("0.0.0.0/0", ip));
        assert!(prefix_contains("10.1.2.3", ip));
        assert!(!prefix_contains("::/0", ip));
        assert!(!prefix_contains("garbage/99", ip));
    }

    #[test]
    fn unanswered_pings_are_joined_sooner_than_they_time_out_and_relayed_pongs_repeat_soon() {
        let mut pace = PingPace::default();
        let hedges: Vec<Duration> = (0..6).map(|_| pace.sent()).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            hedges,
            [ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(5000)]
        );
        let relayed: Vec<Duration> = (0..6).map(|_| pace.relayed()).collect();
        assert_eq!(
            relayed,
            [ms(25), ms(50), ms(100), ms(200), ms(400), ms(500)]
        );
        // An answer resets the hedge: the next unanswered ping is joined after 200 ms again.
        assert_eq!(pace.sent(), ms(200));
        assert_eq!(pace.answered(), RETRY_INTERVAL);
        assert_eq!(pace.sent(), ms(200));
    }

    #[test]
    fn relayed_pongs_warn_and_direct_ones_pass() {
        let outcome = Outcome::start("ping", "100.64.0.2", Layer::Ping);
        let ip = "100.64.0.2".parse().unwrap();
        let mut pong = crate::localapi::PingResult {
            node_name: "devhost".into(),
            node_ip: "100.64.0.2".into(),
            latency_seconds: 0.012,
            derp_region_id: 1,
            derp_region_code: "test".into(),
            ..Default::default()
        };
        let (result, warning) = pong_result(&outcome, ip, &pong, 1);
        assert_eq!(
            result.status,
            tailbox_proto::agent::v1::CheckStatus::Warn as i32
        );
        assert!(result.detail.contains("DERP(test)"), "{}", result.detail);
        assert_eq!(warning.unwrap().code, "relayed-path");

        pong.endpoint = "127.0.0.1:41641".into();
        let (result, warning) = pong_result(&outcome, ip, &pong, 2);
        assert_eq!(
            result.status,
            tailbox_proto::agent::v1::CheckStatus::Pass as i32
        );
        assert!(warning.is_none());
    }

    #[test]
    fn a_latency_no_duration_holds_is_no_panic() {
        let outcome = Outcome::start("ping", "100.64.0.2", Layer::Ping);
        let pong: crate::localapi::PingResult = serde_json::from_str(
            r#"{"NodeName":"devhost","LatencySeconds":1e300,"Endpoint":"127.0.0.1:41641"}"#,
        )
        .unwrap();
        let (result, _) = pong_result(&outcome, "100.64.0.2".parse().unwrap(), &pong, 1);
        assert!(result.detail.contains("in 0µs"), "{}", result.detail);
    }
}
