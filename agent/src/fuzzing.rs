//! Entry points for the fuzz targets in `fuzz/` (built with the `fuzzing` feature only): each
//! feeds outside bytes to the code that reads them in the agent, exactly as the agent does, and
//! lets the result be dropped. Not for other uses.

use std::net::SocketAddr;
use std::time::Duration;

use tailbox_proto::agent::v1::{CheckRequest, Layer, RunRequest};
use tokio::sync::watch;

use crate::bringup::Bringup;
use crate::checks::names::{self, Target};
use crate::checks::proxy::{self, Endpoint};
use crate::checks::tailnet;
use crate::checks::{Daemon, DaemonState, Outcome, ProxyContext};
use crate::daemon::DaemonSettings;
use crate::localapi::{self, BusLines, LocalApi};
use crate::run::Budget;
use crate::targets::Targets;

/// A `GET status` answer: decoded, then read by the status check and the netmap lookups, for the
/// names and addresses it holds and a few it does not.
pub fn localapi_status(bytes: &[u8]) {
    let Ok(status) = localapi::decode_status(bytes) else {
        return;
    };
    let outcome = Outcome::start("status", "", Layer::Control);
    let _ = tailnet::status_result(&outcome, &status);
    let mut asked: Vec<String> = vec![
        "devhost".into(),
        "100.64.0.1".into(),
        "fd7a:115c:a1e0::1".into(),
    ];
    for peer in status.peer.iter().flat_map(|p| p.values()) {
        asked.push(peer.dns_name.clone());
        asked.push(peer.host_name.clone());
        asked.extend(peer.tailscale_ips.iter().flatten().cloned());
        let _ = names::peer_name(peer);
        let _ = names::ping_address(peer);
    }
    for raw in &asked {
        let _ = names::is_magicdns_name(&status, raw);
        let _ = names::closest_peers(&status, raw);
        if let Ok(target) = Target::parse(raw) {
            let _ = tailnet::sight(&status, &target);
        }
    }
}

/// A `POST ping` answer: decoded, then turned into the ping check's result.
pub fn localapi_ping(bytes: &[u8]) {
    let Ok(pong) = localapi::decode_ping(bytes) else {
        return;
    };
    let outcome = Outcome::start("ping", "100.64.0.1", Layer::Ping);
    let ip = pong.ip.parse().unwrap_or([100, 64, 0, 1].into());
    let _ = tailnet::pong_result(&outcome, ip, &pong, 1);
}

/// The IPN bus: `chunks` as they arrive, cut into lines, each decoded and its error classified
/// as login does.
pub fn localapi_ipn_bus<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) {
    let mut lines = BusLines::default();
    for chunk in chunks {
        if lines.push(chunk).is_err() {
            return;
        }
        while let Some(line) = lines.next_line() {
            if let Ok(notify) = localapi::decode_notify(&line)
                && let Some(message) = notify.err_message
            {
                let _ = crate::login::classify_err_message(&message);
            }
        }
    }
}

/// A SOCKS5 CONNECT to `host` port 80 through the proxy at `proxy`, as the HTTP and git checks
/// open their tunnels: the failure's detail, or `None` for a tunnel. The LocalAPI (asked about
/// names after a "general failure") is a socket nobody listens on.
pub async fn socks_connect(proxy: SocketAddr, host: &str) -> Option<String> {
    let (_state, state) = watch::channel(DaemonState::Ready);
    let daemon = Daemon::new(state, LocalApi::new("/nonexistent/tailbox-fuzz.sock"));
    let ctx = ProxyContext::new(proxy, Duration::from_secs(5), daemon);
    let url = url::Url::parse(&format!("http://{host}/")).ok()?;
    let to = Endpoint::of(&url).ok()?;
    proxy::open_tunnel(&ctx, &to).await.err().map(|f| f.detail)
}

/// What a git server sent that the agent reads itself: the start of a 200 answer that is not the
/// smart protocol (with its Content-Type), and an error text libgit2 passes on (a server's `ERR`
/// line becomes "remote error: …").
pub fn git_answer(content_type: &str, body: &[u8]) {
    let _ = crate::checks::git::not_smart(content_type, body);
    let said = String::from_utf8_lossy(body);
    let _ = crate::checks::git::from_libgit2(&git2::Error::from_str(&said));
    let _ =
        crate::checks::git::from_libgit2(&git2::Error::from_str(&format!("remote error: {said}")));
}

/// A decoded `RunRequest`: everything the agent works out from it before starting anything.
pub fn run_request(request: &RunRequest) {
    let budget = Budget::from(request.deadlines.as_ref());
    let deadline = budget.deadline_from_now();
    let _ = budget.checks(deadline);
    check_targets(Targets {
        ping: &request.ping_targets,
        http: &request.http_targets,
        git: &request.git_targets,
    });
    if let Some(tailnet) = request.tailnet.as_ref() {
        let _ = Bringup::hostname_for(tailnet, &request.sandbox_id);
        if let Some(config) = tailnet.daemon.as_ref() {
            let _ = DaemonSettings::resolve(config, std::path::Path::new("/run/tailbox"));
        }
    }
}

/// A decoded sidecar `CheckRequest`, likewise.
pub fn check_request(request: &CheckRequest) {
    let budget = Budget::from(request.deadlines.as_ref());
    let _ = budget.checks(budget.deadline_from_now());
    check_targets(Targets {
        ping: &request.ping_targets,
        http: &request.http_targets,
        git: &request.git_targets,
    });
}

fn check_targets(targets: Targets<'_>) {
    let _ = tailnet::netmap_targets(targets.ping, targets.http, targets.git);
    let _ = targets.skipped("not run: fuzzing", "");
    for target in targets.http {
        let _ = proxy::parse_url(&target.url, &["http", "https"]);
    }
    for target in targets.git {
        let _ = proxy::parse_url(&target.url, &["http", "https", "git"]);
    }
}
