//! libgit2 smart subtransports for `http://`, `https://` and `git://` that go through
//! tailscaled's SOCKS5 proxy.
//!
//! libgit2 has no SOCKS support (and for `http://` it silently connects direct when given a
//! proxy), so these replace its built-in transports process-wide. libgit2 hands a transport
//! factory nothing but the remote, so the settings of the check in progress (proxy, deadline,
//! client, where to put a typed failure) travel in a thread-local that [`with_call`] sets around
//! the blocking libgit2 calls. Each transport talks the protocol itself far enough to record
//! the version the server spoke, to run protocol v2's `ls-refs` when offered, and to turn what
//! went wrong into a typed [`Failure`] instead of a libgit2 message.

use std::cell::RefCell;
use std::io::{self, Cursor, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION, USER_AGENT};
use tailbox_proto::agent::v1::{FailureClass, Layer};

use super::advert::{self, AdvertError, Advertisement};
use super::pkt::{self, PktError, PktReader};
use crate::checks::ProxyContext;
use crate::checks::http as http_check;
use crate::checks::http::failure::{self, Endpoint, Failure};

/// Largest ref advertisement accepted (repositories with very many refs reach megabytes).
const ADVERT_CAP: usize = 64 << 20;
/// What smart HTTP answers for `info/refs?service=git-upload-pack`.
const ADVERT_TYPE: &str = "application/x-git-upload-pack-advertisement";
/// What smart HTTP answers for a `git-upload-pack` POST.
const RESULT_TYPE: &str = "application/x-git-upload-pack-result";
/// Some hosts only speak the smart protocol to user agents that start with `git/`.
const GIT_USER_AGENT: &str = concat!("git/tailbox-agent-", env!("CARGO_PKG_VERSION"));

/// Everything the transport needs from the check that is running on this thread.
pub(crate) struct CallSettings {
    pub ctx: ProxyContext,
    /// The whole budget of the check, for messages.
    pub budget: Duration,
    /// The runtime the check runs on; HTTP goes through its reqwest client.
    pub handle: tokio::runtime::Handle,
    /// The proxy client (http and https only).
    pub client: Option<reqwest::Client>,
    /// Ask for protocol v2.
    pub protocol_v2: bool,
    /// Credentials taken out of the URL, so libgit2 never sees them.
    pub basic_auth: Option<(String, Option<String>)>,
    pub state: Arc<Mutex<CallState>>,
}

/// What the transport learned during one listing.
#[derive(Debug, Default)]
pub(crate) struct CallState {
    /// The first typed failure (libgit2 only sees a short message).
    pub failure: Option<Failure>,
    /// Protocol version the server spoke.
    pub protocol_version: Option<u32>,
    /// Target of an unborn HEAD (empty repository over v2), which libgit2 cannot list.
    pub unborn_head: Option<String>,
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

fn update(settings: &CallSettings, f: impl FnOnce(&mut CallState)) {
    if let Ok(mut state) = settings.state.lock() {
        f(&mut state);
    }
}

fn only_listing() -> git2::Error {
    git2::Error::from_str("tailbox's git transports only list refs")
}

// ---------------------------------------------------------------------------------------------
// Smart HTTP (stateless).

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
        match s.handle.block_on(http_ls(s, url)) {
            Ok(advertisement) => Ok(Box::new(Cursor::new(advertisement))),
            Err(f) => Err(record(s, f)),
        }
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// `GET info/refs`, then `ls-refs` if the server answered with v2; returns the v0 advertisement
/// for libgit2.
async fn http_ls(s: &CallSettings, url: &str) -> Result<Vec<u8>, Failure> {
    let (parsed, to) = http_check::parse_url(url, &["http", "https"])
        .map_err(|e| Failure::new(FailureClass::InvalidInput, Layer::Git, e, "Fix the URL."))?;
    let https = parsed.scheme() == "https";
    let client = s.client.as_ref().ok_or_else(|| {
        Failure::new(
            FailureClass::Internal,
            Layer::Git,
            "no HTTP client for the git transport",
            "This is a bug in the agent; please report it.",
        )
    })?;
    let base = url.trim_end_matches('/');

    let mut get = client
        .get(format!("{base}/info/refs?service=git-upload-pack"))
        .header(USER_AGENT, GIT_USER_AGENT);
    if s.protocol_v2 {
        get = get.header("Git-Protocol", "version=2");
    }
    let response = send(s, get, &to, https).await?;
    let body = smart_body(s, response, ADVERT_TYPE).await?;
    let advertisement = advert::read_advertisement(&mut PktReader::new(&body[..]), true)
        .map_err(|e| advert_failure(e, &to))?;
    match advertisement {
        Advertisement::V0 { version, refs } => {
            update(s, |st| st.protocol_version = Some(version));
            advert::encode_v0(&refs, true).map_err(|e| protocol_failure(e.to_string()))
        }
        Advertisement::V2(caps) => {
            update(s, |st| st.protocol_version = Some(2));
            if caps.ls_refs.is_none() {
                return Err(protocol_failure(
                    "the server speaks protocol v2 but does not offer ls-refs".into(),
                ));
            }
            let request =
                advert::ls_refs_request(&caps).map_err(|e| protocol_failure(e.to_string()))?;
            let post = client
                .post(format!("{base}/git-upload-pack"))
                .header(USER_AGENT, GIT_USER_AGENT)
                .header(CONTENT_TYPE, "application/x-git-upload-pack-request")
                .header(ACCEPT, RESULT_TYPE)
                .header("Git-Protocol", "version=2")
                .body(request);
            let response = send(s, post, &to, https).await?;
            let body = smart_body(s, response, RESULT_TYPE).await?;
            let refs = advert::read_ls_refs(&mut PktReader::new(&body[..]))
                .map_err(|e| advert_failure(e, &to))?;
            update(s, |st| st.unborn_head = advert::unborn_head(&refs));
            advert::v0_from_ls_refs(&refs, &caps, true).map_err(|e| protocol_failure(e.to_string()))
        }
    }
}

/// Sends one request with the credentials within the deadline, classifying failures.
async fn send(
    s: &CallSettings,
    request: reqwest::RequestBuilder,
    to: &Endpoint,
    https: bool,
) -> Result<reqwest::Response, Failure> {
    let request = match &s.basic_auth {
        Some((user, password)) => request.basic_auth(user, password.as_ref()),
        None => request,
    };
    let (response, _) = http_check::send(
        request,
        &s.ctx,
        to,
        https,
        s.budget,
        "listing the refs",
        Layer::Git,
    )
    .await?;
    update(s, |st| st.connected = true);
    Ok(response)
}

/// Checks that the response is the smart protocol's and reads its body within the deadline.
async fn smart_body(
    s: &CallSettings,
    mut response: reqwest::Response,
    want_type: &str,
) -> Result<Vec<u8>, Failure> {
    let status = response.status();
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &reqwest::header::HeaderValue| {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            })
    };
    let code = status.as_u16();
    match code {
        200 => {}
        401 | 403 => {
            let given = s.basic_auth.is_some();
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
                    "The git server rejected the credentials in the URL (user:password@, which \
                     is never printed); check them, and that the user may read the repository."
                } else {
                    "The git server wants credentials: put them in the URL as user:password@ \
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
        _ => {
            let hint = match code {
                300..=399 => format!(
                    "The server redirects to {}; use that URL for the remote.",
                    header(LOCATION).as_deref().map_or_else(
                        || "(no Location header)".to_owned(),
                        crate::redact::redact_url
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
    let smart = media.eq_ignore_ascii_case(want_type);

    let mut body = Vec::new();
    loop {
        match tokio::time::timeout_at(s.ctx.deadline, response.chunk()).await {
            Err(_) => {
                return Err(Failure::deadline(
                    s.budget,
                    true,
                    "reading the ref listing",
                    Layer::Git,
                ));
            }
            Ok(Err(e)) => {
                if let Some(gone) = failure::proxy_went_away(&s.ctx).await {
                    return Err(gone);
                }
                return Err(Failure::new(
                    FailureClass::GitProtocol,
                    Layer::Git,
                    format!(
                        "the ref listing broke off after {} bytes: {}",
                        body.len(),
                        crate::error_chain(&e.without_url())
                    ),
                    "The connection to the git server broke; retry, and check the server.",
                ));
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => {
                body.extend_from_slice(&chunk);
                // A wrong answer needs only its start to be described.
                if (!smart && body.len() >= 512) || body.len() > ADVERT_CAP {
                    break;
                }
            }
        }
    }
    if !smart {
        return Err(not_smart(&content_type, &body));
    }
    if body.len() > ADVERT_CAP {
        return Err(protocol_failure(format!(
            "the server's answer is larger than {} MiB",
            ADVERT_CAP >> 20
        )));
    }
    Ok(body)
}

/// Describes a 200 answer that is not the smart protocol.
fn not_smart(content_type: &str, body: &[u8]) -> Failure {
    let start = String::from_utf8_lossy(&body[..body.len().min(512)]);
    let trimmed = start.trim_start();
    let looks_like = if trimmed.starts_with('<') {
        "an HTML page".to_owned()
    } else if trimmed
        .split_once('\t')
        .is_some_and(|(oid, _)| advert::is_oid(oid))
    {
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

fn protocol_failure(detail: String) -> Failure {
    Failure::new(
        FailureClass::GitProtocol,
        Layer::Git,
        detail,
        "The server does not speak git's smart protocol as expected; check that the URL leads \
         to a git server (git http-backend or git daemon).",
    )
}

fn advert_failure(e: AdvertError, to: &Endpoint) -> Failure {
    match e {
        AdvertError::Remote(msg) => {
            // git daemon's only answers for a missing repository; nothing else is parsed.
            let missing = [
                "not exported",
                "no such repository",
                "not found",
                "does not appear",
            ]
            .iter()
            .any(|m| msg.contains(m));
            if missing {
                Failure::new(
                    FailureClass::GitNotFound,
                    Layer::Git,
                    format!("the git server at {to} said: {msg}"),
                    "Check the repository path, that the repository exists on the dev host, and \
                     that git daemon exports it (--export-all or git-daemon-export-ok).",
                )
            } else {
                protocol_failure(format!("the git server at {to} said: {msg}"))
            }
        }
        AdvertError::Pkt(PktError::Io(e)) if is_timeout(&e) => Failure::new(
            FailureClass::Deadline,
            Layer::Git,
            "the ref listing was still arriving at the deadline",
            "The git server answered too slowly; check the server, or give the check more \
                 time.",
        ),
        AdvertError::Pkt(PktError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            protocol_failure(format!(
                "the git server at {to} closed the connection before listing any refs"
            ))
        }
        other => protocol_failure(format!("{to} answered outside the git protocol: {other}")),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

// ---------------------------------------------------------------------------------------------
// git:// (stateful).

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
        let (sock, prefix) = match action {
            Service::UploadPackLs => daemon_ls(s, url).map_err(|f| record(s, f))?,
            Service::UploadPack => {
                let conn = self
                    .conn
                    .lock()
                    .ok()
                    .and_then(|c| c.as_ref().and_then(|sock| sock.try_clone().ok()));
                (
                    conn.ok_or_else(|| git2::Error::from_str("not connected"))?,
                    Vec::new(),
                )
            }
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
            prefix: Cursor::new(prefix),
            io: DeadlineIo {
                sock,
                deadline: s.ctx.deadline.into_std(),
            },
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

/// Connects through the proxy, asks for upload-pack (v2 if wanted), and returns the connection
/// with the v0 advertisement for libgit2.
fn daemon_ls(s: &CallSettings, url: &str) -> Result<(TcpStream, Vec<u8>), Failure> {
    let (parsed, to) = http_check::parse_url(url, &["git"])
        .map_err(|e| Failure::new(FailureClass::InvalidInput, Layer::Git, e, "Fix the URL."))?;
    let stream = s
        .handle
        .block_on(failure::open_tunnel(&s.ctx, &to, s.budget))?;
    update(s, |st| st.connected = true);
    let sock = stream
        .into_std()
        .and_then(|sock| sock.set_nonblocking(false).map(|()| sock))
        .map_err(|e| protocol_failure(format!("setting up the connection: {e}")))?;
    let mut io = DeadlineIo {
        sock,
        deadline: s.ctx.deadline.into_std(),
    };

    let host = match parsed.port() {
        Some(port) => format!("{}:{port}", to.host),
        None => to.host.clone(),
    };
    let mut request = format!("git-upload-pack {}\0host={host}\0", parsed.path()).into_bytes();
    if s.protocol_v2 {
        request.extend_from_slice(b"\0version=2\0");
    }
    let mut line = Vec::new();
    pkt::write_data(&mut line, &request).map_err(|e| protocol_failure(e.to_string()))?;
    io.write_all(&line)
        .map_err(|e| broken(s, AdvertError::Pkt(PktError::Io(e)), &to))?;

    let advertisement = advert::read_advertisement(&mut PktReader::new(&mut io), false)
        .map_err(|e| broken(s, e, &to))?;
    let for_libgit2 = match advertisement {
        Advertisement::V0 { version, refs } => {
            update(s, |st| st.protocol_version = Some(version));
            advert::encode_v0(&refs, false).map_err(|e| protocol_failure(e.to_string()))?
        }
        Advertisement::V2(caps) => {
            update(s, |st| st.protocol_version = Some(2));
            if caps.ls_refs.is_none() {
                return Err(protocol_failure(
                    "the server speaks protocol v2 but does not offer ls-refs".into(),
                ));
            }
            let request =
                advert::ls_refs_request(&caps).map_err(|e| protocol_failure(e.to_string()))?;
            io.write_all(&request)
                .map_err(|e| broken(s, AdvertError::Pkt(PktError::Io(e)), &to))?;
            let refs = advert::read_ls_refs(&mut PktReader::new(&mut io))
                .map_err(|e| broken(s, e, &to))?;
            update(s, |st| st.unborn_head = advert::unborn_head(&refs));
            advert::v0_from_ls_refs(&refs, &caps, false)
                .map_err(|e| protocol_failure(e.to_string()))?
        }
    };
    Ok((io.sock, for_libgit2))
}

/// Classifies a failed git:// exchange, blaming tailscaled when its proxy went away meanwhile.
fn broken(s: &CallSettings, e: AdvertError, to: &Endpoint) -> Failure {
    if let AdvertError::Pkt(PktError::Io(io)) = &e
        && !is_timeout(io)
        && let Some(gone) = s.handle.block_on(failure::proxy_went_away(&s.ctx))
    {
        return gone;
    }
    advert_failure(e, to)
}

/// Blocking socket I/O that gives up at the check's deadline, so no thread outlives it by much.
struct DeadlineIo {
    sock: TcpStream,
    deadline: Instant,
}

impl DeadlineIo {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the check's deadline passed",
            ));
        }
        Ok(left)
    }
}

impl Read for DeadlineIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.sock.set_read_timeout(Some(left))?;
        self.sock.read(buf)
    }
}

impl Write for DeadlineIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.sock.set_write_timeout(Some(left))?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// What libgit2 reads and writes on git://: the prepared advertisement first, then the socket.
struct DaemonStream {
    prefix: Cursor<Vec<u8>>,
    io: DeadlineIo,
    settings: Arc<CallSettings>,
}

impl DaemonStream {
    fn note(&self, e: io::Error) -> io::Error {
        if is_timeout(&e) {
            update(&self.settings, |st| {
                st.failure.get_or_insert(Failure::deadline(
                    self.settings.budget,
                    true,
                    "the git exchange",
                    Layer::Git,
                ));
            });
        }
        e
    }
}

impl Read for DaemonStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.prefix.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        self.io.read(buf).map_err(|e| self.note(e))
    }
}

impl Write for DaemonStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io.write(buf).map_err(|e| self.note(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.io.flush()
    }
}
