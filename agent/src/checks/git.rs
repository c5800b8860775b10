//! git ref listing through tailscaled's SOCKS5 proxy.
//!
//! libgit2 does the git work (`remote.connect` + `remote.list`, like `git ls-remote`): it speaks
//! the protocol (version 0, which every server speaks) and parses the advertisement. The
//! transports of [`transport`] only carry its bytes through the proxy. libgit2 blocks, so it
//! runs on the blocking pool, with every network operation bounded by the check's deadline. The
//! refs are compared with the expected shas the controller read from the dev host's repository.

mod transport;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tailbox_proto::agent::v1::{
    CheckResult, FailureClass, GitEvidence, GitRef, GitTarget, Layer, RefComparison, check_result,
};

#[cfg(feature = "fuzzing")]
pub(crate) use self::transport::not_smart;
use self::transport::{CallSettings, CallState};
use super::proxy::{self, BasicAuth, Failure};
use super::{Outcome, ProxyContext};
use crate::redact::Secrets;

/// How long after the deadline the check stops waiting for the libgit2 thread. The transports
/// give up at the deadline; this covers libgit2's own work after that.
const THREAD_GRACE: Duration = Duration::from_millis(500);

/// What git daemon says (in an `ERR` line, which libgit2 reports as "remote error: …") when the
/// repository is not there or not exported.
const NOT_FOUND_SAYINGS: [&str; 4] = [
    "not exported",
    "no such repository",
    "not found",
    "does not appear",
];

/// Whether `s` is a full object id (40 hex digits for SHA-1, 64 for SHA-256).
pub(crate) fn is_oid(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Runs the git check: list the remote's refs and compare the expected ones.
pub async fn check_git(target: &GitTarget, ctx: &ProxyContext) -> CheckResult {
    let secrets = Secrets::from_url(&target.url);
    let shown = secrets.scrub(&target.url);
    let outcome = Outcome::start("git", shown.clone(), Layer::Git);
    let proxy = ctx.proxy_url();
    let fail = |f: Failure| {
        outcome.fail(
            f.class,
            f.layer,
            secrets.scrub(&f.detail),
            secrets.scrub(&f.hint),
            Some(check_result::Evidence::Git(GitEvidence {
                proxy: proxy.clone(),
                ..GitEvidence::default()
            })),
        )
    };

    let mut url = match proxy::parse_url(&target.url, &["http", "https", "git"]) {
        Ok((url, _)) => url,
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
        .find(|e| e.name.trim().is_empty() || !is_oid(e.sha.trim()))
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
        return fail(Failure::internal(
            Layer::Git,
            format!("the git transports are unavailable: {e}"),
        ));
    }
    // libgit2 gets the URL without credentials; the transport sends them as basic auth.
    let auth = BasicAuth::from_url(&url);
    let _ = url.set_username("");
    let _ = url.set_password(None);

    loop {
        let settings = CallSettings {
            ctx: ctx.clone(),
            handle: tokio::runtime::Handle::current(),
            auth: auth.clone(),
            state: Arc::new(Mutex::new(CallState::default())),
        };
        match list(url.as_str(), settings).await {
            Ok(heads) => return judge(&outcome, target, &heads, &proxy, &shown),
            Err(f) => {
                if proxy::daemon_came_back(ctx, &f).await {
                    continue;
                }
                return fail(proxy::blame_stuck_daemon(ctx, f, "git").await);
            }
        }
    }
}

/// One advertised ref as libgit2 lists it.
#[derive(Debug, Clone)]
struct Head {
    name: String,
    oid: String,
    symref_target: Option<String>,
}

/// Lists the refs on the blocking pool within the deadline.
async fn list(url: &str, settings: CallSettings) -> Result<Vec<Head>, Failure> {
    let state = settings.state.clone();
    let ctx = settings.ctx.clone();
    let url = url.to_owned();
    let job =
        tokio::task::spawn_blocking(move || transport::with_call(settings, || ls_remote(&url)));
    let outcome = tokio::time::timeout_at(ctx.deadline + THREAD_GRACE, job).await;
    let mut state = match state.lock() {
        Ok(mut s) => std::mem::take(&mut *s),
        Err(_) => {
            return Err(Failure::internal(
                Layer::Git,
                "the git transport state is poisoned",
            ));
        }
    };
    match outcome {
        Err(_) => Err(state.failure.take().unwrap_or_else(|| {
            Failure::deadline(ctx.budget, state.connected, "the ref listing", Layer::Git)
        })),
        Ok(Err(join)) => Err(Failure::internal(
            Layer::Git,
            format!("the libgit2 thread failed: {join}"),
        )),
        Ok(Ok(Err(e))) => Err(state.failure.take().unwrap_or_else(|| from_libgit2(&e))),
        Ok(Ok(Ok(heads))) => Ok(heads),
    }
}

/// Classifies what libgit2 could not make of the server's answer (the transport had no
/// complaint).
pub(crate) fn from_libgit2(e: &git2::Error) -> Failure {
    let message = e.message();
    if let Some(said) = message.strip_prefix("remote error: ") {
        if NOT_FOUND_SAYINGS.iter().any(|s| said.contains(s)) {
            return Failure::new(
                FailureClass::GitNotFound,
                Layer::Git,
                format!("the git server said: {said}"),
                "Check the repository path, that the repository exists on the dev host, and that \
                 git daemon exports it (`--export-all` or git-daemon-export-ok).",
            );
        }
        return Failure::new(
            FailureClass::GitProtocol,
            Layer::Git,
            format!("the git server said: {said}"),
            "The git server refused the listing; check its log on the dev host.",
        );
    }
    Failure::new(
        FailureClass::GitProtocol,
        Layer::Git,
        format!("libgit2 could not read the server's answer: {message}"),
        "The server's answer is not the git protocol; check that the URL leads to a git server \
         (git http-backend or git daemon).",
    )
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
    heads: &[Head],
    proxy: &str,
    shown: &str,
) -> CheckResult {
    let find = |name: &str| heads.iter().find(|h| h.name == name);
    let head = find("HEAD");
    let head_target = head.and_then(|h| h.symref_target.clone());
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
        // libgit2 speaks version 0 only.
        protocol_version: 0,
        proxy: proxy.to_owned(),
    };

    let summary = format!(
        "listed {ref_count} refs of {shown}{}",
        match (&head_target, head) {
            (Some(t), Some(h)) => format!("; HEAD -> {t} at {}", short(&h.oid)),
            (None, Some(h)) => format!("; HEAD at {}", short(&h.oid)),
            (_, None) => String::new(),
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
                 repository (`git push <remote> <ref>`), or check that the URL points at the \
                 right repository on the right server (another instance on another port?).",
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
