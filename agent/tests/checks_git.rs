//! The git check against a real tailnet: the lab's dev-host peer serves its repository with the
//! real `git http-backend`, these tests add a real `git daemon` and a few deliberately wrong
//! servers on the dev host's loopback (tailnet TCP to the peer's port P reaches 127.0.0.1:P), and
//! a second real tailscaled is the sandbox whose SOCKS5 proxy the check goes through.
#![allow(clippy::unwrap_used)]

mod checks_support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use checks_support::{
    FixedHttp, ScriptedSocks5, Socks5Script, StandInDaemon, TEST_DEADLINE, assert_deadline_kept,
    assert_one_request_with_basic_auth, class, closed_addr, closed_port, ctx, ctx_at, header,
    layer, sandbox, status,
};
use tailbox_agent::checks::git::check_git;
use tailbox_proto::agent::v1::{
    CheckResult, CheckStatus, ExpectedRef, FailureClass, GitEvidence, GitTarget, Layer,
    check_result,
};
use tailbox_testkit::lab::{GIT_AUTH_USER, Lab};
use tokio::net::TcpListener;
use tokio::time::timeout;

fn target(url: impl Into<String>, expected: &[(&str, &str)]) -> GitTarget {
    GitTarget {
        url: url.into(),
        expected_refs: expected
            .iter()
            .map(|(name, sha)| ExpectedRef {
                name: (*name).into(),
                sha: (*sha).into(),
            })
            .collect(),
    }
}

/// Every ref of the lab repository, as expectations.
fn all_lab_refs(lab: &Lab) -> Vec<(String, String)> {
    lab.git_refs()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn refs_slice(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

fn evidence(r: &CheckResult) -> &GitEvidence {
    match &r.evidence {
        Some(check_result::Evidence::Git(e)) => e,
        other => panic!("no git evidence: {other:?}"),
    }
}

/// The evidence of a listing of the lab repository, checked against what `git rev-parse` says.
fn assert_lab_listing(lab: &Lab, r: &CheckResult) {
    assert_eq!(status(r), CheckStatus::Pass, "{r:#?}");
    assert_eq!(r.name, "git");
    assert_eq!(layer(r), Layer::Git);
    let e = evidence(r);
    assert_eq!(e.ref_count as usize, lab.git_refs().len(), "{e:?}");
    assert_eq!(e.head_target, "refs/heads/main");
    assert_eq!(e.head_sha, lab.git_ref("HEAD").unwrap());
    let tip = e.branch_tip.as_ref().unwrap();
    assert_eq!(tip.name, "refs/heads/main");
    assert_eq!(tip.sha, lab.git_ref("refs/heads/main").unwrap());
    assert_eq!(e.comparisons.len(), lab.git_refs().len());
    for c in &e.comparisons {
        assert!(c.matched, "{c:?}");
        assert_eq!(&c.actual, lab.git_ref(&c.name).unwrap());
    }
}

/// A loopback port that accepts connections and never says a word.
async fn silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    port
}

/// A real `git daemon` in inetd mode behind a loopback listener: each connection gets its own
/// daemon process with the socket as stdin and stdout. Serves the directory holding the lab
/// repository.
async fn git_daemon(base: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let home = tempfile::tempdir().unwrap();
    tokio::spawn(async move {
        let _home = home;
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let s = s.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            let out = s.try_clone().unwrap();
            let mut child = tokio::process::Command::new("git")
                .arg("daemon")
                .arg("--inetd")
                .arg("--export-all")
                .arg(format!("--base-path={}", base.display()))
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("HOME", _home.path())
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(s)))
                .stdout(Stdio::from(std::os::fd::OwnedFd::from(out)))
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_speaks_v2_and_one_that_speaks_only_v0_both_list_every_ref() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let expected = all_lab_refs(&lab);
        // The lab's http-backend hands the Git-Protocol header to upload-pack, so it speaks v2
        // to a client that asks; the other server drops the header, as v0-only servers do.
        // libgit2 speaks v0 with both.
        for url in [lab.git_url(), lab.git_v0_url()] {
            let r = check_git(
                &target(&url, &refs_slice(&expected)),
                &ctx(&node, Duration::from_secs(30)),
            )
            .await;
            assert_lab_listing(&lab, &r);
            let e = evidence(&r);
            assert_eq!(e.protocol_version, 0, "{r:#?}");
            assert_eq!(e.proxy, format!("socks5h://{}", node.socks5_addr()));
            assert_eq!(r.target, url);
            assert!(r.detail.contains("HEAD -> refs/heads/main"), "{}", r.detail);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn git_daemon_over_the_git_protocol_lists_every_ref() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let base = lab.git_repo_dir().parent().unwrap().to_owned();
        let port = git_daemon(base).await;
        let url = format!("git://{}:{port}/lab.git", lab.peer_ipv4());
        let expected = all_lab_refs(&lab);
        let r = check_git(
            &target(&url, &refs_slice(&expected)),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_lab_listing(&lab, &r);

        let missing = format!("git://{}:{port}/nope.git", lab.peer_ipv4());
        let r = check_git(&target(missing, &[]), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(class(&r), FailureClass::GitNotFound, "{r:#?}");
        assert!(r.hint.contains("export"), "{}", r.hint);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_from_the_url_opens_a_protected_repository_and_is_never_shown() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let password = lab.git_password().to_owned();
        let with = |user: &str, pass: &str| {
            lab.git_auth_url()
                .replacen("http://", &format!("http://{user}:{pass}@"), 1)
        };
        let expected = all_lab_refs(&lab);
        let cases = [
            (with(GIT_AUTH_USER, &password), None),
            (
                with(GIT_AUTH_USER, "wrong-password"),
                Some(FailureClass::GitAuth),
            ),
            (lab.git_auth_url(), Some(FailureClass::GitAuth)),
        ];
        for (url, want) in cases {
            let r = check_git(
                &target(&url, &refs_slice(&expected)),
                &ctx(&node, Duration::from_secs(30)),
            )
            .await;
            match want {
                None => assert_lab_listing(&lab, &r),
                Some(c) => {
                    assert_eq!(class(&r), c, "{r:#?}");
                    assert_eq!(layer(&r), Layer::Git);
                }
            }
            for text in [serde_json::to_string(&r).unwrap(), format!("{r:?}")] {
                assert!(!text.contains(&password), "password leaked: {text}");
                assert!(!text.contains("wrong-password"), "password leaked: {text}");
            }
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expected_sha_that_differs_is_a_ref_mismatch_with_the_comparison() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let main = lab.git_ref("refs/heads/main").unwrap().to_owned();
        let feature = lab.git_ref("refs/heads/feature").unwrap().to_owned();

        let r = check_git(
            &target(lab.git_url(), &[("refs/heads/main", &main.to_uppercase())]),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");

        let r = check_git(
            &target(
                lab.git_url(),
                &[
                    ("refs/heads/main", &feature),
                    ("refs/heads/feature", &feature),
                    ("refs/heads/gone", &main),
                ],
            ),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        assert_eq!(class(&r), FailureClass::GitRefMismatch);
        assert_eq!(layer(&r), Layer::Git);
        let c = &evidence(&r).comparisons;
        assert_eq!(c.len(), 3);
        assert_eq!(
            (
                c[0].name.as_str(),
                c[0].expected.as_str(),
                c[0].actual.as_str(),
                c[0].matched
            ),
            ("refs/heads/main", feature.as_str(), main.as_str(), false)
        );
        assert!(c[1].matched);
        assert_eq!((c[2].actual.as_str(), c[2].matched), ("", false));
        assert!(r.detail.contains("refs/heads/main is"), "{}", r.detail);
        assert!(
            r.detail.contains("refs/heads/gone is missing"),
            "{}",
            r.detail
        );
        assert!(r.hint.contains("push"), "{}", r.hint);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_path_that_does_not_exist_is_git_not_found() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let url = lab.git_url().replace("/lab.git", "/nope.git");
        let r = check_git(&target(url, &[]), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(class(&r), FailureClass::GitNotFound, "{r:#?}");
        assert_eq!(layer(&r), Layer::Git);
        assert!(r.hint.contains("/git/<owner>/<repo>.git"), "{}", r.hint);

        // The dev host's plain web server has no git either: it answers 404 for info/refs, and
        // a 404 cannot be told apart from a git server without that repository.
        let r = check_git(
            &target(lab.health_url(), &[]),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(class(&r), FailureClass::GitNotFound, "{r:#?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_web_page_or_dumb_http_is_git_protocol() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let sha = lab.git_ref("refs/heads/main").unwrap();
        let html = FixedHttp::start(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n\
             <!DOCTYPE html><html><body>cook</body></html>",
        )
        .await;
        let dumb = FixedHttp::start(format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n\
             {sha}\trefs/heads/main\n"
        ))
        .await;
        // Right content type, wrong content.
        let liar = FixedHttp::start(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n\
             Connection: close\r\n\r\nok",
        )
        .await;
        for (server, says) in [(html, "HTML"), (dumb, "dumb"), (liar, "git")] {
            let url = format!("http://{}:{}/git/me/repo.git", lab.peer_ipv4(), server.port);
            let r = check_git(&target(url, &[]), &ctx(&node, Duration::from_secs(30))).await;
            assert_eq!(class(&r), FailureClass::GitProtocol, "{r:#?}");
            assert_eq!(layer(&r), Layer::Git);
            assert!(r.detail.contains(says), "{}", r.detail);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_failures_are_classified_like_http() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let closed = closed_port().await;
        let cases = [
            (
                format!("http://{}:{closed}/lab.git", lab.peer_ipv4()),
                FailureClass::TcpRefused,
            ),
            (
                format!("git://{}:{closed}/lab.git", lab.peer_ipv4()),
                FailureClass::TcpRefused,
            ),
        ];
        for (url, want) in cases {
            let r = check_git(&target(&url, &[]), &ctx(&node, Duration::from_secs(30))).await;
            assert_eq!(class(&r), want, "{url}: {r:#?}");
            assert_eq!(layer(&r), Layer::Tcp, "{url}");
            assert!(r.hint.contains("0.0.0.0"), "{}", r.hint);
        }

        // No proxy at all.
        let nowhere = closed_addr().await;
        for url in [lab.git_url(), format!("git://{}/lab.git", lab.peer_ipv4())] {
            let r = check_git(
                &target(&url, &[]),
                &ctx_at(nowhere, Duration::from_secs(10)),
            )
            .await;
            assert_eq!(class(&r), FailureClass::SocksRefused, "{url}: {r:#?}");
        }

        // The proxy module the HTTP check uses classifies git's tunnels the same way.
        let refusing =
            ScriptedSocks5::start(Socks5Script::Reply(vec![5, 5, 0, 1, 0, 0, 0, 0, 0, 0])).await;
        for url in [lab.git_url(), format!("git://{}/lab.git", lab.peer_ipv4())] {
            let ctx = ctx_at(refusing.addr, Duration::from_secs(10));
            let r = check_git(&target(&url, &[]), &ctx).await;
            assert_eq!(class(&r), FailureClass::TcpRefused, "{url}: {r:#?}");
            assert!(r.detail.contains("reply 5"), "{}", r.detail);
        }

        // TLS spoken to a plain HTTP port: the tunnel opens, the handshake fails.
        let https = lab.git_url().replacen("http://", "https://", 1);
        let r = check_git(&target(&https, &[]), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(layer(&r), Layer::Http, "{r:#?}");
        assert!(r.detail.contains("TLS"), "{}", r.detail);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_runs_into_the_deadline_on_time() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let port = silent_server().await;
        let budget = Duration::from_secs(2);
        for url in [
            format!("http://{}:{port}/lab.git", lab.peer_ipv4()),
            format!("git://{}:{port}/lab.git", lab.peer_ipv4()),
        ] {
            let started = Instant::now();
            let r = check_git(&target(&url, &[]), &ctx(&node, budget)).await;
            let took = started.elapsed();
            assert_deadline_kept(&r, Layer::Git, took, budget, Duration::from_secs(2), &url);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_url_are_used_and_never_shown() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let password = "hunter2-Sup3rSecret";
        let user = "cookuser";
        let creds = |url: &str| url.replacen("http://", &format!("http://{user}:{password}@"), 1);
        let unauthorized = FixedHttp::start(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cook\"\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        let forbidden = FixedHttp::start(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        let expected = all_lab_refs(&lab);
        let cases = [
            (creds(&lab.git_url()), None),
            (
                format!(
                    "http://{}:{}/git/a/b.git",
                    lab.peer_ipv4(),
                    unauthorized.port
                ),
                Some(FailureClass::GitAuth),
            ),
            (
                creds(&format!(
                    "http://{}:{}/git/a/b.git",
                    lab.peer_ipv4(),
                    forbidden.port
                )),
                Some(FailureClass::GitAuth),
            ),
        ];
        for (url, want) in cases {
            let r = check_git(
                &target(&url, &refs_slice(&expected)),
                &ctx(&node, Duration::from_secs(30)),
            )
            .await;
            match want {
                None => assert_lab_listing(&lab, &r),
                Some(c) => assert_eq!(class(&r), c, "{r:#?}"),
            }
            let json = serde_json::to_string(&r).unwrap();
            for text in [json, format!("{r:?}")] {
                assert!(!text.contains(password), "password leaked: {text}");
                assert!(!text.contains(user), "user leaked: {text}");
            }
        }
        // The credentials went to the server as basic auth, never in the URL; none without them.
        assert_one_request_with_basic_auth(
            &forbidden.request_heads(),
            "GET /git/a/b.git/info/refs?service=git-upload-pack HTTP/1.1\r\n",
        );
        let heads = unauthorized.request_heads();
        assert_eq!(heads.len(), 1, "{heads:?}");
        assert_eq!(header(&heads[0], "authorization"), None, "{heads:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_waits_for_a_restarting_daemon_and_then_passes() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let base = lab.git_repo_dir().parent().unwrap().to_owned();
        let daemon_port = git_daemon(base).await;
        for url in [
            lab.git_url(),
            format!("git://{}:{daemon_port}/lab.git", lab.peer_ipv4()),
        ] {
            // tailscaled is down (nothing on its proxy port) and its supervisor says so.
            let mut daemon = StandInDaemon::down(node.socket()).await;
            let ctx = daemon.ctx(Duration::from_secs(20));
            let head = lab.git_ref("HEAD").unwrap().to_owned();
            let check =
                tokio::spawn(
                    async move { check_git(&target(url, &[("HEAD", &head)]), &ctx).await },
                );
            tokio::time::sleep(Duration::from_millis(1500)).await;
            daemon.come_back(node.socks5_addr()).await;
            let r = check.await.unwrap();
            assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn bad_input_is_invalid_input() {
    let c = ctx_at("127.0.0.1:9".parse().unwrap(), Duration::from_secs(5));
    for t in [
        target("ssh://git@host/repo.git", &[]),
        target("not a url", &[]),
        target("http://h/r.git", &[("refs/heads/main", "abc")]),
        target("http://h/r.git", &[("", &"a".repeat(40))]),
    ] {
        let r = check_git(&t, &c).await;
        assert_eq!(class(&r), FailureClass::InvalidInput, "{r:#?}");
    }
}
