//! HTTP through tailscaled's SOCKS5 proxy.
//!
//! One GET with reqwest (socks5h: tailscaled resolves names, so MagicDNS works), bounded by the
//! check's deadline, with a capped body read. When the connection cannot be opened, reqwest's
//! error says little, so the failure is diagnosed with a second, plain SOCKS5 CONNECT that reports
//! the proxy's reply code ([`failure::open_tunnel`]); the git check shares that machinery.

pub(crate) mod failure;
pub(crate) mod socks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use reqwest::{StatusCode, Url};
use tailbox_proto::agent::v1::{
    CheckResult, FailureClass, HttpEvidence, HttpTarget, Layer, check_result,
};

use self::failure::{Endpoint, Failure};
use super::{Outcome, ProxyContext};
use crate::error_chain;
use crate::events::duration;
use crate::redact::redact_url;

/// Body bytes read at most; the rest is never read, so a huge response costs nothing.
pub const BODY_CAP: u64 = 1 << 20;
/// Body bytes kept as text in the evidence.
pub const BODY_PREFIX_LEN: usize = 256;

/// Runs the HTTP check: GET `target.url` through the proxy and compare the status.
pub async fn check_http(target: &HttpTarget, ctx: &ProxyContext) -> CheckResult {
    let secrets = Secrets::from_url(&target.url);
    let shown = secrets.redact(&target.url);
    let outcome = Outcome::start("http", shown.clone(), Layer::Http);
    let proxy = ctx.proxy_url();
    let no_response = || {
        check_result::Evidence::Http(HttpEvidence {
            proxy: proxy.clone(),
            ..HttpEvidence::default()
        })
    };

    let (url, to) = match parse_url(&target.url, &["http", "https"]) {
        Ok(parsed) => parsed,
        Err(why) => {
            return outcome.fail(
                FailureClass::InvalidInput,
                Layer::Http,
                format!("{shown} is not a usable URL: {why}"),
                "Give an http:// or https:// URL, e.g. http://<dev host tailnet IP>:<port>/health.",
                Some(no_response()),
            );
        }
    };
    let client = match client(ctx.socks_addr) {
        Ok(c) => c,
        Err(e) => {
            return outcome.fail(
                FailureClass::Internal,
                Layer::Http,
                format!("could not build the HTTP client: {e}"),
                "This is a bug in the agent; please report it with the agent's log.",
                Some(no_response()),
            );
        }
    };

    let limit = ctx.remaining();
    let mut retried_transient = false;
    loop {
        match fetch(&client, &url, &to, ctx, limit).await {
            Ok(fetched) => return judge(&outcome, target, fetched, &shown, &proxy, &secrets),
            Err(f) => {
                if f.transient && !retried_transient {
                    retried_transient = true;
                    continue;
                }
                if failure::daemon_came_back(ctx, &f).await {
                    continue;
                }
                return outcome.fail(
                    f.class,
                    f.layer,
                    secrets.redact(&f.detail),
                    secrets.redact(&f.hint),
                    Some(no_response()),
                );
            }
        }
    }
}

/// What one GET produced once the response headers arrived.
struct Fetched {
    status: StatusCode,
    ttfb: Duration,
    content_type: String,
    location: Option<String>,
    body_bytes: u64,
    truncated: bool,
    prefix: Vec<u8>,
    /// Reading the body failed or ran out of time after `body_bytes`.
    body_error: Option<String>,
}

async fn fetch(
    client: &reqwest::Client,
    url: &Url,
    to: &Endpoint,
    ctx: &ProxyContext,
    limit: Duration,
) -> Result<Fetched, Failure> {
    let asked = Instant::now();
    let (mut response, opened) = send(
        client.get(url.clone()),
        ctx,
        to,
        url.scheme() == "https",
        limit,
        "the response headers",
        Layer::Http,
    )
    .await?;
    let headers_at = Instant::now();
    // From the moment the connection was open (the request goes out right then) to the headers;
    // the SOCKS handshake and tailscaled's dial are not the server's latency.
    let ttfb = headers_at.duration_since(opened.unwrap_or(asked));
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let content_type = header(reqwest::header::CONTENT_TYPE).unwrap_or_default();
    let location = header(reqwest::header::LOCATION);

    let mut fetched = Fetched {
        status: response.status(),
        ttfb,
        content_type,
        location,
        body_bytes: 0,
        truncated: false,
        prefix: Vec::new(),
        body_error: None,
    };
    loop {
        match tokio::time::timeout_at(ctx.deadline, response.chunk()).await {
            Err(_) => {
                fetched.body_error = Some(format!(
                    "the body was still arriving at the {:.1} s deadline",
                    limit.as_secs_f64()
                ));
                break;
            }
            Ok(Err(e)) => {
                fetched.body_error = Some(error_chain(&e.without_url()));
                break;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => {
                let room = BODY_CAP - fetched.body_bytes;
                let take = chunk.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                let want = BODY_PREFIX_LEN.saturating_sub(fetched.prefix.len());
                fetched.prefix.extend_from_slice(&chunk[..take.min(want)]);
                fetched.body_bytes += take as u64;
                if take < chunk.len() {
                    // Dropping the response closes the connection; the rest is never read.
                    fetched.truncated = true;
                    break;
                }
            }
        }
    }
    Ok(fetched)
}

/// Sends one request to `to` through the proxy within the check's deadline (`budget` is the
/// check's whole time, for messages), with a failure classified ([`classify`]); a deadline that
/// passes once connected is put as `waiting_for` not arriving, at `layer`. Also returns when the
/// request's connection opened.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    ctx: &ProxyContext,
    to: &Endpoint,
    https: bool,
    budget: Duration,
    waiting_for: &str,
    layer: Layer,
) -> Result<(reqwest::Response, Option<Instant>), Failure> {
    let trace = Arc::new(ConnectTrace::default());
    let sending = CONNECT_TRACE.scope(trace.clone(), request.send());
    match tokio::time::timeout_at(ctx.deadline, sending).await {
        Err(_) => Err(Failure::deadline(
            budget,
            trace.opened().is_some(),
            waiting_for,
            layer,
        )),
        Ok(Err(e)) => Err(classify(e, ctx, to, https, budget).await),
        Ok(Ok(response)) => Ok((response, trace.opened())),
    }
}

/// Turns a reqwest error into a typed failure, opening a diagnostic tunnel when the connection
/// could not be opened.
async fn classify(
    err: reqwest::Error,
    ctx: &ProxyContext,
    to: &Endpoint,
    https: bool,
    limit: Duration,
) -> Failure {
    let connect = err.is_connect();
    let timeout = err.is_timeout();
    let text = error_chain(&err.without_url());
    tracing::debug!(error = %text, "HTTP request through the proxy failed");
    if !connect {
        if let Some(gone) = failure::proxy_went_away(ctx).await {
            return gone;
        }
        return Failure::new(
            FailureClass::HttpStatus,
            Layer::Http,
            format!("{to} accepted the connection but no HTTP response came back: {text}"),
            "Something listens on that port but did not answer HTTP: check the port, and the \
             scheme (https:// for a TLS port, http:// otherwise).",
        );
    }
    if timeout {
        return failure::connect_timed_out(ctx.socks_addr, to);
    }
    // A fresh tunnel says why reqwest's did not open; if it opens, the failure was above TCP
    // (TLS) or transient.
    match failure::open_tunnel(ctx, to, limit).await {
        Err(f) => f,
        Ok(_tunnel) if https => Failure::new(
            FailureClass::HttpStatus,
            Layer::Http,
            format!("TCP to {to} opens through the tailnet, but TLS failed: {text}"),
            "The TLS handshake failed: check that the port serves https, that its certificate \
             is valid for the host in the URL, and that its CA is trusted in the sandbox (the \
             system CA bundle, or SSL_CERT_FILE).",
        ),
        Ok(_tunnel) => Failure {
            transient: true,
            ..Failure::new(
                FailureClass::TcpRefused,
                Layer::Tcp,
                format!(
                    "opening the connection to {to} failed ({text}), although a second tunnel \
                     opened"
                ),
                "The path through the tailnet is flaky; retry, and check tailscaled's log.",
            )
        },
    }
}

/// Decides pass or fail from the response.
fn judge(
    outcome: &Outcome,
    target: &HttpTarget,
    f: Fetched,
    shown: &str,
    proxy: &str,
    secrets: &Secrets,
) -> CheckResult {
    let code = f.status.as_u16();
    let evidence = check_result::Evidence::Http(HttpEvidence {
        status_code: u32::from(code),
        time_to_first_byte: Some(duration(f.ttfb)),
        body_bytes: f.body_bytes,
        body_truncated: f.truncated,
        body_prefix: secrets.redact(&prefix_text(&f.prefix)),
        content_type: f.content_type.clone(),
        proxy: proxy.to_owned(),
    });
    let expected = target.expected_status;
    let ok = match expected {
        0 => f.status.is_success(),
        want => u32::from(code) == want,
    };
    let want_text = match expected {
        0 => "2xx".to_owned(),
        want => want.to_string(),
    };
    let size = if f.truncated {
        format!("first {} bytes read, body truncated", f.body_bytes)
    } else {
        format!("{} bytes", f.body_bytes)
    };
    let answered = format!(
        "GET {shown} answered {} after {} ms ({size})",
        status_text(f.status),
        f.ttfb.as_millis()
    );
    if !ok {
        let hint = match code {
            300..=399 => format!(
                "The server redirects to {}; point the check at the final URL, or expect {code}.",
                secrets.redact(f.location.as_deref().unwrap_or("(no Location header)"))
            ),
            401 | 403 => format!(
                "The server wants credentials or refused them; put them in the URL \
                 (user:password@, never printed), or expect {code}."
            ),
            404 => "Nothing is at that path on the server; check the URL's path.".to_owned(),
            500..=599 => {
                "The server was reached and answered with an error; check its log on the dev host."
                    .to_owned()
            }
            _ => {
                format!("The server was reached; check the URL, or expect {code} if that is right.")
            }
        };
        return outcome.fail(
            FailureClass::HttpStatus,
            Layer::Http,
            format!("{answered}, expected {want_text}"),
            hint,
            Some(evidence),
        );
    }
    match &f.body_error {
        Some(e) => outcome.warn(
            format!(
                "{answered}, but reading the body failed: {}",
                secrets.redact(e)
            ),
            "The status is right but the body was cut off; check the server and the path \
             through the tailnet.",
            evidence,
        ),
        None => outcome.pass(answered, evidence),
    }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The body prefix as text: lossy UTF-8 without a character cut in half at the end.
fn prefix_text(prefix: &[u8]) -> String {
    let cut = match std::str::from_utf8(prefix) {
        Ok(_) => prefix.len(),
        // An incomplete sequence at the very end comes from the byte cap, not from the body.
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => prefix.len(),
    };
    String::from_utf8_lossy(&prefix[..cut]).into_owned()
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
    let host = url.host_str().ok_or("the URL has no host")?.to_owned();
    let port = url
        .port_or_known_default()
        .or_else(|| (url.scheme() == "git").then_some(9418))
        .ok_or("the URL has no port")?;
    Ok((url, Endpoint { host, port }))
}

// ---------------------------------------------------------------------------------------------
// Keeping credentials out of results.

/// The credentials of a target URL, to scrub from anything that leaves the agent.
#[derive(Debug, Default, Clone)]
pub(crate) struct Secrets(Vec<String>);

impl Secrets {
    /// Collects the user name and password of `url`, as written and percent-decoded.
    pub(crate) fn from_url(url: &str) -> Self {
        let mut found = Vec::new();
        if let Some(scheme_end) = url.find("://") {
            let rest = &url[scheme_end + 3..];
            let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
            if let Some(at) = authority.rfind('@') {
                let userinfo = &authority[..at];
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                for part in [user, pass] {
                    // Very short strings would scrub ordinary words; they are still kept out of
                    // URLs by the URL redaction.
                    if part.len() >= 3 {
                        found.push(part.to_owned());
                        let decoded = percent_decode(part);
                        if decoded != part {
                            found.push(decoded);
                        }
                    }
                }
            }
        }
        // Longest first, so a password containing the user name is replaced whole.
        found.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self(found)
    }

    /// Redacts URLs in `text` and replaces every occurrence of a known secret.
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = redact_urls_in(text);
        for secret in &self.0 {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "****");
            }
        }
        out
    }
}

/// Applies [`redact_url`] to every URL-looking token of a free text (error messages quote URLs).
pub(crate) fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+.-".contains(c)))
            .map_or(0, |p| p + 1);
        let end = rest[i + 3..]
            .find(|c: char| c.is_whitespace() || "\"'<>()`".contains(c))
            .map_or(rest.len(), |p| i + 3 + p);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Percent-decodes a URL component (user names and passwords stay encoded in parsed URLs).
pub(crate) fn percent_decode(s: &str) -> String {
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The shared client.

/// One client per proxy address for the life of the process: building one loads the CA store,
/// which costs milliseconds.
static CLIENTS: LazyLock<Mutex<HashMap<SocketAddr, reqwest::Client>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The reqwest client that goes through the SOCKS5 proxy at `proxy` (socks5h).
pub(crate) fn client(proxy: SocketAddr) -> Result<reqwest::Client, String> {
    let mut clients = CLIENTS
        .lock()
        .map_err(|_| "the HTTP client cache is poisoned".to_owned())?;
    if let Some(c) = clients.get(&proxy) {
        return Ok(c.clone());
    }
    let c = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("socks5h://{proxy}")).map_err(|e| error_chain(&e))?)
        // A check reports what the server said, not where it led.
        .redirect(reqwest::redirect::Policy::none())
        .retry(reqwest::retry::never())
        // Each check opens its own connection: that is what it measures, and a pooled one could
        // have gone through a tailscaled that has since been restarted.
        .pool_max_idle_per_host(0)
        .connect_timeout(failure::CONNECT_TIMEOUT)
        .connector_layer(tower::layer::layer_fn(|inner| TraceConnect { inner }))
        .user_agent(concat!("tailbox-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| error_chain(&e))?;
    clients.insert(proxy, c.clone());
    Ok(c)
}

tokio::task_local! {
    /// Where the connector of the request being made records when its connection opened.
    static CONNECT_TRACE: Arc<ConnectTrace>;
}

/// When the connection of one request opened (SOCKS handshake, dial and TLS done).
#[derive(Debug, Default)]
struct ConnectTrace {
    opened: Mutex<Option<Instant>>,
}

impl ConnectTrace {
    /// When the connection opened, if it did.
    fn opened(&self) -> Option<Instant> {
        self.opened.lock().ok().and_then(|g| *g)
    }

    fn mark(&self) {
        if let Ok(mut g) = self.opened.lock() {
            *g = Some(Instant::now());
        }
    }
}

/// Connector middleware that marks the [`ConnectTrace`] of the current request.
#[derive(Clone)]
struct TraceConnect<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, R> tower::Service<R> for TraceConnect<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // The connector is called while the request future is polled, so the task-local of the
        // check that made the request is in scope (the pool is off, nothing runs detached).
        let trace = CONNECT_TRACE.try_with(Arc::clone).ok();
        let connecting = self.inner.call(req);
        Box::pin(async move {
            let result = connecting.await;
            if let (Ok(_), Some(trace)) = (&result, trace) {
                trace.mark();
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_from_urls_and_free_text() {
        let s = Secrets::from_url("https://alice:s3cr%40t-pass@cook.example.com/git/a.git");
        let text = "error for url (https://alice:s3cr%40t-pass@cook.example.com/x): \
                    auth s3cr@t-pass rejected for alice";
        let out = s.redact(text);
        assert!(!out.contains("s3cr"), "{out}");
        assert!(!out.contains("alice"), "{out}");
        assert!(out.contains("https://****@cook.example.com/x"), "{out}");
    }

    #[test]
    fn urls_in_text_are_redacted_without_touching_the_rest() {
        assert_eq!(
            redact_urls_in("a http://u:p@h:1/x b (git://h/y) c"),
            "a http://****@h:1/x b (git://h/y) c"
        );
        assert_eq!(redact_urls_in("no urls here"), "no urls here");
        assert_eq!(redact_urls_in("://odd"), "://odd");
    }

    #[test]
    fn body_prefix_drops_a_cut_character_only_at_the_end() {
        let mut bytes = "ok é".as_bytes().to_vec();
        bytes.pop();
        assert_eq!(prefix_text(&bytes), "ok ");
        assert_eq!(prefix_text(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn urls_parse_into_endpoints() {
        let (_, e) = parse_url("http://100.64.0.1:7420/health", &["http", "https"]).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("100.64.0.1", 7420));
        let (_, e) = parse_url("https://devhost/x", &["http", "https"]).unwrap();
        assert_eq!(e.port, 443);
        let (_, e) = parse_url("git://devhost/lab.git", &["git"]).unwrap();
        assert_eq!(e.port, 9418);
        assert!(parse_url("ftp://h/x", &["http", "https"]).is_err());
        assert!(parse_url("not a url", &["http"]).is_err());
    }
}
