//! libgit2 smart subtransports for `http://`, `https://` and `git://` that go through
//! tailscaled's SOCKS5 proxy. They only carry bytes; libgit2 speaks the git protocol and parses
//! the advertisement.
//!
//! libgit2 has no SOCKS support (and for `http://` it silently connects direct when given a
//! proxy), so these replace its built-in transports process-wide. A transport factory gets
//! nothing but the remote, so the settings of the check in progress travel in a thread-local
//! that [`with_call`] sets around the blocking libgit2 calls. What went wrong is kept as a typed
//! [`Failure`] for the check; libgit2 only gets a short message.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use http::header::{CONTENT_TYPE, LOCATION};
use hyper::body::Incoming;
use tailbox_proto::agent::v1::{FailureClass, Layer};
use url::Url;

use super::is_oid;
use crate::checks::ProxyContext;
use crate::checks::proxy::{self, BasicAuth, BodyError, Failure, Get};

/// What smart HTTP answers for `info/refs?service=git-upload-pack`.
const ADVERT_TYPE: &str = "application/x-git-upload-pack-advertisement";
/// Some hosts only speak the smart protocol to user agents that start with `git/`.
const GIT_USER_AGENT: &str = concat!("git/tailbox-agent-", env!("CARGO_PKG_VERSION"));
/// Bytes of a wrong answer read to describe it.
const DESCRIBE_BYTES: usize = 512;

/// Everything the transport needs from the check that is running on this thread.
pub(crate) struct CallSettings {
    pub ctx: ProxyContext,
    /// The runtime the check runs on; the tunnels and HTTP run there.
    pub handle: tokio::runtime::Handle,
    /// Credentials taken out of the URL, so libgit2 never sees them.
    pub auth: Option<BasicAuth>,
    pub state: Arc<Mutex<CallState>>,
}

/// What the transport learned during one listing.
#[derive(Debug, Default)]
pub(crate) struct CallState {
    /// The first typed failure (libgit2 only sees a short message).
    pub failure: Option<Failure>,
    /// Whether a connection to the server was opened.
    pub connected: bool,
}

thread_local! {
    static CALL: RefCell<Option<Arc<CallSettings>>> = const { RefCell::new(None) };
}

/// Runs `f` (blocking libgit2 calls) with `settings` visible to the transports created on this
/// thread.
pub(crate) fn with_call<T>(settings: CallSettings, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CALL.with(|c| c.borrow_mut().take());
        }
    }
    CALL.with(|c| *c.borrow_mut() = Some(Arc::new(settings)));
    let _reset = Reset;
    f()
}

static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers the transports with libgit2, once per process.
pub(crate) fn register() -> Result<(), String> {
    REGISTERED
        .get_or_init(|| {
            for scheme in ["http", "https", "git"] {
                // SAFETY: `register` must not race with libgit2 creating transports. It runs
                // exactly once, inside `get_or_init` (concurrent callers wait for it), and every
                // libgit2 use in the agent happens after a successful `register()`.
                unsafe { git2::transport::register(scheme, factory) }
                    .map_err(|e| format!("registering the {scheme}:// transport: {e}"))?;
            }
            Ok(())
        })
        .clone()
}

fn factory(remote: &git2::Remote<'_>) -> Result<Transport, git2::Error> {
    let Some(settings) = CALL.with(|c| c.borrow().clone()) else {
        // Refuse rather than let anything reach the network around the proxy.
        return Err(git2::Error::from_str(
            "tailbox's git transports only work inside a git check",
        ));
    };
    if remote.url_bytes().starts_with(b"git://") {
        Transport::smart(
            remote,
            false,
            GitDaemon {
                settings,
                conn: Mutex::new(None),
            },
        )
    } else {
        Transport::smart(remote, true, SmartHttp { settings })
    }
}

/// Keeps the typed failure for the check and gives libgit2 a short message.
fn record(settings: &CallSettings, f: Failure) -> git2::Error {
    let err = git2::Error::from_str(&f.detail);
    if let Ok(mut state) = settings.state.lock() {
        state.failure.get_or_insert(f);
    }
    err
}

fn connected(settings: &CallSettings) {
    if let Ok(mut state) = settings.state.lock() {
        state.connected = true;
    }
}

fn only_listing() -> git2::Error {
    git2::Error::from_str("tailbox's git transports only list refs")
}

/// Keeps why a read failed and hands libgit2 an I/O error.
fn read_failed(settings: &CallSettings, f: Failure) -> io::Error {
    let err = io::Error::other(f.detail.clone());
    let _ = record(settings, f);
    err
}

/// A read that ran into the check's deadline, or a connection that broke (because tailscaled
/// went away, when it did).
fn interrupted(settings: &CallSettings, timed_out: bool, why: &str) -> Failure {
    if timed_out {
        return Failure::deadline(settings.ctx.budget, true, "the ref listing", Layer::Git);
    }
    if let Some(gone) = settings
        .handle
        .block_on(proxy::proxy_went_away(&settings.ctx))
    {
        return gone;
    }
    Failure::new(
        FailureClass::GitProtocol,
        Layer::Git,
        format!("the connection to the git server broke: {why}"),
        "The connection to the git server broke; retry, and check the server.",
    )
}

// ---------------------------------------------------------------------------------------------
// Smart HTTP (stateless): the advertisement is one GET; listing needs nothing else.

struct SmartHttp {
    settings: Arc<CallSettings>,
}

impl SmartSubtransport for SmartHttp {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        if action != Service::UploadPackLs {
            return Err(only_listing());
        }
        let s = &self.settings;
        match s.handle.block_on(advertisement(s, url)) {
            Ok(body) => Ok(Box::new(BodyReader {
                settings: s.clone(),
                body,
                pending: Bytes::new(),
            })),
            Err(f) => Err(record(s, f)),
        }
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// `GET info/refs?service=git-upload-pack`: returns the body once the answer is known to be
/// the smart protocol's.
async fn advertisement(s: &CallSettings, url: &str) -> Result<Incoming, Failure> {
    let refs = format!(
        "{}/info/refs?service=git-upload-pack",
        url.trim_end_matches('/')
    );
    let refs = Url::parse(&refs).map_err(|e| {
        Failure::new(
            FailureClass::InvalidInput,
            Layer::Git,
            format!("{refs} is not a URL: {e}"),
            "Fix the URL.",
        )
    })?;
    let answer = proxy::get(
        &s.ctx,
        &Get {
            url: &refs,
            user_agent: GIT_USER_AGENT,
            auth: s.auth.as_ref(),
            waiting_for: "the ref listing",
            layer: Layer::Git,
        },
    )
    .await?;
    connected(s);
    let response = answer.response;
    let status = response.status();
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    match status.as_u16() {
        200 => {}
        401 | 403 => {
            let given = s.auth.is_some();
            return Err(Failure::new(
                FailureClass::GitAuth,
                Layer::Git,
                format!(
                    "the git server answered {status}{}",
                    if given {
                        " to the credentials in the URL"
                    } else {
                        ""
                    }
                ),
                if given {
                    "The git server rejected the credentials in the URL (`user:password@`, which \
                     is never printed); check them, and that the user may read the repository."
                } else {
                    "The git server wants credentials: put them in the URL as `user:password@` \
                     (they are never printed)."
                },
            ));
        }
        404 => {
            return Err(Failure::new(
                FailureClass::GitNotFound,
                Layer::Git,
                format!("the git server answered {status}: no repository at that URL"),
                "Check the repository path (cook serves /git/<owner>/<repo>.git) and that the \
                 repository exists on the dev host.",
            ));
        }
        code => {
            let hint = match code {
                300..=399 => format!(
                    "The server redirects to {}; use that URL for the remote.",
                    header(LOCATION).as_deref().map_or_else(
                        || "nowhere (no Location header)".to_owned(),
                        tailbox_proto::redact::redact_url
                    )
                ),
                500..=599 => "The git server failed; check its log on the dev host.".to_owned(),
                _ => "Check the URL of the remote.".to_owned(),
            };
            return Err(Failure::new(
                FailureClass::HttpStatus,
                Layer::Http,
                format!("the git server answered {status} for the ref listing"),
                hint,
            ));
        }
    }
    let content_type = header(CONTENT_TYPE).unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or("").trim();
    let mut body = response.into_body();
    if media.eq_ignore_ascii_case(ADVERT_TYPE) {
        return Ok(body);
    }
    // A wrong answer needs only its start to be described.
    let mut start = Vec::new();
    while start.len() < DESCRIBE_BYTES {
        match proxy::next_chunk(&s.ctx, &mut body).await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    Err(not_smart(&content_type, &start))
}

/// Describes a 200 answer that is not the smart protocol.
pub(crate) fn not_smart(content_type: &str, body: &[u8]) -> Failure {
    let start = String::from_utf8_lossy(&body[..body.len().min(DESCRIBE_BYTES)]);
    let trimmed = start.trim_start();
    let looks_like = if trimmed.starts_with('<') {
        "an HTML page".to_owned()
    } else if trimmed.split_once('\t').is_some_and(|(oid, _)| is_oid(oid)) {
        "a plain list of refs: a \"dumb\" HTTP server serving repository files".to_owned()
    } else if content_type.is_empty() {
        "something without a Content-Type".to_owned()
    } else {
        format!("Content-Type {content_type}")
    };
    Failure::new(
        FailureClass::GitProtocol,
        Layer::Git,
        format!("the URL answered with {looks_like}, not git's smart HTTP protocol"),
        "The URL does not lead to git's smart HTTP service. Check the path (cook serves git at \
         /git/<owner>/<repo>.git), and that the server runs git http-backend rather than \
         serving files or a web page.",
    )
}

/// The advertisement as libgit2 reads it: the response body, pulled chunk by chunk within the
/// check's deadline.
struct BodyReader {
    settings: Arc<CallSettings>,
    body: Incoming,
    pending: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = &self.settings;
        while self.pending.is_empty() {
            match s.handle.block_on(proxy::next_chunk(&s.ctx, &mut self.body)) {
                Ok(Some(chunk)) => self.pending = chunk,
                Ok(None) => return Ok(0),
                Err(BodyError::Deadline) => {
                    return Err(read_failed(s, interrupted(s, true, "")));
                }
                Err(BodyError::Broken(why)) => {
                    return Err(read_failed(s, interrupted(s, false, &why)));
                }
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

impl Write for BodyReader {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        // A listing sends nothing after the GET.
        Err(io::Error::other("tailbox's git transports only list refs"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// git:// (stateful): a tunnel, and the one request line git daemon needs before libgit2 talks.

struct GitDaemon {
    settings: Arc<CallSettings>,
    /// The connection, for the second stream libgit2 asks for on it (to say goodbye); each
    /// stream handed to libgit2 holds its own handle to the socket.
    conn: Mutex<Option<TcpStream>>,
}

impl SmartSubtransport for GitDaemon {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let s = &self.settings;
        let sock = match action {
            Service::UploadPackLs => daemon_connect(s, url).map_err(|f| record(s, f))?,
            Service::UploadPack => self
                .conn
                .lock()
                .ok()
                .and_then(|c| c.as_ref().and_then(|sock| sock.try_clone().ok()))
                .ok_or_else(|| git2::Error::from_str("not connected"))?,
            _ => return Err(only_listing()),
        };
        if let Ok(mut conn) = self.conn.lock()
            && conn.is_none()
        {
            *conn = Some(
                sock.try_clone()
                    .map_err(|e| git2::Error::from_str(&e.to_string()))?,
            );
        }
        Ok(Box::new(DaemonStream {
            sock,
            deadline: s.ctx.deadline.into_std(),
            settings: s.clone(),
        }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        if let Some(sock) = self.conn.lock().ok().and_then(|mut c| c.take()) {
            let _ = sock.shutdown(Shutdown::Both);
        }
        Ok(())
    }
}

/// Opens the tunnel and asks git daemon for upload-pack. Over git:// that request line is the
/// transport's job (there is no HTTP request to name the service); libgit2 does the rest.
fn daemon_connect(s: &CallSettings, url: &str) -> Result<TcpStream, Failure> {
    let (parsed, to) = proxy::parse_url(url, &["git"])
        .map_err(|e| Failure::new(FailureClass::InvalidInput, Layer::Git, e, "Fix the URL."))?;
    let tunnel = s.handle.block_on(proxy::open_tunnel(&s.ctx, &to))?;
    connected(s);
    let mut sock = tunnel
        .into_std()
        .and_then(|sock| sock.set_nonblocking(false).map(|()| sock))
        .map_err(|e| Failure::internal(Layer::Git, format!("setting up the connection: {e}")))?;
    let host = match parsed.port() {
        Some(port) => format!("{}:{port}", to.host),
        None => to.host.to_string(),
    };
    let request = format!("git-upload-pack {}\0host={host}\0", parsed.path());
    // One pkt-line: four hex digits of length (their own included), then the payload.
    let line = format!("{:04x}{request}", request.len() + 4);
    let sent = left(s.ctx.deadline.into_std())
        .and_then(|left| sock.set_write_timeout(Some(left)))
        .and_then(|()| sock.write_all(line.as_bytes()));
    if let Err(e) = sent {
        return Err(interrupted(s, is_timeout(&e), &e.to_string()));
    }
    Ok(sock)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// Time left before `deadline`, or a timeout error when it has passed.
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the check's deadline passed",
        ));
    }
    Ok(left)
}

/// What libgit2 reads and writes on git://: blocking socket I/O that gives up at the check's
/// deadline, so no thread outlives it by much.
struct DaemonStream {
    sock: TcpStream,
    deadline: Instant,
    settings: Arc<CallSettings>,
}

impl DaemonStream {
    /// Keeps why a read failed (the listing depends on reads).
    fn read_failed(&self, e: io::Error) -> io::Error {
        let f = interrupted(&self.settings, is_timeout(&e), &e.to_string());
        read_failed(&self.settings, f)
    }
}

impl Read for DaemonStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = left(self.deadline).map_err(|e| self.read_failed(e))?;
        self.sock.set_read_timeout(Some(left))?;
        self.sock.read(buf).map_err(|e| self.read_failed(e))
    }
}

impl Write for DaemonStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // libgit2 writes only to say goodbye once the refs are listed; a failure then is
        // libgit2's to ignore, except running out of time.
        let left = left(self.deadline).map_err(|e| self.read_failed(e))?;
        self.sock.set_write_timeout(Some(left))?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}
