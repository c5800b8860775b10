//! B2's floor: the least any client can do to bring a fresh tailscaled to Running, measured in
//! the bench's own process so that no client's start-up or bookkeeping is in it.
//!
//! It spawns tailscaled as the spike does, tries its socket every millisecond, and then makes
//! only the LocalAPI calls a login needs, on connections opened at once: the IPN bus (to hear
//! Running), `start` with the auth key and `login-interactive` (what `tailscale up` and the
//! agent send for a node without a key). What is left is tailscaled's own work: its start, its
//! backend coming up, and its registration with control. The three parts are timed apart:
//! spawn to the socket accepting, to the bus's first message (the backend exists), and to
//! Running.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixStream;

/// The Host header tailscaled's LocalAPI requires.
const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// `ipn.NotifyInitialState`: the bus starts with the current state.
const BUS_INITIAL_STATE: u64 = 2;
/// `ipn.Running`.
const STATE_RUNNING: i64 = 6;
/// How often the socket is tried: finer than any client would, so the floor stays a floor.
const SOCKET_POLL: Duration = Duration::from_millis(1);

/// When each part of one bare login ended, from tailscaled's spawn.
pub struct FloorRun {
    pub to_socket: Duration,
    pub to_backend: Duration,
    pub to_running: Duration,
}

/// Brings the tailscaled just spawned (at `spawned`, listening on `socket`) to Running with
/// the fewest LocalAPI calls, and says when each part ended.
pub async fn login(
    spawned: Instant,
    socket: &Path,
    control_url: &str,
    hostname: &str,
    auth_key: &str,
) -> Result<FloorRun> {
    let bus_stream = loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => break stream,
            Err(_) => tokio::time::sleep(SOCKET_POLL).await,
        }
    };
    let to_socket = spawned.elapsed();
    // The bus first, so no state change is missed; `start` and `login-interactive` on their
    // own connections right behind it. tailscaled holds each until its backend exists.
    let mut bus = send(
        bus_stream,
        "GET",
        &format!("/localapi/v0/watch-ipn-bus?mask={BUS_INITIAL_STATE}"),
        Bytes::new(),
    )
    .await?
    .into_body();
    let prefs = json!({
        "ControlURL": control_url,
        "WantRunning": true,
        "Hostname": hostname,
        "CorpDNS": false,
    });
    let start = json!({ "AuthKey": auth_key, "UpdatePrefs": prefs }).to_string();
    let started = call(socket, "POST", "/localapi/v0/start", start.into());
    let mut to_backend = None;
    let mut pending = Vec::new();
    let wait_running = async {
        while let Some(frame) = bus.frame().await {
            let frame = frame.context("reading the IPN bus")?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let notify: Value =
                    serde_json::from_slice(&line).context("a bus message that is not JSON")?;
                to_backend.get_or_insert_with(|| spawned.elapsed());
                if let Some(message) = notify["ErrMessage"].as_str().filter(|m| !m.is_empty()) {
                    bail!("tailscaled: {message}");
                }
                if notify["BrowseToURL"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty())
                {
                    bail!("control asked for an interactive login: the auth key was refused");
                }
                if notify["State"].as_i64() == Some(STATE_RUNNING) {
                    return Ok(spawned.elapsed());
                }
            }
        }
        bail!("tailscaled closed the IPN bus before Running")
    };
    let (started, to_running) = tokio::join!(
        async {
            started.await?;
            call(
                socket,
                "POST",
                "/localapi/v0/login-interactive",
                Bytes::new(),
            )
            .await
        },
        wait_running,
    );
    started?;
    let to_running = to_running?;
    Ok(FloorRun {
        to_socket,
        to_backend: to_backend.unwrap_or(to_running),
        to_running,
    })
}

/// One LocalAPI request on a fresh connection; fails unless tailscaled answers 2xx.
async fn call(socket: &Path, method: &str, path: &str, body: Bytes) -> Result<()> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let response = send(stream, method, path, body).await?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer to {path}"))?
        .to_bytes();
    if !status.is_success() {
        bail!(
            "{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(())
}

async fn send(
    stream: UnixStream,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<http::Response<Incoming>> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("an HTTP connection to the LocalAPI")?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, LOCALAPI_HOST)
        .body(Full::new(body))
        .context("building a LocalAPI request")?;
    sender
        .send_request(request)
        .await
        .with_context(|| format!("{method} {path}"))
}

/// Logs the node out (so control forgets it, as the spike's `tailscale logout` does).
pub async fn logout(socket: &Path) -> Result<()> {
    call(socket, "POST", "/localapi/v0/logout", Bytes::new()).await
}
