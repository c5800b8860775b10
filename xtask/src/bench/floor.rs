//! The floors of B2 and B1: the least any client can do, measured in the bench's own process so
//! that no client's start-up or bookkeeping is in them. Both speak to tailscaled through the
//! agent's own LocalAPI client (`tailbox-localapi`).
//!
//! B2's ([`login`]) spawns tailscaled as the spike does, tries its socket every millisecond,
//! and then makes only the LocalAPI calls a login needs: the IPN bus (to hear Running), `start`
//! with the auth key and `login-interactive` (what `tailscale up` and the agent send for a node
//! without a key). What is left is tailscaled's own work, timed in three parts: spawn to the
//! socket accepting, to the bus's first message (the backend exists), and to Running. It then
//! reads on until control gives the node its home DERP region, as the agent's login does
//! (`agent/src/login.rs`), and times that apart.
//!
//! B1's ([`checks`]) starts the moment control has given that region and makes one request per check, all
//! at once, as the agent's checks phase runs them: a disco ping through the LocalAPI, and one GET
//! each for the HTTP target and for the git listing (`info/refs?service=git-upload-pack`, the one
//! request of a protocol-v0 `ls-remote`, which is what the agent's libgit2 sends) through
//! tailscaled's SOCKS5 proxy. What is left is the tailnet's work (the first WireGuard handshake
//! with the dev host, a TCP handshake through both netstacks) and the servers' own time, which
//! is measured apart: the same git request straight to the server on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tailbox_localapi::{LocalApi, state};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// `ipn.NotifyInitialState`: the bus starts with the current state.
const BUS_INITIAL_STATE: u64 = 2;
/// How often the socket is tried: finer than any client would, so the floor stays a floor.
const SOCKET_POLL: Duration = Duration::from_millis(1);
/// How long the floor's ping may wait for its pong (tailscaled sets no limit of its own).
const PING_LIMIT: Duration = Duration::from_secs(10);
/// A dial failure after this long means nothing answered (tailscaled gives up after 5 s); the
/// agent's threshold.
const NOTHING_ANSWERED_AFTER: Duration = Duration::from_millis(1500);
/// How a git smart-HTTP ref advertisement for upload-pack starts (its first pkt-line).
const UPLOAD_PACK_ADVERTISEMENT: &[u8] = b"001e# service=git-upload-pack\n";

/// When each part of one bare login ended, from tailscaled's spawn.
pub struct LoginFloor {
    pub to_socket: Duration,
    pub to_backend: Duration,
    pub to_running: Duration,
    /// Until control gave the node its home DERP region, which a peer needs to answer it.
    pub to_home_derp: Duration,
}

/// Brings the tailscaled just spawned (at `spawned`, listening on `socket`) to Running with
/// the fewest LocalAPI calls, and says when each part ended.
pub async fn login(
    spawned: Instant,
    socket: &Path,
    control_url: &str,
    hostname: &str,
    auth_key: &str,
) -> Result<LoginFloor> {
    while UnixStream::connect(socket).await.is_err() {
        tokio::time::sleep(SOCKET_POLL).await;
    }
    let to_socket = spawned.elapsed();
    let api = LocalApi::new(socket);
    // The bus first, so no state change is missed; `start` and `login-interactive` right behind
    // it. tailscaled holds each until its backend exists.
    let mut bus = api
        .watch_ipn_bus(BUS_INITIAL_STATE)
        .await
        .context("opening the IPN bus")?;
    let prefs = json!({
        "ControlURL": control_url,
        "WantRunning": true,
        "Hostname": hostname,
        "CorpDNS": false,
    });
    let mut to_backend = None;
    let mut to_home_derp = None;
    let wait_running = async {
        while let Some(notify) = bus.next().await.context("reading the IPN bus")? {
            to_backend.get_or_insert_with(|| spawned.elapsed());
            if gives_home_derp(&notify) {
                to_home_derp.get_or_insert_with(|| spawned.elapsed());
            }
            if let Some(message) = notify.err_message.filter(|m| !m.is_empty()) {
                bail!("tailscaled: {message}");
            }
            if notify.browse_to_url.is_some_and(|u| !u.is_empty()) {
                bail!("control asked for an interactive login: the auth key was refused");
            }
            if notify.state == Some(state::RUNNING) {
                return Ok(spawned.elapsed());
            }
        }
        bail!("tailscaled closed the IPN bus before Running")
    };
    let (started, to_running) = tokio::join!(
        async {
            api.start(auth_key, &prefs).await?;
            api.login_interactive().await
        },
        wait_running,
    );
    started.context("starting the backend")?;
    let to_running = to_running?;
    while to_home_derp.is_none() {
        let notify = bus
            .next()
            .await
            .context("reading the IPN bus")?
            .context("tailscaled closed the IPN bus before control gave a home DERP region")?;
        if gives_home_derp(&notify) {
            to_home_derp = Some(spawned.elapsed());
        }
    }
    Ok(LoginFloor {
        to_socket,
        to_backend: to_backend.unwrap_or(to_running),
        to_running,
        to_home_derp: to_home_derp.unwrap_or(to_running).max(to_running),
    })
}

/// Whether a bus message carries the node's home DERP region as control gives it.
fn gives_home_derp(notify: &tailbox_localapi::Notify) -> bool {
    notify
        .self_change
        .as_ref()
        .is_some_and(|node| node.home_derp_region().is_some())
}

/// Where B1's checks go on the dev host: its tailnet IPv4, whose port P reaches 127.0.0.1:P.
pub struct Targets<'a> {
    pub peer: Ipv4Addr,
    pub http_port: u16,
    pub http_path: &'a str,
    pub git_port: u16,
    pub git_path: &'a str,
}

/// When each of B1's floor requests had its answer, from the moment they all started.
pub struct ChecksFloor {
    /// Until ping, HTTP and git had all answered.
    pub phase: Duration,
    pub ping: Duration,
    pub http: Duration,
    pub git: Duration,
    /// Of git's: until the SOCKS5 proxy said the connection through the tailnet was open.
    pub git_connect: Duration,
    /// The same git request on loopback, straight to the server, after the phase.
    pub git_server: Duration,
}

/// B1's floor on the node `api` speaks to, which must have just reached Running, with its home
/// DERP region known to control, and serve SOCKS5 on `proxy`.
pub async fn checks(
    api: &LocalApi,
    proxy: SocketAddr,
    targets: &Targets<'_>,
) -> Result<ChecksFloor> {
    let peer = targets.peer.to_string();
    let refs_path = format!("{}/info/refs?service=git-upload-pack", targets.git_path);
    let started = Instant::now();
    let ping = async {
        let pong = api
            .ping(&peer, "disco", PING_LIMIT)
            .await
            .context("the floor's ping")?;
        if !pong.err.is_empty() {
            bail!("the floor's ping of {peer}: {}", pong.err);
        }
        Ok(started.elapsed())
    };
    let http = async {
        let stream = through_tailnet(proxy, targets.peer, targets.http_port, started).await?;
        get(stream, &peer, targets.http_port, targets.http_path).await?;
        Ok(started.elapsed())
    };
    let git = async {
        let stream = through_tailnet(proxy, targets.peer, targets.git_port, started).await?;
        let connected = started.elapsed();
        let body = get(stream, &peer, targets.git_port, &refs_path).await?;
        expect_advertisement(&body)?;
        Ok((connected, started.elapsed()))
    };
    let (ping, http, (git_connect, git)) = tokio::try_join!(ping, http, git)?;
    let phase = started.elapsed();

    let server_started = Instant::now();
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, targets.git_port))
        .await
        .context("connecting to the git server on loopback")?;
    let body = get(stream, "127.0.0.1", targets.git_port, &refs_path).await?;
    expect_advertisement(&body)?;
    let git_server = server_started.elapsed();
    Ok(ChecksFloor {
        phase,
        ping,
        http,
        git,
        git_connect,
        git_server,
    })
}

/// A TCP connection to `peer:port` through tailscaled's SOCKS5 proxy. A failure says how long
/// after Running (`running`) it came.
///
/// Like the agent (`agent/src/checks/proxy.rs`), a dial that nothing answered is made once
/// more: a fresh node's first WireGuard handshake can reach the dev host before the dev host
/// has an address for it, and is then lost; WireGuard repeats it after 5 s, when tailscaled
/// has given up the first dial. Every client pays that when it happens, so the floor does too.
async fn through_tailnet(
    proxy: SocketAddr,
    peer: Ipv4Addr,
    port: u16,
    running: Instant,
) -> Result<tokio_socks::tcp::Socks5Stream<TcpStream>> {
    let to = SocketAddr::from((peer, port));
    let since_running = || running.elapsed().as_secs_f64() * 1e3;
    let mut asked = since_running();
    let mut result = tokio_socks::tcp::Socks5Stream::connect(proxy, to).await;
    if matches!(result, Err(tokio_socks::Error::GeneralSocksServerFailure))
        && since_running() - asked >= ms(NOTHING_ANSWERED_AFTER)
    {
        asked = since_running();
        result = tokio_socks::tcp::Socks5Stream::connect(proxy, to).await;
    }
    result.with_context(|| {
        format!(
            "connecting to {to} through the SOCKS5 proxy {proxy} (asked {asked:.1} ms after \
             Running, answered {:.1} ms after)",
            since_running()
        )
    })
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// One HTTP/1.1 GET on `stream`; the whole body of a 200 answer.
async fn get<S>(stream: S, host: &str, port: u16, path: &str) -> Result<Bytes>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("an HTTP connection to {host}:{port}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .body(Empty::<Bytes>::new())
        .context("building a GET")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET http://{host}:{port}{path}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer of http://{host}:{port}{path}"))?
        .to_bytes();
    if status != http::StatusCode::OK {
        bail!("GET http://{host}:{port}{path} answered {status}");
    }
    Ok(body)
}

/// Fails unless `body` is a git upload-pack ref advertisement that lists a branch.
fn expect_advertisement(body: &[u8]) -> Result<()> {
    let lists_a_branch = body
        .windows(b"refs/heads/".len())
        .any(|w| w == b"refs/heads/");
    if !body.starts_with(UPLOAD_PACK_ADVERTISEMENT) || !lists_a_branch {
        bail!(
            "the git server's answer is not a ref advertisement: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
    }
    Ok(())
}

/// Logs the node out (so control forgets it, as the spike's `tailscale logout` does).
pub async fn logout(socket: &Path) -> Result<()> {
    LocalApi::new(socket)
        .logout()
        .await
        .context("logging the floor's node out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_upload_pack_advertisement_with_a_branch_passes() {
        let good = b"001e# service=git-upload-pack\n0000003f1234 refs/heads/main\n0000";
        assert!(expect_advertisement(good).is_ok());
        assert!(expect_advertisement(b"001e# service=git-upload-pack\n0000").is_err());
        assert!(expect_advertisement(b"<html>refs/heads/main</html>").is_err());
    }
}
