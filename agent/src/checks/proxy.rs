//! Connections through tailscaled's SOCKS5 proxy, shared by the HTTP and git checks.
//!
//! - The tunnel: we open the TCP connection to the proxy ourselves (so "no proxy there" is its
//!   own case), then tokio-socks does the SOCKS5 handshake (socks5h: tailscaled resolves names,
//!   so MagicDNS works) and returns one error per reply code. It checks the reply code before it
//!   reads the bound address, so tailscaled's malformed failure replies (tailscale#6144) are
//!   read as what they say.
//! - HTTP over the tunnel: TLS (rustls with the system's roots) for https, then one HTTP/1.1
//!   exchange with hyper.
//! - Every failure is classified where it happens, once: what went wrong, at which layer, and a
//!   hint. tailscaled's proxy answers every dial error with reply 1 ("general failure"); for a
//!   name target that reply is followed by one question to the LocalAPI, the only place
//!   tailscaled says whether the name resolved.
//! - tailscaled's own trouble: a proxy that went away mid-exchange, a restart worth waiting for,
//!   and a check that ran out of time because tailscaled stopped answering.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, HeaderValue, USER_AGENT};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tailbox_proto::agent::v1::{FailureClass, Layer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_socks::tcp::Socks5Stream;
use tokio_socks::{Error as SocksError, TargetAddr};
use url::{Host, Url};

use super::{ProxyContext, names};
use crate::error_chain;
use crate::localapi::DialAnswer;

/// How long the SOCKS5 handshake may take once the proxy accepted the TCP connection.
/// tailscaled gives up dialing after 5 s and then answers, so this only fires when the proxy
/// itself stalls.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A dial failure reported after at least this long means nothing answered (tailscaled retried
/// until it gave up, at most 5 s); a closed port answers with a reset within a round trip.
const NO_ANSWER_AFTER: Duration = Duration::from_millis(1500);

/// How long a dead proxy may look dead before the supervisor has noticed that tailscaled died.
const DAEMON_NOTICE_GRACE: Duration = Duration::from_secs(1);

/// How long the LocalAPI gets to say whether a name resolved.
const RESOLVE_QUESTION_LIMIT: Duration = Duration::from_secs(3);

/// Where a connection goes: a host as written in the URL and a port.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// An IP literal, or a name tailscaled resolves.
    pub host: Host<String>,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// The host and port of `url` (git:// defaults to 9418).
    pub(crate) fn of(url: &Url) -> Result<Self, String> {
        let host = url.host().ok_or("the URL has no host")?.to_owned();
        let port = url
            .port_or_known_default()
            .or_else(|| (url.scheme() == "git").then_some(9418))
            .ok_or("the URL has no port")?;
        Ok(Self { host, port })
    }

    /// The host as a name, when it is not an IP literal.
    pub(crate) fn name(&self) -> Option<&str> {
        match &self.host {
            Host::Domain(name) => Some(name),
            Host::Ipv4(_) | Host::Ipv6(_) => None,
        }
    }

    fn target(&self) -> TargetAddr<'_> {
        match &self.host {
            Host::Domain(name) => TargetAddr::Domain(name.as_str().into(), self.port),
            Host::Ipv4(ip) => TargetAddr::Ip(SocketAddr::from((*ip, self.port))),
            Host::Ipv6(ip) => TargetAddr::Ip(SocketAddr::from((*ip, self.port))),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // url's Host prints IPv6 in brackets.
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Parses a target URL of one of `schemes`, returning it and where it connects to.
pub(crate) fn parse_url(raw: &str, schemes: &[&str]) -> Result<(Url, Endpoint), String> {
    let url = Url::parse(raw.trim()).map_err(|e| e.to_string())?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "scheme {:?} is not supported here (use {})",
            url.scheme(),
            schemes.join(", ")
        ));
    }
    let to = Endpoint::of(&url)?;
    Ok((url, to))
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
        }
    }

    fn connection(class: FailureClass, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            connection_level: true,
            ..Self::new(class, Layer::Tcp, detail, hint)
        }
    }

    fn proxy_down(detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            proxy_down: true,
            ..Self::connection(FailureClass::SocksRefused, detail, hint)
        }
    }

    /// The check's deadline passed; `connected` says whether a connection was open by then, and
    /// `waiting_for` what had not arrived, at `layer`.
    pub(crate) fn deadline(
        budget: Duration,
        connected: bool,
        waiting_for: &str,
        layer: Layer,
    ) -> Self {
        let secs = budget.as_secs_f64();
        if connected {
            Self::new(
                FailureClass::Deadline,
                layer,
                format!(
                    "connected, but {waiting_for} did not arrive within the {secs:.1}s deadline"
                ),
                "The server accepted the connection but answered too slowly; check the server \
                 (is it busy or stuck?), or give the check more time.",
            )
        } else {
            Self::connection(
                FailureClass::Deadline,
                format!(
                    "no connection through tailscaled's SOCKS5 proxy within the {secs:.1}s \
                     deadline"
                ),
                "The tunnel to the dev host did not open in time; check that the dev host is \
                 online in the netmap (`tailscale status`) and reachable (`tailscale ping`), or \
                 give the check more time.",
            )
        }
    }

    /// A bug in the agent.
    pub(crate) fn internal(layer: Layer, detail: impl Into<String>) -> Self {
        Self::new(
            FailureClass::Internal,
            layer,
            detail,
            "This is a bug in tailbox; please report it with the output above.",
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The tunnel.

/// Opens a tunnel to `to` through tailscaled's SOCKS5 proxy within the check's deadline,
/// classifying what went wrong.
///
/// A dial nothing answered is made once more while time remains: tailscaled gives up a dial
/// after 5 s, and a fresh node's first WireGuard handshake with a peer can be lost, which
/// WireGuard repeats after those same 5 s (login's wait for the home DERP region prevents the
/// known cause; this is the backstop). The failure reported is then the second one.
pub(crate) async fn open_tunnel(ctx: &ProxyContext, to: &Endpoint) -> Result<TcpStream, Failure> {
    let opening = async {
        match dial(ctx, to).await {
            Err(Dialed::NothingAnswered(first)) => {
                tracing::info!("{}; dialing once more", first.detail);
                match dial(ctx, to).await {
                    Ok(tunnel) => Ok(tunnel),
                    Err(Dialed::NothingAnswered(f) | Dialed::Failed(f)) => Err(f),
                }
            }
            Err(Dialed::Failed(f)) => Err(f),
            Ok(tunnel) => Ok(tunnel),
        }
    };
    match tokio::time::timeout_at(ctx.deadline, opening).await {
        Err(_) => Err(Failure::deadline(
            ctx.budget,
            false,
            "the connection",
            Layer::Tcp,
        )),
        Ok(result) => result,
    }
}

/// How one dial through the proxy failed.
enum Dialed {
    /// tailscaled tried to dial and nothing answered (worth one more try).
    NothingAnswered(Failure),
    /// Anything else.
    Failed(Failure),
}

/// One SOCKS5 CONNECT through the proxy.
async fn dial(ctx: &ProxyContext, to: &Endpoint) -> Result<TcpStream, Dialed> {
    let proxy = ctx.socks_addr;
    let tcp = TcpStream::connect(proxy).await.map_err(|e| {
        Dialed::Failed(Failure::proxy_down(
            format!("tailscaled's SOCKS5 proxy at {proxy} is not reachable: {e}"),
            format!(
                "Nothing accepts connections on {proxy}: tailscaled is not running, or was \
                 started without `--socks5-server={proxy}`. Check the daemon result and \
                 tailscaled's log."
            ),
        ))
    })?;
    // git sends many small packets; Nagle plus delayed ACKs would add ~40 ms to each.
    let _ = tcp.set_nodelay(true);
    let asked = Instant::now();
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        Socks5Stream::connect_with_socket(tcp, to.target()),
    )
    .await
    {
        Err(_) => Err(Dialed::Failed(Failure::connection(
            FailureClass::SocksTimeout,
            format!(
                "tailscaled's SOCKS5 proxy at {proxy} accepted, but did not answer the request \
                 for {to} within {}s",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
            "The proxy is stuck; check tailscaled's log, and that the dev host is online in the \
             netmap.",
        ))),
        Ok(Ok(tunnel)) => Ok(tunnel.into_inner()),
        Ok(Err(err)) => {
            let waited = asked.elapsed();
            let general = matches!(err, SocksError::GeneralSocksServerFailure);
            if general && let Some(failure) = name_did_not_resolve(ctx, to).await {
                return Err(Dialed::Failed(failure));
            }
            let failure = from_socks(&err, waited, proxy, to);
            if general && waited >= NO_ANSWER_AFTER {
                Err(Dialed::NothingAnswered(failure))
            } else {
                Err(Dialed::Failed(failure))
            }
        }
    }
}

/// The RFC 1928 reply code behind a tokio-socks error, if it is a reply.
fn reply_code(err: &SocksError) -> Option<u8> {
    Some(match err {
        SocksError::GeneralSocksServerFailure => 1,
        SocksError::ConnectionNotAllowedByRuleset => 2,
        SocksError::NetworkUnreachable => 3,
        SocksError::HostUnreachable => 4,
        SocksError::ConnectionRefused => 5,
        SocksError::TtlExpired => 6,
        SocksError::CommandNotSupported => 7,
        SocksError::AddressTypeNotSupported => 8,
        _ => return None,
    })
}

/// Classifies a failed SOCKS5 handshake. `waited` is the time from the request to the answer.
fn from_socks(err: &SocksError, waited: Duration, proxy: SocketAddr, to: &Endpoint) -> Failure {
    let not_tailscaled = format!(
        "Something other than tailscaled's SOCKS5 proxy seems to listen on {proxy}; point the \
         agent at tailscaled's `--socks5-server` address."
    );
    let Some(code) = reply_code(err) else {
        return match err {
            SocksError::Io(e) => Failure::proxy_down(
                format!("the SOCKS5 proxy at {proxy} hung up mid-handshake: {e}"),
                "tailscaled may have died or be restarting; check the daemon result and \
                 tailscaled's log.",
            ),
            SocksError::InvalidTargetAddress(why) => Failure::new(
                FailureClass::InvalidInput,
                Layer::Tcp,
                format!("cannot ask the proxy for {to}: {why}"),
                "Fix the host in the URL.",
            ),
            SocksError::NoAcceptableAuthMethods | SocksError::AuthorizationRequired => {
                Failure::connection(
                    FailureClass::SocksRefused,
                    format!("the SOCKS5 proxy at {proxy} demands authentication"),
                    format!("tailscaled's proxy needs no authentication. {not_tailscaled}"),
                )
            }
            // A version, reserved byte, method, reply code or address type SOCKS5 does not have.
            other => Failure::connection(
                FailureClass::SocksRefused,
                format!("{proxy} answered outside SOCKS5: {other}"),
                not_tailscaled,
            ),
        };
    };
    let said = format!(
        "reply {code}, {}, after {}ms",
        err.to_string().to_lowercase(),
        waited.as_millis()
    );
    match code {
        1 if waited >= NO_ANSWER_AFTER => Failure::connection(
            FailureClass::SocksTimeout,
            format!(
                "tailscaled could not open TCP to {to}: nothing answered ({said} from its SOCKS5 \
                 proxy)"
            ),
            format!(
                "Nothing answered at {} over the tailnet. Check that the address belongs to a \
                 peer that is online in the netmap (`tailscale status`), that ACLs let this node \
                 reach it, and that the port is right.",
                to.host
            ),
        ),
        6 => Failure::connection(
            FailureClass::SocksTimeout,
            format!("the SOCKS5 proxy at {proxy} gave up connecting to {to} ({said})"),
            "Nothing answered in time; check that the dev host is online in the netmap and that \
             the port is right.",
        ),
        2 | 7 | 8 => Failure::connection(
            FailureClass::SocksRefused,
            format!("the SOCKS5 proxy at {proxy} rejected the request for {to} ({said})"),
            format!("tailscaled's proxy accepts every CONNECT it can dial. {not_tailscaled}"),
        ),
        // 1 (fast), 3, 4, 5: the dial itself failed.
        _ => {
            let name = match to.name() {
                Some(name) => format!(
                    " {name} is a name: tailscaled resolves it, so also check it is the \
                     MagicDNS name of a peer, or use the tailnet IP."
                ),
                None => String::new(),
            };
            Failure::connection(
                FailureClass::TcpRefused,
                format!("tailscaled could not open TCP to {to} ({said} from its SOCKS5 proxy)"),
                format!(
                    "Nothing accepted TCP on port {} of {} over the tailnet. Is the server \
                     running on the dev host, and does it listen on 0.0.0.0 or the tailnet IP \
                     rather than 127.0.0.1?{name}",
                    to.port, to.host
                ),
            )
        }
    }
}

/// After a "general failure" reply for a name: whether tailscaled could not resolve the name.
/// Its SOCKS5 proxy answers a resolve failure and a refused port alike. A MagicDNS name of a
/// peer resolved (tailscaled looks those up in the netmap, as [`names`] does); any other name
/// went to the sandbox's DNS, and the LocalAPI's `dial` says whether that failed: it resolves
/// first and answers "resolve failure" when that step fails (tailscaled 1.98 and later). A name
/// the sandbox's DNS knows is almost always outside the tailnet, which `dial` hands back without
/// dialing it.
async fn name_did_not_resolve(ctx: &ProxyContext, to: &Endpoint) -> Option<Failure> {
    let name = to.name()?.to_ascii_lowercase();
    let limit = RESOLVE_QUESTION_LIMIT.min(
        ctx.deadline
            .saturating_duration_since(tokio::time::Instant::now()),
    );
    let api = ctx.daemon.api();
    let status = tokio::time::timeout(limit, api.status(true))
        .await
        .ok()?
        .ok()?;
    if names::is_magicdns_name(&status, &name) {
        return None;
    }
    let answer = tokio::time::timeout(limit, api.dial(&name, to.port)).await;
    let Ok(Ok(DialAnswer::ResolveFailed(why))) = answer else {
        return None;
    };
    // What the netmap offers instead, since a MagicDNS name is what a tailnet target should be.
    let closest = names::closest_peers(&status, &name);
    let offer = if closest.is_empty() {
        String::new()
    } else {
        format!(" Peers with similar names: {}.", closest.join(", "))
    };
    Some(Failure::connection(
        FailureClass::DnsFailed,
        format!("tailscaled could not resolve {name}: {why}"),
        format!(
            "{name} is not the MagicDNS name of any peer in the netmap, and the sandbox's DNS \
             does not know it either. Use the dev host's MagicDNS name (`tailscale status` on \
             the dev host shows it) or its tailnet IP (`tailscale ip -4`).{offer}"
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// HTTP over the tunnel.

/// A byte stream a request can go over: the tunnel, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The TLS settings: the system's roots (SSL_CERT_FILE and SSL_CERT_DIR count), HTTP/1.1.
/// Built once: loading the roots takes milliseconds.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls_platform_verifier::BuilderVerifierExt as _;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .and_then(|builder| builder.with_platform_verifier())
                .map_err(|e| e.to_string())?
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// Opens the tunnel for `url`, with TLS for https.
async fn connect(ctx: &ProxyContext, url: &Url, to: &Endpoint) -> Result<Box<dyn Io>, Failure> {
    let tunnel = open_tunnel(ctx, to).await?;
    if url.scheme() != "https" {
        return Ok(Box::new(tunnel));
    }
    let config = tls_config().map_err(|e| {
        Failure::internal(Layer::Http, format!("the TLS settings are unusable: {e}"))
    })?;
    let server_name = match &to.host {
        Host::Domain(name) => {
            rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                Failure::new(
                    FailureClass::InvalidInput,
                    Layer::Http,
                    format!("{name} cannot be checked against a certificate: {e}"),
                    "Fix the host in the URL.",
                )
            })?
        }
        Host::Ipv4(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
        Host::Ipv6(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
    };
    match tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tunnel)
        .await
    {
        Ok(tls) => Ok(Box::new(tls)),
        Err(e) => Err(Failure::new(
            FailureClass::HttpStatus,
            Layer::Http,
            format!("TCP to {to} opens through the tailnet, but TLS failed: {e}"),
            "The TLS handshake failed: check that the port serves https, that its certificate \
             is valid for the host in the URL, and that its CA is trusted in the sandbox (the \
             system CA bundle, or `SSL_CERT_FILE`).",
        )),
    }
}

/// Credentials for HTTP basic authentication, taken from a URL's userinfo.
#[derive(Clone)]
pub(crate) struct BasicAuth(HeaderValue);

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BasicAuth(****)")
    }
}

impl BasicAuth {
    /// The user and password of `url`, decoded; `None` without a user name.
    pub(crate) fn from_url(url: &Url) -> Option<Self> {
        if url.username().is_empty() {
            return None;
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let pair = format!(
            "{}:{}",
            decode(url.username()),
            decode(url.password().unwrap_or(""))
        );
        let token = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut value = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
        value.set_sensitive(true);
        Some(Self(value))
    }
}

/// One GET and what it needs beyond the URL.
pub(crate) struct Get<'a> {
    /// The URL; its userinfo is ignored (see `auth`).
    pub url: &'a Url,
    /// User-Agent header.
    pub user_agent: &'a str,
    /// Basic authentication to send.
    pub auth: Option<&'a BasicAuth>,
    /// What the response is, for a deadline message ("the response headers").
    pub waiting_for: &'a str,
    /// The layer a server-side failure belongs to.
    pub layer: Layer,
}

/// A response whose head arrived.
pub(crate) struct Answer {
    pub response: hyper::Response<Incoming>,
    /// From the moment the connection was open (the request went out right then) to the head;
    /// the SOCKS5 handshake and tailscaled's dial are not the server's latency.
    pub ttfb: Duration,
}

/// Sends one GET over a fresh tunnel within the check's deadline, classifying what fails.
pub(crate) async fn get(ctx: &ProxyContext, get: &Get<'_>) -> Result<Answer, Failure> {
    let to = Endpoint::of(get.url).map_err(|why| {
        Failure::new(
            FailureClass::InvalidInput,
            get.layer,
            format!("cannot connect to {}: {why}", get.url),
            "Fix the URL.",
        )
    })?;
    let request = request(get).map_err(|e| {
        Failure::new(
            FailureClass::InvalidInput,
            get.layer,
            format!("cannot build a request for that URL: {e}"),
            "Fix the URL.",
        )
    })?;
    let mut opened = None;
    let exchange = tokio::time::timeout_at(ctx.deadline, async {
        let io = connect(ctx, get.url, &to).await?;
        let at = Instant::now();
        opened = Some(at);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| no_response(&to, &e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("HTTP connection ended: {e}");
            }
        });
        match sender.send_request(request).await {
            Ok(response) => Ok(Answer {
                response,
                ttfb: at.elapsed(),
            }),
            Err(e) => Err(no_response(&to, &e)),
        }
    })
    .await;
    match exchange {
        Err(_) => Err(Failure::deadline(
            ctx.budget,
            opened.is_some(),
            get.waiting_for,
            get.layer,
        )),
        Ok(Err(failure)) if failure.class == FailureClass::HttpStatus && opened.is_some() => {
            // A connection that broke may have been tailscaled going away.
            Err(proxy_went_away(ctx).await.unwrap_or(failure))
        }
        Ok(result) => result,
    }
}

fn request(get: &Get<'_>) -> Result<http::Request<Empty<Bytes>>, http::Error> {
    let url = get.url;
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let host = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let mut builder = http::Request::get(if target.is_empty() { "/" } else { target })
        .header(HOST, host)
        .header(USER_AGENT, get.user_agent);
    if let Some(auth) = get.auth {
        builder = builder.header(AUTHORIZATION, auth.0.clone());
    }
    builder.body(Empty::new())
}

fn no_response(to: &Endpoint, e: &hyper::Error) -> Failure {
    Failure::new(
        FailureClass::HttpStatus,
        Layer::Http,
        format!(
            "{to} accepted the connection but no HTTP response came back: {}",
            error_chain(e)
        ),
        "Something listens on that port but did not answer HTTP: check the port, and the scheme \
         (https:// for a TLS port, http:// otherwise).",
    )
}

/// Why reading a body stopped early.
pub(crate) enum BodyError {
    /// The check's deadline passed.
    Deadline,
    /// The connection broke.
    Broken(String),
}

/// The next piece of a body within the check's deadline; `None` at its end.
pub(crate) async fn next_chunk(
    ctx: &ProxyContext,
    body: &mut Incoming,
) -> Result<Option<Bytes>, BodyError> {
    loop {
        match tokio::time::timeout_at(ctx.deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Deadline),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(BodyError::Broken(error_chain(&e))),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
                // Trailers carry nothing a check reads.
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tailscaled's own trouble.

/// After a connection broke mid-exchange: whether tailscaled (its proxy) went away meanwhile,
/// which explains the break better than the server does, and makes the attempt worth
/// repeating once tailscaled is back.
pub(crate) async fn proxy_went_away(ctx: &ProxyContext) -> Option<Failure> {
    let proxy = ctx.socks_addr;
    let alive = matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(proxy)).await,
        Ok(Ok(_))
    );
    if alive && ctx.daemon.is_ready() {
        return None;
    }
    Some(Failure::proxy_down(
        format!("the connection broke while tailscaled's SOCKS5 proxy at {proxy} went away"),
        "tailscaled died or restarted during the check; check the daemon result and \
         tailscaled's log.",
    ))
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

/// The failure a check reports: when it ran out of time, tailscaled is asked whether it still
/// answers, and a stuck or gone daemon is blamed at the daemon layer instead of the target.
pub(crate) async fn blame_stuck_daemon(
    ctx: &ProxyContext,
    failure: Failure,
    check: &str,
) -> Failure {
    if failure.class != FailureClass::Deadline {
        return failure;
    }
    match ctx
        .daemon
        .fault_after_timeout(&format!("the {check} check"))
        .await
    {
        Some(fault) => Failure::new(fault.class, Layer::Daemon, fault.detail, fault.hint),
        None => failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(host: &str) -> Endpoint {
        Endpoint::of(&Url::parse(&format!("http://{host}:7420/")).unwrap()).unwrap()
    }

    fn proxy() -> SocketAddr {
        "127.0.0.1:1055".parse().unwrap()
    }

    #[test]
    fn fast_general_failure_is_tcp_refused_with_the_bind_hint() {
        let f = from_socks(
            &SocksError::GeneralSocksServerFailure,
            Duration::from_millis(20),
            proxy(),
            &to("100.64.0.2"),
        );
        assert_eq!(f.class, FailureClass::TcpRefused);
        assert_eq!(f.layer, Layer::Tcp);
        assert!(f.hint.contains("0.0.0.0"), "{}", f.hint);
        assert!(f.detail.contains("reply 1"), "{}", f.detail);
        assert!(f.connection_level && !f.proxy_down);
    }

    #[test]
    fn slow_general_failure_is_a_dial_timeout() {
        let f = from_socks(
            &SocksError::GeneralSocksServerFailure,
            Duration::from_secs(5),
            proxy(),
            &to("100.64.0.2"),
        );
        assert_eq!(f.class, FailureClass::SocksTimeout);
    }

    #[test]
    fn a_hangup_is_the_proxy_going_down() {
        let f = from_socks(
            &SocksError::Io(std::io::ErrorKind::UnexpectedEof.into()),
            Duration::ZERO,
            proxy(),
            &to("100.64.0.2"),
        );
        assert_eq!(f.class, FailureClass::SocksRefused);
        assert!(f.proxy_down);
    }

    #[test]
    fn endpoints_bracket_ipv6_and_know_names() {
        let e = Endpoint::of(&Url::parse("http://[fd7a:115c:a1e0::1]/").unwrap()).unwrap();
        assert_eq!(e.to_string(), "[fd7a:115c:a1e0::1]:80");
        assert!(e.name().is_none());
        assert_eq!(to("100.64.0.2").to_string(), "100.64.0.2:7420");
        assert_eq!(to("devhost").name(), Some("devhost"));
        let e = Endpoint::of(&Url::parse("git://devhost/lab.git").unwrap()).unwrap();
        assert_eq!(e.port, 9418);
    }

    #[test]
    fn urls_parse_into_endpoints() {
        let (_, e) = parse_url("https://devhost/x", &["http", "https"]).unwrap();
        assert_eq!(e.port, 443);
        assert!(parse_url("ftp://h/x", &["http", "https"]).is_err());
        assert!(parse_url("not a url", &["http"]).is_err());
    }

    #[test]
    fn basic_auth_is_decoded_and_never_printed() {
        let url = Url::parse("http://cook%40me:p%3Ass@h/").unwrap();
        let auth = BasicAuth::from_url(&url).unwrap();
        assert_eq!(
            auth.0.to_str().unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("cook@me:p:ss")
            )
        );
        assert_eq!(format!("{auth:?}"), "BasicAuth(****)");
        assert!(BasicAuth::from_url(&Url::parse("http://h/").unwrap()).is_none());
    }

    #[test]
    fn requests_use_the_origin_form_and_the_host_header() {
        let url = Url::parse("http://u:p@devhost:7420/a/b?c=d#frag").unwrap();
        let request = request(&Get {
            url: &url,
            user_agent: "t",
            auth: None,
            waiting_for: "",
            layer: Layer::Http,
        })
        .unwrap();
        assert_eq!(request.uri(), "/a/b?c=d");
        assert_eq!(request.headers()[HOST], "devhost:7420");
        assert!(request.headers().get(AUTHORIZATION).is_none());
    }
}
