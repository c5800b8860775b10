//! The HTTP check against a real tailnet: the lab's control, its dev-host peer serving HTTP, and
//! a second real tailscaled as the sandbox whose SOCKS5 proxy the check goes through.
#![allow(clippy::unwrap_used)]

mod checks_support;

use std::time::{Duration, Instant};

use checks_support::{
    FixedHttp, ScriptedSocks5, Socks5Script, StandInDaemon, TEST_DEADLINE, assert_deadline_kept,
    assert_one_request_with_basic_auth, class, closed_addr, closed_port, ctx, ctx_at, layer,
    sandbox, status,
};
use tailbox_agent::checks::http::{BODY_CAP, check_http};
use tailbox_proto::agent::v1::{
    CheckResult, CheckStatus, FailureClass, HttpEvidence, HttpTarget, Layer, check_result,
};
use tokio::time::timeout;

fn target(url: impl Into<String>, expected_status: u32) -> HttpTarget {
    HttpTarget {
        url: url.into(),
        expected_status,
        expected_status_max: 0,
    }
}

fn evidence(r: &CheckResult) -> &HttpEvidence {
    match &r.evidence {
        Some(check_result::Evidence::Http(e)) => e,
        other => panic!("no HTTP evidence: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_passes_with_status_body_and_timing() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let r = check_http(
            &target(lab.health_url(), 0),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
        assert_eq!(r.name, "http");
        assert_eq!(r.target, lab.health_url());
        assert_eq!(layer(&r), Layer::Http);
        let e = evidence(&r);
        assert_eq!(e.status_code, 200);
        assert_eq!(e.body_prefix, "ok");
        assert_eq!(e.body_bytes, 2);
        assert!(!e.body_truncated);
        assert!(e.content_type.starts_with("text/plain"), "{e:?}");
        assert_eq!(e.proxy, format!("socks5h://{}", node.socks5_addr()));
        assert!(e.time_to_first_byte.is_some());
        assert!(r.duration.is_some());

        // The peer's IPv6 tailnet address works as well.
        let v6 = format!("http://[{}]:{}/health", lab.peer_ipv6(), lab.http_port());
        let r = check_http(&target(&v6, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn unexpected_status_fails_and_an_expected_one_passes() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let url = format!("{}/status/500", lab.http_base_url());
        let r = check_http(&target(&url, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        assert_eq!(class(&r), FailureClass::HttpStatus);
        assert_eq!(layer(&r), Layer::Http);
        assert_eq!(evidence(&r).status_code, 500);
        assert_eq!(evidence(&r).body_prefix, "status 500\n");
        assert!(r.detail.contains("expected 2xx"), "{}", r.detail);
        assert!(!r.hint.is_empty());

        let r = check_http(&target(&url, 500), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");

        let r = check_http(
            &target(lab.health_url(), 204),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        assert_eq!(class(&r), FailureClass::HttpStatus, "{r:#?}");
        assert!(r.detail.contains("expected 204"), "{}", r.detail);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_body_is_read_up_to_the_cap_and_passes() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let url = format!("{}/large?bytes={}", lab.http_base_url(), 8 * BODY_CAP);
        let started = Instant::now();
        let r = check_http(&target(url, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
        let e = evidence(&r);
        assert!(e.body_truncated);
        assert_eq!(e.body_bytes, BODY_CAP);
        assert!(
            e.body_prefix.starts_with("tailbox-lab\ntailbox-lab\n"),
            "{e:?}"
        );
        assert_eq!(e.body_prefix.len(), 256);
        eprintln!("large body check took {:?}", started.elapsed());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_on_the_peer_is_tcp_refused_with_the_bind_hint() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let url = format!("http://{}:{}/health", lab.peer_ipv4(), closed_port().await);
        let started = Instant::now();
        let r = check_http(&target(url, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        assert_eq!(class(&r), FailureClass::TcpRefused, "{r:#?}");
        assert_eq!(layer(&r), Layer::Tcp);
        assert!(r.hint.contains("0.0.0.0"), "{}", r.hint);
        assert!(r.hint.contains("127.0.0.1"), "{}", r.hint);
        assert_eq!(evidence(&r).status_code, 0);
        // A reset, not tailscaled's 5 s dial timeout (for the request and for the diagnosis).
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tailnet_ip_without_a_peer_fails_at_the_connection_without_hanging() {
    timeout(TEST_DEADLINE, async {
        let (_lab, node) = sandbox().await;
        // An address in the tailnet's IPv6 range that no node has. (An unused 100.x address is
        // dialed on the host network, and what answers there depends on the machine.)
        let budget = Duration::from_secs(20);
        let started = Instant::now();
        let r = check_http(
            &target("http://[fd7a:115c:a1e0::99]:8080/health", 0),
            &ctx(&node, budget),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        assert!(
            matches!(
                class(&r),
                FailureClass::TcpRefused | FailureClass::SocksTimeout
            ),
            "{r:#?}"
        );
        assert_eq!(layer(&r), Layer::Tcp);
        assert!(took < budget, "took {took:?}");
        eprintln!(
            "no-peer check: {:?} after {took:?}: {}",
            class(&r),
            r.detail
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_address_where_nothing_listens_is_socks_refused() {
    timeout(TEST_DEADLINE, async {
        let closed = closed_addr().await;
        let started = Instant::now();
        let r = check_http(
            &target("http://100.64.0.1:7420/health", 0),
            &ctx_at(closed, Duration::from_secs(10)),
        )
        .await;
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        assert_eq!(class(&r), FailureClass::SocksRefused, "{r:#?}");
        assert_eq!(layer(&r), Layer::Tcp);
        assert!(r.hint.contains("--socks5-server"), "{}", r.hint);
        // One second of grace for a supervisor to notice a dead daemon, no more.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_url_appear_nowhere_in_the_result() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let password = "hunter2-Sup3rSecret";
        let user = "cookuser";
        let with_creds = |base: &str, path: &str| {
            let rest = base.strip_prefix("http://").unwrap();
            format!("http://{user}:{password}@{rest}{path}")
        };
        let closed = format!("http://{}:{}", lab.peer_ipv4(), closed_port().await);
        // A server on the dev host that shows what it was sent.
        let recording =
            FixedHttp::start("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        let recording_url = format!("http://{}:{}", lab.peer_ipv4(), recording.port);
        // Passes (one at the recording server), a refusal whose hint is about credentials, and
        // a failure before any request went out.
        let cases = [
            (with_creds(&lab.http_base_url(), "/health"), None),
            (with_creds(&recording_url, "/private"), None),
            (
                with_creds(&lab.http_base_url(), "/status/401"),
                Some(FailureClass::HttpStatus),
            ),
            (with_creds(&closed, "/x"), Some(FailureClass::TcpRefused)),
        ];
        for (url, want) in cases {
            let r = check_http(&target(&url, 0), &ctx(&node, Duration::from_secs(30))).await;
            match want {
                None => assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}"),
                Some(c) => assert_eq!(class(&r), c, "{r:#?}"),
            }
            let json = serde_json::to_string(&r).unwrap();
            let debug = format!("{r:?}");
            for text in [&json, &debug] {
                assert!(!text.contains(password), "password leaked: {text}");
                assert!(!text.contains(user), "user leaked: {text}");
            }
            assert!(r.target.contains("****@"), "{}", r.target);
        }
        // The credentials went to the server as basic auth, and only there.
        assert_one_request_with_basic_auth(&recording.request_heads(), "GET /private HTTP/1.1\r\n");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_response_runs_into_the_deadline_on_time() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let url = format!("{}/slow?ms=20000", lab.http_base_url());
        let budget = Duration::from_secs(2);
        let started = Instant::now();
        let r = check_http(&target(url, 0), &ctx(&node, budget)).await;
        let took = started.elapsed();
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        // The connection was open; the server was slow.
        let slack = Duration::from_millis(1500);
        assert_deadline_kept(&r, Layer::Http, took, budget, slack, "a slow server");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_waits_for_a_restarting_daemon_and_then_passes() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        // The proxy port the check is given, with nothing behind it yet: tailscaled is down and
        // its supervisor says so.
        let mut daemon = StandInDaemon::down(node.socket()).await;
        let ctx = daemon.ctx(Duration::from_secs(20));
        let health = lab.health_url();
        let check = tokio::spawn(async move { check_http(&target(health, 0), &ctx).await });

        // "Restart": the proxy comes back on the same port and the supervisor reports ready.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        daemon.come_back(node.socks5_addr()).await;

        let r = check.await.unwrap();
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
        assert_eq!(evidence(&r).body_prefix, "ok");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_that_dies_mid_request_and_comes_back_in_time_does_not_fail_the_check() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let mut daemon = StandInDaemon::up(&node).await;
        let ctx = daemon.ctx(Duration::from_secs(20));
        let url = format!("{}/slow?ms=1500", lab.http_base_url());
        let started = Instant::now();
        let check = tokio::spawn(async move { check_http(&target(url, 0), &ctx).await });

        // tailscaled dies while the server is still thinking...
        tokio::time::sleep(Duration::from_millis(500)).await;
        daemon.die().await;
        // ...and its supervisor brings it back a second later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        daemon.come_back(node.socks5_addr()).await;

        let r = check.await.unwrap();
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
        // The first attempt was lost; the second one took the full 1.5 s again.
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_a_plain_http_port_fails_at_the_http_layer_with_a_tls_hint() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let url = lab.health_url().replacen("http://", "https://", 1);
        let r = check_http(&target(url, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Fail, "{r:#?}");
        assert_eq!(layer(&r), Layer::Http, "{r:#?}");
        assert!(r.detail.contains("TLS"), "{}", r.detail);
        assert!(r.hint.contains("certificate"), "{}", r.hint);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_that_is_gone_for_good_fails_the_check_at_once() {
    timeout(TEST_DEADLINE, async {
        let daemon = StandInDaemon::down_for_good().await;
        let ctx = daemon.ctx(Duration::from_secs(20));
        let started = Instant::now();
        let check =
            tokio::spawn(async move { check_http(&target("http://100.64.0.1:1/", 0), &ctx).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        daemon.gone();
        let r = check.await.unwrap();
        assert_eq!(class(&r), FailureClass::SocksRefused, "{r:#?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_url_that_is_not_http_is_invalid_input() {
    let r = check_http(
        &target("ftp://u:secretpw@host/x", 0),
        &ctx_at("127.0.0.1:9".parse().unwrap(), Duration::from_secs(5)),
    )
    .await;
    assert_eq!(class(&r), FailureClass::InvalidInput, "{r:#?}");
    assert!(!format!("{r:?}").contains("secretpw"));
}

fn range(url: impl Into<String>, low: u32, high: u32) -> HttpTarget {
    HttpTarget {
        url: url.into(),
        expected_status: low,
        expected_status_max: high,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_followed_through_the_tailnet_and_recorded() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let start = lab.redirect_url(2);
        let r = check_http(&target(&start, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
        let e = evidence(&r);
        assert_eq!((e.status_code, e.body_prefix.as_str()), (200, "ok"));
        assert_eq!(e.final_url, lab.health_url());
        let chain: Vec<(&str, u32, &str)> = e
            .redirects
            .iter()
            .map(|h| (h.url.as_str(), h.status_code, h.location.as_str()))
            .collect();
        let middle = lab.redirect_url(1);
        assert_eq!(
            chain,
            [
                (start.as_str(), 302, middle.as_str()),
                (middle.as_str(), 302, lab.health_url().as_str())
            ]
        );
        assert!(r.detail.contains("redirected 2 times"), "{}", r.detail);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expected_redirect_passes_without_being_followed() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        for expected in [
            target(lab.redirect_url(1), 302),
            range(lab.redirect_url(1), 300, 399),
        ] {
            let r = check_http(&expected, &ctx(&node, Duration::from_secs(30))).await;
            assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
            let e = evidence(&r);
            assert_eq!(e.status_code, 302);
            assert!(e.redirects.is_empty(), "{e:?}");
            assert_eq!(e.final_url, lab.redirect_url(1));
        }
        // A range that does not hold the answer fails and names it.
        let r = check_http(
            &range(lab.health_url(), 300, 399),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(class(&r), FailureClass::HttpStatus, "{r:#?}");
        assert!(r.detail.contains("expected 300-399"), "{}", r.detail);
        assert!(r.hint.contains("`--http 200=<URL>`"), "{}", r.hint);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn more_than_five_redirects_fail_with_the_chain() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        let r = check_http(
            &target(lab.redirect_url(6), 0),
            &ctx(&node, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(class(&r), FailureClass::HttpStatus, "{r:#?}");
        assert_eq!(layer(&r), Layer::Http);
        let e = evidence(&r);
        assert_eq!(e.redirects.len(), 5, "{e:?}");
        assert_eq!(e.status_code, 302);
        assert_eq!(e.final_url, lab.redirect_url(1));
        assert!(r.hint.contains("more than 5 times"), "{}", r.hint);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_tailscaled_cannot_resolve_is_dns_failed_with_a_magicdns_hint() {
    timeout(TEST_DEADLINE, async {
        let (lab, node) = sandbox().await;
        // The MagicDNS name works (tailscaled resolves it from the netmap)...
        let by_name = format!("http://{}:{}/health", lab.peer_fqdn(), lab.http_port());
        let r = check_http(&target(by_name, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");

        // ...and a name no peer has, which tailscaled then hands to the system's resolver. A
        // label longer than 63 bytes is one Go's resolver refuses without sending a query, so
        // the test stays on this machine.
        let unknown = format!("http://{}.tailbox-lab.test:80/health", "x".repeat(64));
        let started = Instant::now();
        let r = check_http(&target(unknown, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(class(&r), FailureClass::DnsFailed, "{r:#?}");
        assert_eq!(layer(&r), Layer::Tcp);
        assert!(r.hint.contains("MagicDNS"), "{}", r.hint);
        assert!(
            r.hint.contains(&lab.peer_fqdn()),
            "the closest peer: {}",
            r.hint
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        // A name that resolves to a closed port is still a refused connection, not DNS.
        let refused = format!("http://{}:{}/", lab.peer_fqdn(), closed_port().await);
        let r = check_http(&target(refused, 0), &ctx(&node, Duration::from_secs(30))).await;
        assert_eq!(class(&r), FailureClass::TcpRefused, "{r:#?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn every_socks5_reply_maps_to_its_class() {
    use FailureClass::{SocksRefused, SocksTimeout, TcpRefused};
    let reply = |code: u8| Socks5Script::Reply(vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]);
    let cases = [
        ("general failure", reply(1), TcpRefused),
        ("not allowed by ruleset", reply(2), SocksRefused),
        ("network unreachable", reply(3), TcpRefused),
        ("host unreachable", reply(4), TcpRefused),
        ("connection refused", reply(5), TcpRefused),
        ("TTL expired", reply(6), SocksTimeout),
        ("command not supported", reply(7), SocksRefused),
        ("address type not supported", reply(8), SocksRefused),
        // tailscale#6144: a failure reply whose address type is 0 and has no address. Read as
        // the failure it reports.
        (
            "malformed failure reply",
            Socks5Script::Reply(vec![5, 1, 0, 0]),
            TcpRefused,
        ),
        // A success whose bound address has no valid type: not SOCKS5.
        (
            "malformed success reply",
            Socks5Script::Reply(vec![5, 0, 0, 0, 9, 9]),
            SocksRefused,
        ),
        ("unassigned reply code", reply(9), SocksRefused),
        (
            "authentication demanded",
            Socks5Script::Method(0xff),
            SocksRefused,
        ),
    ];
    for (what, script, want) in cases {
        let proxy = ScriptedSocks5::start(script).await;
        let r = check_http(
            &target("http://100.64.0.1:7420/health", 0),
            &ctx_at(proxy.addr, Duration::from_secs(10)),
        )
        .await;
        assert_eq!(class(&r), want, "{what}: {r:#?}");
        assert_eq!(layer(&r), Layer::Tcp, "{what}");
        assert!(!r.hint.is_empty(), "{what}");
    }
}

#[tokio::test]
async fn a_dial_nothing_answered_is_made_once_more() {
    // What tailscaled answers when its 5 s dial gets nowhere, shortened: reply 1, late.
    let nothing_answered = Socks5Script::SlowReply(
        Duration::from_millis(1600),
        vec![5, 1, 0, 1, 0, 0, 0, 0, 0, 0],
    );
    // A tunnel that opens, and the dev host's answer through it.
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_vec();
    let url = "http://100.64.0.1:7420/health";

    let proxy =
        ScriptedSocks5::start_each(vec![nothing_answered.clone(), Socks5Script::Tunnel(ok)]).await;
    let r = check_http(
        &target(url, 0),
        &ctx_at(proxy.addr, Duration::from_secs(10)),
    )
    .await;
    assert_eq!(status(&r), CheckStatus::Pass, "{r:#?}");
    assert_eq!(evidence(&r).body_prefix, "ok");

    // Twice nothing: the second failure is the one reported, and there is no third try.
    let proxy = ScriptedSocks5::start(nothing_answered).await;
    let started = Instant::now();
    let r = check_http(
        &target(url, 0),
        &ctx_at(proxy.addr, Duration::from_secs(10)),
    )
    .await;
    assert_eq!(class(&r), FailureClass::SocksTimeout, "{r:#?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3200) && took < Duration::from_millis(4800),
        "{took:?}"
    );
}
