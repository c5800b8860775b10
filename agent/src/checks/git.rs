//! git ref listing through tailscaled's SOCKS5 proxy.
//!
//! libgit2 (`remote.connect` + `remote.list`, like `git ls-remote`) over the custom transports of
//! [`transport`], which speak protocol v2 when the server offers it. libgit2 blocks, so it runs
//! on the blocking pool, with every network operation bounded by the check's deadline. The refs
//! are compared with the expected shas the controller read from the dev host's repository.

mod advert;
mod pkt;
mod transport;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tailbox_proto::agent::v1::{
    CheckResult, FailureClass, GitEvidence, GitRef, GitTarget, Layer, RefComparison, check_result,
};

use self::transport::{CallSettings, CallState};
use super::http::failure::{self, Failure};
use super::http::{self as http_check, Secrets, percent_decode};
use super::{Outcome, ProxyContext};

/// How long after the deadline the check stops waiting for the libgit2 thread. The transports
/// give up at the deadline; this covers libgit2's own work after that.
const THREAD_GRACE: Duration = Duration::from_millis(500);

/// Options of the git check beyond its target.
#[derive(Debug, Clone)]
pub struct GitOptions {
    /// Ask the server for protocol v2 (the default); off forces the v0 exchange.
    pub protocol_v2: bool,
}

impl Default for GitOptions {
    fn default() -> Self {
        Self { protocol_v2: true }
    }
}

/// Runs the git check: list the remote's refs and compare the expected ones.
pub async fn check_git(target: &GitTarget, ctx: &ProxyContext) -> CheckResult {
    check_git_with(target, ctx, &GitOptions::default()).await
}

/// [`check_git`] with options.
pub async fn check_git_with(
    target: &GitTarget,
    ctx: &ProxyContext,
    options: &GitOptions,
) -> CheckResult {
    let secrets = Secrets::from_url(&target.url);
    let shown = secrets.redact(&target.url);
    let outcome = Outcome::start("git", shown.clone(), Layer::Git);
    let proxy = ctx.proxy_url();
    let fail = |f: Failure| {
        outcome.fail(
            f.class,
            f.layer,
            secrets.redact(&f.detail),
            secrets.redact(&f.hint),
            Some(check_result::Evidence::Git(GitEvidence {
                proxy: proxy.clone(),
                ..GitEvidence::default()
            })),
        )
    };

    let (mut url, _) = match http_check::parse_url(&target.url, &["http", "https", "git"]) {
        Ok(parsed) => parsed,
        Err(why) => {
            return fail(Failure::new(
                FailureClass::InvalidInput,
                Layer::Git,
                format!("{shown} is not a usable git URL: {why}"),
                "Give an http://, https:// or git:// URL, e.g. \
                 http://<dev host tailnet IP>:<port>/git/<owner>/<repo>.git.",
            ));
        }
    };
    if let Some(bad) = target
        .expected_refs
        .iter()
        .find(|e| e.name.trim().is_empty() || !advert::is_oid(e.sha.trim()))
    {
        return fail(Failure::new(
            FailureClass::InvalidInput,
            Layer::Git,
            format!(
                "expected ref {:?} with sha {:?} is not a ref name and a full object id",
                bad.name, bad.sha
            ),
            "Give each expected ref its full name (refs/heads/main or HEAD) and its 40- or \
             64-hex-digit sha.",
        ));
    }
    if let Err(e) = transport::register() {
        return fail(internal(format!("the git transports are unavailable: {e}")));
    }
    let client = if url.scheme() == "git" {
        None
    } else {
        match http_check::client(ctx.socks_addr) {
            Ok(c) => Some(c),
            Err(e) => return fail(internal(format!("could not build the HTTP client: {e}"))),
        }
    };
    // libgit2 gets the URL without credentials; the transport adds them to the request, decoded
    // (userinfo in a parsed URL stays percent-encoded; the server wants the real text).
    let basic_auth = (!url.username().is_empty()).then(|| {
        (
            percent_decode(url.username()),
            url.password().map(percent_decode),
        )
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);

    let budget = ctx.remaining();
    loop {
        let settings = CallSettings {
            ctx: ctx.clone(),
            budget,
            handle: tokio::runtime::Handle::current(),
            client: client.clone(),
            protocol_v2: options.protocol_v2,
            basic_auth: basic_auth.clone(),
            state: Arc::new(Mutex::new(CallState::default())),
        };
        match list(url.as_str(), settings).await {
            Ok(listing) => return judge(&outcome, target, &listing, &proxy, &shown),
            Err(f) => {
                if failure::daemon_came_back(ctx, &f).await {
                    continue;
                }
                return fail(f);
            }
        }
    }
}

fn internal(detail: String) -> Failure {
    Failure::new(
        FailureClass::Internal,
        Layer::Git,
        detail,
        "This is a bug in the agent; please report it with the agent's log.",
    )
}

/// One advertised ref as libgit2 lists it.
#[derive(Debug, Clone)]
struct Head {
    name: String,
    oid: String,
    symref_target: Option<String>,
}

/// What one listing produced.
#[derive(Debug)]
struct Listing {
    heads: Vec<Head>,
    protocol_version: u32,
    unborn_head: Option<String>,
}

/// Lists the refs on the blocking pool within the deadline.
async fn list(url: &str, settings: CallSettings) -> Result<Listing, Failure> {
    let state = settings.state.clone();
    let deadline = settings.ctx.deadline;
    let budget = settings.budget;
    let url = url.to_owned();
    let job =
        tokio::task::spawn_blocking(move || transport::with_call(settings, || ls_remote(&url)));
    let outcome = tokio::time::timeout_at(deadline + THREAD_GRACE, job).await;
    let mut state = match state.lock() {
        Ok(mut s) => std::mem::take(&mut *s),
        Err(_) => return Err(internal("the git transport state is poisoned".into())),
    };
    match outcome {
        Err(_) => Err(state.failure.take().unwrap_or_else(|| {
            Failure::deadline(budget, state.connected, "listing the refs", Layer::Git)
        })),
        Ok(Err(join)) => Err(internal(format!("the libgit2 thread failed: {join}"))),
        Ok(Ok(Err(e))) => Err(state.failure.take().unwrap_or_else(|| {
            // The transport worked but libgit2 could not use the answer.
            Failure::new(
                FailureClass::GitProtocol,
                Layer::Git,
                format!(
                    "libgit2 could not read the server's answer: {}",
                    e.message()
                ),
                "The server's answer is not the git protocol libgit2 expects; check that the \
                 URL leads to a git server.",
            )
        })),
        Ok(Ok(Ok(heads))) => Ok(Listing {
            heads,
            protocol_version: state.protocol_version.unwrap_or(0),
            unborn_head: state.unborn_head.take(),
        }),
    }
}

/// `git ls-remote` with libgit2, on the current (blocking) thread.
fn ls_remote(url: &str) -> Result<Vec<Head>, git2::Error> {
    let mut remote = git2::Remote::create_detached(url)?;
    remote.connect(git2::Direction::Fetch)?;
    let heads = remote
        .list()?
        .iter()
        .map(|h| Head {
            name: h.name().to_owned(),
            oid: h.oid().to_string(),
            symref_target: h.symref_target().map(str::to_owned),
        })
        .collect();
    let _ = remote.disconnect();
    Ok(heads)
}

fn judge(
    outcome: &Outcome,
    target: &GitTarget,
    listing: &Listing,
    proxy: &str,
    shown: &str,
) -> CheckResult {
    let heads = &listing.heads;
    let find = |name: &str| heads.iter().find(|h| h.name == name);
    let head = find("HEAD");
    let head_target = head
        .and_then(|h| h.symref_target.clone())
        .or_else(|| listing.unborn_head.clone());
    let branch_tip = head_target
        .as_deref()
        .and_then(find)
        .or_else(|| heads.iter().find(|h| h.name.starts_with("refs/heads/")))
        .map(|h| GitRef {
            name: h.name.clone(),
            sha: h.oid.clone(),
        });
    // Peeled tag lines (`^{}`) describe a ref; they are not refs.
    let ref_count = heads.iter().filter(|h| !h.name.ends_with("^{}")).count();

    let comparisons: Vec<RefComparison> = target
        .expected_refs
        .iter()
        .map(|want| {
            let name = want.name.trim();
            // Full names are expected; short ones are tried the way git resolves them.
            let actual = find(name)
                .or_else(|| find(&format!("refs/heads/{name}")))
                .or_else(|| find(&format!("refs/tags/{name}")))
                .map(|h| h.oid.clone())
                .unwrap_or_default();
            RefComparison {
                name: name.to_owned(),
                expected: want.sha.trim().to_ascii_lowercase(),
                matched: actual.eq_ignore_ascii_case(want.sha.trim()),
                actual,
            }
        })
        .collect();
    let evidence = GitEvidence {
        ref_count: u32::try_from(ref_count).unwrap_or(u32::MAX),
        head_sha: head.map(|h| h.oid.clone()).unwrap_or_default(),
        head_target: head_target.clone().unwrap_or_default(),
        branch_tip: branch_tip.clone(),
        comparisons: comparisons.clone(),
        protocol_version: listing.protocol_version,
        proxy: proxy.to_owned(),
    };

    let summary = format!(
        "listed {ref_count} refs of {shown} over protocol v{}{}",
        listing.protocol_version,
        match (&head_target, head) {
            (Some(t), Some(h)) => format!("; HEAD -> {t} at {}", short(&h.oid)),
            (Some(t), None) => format!("; HEAD -> {t} (unborn)"),
            (None, Some(h)) => format!("; HEAD at {}", short(&h.oid)),
            (None, None) => String::new(),
        }
    );
    let mismatched: Vec<String> = comparisons
        .iter()
        .filter(|c| !c.matched)
        .map(|c| {
            if c.actual.is_empty() {
                format!("{} is missing (expected {})", c.name, short(&c.expected))
            } else {
                format!(
                    "{} is {} (expected {})",
                    c.name,
                    short(&c.actual),
                    short(&c.expected)
                )
            }
        })
        .collect();
    let evidence = check_result::Evidence::Git(evidence);
    if !mismatched.is_empty() {
        let missing = comparisons
            .iter()
            .any(|c| !c.matched && c.actual.is_empty());
        return outcome.fail(
            FailureClass::GitRefMismatch,
            Layer::Git,
            format!("{summary}, but {}", mismatched.join("; ")),
            format!(
                "The remote does not have what was expected: push the {} to the dev host's \
                 repository (git push <remote> <ref>), or check that the URL points at the right \
                 repository on the right server (another instance on another port?).",
                if missing {
                    "missing refs"
                } else {
                    "current commits"
                }
            ),
            Some(evidence),
        );
    }
    if ref_count == 0 {
        return outcome.warn(
            format!("{summary}: the repository is empty"),
            "The repository exists but has no commits; push a branch to it.",
            evidence,
        );
    }
    let compared = if comparisons.is_empty() {
        String::new()
    } else {
        format!("; {} expected refs match", comparisons.len())
    };
    outcome.pass(format!("{summary}{compared}"), evidence)
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
