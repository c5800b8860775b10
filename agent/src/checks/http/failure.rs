//! Typed failures of connections through tailscaled's SOCKS5 proxy, shared by the HTTP and git
//! checks: what went wrong, at which layer, and what a person can do about it.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use tailbox_proto::agent::v1::{FailureClass, Layer};
use tokio::net::TcpStream;

use super::socks::{self, REPLY_GENERAL_FAILURE, SocksFailure};
use crate::checks::ProxyContext;

/// How long reqwest may take to open a tunnel (SOCKS handshake, tailscaled's dial, TLS).
/// tailscaled gives up dialing after 5 s, so this only fires when the proxy itself stalls.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A dial failure reported after at least this long means nothing answered (tailscaled retried
/// until it gave up, at most 5 s); a closed port answers with a reset within a round trip.
const NO_ANSWER_AFTER: Duration = Duration::from_millis(1500);

/// How long a dead proxy may look dead before the supervisor has noticed that tailscaled died.
const DAEMON_NOTICE_GRACE: Duration = Duration::from_secs(1);

/// Where a connection was going.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// Host as written in the URL (an IP literal or a name tailscaled resolves).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') && !self.host.starts_with('[') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Endpoint {
    fn is_name(&self) -> bool {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_err()
    }
}

/// One classified failure, ready to become a check result.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub class: FailureClass,
    pub layer: Layer,
    pub detail: String,
    pub hint: String,
    /// The proxy itself was unreachable or hung up: what a dead or restarting tailscaled looks
    /// like from here.
    pub proxy_down: bool,
    /// The failure happened while opening the connection (so a daemon restart could explain it).
    pub connection_level: bool,
    /// The tunnel failed once and then opened on a second try: worth one more attempt.
    pub transient: bool,
}

impl Failure {
    /// A failure that is not about opening the connection.
    pub(crate) fn new(
        class: FailureClass,
        layer: Layer,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self {
            class,
            layer,
            detail: detail.into(),
            hint: hint.into(),
            proxy_down: false,
            connection_level: false,
            transient: false,
        }
    }

    fn connection(class: FailureClass, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            connection_level: true,
            ..Self::new(class, Layer::Tcp, detail, hint)
        }
    }

    /// The check's deadline passed; `connected` says whether a connection was open by then.
    pub(crate) fn deadline(limit: Duration, connected: bool, what: &str, at: Layer) -> Self {
        let secs = limit.as_secs_f64();
        if connected {
            Self::new(
                FailureClass::Deadline,
                at,
                format!("connected, but {what} did not finish within the {secs:.1} s deadline"),
                "The server accepted the connection but answered too slowly; check the server \
                 (is it busy or stuck?), or give the check more time.",
            )
        } else {
            Self::connection(
                FailureClass::Deadline,
                format!(
                    "no connection through tailscaled's SOCKS5 proxy within the {secs:.1} s \
                     deadline"
                ),
                "The tunnel to the dev host did not open in time; check that the dev host is \
                 online in the netmap (tailscale status) and reachable (tailscale ping), or \
                 give the check more time.",
            )
        }
    }
}

/// The tunnel itself timed out in reqwest's connect step.
pub(crate) fn connect_timed_out(proxy: SocketAddr, to: &Endpoint) -> Failure {
    Failure::connection(
        FailureClass::SocksTimeout,
        format!(
            "opening a connection to {to} through the SOCKS5 proxy {proxy} took longer than {} s",
            CONNECT_TIMEOUT.as_secs()
        ),
        "tailscaled's SOCKS5 proxy accepted but did not complete the connection; check \
         tailscaled's log, and that the dev host is online in the netmap.",
    )
}

/// Classifies a SOCKS5 failure from [`socks::connect`].
fn from_socks(failure: &SocksFailure, proxy: SocketAddr, to: &Endpoint) -> Failure {
    match failure {
        SocksFailure::ProxyUnreachable(e) => Failure {
            proxy_down: true,
            ..Failure::connection(
                FailureClass::SocksRefused,
                format!("tailscaled's SOCKS5 proxy at {proxy} is not reachable: {e}"),
                format!(
                    "Nothing accepts connections on {proxy}: tailscaled is not running, or was \
                     started without --socks5-server={proxy}. Check the daemon result and \
                     tailscaled's log."
                ),
            )
        },
        SocksFailure::ProxyClosed(e) => Failure {
            proxy_down: true,
            ..Failure::connection(
                FailureClass::SocksRefused,
                format!("the SOCKS5 proxy at {proxy} closed the connection mid-handshake: {e}"),
                "tailscaled may have died or be restarting; check the daemon result and \
                 tailscaled's log.",
            )
        },
        SocksFailure::AuthRequired => Failure::connection(
            FailureClass::SocksRefused,
            format!("the SOCKS5 proxy at {proxy} demands authentication"),
            format!(
                "tailscaled's proxy needs no authentication, so something else listens on \
                 {proxy}; point the agent at tailscaled's --socks5-server address."
            ),
        ),
        SocksFailure::NotSocks5(what) => Failure::connection(
            FailureClass::SocksRefused,
            format!("{proxy} does not speak SOCKS5 ({what})"),
            format!(
                "Something other than tailscaled's SOCKS5 proxy listens on {proxy}; point the \
                 agent at tailscaled's --socks5-server address."
            ),
        ),
        SocksFailure::InvalidTarget(why) => Failure::new(
            FailureClass::InvalidInput,
            Layer::Tcp,
            format!("cannot ask the proxy for {to}: {why}"),
            "Fix the host in the URL.",
        ),
        SocksFailure::Reply {
            code,
            malformed_atyp,
            waited,
        } => {
            let malformed = match malformed_atyp {
                Some(atyp) => format!(
                    "; the reply was malformed (address type {atyp:#04x}, a known tailscaled \
                     bug, tailscale/tailscale#6144) and is read as a failed dial"
                ),
                None => String::new(),
            };
            let said = format!(
                "reply {code}, {}, after {} ms",
                socks::reply_text(*code),
                waited.as_millis()
            );
            if *code == REPLY_GENERAL_FAILURE && *waited >= NO_ANSWER_AFTER {
                Failure::connection(
                    FailureClass::SocksTimeout,
                    format!(
                        "tailscaled could not open TCP to {to}: nothing answered ({said} from \
                         its SOCKS5 proxy){malformed}"
                    ),
                    format!(
                        "Nothing answered at {} over the tailnet. Check that the address \
                         belongs to a peer that is online in the netmap (tailscale status), \
                         that ACLs let this node reach it, and that the port is right.",
                        to.host
                    ),
                )
            } else if matches!(*code, 7 | 8) {
                Failure::connection(
                    FailureClass::SocksRefused,
                    format!("the SOCKS5 proxy {proxy} rejected the request for {to} ({said})"),
                    "The proxy does not support this request; is it tailscaled's SOCKS5 proxy?",
                )
            } else {
                let name = if to.is_name() {
                    format!(
                        " {} is a name: tailscaled resolves it, so also check it is the \
                         MagicDNS name of a peer, or use the tailnet IP.",
                        to.host
                    )
                } else {
                    String::new()
                };
                Failure::connection(
                    FailureClass::TcpRefused,
                    format!(
                        "tailscaled could not open TCP to {to} ({said} from its SOCKS5 \
                         proxy){malformed}"
                    ),
                    format!(
                        "Nothing accepted TCP on port {} of {} over the tailnet. Is the server \
                         running on the dev host, and does it listen on 0.0.0.0 or the tailnet \
                         IP rather than 127.0.0.1?{name}",
                        to.port, to.host
                    ),
                )
            }
        }
    }
}

/// Opens a tunnel to `to` through tailscaled's SOCKS5 proxy within the check's deadline
/// (`budget` is the check's whole time, for the message), classifying what went wrong. The git://
/// transport connects with it, and the HTTP check diagnoses with it a connection reqwest could
/// not open: reqwest's own error says little (and its SOCKS client rejects tailscale#6144
/// replies outright), while the reply code and the failing step are exactly what the
/// classification needs.
pub(crate) async fn open_tunnel(
    ctx: &ProxyContext,
    to: &Endpoint,
    budget: Duration,
) -> Result<TcpStream, Failure> {
    let proxy = ctx.socks_addr;
    match tokio::time::timeout_at(ctx.deadline, socks::connect(proxy, &to.host, to.port)).await {
        Err(_) => Err(Failure::deadline(
            budget,
            false,
            "opening the connection",
            Layer::Tcp,
        )),
        Ok(Err(failure)) => Err(from_socks(&failure, proxy, to)),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// After a connection broke mid-exchange: whether tailscaled (its proxy) went away meanwhile,
/// which explains the break better than the server does, and makes the attempt worth
/// repeating once tailscaled is back.
pub(crate) async fn proxy_went_away(ctx: &ProxyContext) -> Option<Failure> {
    let proxy = ctx.socks_addr;
    let alive = matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(proxy)
        )
        .await,
        Ok(Ok(_))
    );
    if alive && ctx.daemon.is_ready() {
        return None;
    }
    Some(Failure {
        proxy_down: true,
        ..Failure::connection(
            FailureClass::SocksRefused,
            format!("the connection broke while tailscaled's SOCKS5 proxy at {proxy} went away"),
            "tailscaled died or restarted during the check; check the daemon result and \
             tailscaled's log.",
        )
    })
}

/// After a connection-level failure: whether tailscaled was (or is being) restarted and is ready
/// again in time, so the attempt is worth repeating.
pub(crate) async fn daemon_came_back(ctx: &ProxyContext, failure: &Failure) -> bool {
    if !failure.connection_level {
        return false;
    }
    if ctx.daemon.is_ready() {
        if !failure.proxy_down {
            return false;
        }
        // A dead proxy with a "ready" daemon: the supervisor may not have seen the exit yet.
        let grace = tokio::time::Instant::now() + DAEMON_NOTICE_GRACE;
        if !ctx.daemon.wait_not_ready(grace.min(ctx.deadline)).await {
            return false;
        }
    }
    tracing::info!("tailscaled is not ready; waiting for it before retrying the check");
    matches!(
        tokio::time::timeout_at(ctx.deadline, ctx.daemon.wait()).await,
        Ok(true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to() -> Endpoint {
        Endpoint {
            host: "100.64.0.2".into(),
            port: 7420,
        }
    }

    fn proxy() -> SocketAddr {
        "127.0.0.1:1055".parse().unwrap()
    }

    #[test]
    fn fast_general_failure_is_tcp_refused_with_the_bind_hint() {
        let f = from_socks(
            &SocksFailure::Reply {
                code: 1,
                malformed_atyp: None,
                waited: Duration::from_millis(20),
            },
            proxy(),
            &to(),
        );
        assert_eq!(f.class, FailureClass::TcpRefused);
        assert_eq!(f.layer, Layer::Tcp);
        assert!(f.hint.contains("0.0.0.0"), "{}", f.hint);
        assert!(f.connection_level && !f.proxy_down);
    }

    #[test]
    fn slow_general_failure_is_a_dial_timeout() {
        let f = from_socks(
            &SocksFailure::Reply {
                code: 1,
                malformed_atyp: Some(0),
                waited: Duration::from_secs(5),
            },
            proxy(),
            &to(),
        );
        assert_eq!(f.class, FailureClass::SocksTimeout);
        assert!(f.detail.contains("6144"), "{}", f.detail);
    }

    #[test]
    fn missing_proxy_is_socks_refused_and_proxy_down() {
        let f = from_socks(
            &SocksFailure::ProxyUnreachable(std::io::ErrorKind::ConnectionRefused.into()),
            proxy(),
            &to(),
        );
        assert_eq!(f.class, FailureClass::SocksRefused);
        assert!(f.proxy_down);
    }

    #[test]
    fn endpoints_bracket_ipv6() {
        let e = Endpoint {
            host: "fd7a:115c:a1e0::1".into(),
            port: 80,
        };
        assert_eq!(e.to_string(), "[fd7a:115c:a1e0::1]:80");
        assert_eq!(to().to_string(), "100.64.0.2:7420");
    }
}
