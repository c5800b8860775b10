//! HTTP through tailscaled's SOCKS5 proxy.
//!
//! One GET over a fresh tunnel ([`proxy::get`]; socks5h, so MagicDNS names work), bounded by the
//! check's deadline, with a capped body read. Redirects are followed through the proxy, at most
//! [`MAX_REDIRECTS`], unless their status is the expected one, and every one is in the evidence.
//! The expected status is a code or an inclusive range; any 2xx by default.

use std::fmt;
use std::time::Duration;

use http::StatusCode;
use http::header::{CONTENT_TYPE, LOCATION};
use tailbox_proto::agent::v1::{
    CheckResult, FailureClass, HttpEvidence, HttpRedirect, HttpTarget, Layer, check_result,
};
use url::Url;

use super::proxy::{self, Answer, BasicAuth, BodyError, Failure, Get};
use super::{Outcome, ProxyContext};
use crate::events::duration;
use crate::redact::Secrets;

/// Body bytes read at most; the rest is never read, so a huge response costs nothing.
pub const BODY_CAP: u64 = 1 << 20;
/// Body bytes kept as text in the evidence.
pub const BODY_PREFIX_LEN: usize = 256;
/// Redirects followed at most, like browsers' lower limits; more is a loop in practice.
pub const MAX_REDIRECTS: usize = 5;

const USER_AGENT: &str = concat!("tailbox-agent/", env!("CARGO_PKG_VERSION"));

/// The statuses that pass: an inclusive range of codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    low: u16,
    high: u16,
}

impl Expected {
    /// Any 2xx.
    pub const DEFAULT: Self = Self {
        low: 200,
        high: 299,
    };

    /// What `target` expects: `expected_status` alone, the range up to `expected_status_max`, or
    /// any 2xx when neither is set.
    pub fn of(target: &HttpTarget) -> Result<Self, String> {
        let code = |n: u32| {
            u16::try_from(n)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| format!("{n} is not an HTTP status (100 to 599)"))
        };
        match (target.expected_status, target.expected_status_max) {
            (0, 0) => Ok(Self::DEFAULT),
            (0, max) => Err(format!("a range up to {max} needs its lower end")),
            (low, 0) => code(low).map(|low| Self { low, high: low }),
            (low, high) => {
                let (low, high) = (code(low)?, code(high)?);
                if low > high {
                    return Err(format!("the range {low}-{high} is empty"));
                }
                Ok(Self { low, high })
            }
        }
    }

    /// Whether `code` passes.
    pub fn contains(&self, code: u16) -> bool {
        (self.low..=self.high).contains(&code)
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::DEFAULT {
            f.write_str("2xx")
        } else if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// Runs the HTTP check: GET `target.url` through the proxy, following redirects, and compare
/// the final status with the expected one.
pub async fn check_http(target: &HttpTarget, ctx: &ProxyContext) -> CheckResult {
    let secrets = Secrets::from_url(&target.url);
    let shown = secrets.scrub(&target.url);
    let outcome = Outcome::start("http", shown.clone(), Layer::Http);
    let proxy = ctx.proxy_url();
    let no_response = |redirects: Vec<HttpRedirect>| {
        check_result::Evidence::Http(HttpEvidence {
            proxy: proxy.clone(),
            redirects,
            ..HttpEvidence::default()
        })
    };

    let invalid = |why: String| {
        outcome.fail(
            FailureClass::InvalidInput,
            Layer::Http,
            secrets.scrub(&why),
            "Give an http:// or https:// URL, e.g. http://<dev host tailnet IP>:<port>/health, \
             and an expected status from 100 to 599.",
            Some(no_response(Vec::new())),
        )
    };
    let url = match proxy::parse_url(&target.url, &["http", "https"]) {
        Ok((url, _)) => url,
        Err(why) => return invalid(format!("{shown} is not a usable URL: {why}")),
    };
    let expected = match Expected::of(target) {
        Ok(expected) => expected,
        Err(why) => {
            return invalid(format!(
                "the expected status for {shown} is unusable: {why}"
            ));
        }
    };

    loop {
        let mut redirects = Vec::new();
        match follow(ctx, &url, expected, &mut redirects).await {
            Ok(fetched) => {
                return judge(
                    &outcome, expected, fetched, redirects, &shown, &proxy, &secrets,
                );
            }
            Err(f) => {
                if proxy::daemon_came_back(ctx, &f).await {
                    continue;
                }
                let f = proxy::blame_stuck_daemon(ctx, f, "HTTP").await;
                let redirects = scrubbed(&redirects, &secrets);
                return outcome.fail(
                    f.class,
                    f.layer,
                    secrets.scrub(&f.detail),
                    secrets.scrub(&f.hint),
                    Some(no_response(redirects)),
                );
            }
        }
    }
}

/// One redirect as it happened, before redaction.
struct Hop {
    url: Url,
    status: StatusCode,
    location: Url,
}

fn scrubbed(hops: &[Hop], secrets: &Secrets) -> Vec<HttpRedirect> {
    hops.iter()
        .map(|hop| HttpRedirect {
            url: secrets.scrub(hop.url.as_str()),
            status_code: u32::from(hop.status.as_u16()),
            location: secrets.scrub(hop.location.as_str()),
        })
        .collect()
}

/// What the final GET produced once its response headers arrived.
struct Fetched {
    url: Url,
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

/// GETs `start`, following redirects into `hops` until a response that is not one to follow.
async fn follow(
    ctx: &ProxyContext,
    start: &Url,
    expected: Expected,
    hops: &mut Vec<Hop>,
) -> Result<Fetched, Failure> {
    let mut url = start.clone();
    let mut auth = BasicAuth::from_url(&url);
    loop {
        let answer = proxy::get(
            ctx,
            &Get {
                url: &url,
                user_agent: USER_AGENT,
                auth: auth.as_ref(),
                waiting_for: "the response headers",
                layer: Layer::Http,
            },
        )
        .await?;
        let status = answer.response.status();
        let next = (hops.len() < MAX_REDIRECTS && !expected.contains(status.as_u16()))
            .then(|| redirect_target(&answer, &url))
            .flatten();
        let Some(next) = next else {
            return Ok(read(ctx, url, answer).await);
        };
        // Credentials go to the origin they were given for, never to another one.
        if next.origin() != url.origin() {
            auth = BasicAuth::from_url(&next);
        } else if let Some(own) = BasicAuth::from_url(&next) {
            auth = Some(own);
        }
        hops.push(Hop {
            url: std::mem::replace(&mut url, next.clone()),
            status,
            location: next,
        });
    }
}

/// Where a redirect response points, if it is one the check can follow: a 301, 302, 303, 307 or
/// 308 with a Location that resolves to an http(s) URL.
fn redirect_target(answer: &Answer, from: &Url) -> Option<Url> {
    let status = answer.response.status();
    if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = answer.response.headers().get(LOCATION)?.to_str().ok()?;
    let next = from.join(location.trim()).ok()?;
    matches!(next.scheme(), "http" | "https").then_some(next)
}

/// Reads the final response's body up to the cap within the deadline.
async fn read(ctx: &ProxyContext, url: Url, answer: Answer) -> Fetched {
    let Answer { response, ttfb } = answer;
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut fetched = Fetched {
        url,
        status: response.status(),
        ttfb,
        content_type: header(CONTENT_TYPE).unwrap_or_default(),
        location: header(LOCATION),
        body_bytes: 0,
        truncated: false,
        prefix: Vec::new(),
        body_error: None,
    };
    let mut body = response.into_body();
    loop {
        match proxy::next_chunk(ctx, &mut body).await {
            Err(BodyError::Deadline) => {
                fetched.body_error = Some(format!(
                    "the body was still arriving at the {:.1}s deadline",
                    ctx.budget.as_secs_f64()
                ));
                break;
            }
            Err(BodyError::Broken(why)) => {
                fetched.body_error = Some(why);
                break;
            }
            Ok(None) => break,
            Ok(Some(chunk)) => {
                let room = BODY_CAP - fetched.body_bytes;
                let take = chunk.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                let want = BODY_PREFIX_LEN.saturating_sub(fetched.prefix.len());
                fetched.prefix.extend_from_slice(&chunk[..take.min(want)]);
                fetched.body_bytes += take as u64;
                if take < chunk.len() {
                    // Dropping the body closes the connection; the rest is never read.
                    fetched.truncated = true;
                    break;
                }
            }
        }
    }
    fetched
}

/// Decides pass or fail from the final response.
fn judge(
    outcome: &Outcome,
    expected: Expected,
    f: Fetched,
    hops: Vec<Hop>,
    shown: &str,
    proxy: &str,
    secrets: &Secrets,
) -> CheckResult {
    let code = f.status.as_u16();
    let final_url = secrets.scrub(f.url.as_str());
    let evidence = check_result::Evidence::Http(HttpEvidence {
        status_code: u32::from(code),
        time_to_first_byte: Some(duration(f.ttfb)),
        body_bytes: f.body_bytes,
        body_truncated: f.truncated,
        body_prefix: secrets.scrub(&prefix_text(&f.prefix)),
        content_type: f.content_type.clone(),
        proxy: proxy.to_owned(),
        redirects: scrubbed(&hops, secrets),
        final_url: final_url.clone(),
    });
    let size = if f.truncated {
        format!("first {} bytes read, body truncated", f.body_bytes)
    } else {
        format!("{} bytes", f.body_bytes)
    };
    let redirected = match hops.len() {
        0 => String::new(),
        1 => format!(", redirected once to {final_url},"),
        n => format!(", redirected {n} times to {final_url},"),
    };
    let answered = format!(
        "GET {shown}{redirected} answered {} after {}ms ({size})",
        status_text(f.status),
        f.ttfb.as_millis()
    );
    if !expected.contains(code) {
        let expect_it =
            format!("if {code} is the right answer, expect it with `--http {code}=<URL>`");
        let hint = match code {
            300..=399 if hops.len() == MAX_REDIRECTS => format!(
                "The server redirected more than {MAX_REDIRECTS} times (a redirect loop?); point \
                 the check at the final URL, or, {expect_it}."
            ),
            300..=399 => format!(
                "The server redirects to {}, which the check cannot follow; point the check at \
                 the final URL, or, {expect_it}.",
                secrets.scrub(
                    f.location
                        .as_deref()
                        .unwrap_or("nowhere (no Location header)")
                )
            ),
            401 | 403 => format!(
                "The server wants credentials or refused them; put them in the URL \
                 (`user:password@`, never printed), or, {expect_it}."
            ),
            404 => "Nothing is at that path on the server; check the URL's path.".to_owned(),
            500..=599 => {
                "The server was reached and answered with an error; check its log on the dev host."
                    .to_owned()
            }
            _ => format!("The server was reached; check the URL, or, {expect_it}."),
        };
        return outcome.fail(
            FailureClass::HttpStatus,
            Layer::Http,
            format!("{answered}, expected {expected}"),
            hint,
            Some(evidence),
        );
    }
    match &f.body_error {
        Some(e) => outcome.warn(
            format!(
                "{answered}, but reading the body failed: {}",
                secrets.scrub(e)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(low: u32, high: u32) -> HttpTarget {
        HttpTarget {
            url: "http://h/".into(),
            expected_status: low,
            expected_status_max: high,
        }
    }

    #[test]
    fn expected_statuses_are_a_code_a_range_or_any_2xx() {
        let any = Expected::of(&target(0, 0)).unwrap();
        assert!(any.contains(204) && !any.contains(302));
        assert_eq!(any.to_string(), "2xx");
        let one = Expected::of(&target(302, 0)).unwrap();
        assert!(one.contains(302) && !one.contains(301));
        assert_eq!(one.to_string(), "302");
        let range = Expected::of(&target(300, 399)).unwrap();
        assert!(range.contains(301) && range.contains(399) && !range.contains(200));
        assert_eq!(range.to_string(), "300-399");
        for (low, high) in [(0, 399), (99, 0), (600, 0), (400, 300), (200, 1000)] {
            assert!(Expected::of(&target(low, high)).is_err(), "{low}-{high}");
        }
    }

    #[test]
    fn body_prefix_drops_a_cut_character_only_at_the_end() {
        let mut bytes = "ok é".as_bytes().to_vec();
        bytes.pop();
        assert_eq!(prefix_text(&bytes), "ok ");
        assert_eq!(prefix_text(b"a\xffb"), "a\u{fffd}b");
    }
}
