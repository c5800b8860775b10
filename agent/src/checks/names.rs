//! Tailnet targets by name: a peer's host name, MagicDNS name or FQDN, resolved from the netmap
//! (the LocalAPI's status), never through the system's DNS.
//!
//! A name is matched the way `tailscale ping` does, most specific first: the full MagicDNS name
//! (FQDN), then its first label (the MagicDNS short name), then the OS host name. The first kind
//! that matches decides; two peers matching at that level make the name ambiguous.

use std::fmt;
use std::net::IpAddr;

use crate::localapi::{PeerStatus, Status};

/// How many similar names an unknown name's failure offers.
const CLOSEST: usize = 3;

/// What a ping or netmap wait is aimed at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A tailnet (or routed) IP.
    Ip(IpAddr),
    /// A peer's name, lower-case, without a trailing dot.
    Name(String),
}

impl Target {
    /// An IP literal, or something that can be a DNS name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if let Ok(ip) = raw.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(Self::Ip(ip));
        }
        let name = raw.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |label: &str| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{raw:?} is neither an IP address nor a host name (letters, digits and dashes, \
                 in dot-separated labels)"
            ));
        }
        Ok(Self::Name(name))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => ip.fmt(f),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// What a name resolved to in the netmap.
#[derive(Debug)]
pub enum Resolution<'a> {
    /// Exactly one peer.
    Peer(&'a PeerStatus),
    /// More than one peer at the most specific level that matched.
    Ambiguous(Vec<&'a PeerStatus>),
    /// No peer.
    Unknown,
}

/// The peer's MagicDNS name without the trailing dot, or its host name when it has none.
pub fn peer_name(peer: &PeerStatus) -> String {
    let dns = peer.dns_name.trim_end_matches('.');
    if dns.is_empty() {
        peer.host_name.to_ascii_lowercase()
    } else {
        dns.to_ascii_lowercase()
    }
}

/// The MagicDNS short name: the first label of the MagicDNS name.
fn short_name(peer: &PeerStatus) -> String {
    let name = peer_name(peer);
    name.split('.').next().unwrap_or_default().to_owned()
}

/// Resolves `name` (as [`Target::parse`] leaves it) among the peers of `status`.
pub fn resolve<'a>(status: &'a Status, name: &str) -> Resolution<'a> {
    let peers: Vec<&PeerStatus> = status.peer.iter().flat_map(|m| m.values()).collect();
    let fqdn = |p: &PeerStatus| !p.dns_name.is_empty() && peer_name(p) == name;
    let short =
        |p: &PeerStatus| !name.contains('.') && !p.dns_name.is_empty() && short_name(p) == name;
    let host = |p: &PeerStatus| p.host_name.eq_ignore_ascii_case(name);
    let levels: [&dyn Fn(&PeerStatus) -> bool; 3] = [&fqdn, &short, &host];
    for matches in levels {
        let mut found: Vec<&PeerStatus> = peers.iter().copied().filter(|p| matches(p)).collect();
        found.sort_by_key(|p| peer_name(p));
        match found.len() {
            0 => continue,
            1 => return Resolution::Peer(found[0]),
            _ => return Resolution::Ambiguous(found),
        }
    }
    Resolution::Unknown
}

/// Whether `name` is a peer's MagicDNS name, full or short: the names tailscaled resolves from
/// the netmap rather than through DNS.
pub fn is_magicdns_name(status: &Status, name: &str) -> bool {
    status.peer.iter().flat_map(|m| m.values()).any(|peer| {
        !peer.dns_name.is_empty()
            && (peer_name(peer) == name || (!name.contains('.') && short_name(peer) == name))
    })
}

/// The names of the peers closest to `name` (edit distance), closest first, at most three.
pub fn closest_peers(status: &Status, name: &str) -> Vec<String> {
    let mut scored: Vec<(usize, String)> = status
        .peer
        .iter()
        .flat_map(|m| m.values())
        .map(|peer| {
            let full = peer_name(peer);
            // A short name is compared with short names, an FQDN with FQDNs.
            let compared = if name.contains('.') {
                full.clone()
            } else {
                short_name(peer)
            };
            (strsim::levenshtein(name, &compared), full)
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(CLOSEST).map(|(_, n)| n).collect()
}

/// The address to ping a peer at: its first IPv4, else its first address.
pub fn ping_address(peer: &PeerStatus) -> Option<IpAddr> {
    let ips: Vec<IpAddr> = peer
        .tailscale_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| ips.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn peer(id: &str, host: &str, dns: &str, ip: &str) -> PeerStatus {
        PeerStatus {
            id: id.into(),
            host_name: host.into(),
            dns_name: dns.into(),
            tailscale_ips: Some(vec![ip.into(), "fd7a:115c:a1e0::9".into()]),
            ..Default::default()
        }
    }

    fn status(peers: Vec<PeerStatus>) -> Status {
        Status {
            peer: Some(
                peers
                    .into_iter()
                    .map(|p| (format!("nodekey:{}", p.id), p))
                    .collect::<HashMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn resolved(status: &Status, name: &str) -> Option<String> {
        match resolve(status, name) {
            Resolution::Peer(p) => Some(p.id.clone()),
            _ => None,
        }
    }

    #[test]
    fn targets_are_ips_or_names() {
        assert_eq!(
            Target::parse(" 100.64.0.1 ").unwrap(),
            Target::Ip("100.64.0.1".parse().unwrap())
        );
        assert_eq!(
            Target::parse("[fd7a:115c:a1e0::1]").unwrap(),
            Target::Ip("fd7a:115c:a1e0::1".parse().unwrap())
        );
        assert_eq!(
            Target::parse("DevHost.tail1234.ts.net.").unwrap(),
            Target::Name("devhost.tail1234.ts.net".into())
        );
        for bad in [
            "",
            "not a host!",
            "a..b",
            &"x".repeat(64),
            "http://devhost/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_match_fqdn_then_short_name_then_host_name() {
        let s = status(vec![
            peer("1", "macbook", "devhost.tail1234.ts.net.", "100.64.0.1"),
            peer("2", "devhost", "devhost-1.tail1234.ts.net.", "100.64.0.2"),
            peer("3", "ci", "ci.tail1234.ts.net.", "100.64.0.3"),
        ]);
        assert_eq!(
            resolved(&s, "devhost.tail1234.ts.net").as_deref(),
            Some("1")
        );
        // The MagicDNS short name wins over another machine's OS host name.
        assert_eq!(resolved(&s, "devhost").as_deref(), Some("1"));
        assert_eq!(resolved(&s, "devhost-1").as_deref(), Some("2"));
        assert_eq!(resolved(&s, "macbook").as_deref(), Some("1"));
        assert!(matches!(resolve(&s, "nope"), Resolution::Unknown));
        assert!(matches!(
            resolve(&s, "devhost.other.ts.net"),
            Resolution::Unknown
        ));
    }

    #[test]
    fn magicdns_names_are_full_or_short_names_never_host_names() {
        let s = status(vec![peer(
            "1",
            "macbook",
            "devhost.tail1234.ts.net.",
            "100.64.0.1",
        )]);
        assert!(is_magicdns_name(&s, "devhost.tail1234.ts.net"));
        assert!(is_magicdns_name(&s, "devhost"));
        assert!(!is_magicdns_name(&s, "macbook"));
        assert!(!is_magicdns_name(&s, "devhost.example.com"));
    }

    #[test]
    fn a_name_two_peers_share_is_ambiguous() {
        // Two tailnets' nodes shared into one: the same short name twice.
        let s = status(vec![
            peer("1", "a", "devhost.tail1.ts.net.", "100.64.0.1"),
            peer("2", "b", "devhost.tail2.ts.net.", "100.64.0.2"),
        ]);
        match resolve(&s, "devhost") {
            Resolution::Ambiguous(peers) => {
                let names: Vec<String> = peers.iter().map(|p| peer_name(p)).collect();
                assert_eq!(names, ["devhost.tail1.ts.net", "devhost.tail2.ts.net"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(resolved(&s, "devhost.tail2.ts.net").as_deref(), Some("2"));
    }

    #[test]
    fn the_closest_names_come_first() {
        let s = status(vec![
            peer("1", "devhost", "devhost.lab.test.", "100.64.0.1"),
            peer("2", "ci", "ci-runner.lab.test.", "100.64.0.2"),
            peer("3", "db", "db.lab.test.", "100.64.0.3"),
            peer("4", "x", "devbox.lab.test.", "100.64.0.4"),
        ]);
        assert_eq!(
            closest_peers(&s, "devhots"),
            ["devhost.lab.test", "devbox.lab.test", "db.lab.test"]
        );
        assert_eq!(closest_peers(&s, "devhost.lab.tset")[0], "devhost.lab.test");
        assert!(closest_peers(&Status::default(), "x").is_empty());
    }

    #[test]
    fn pings_go_to_the_first_ipv4() {
        let p = peer("1", "h", "h.", "100.64.0.7");
        assert_eq!(ping_address(&p), Some("100.64.0.7".parse().unwrap()));
    }
}
