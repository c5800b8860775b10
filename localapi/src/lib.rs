//! A client for tailscaled's LocalAPI: HTTP/1.1 over its unix socket.
//!
//! Its own crate, light (hyper, serde, tokio), so that the agent and `cargo xtask bench`'s floor
//! speak to tailscaled through the same client without the bench building the agent's libgit2.
//!
//! Facts that shape it: the Host header must be `local-tailscaled.sock` and there must be no
//! Origin or Referer (tailscaled's CSRF guard answers 403 otherwise); permission comes from the
//! socket peer's uid, so there is no auth header. A fresh connection per request is cheap on a
//! unix socket and avoids reconnect logic; the IPN bus gets its own long-lived connection.

// It runs inside the agent, whose stdout is the gRPC wire.
#![deny(clippy::print_stdout, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

/// Host header tailscaled accepts on its socket.
const LOCALAPI_HOST: &str = "local-tailscaled.sock";

/// A LocalAPI failure.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// The socket did not accept a connection.
    #[error("cannot connect to tailscaled's LocalAPI socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("LocalAPI {what} failed")]
    Http {
        /// Which request.
        what: String,
        /// The hyper error.
        #[source]
        source: hyper::Error,
    },
    /// tailscaled answered with an unexpected status.
    #[error("LocalAPI {what} answered {status}: {body}")]
    Status {
        /// Which request.
        what: String,
        /// HTTP status.
        status: StatusCode,
        /// Response body (trimmed, bounded).
        body: String,
    },
    /// The response was not the JSON we expected.
    #[error("LocalAPI {what} returned unexpected JSON")]
    Decode {
        /// Which request.
        what: String,
        /// The decode error.
        #[source]
        source: serde_json::Error,
    },
    /// The answer (or one IPN-bus message) was larger than the agent reads.
    #[error("LocalAPI {what} sent more than {limit} bytes")]
    TooLarge {
        /// Which request.
        what: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The request took longer than allowed.
    #[error("LocalAPI {what} timed out after {after:?}")]
    Timeout {
        /// Which request.
        what: String,
        /// The limit.
        after: Duration,
    },
}

/// The most the agent reads of one LocalAPI answer or one IPN-bus message. A full netmap of a
/// large tailnet is a few MiB; anything past this is not tailscaled talking sense, and reading
/// it would only spend the sandbox's memory.
pub const MAX_MESSAGE_BYTES: usize = 32 << 20;
/// The most the agent keeps of an answer it only quotes in an error.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// Client for one tailscaled socket.
#[derive(Debug, Clone)]
pub struct LocalApi {
    socket: PathBuf,
}

/// `GET /localapi/v0/status` (the fields the agent uses).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Status {
    /// tailscaled version.
    pub version: String,
    /// NoState, NeedsLogin, NeedsMachineAuth, Stopped, Starting, Running.
    pub backend_state: String,
    /// Whether the node has a node key (decides whether login-interactive is needed).
    pub have_node_key: bool,
    /// URL for an interactive login, when control wants one.
    #[serde(rename = "AuthURL")]
    pub auth_url: String,
    /// This node's tailnet addresses.
    #[serde(rename = "TailscaleIPs")]
    pub tailscale_ips: Option<Vec<String>>,
    /// This node.
    #[serde(rename = "Self")]
    pub self_node: Option<PeerStatus>,
    /// Human-readable health warnings.
    pub health: Option<Vec<String>>,
    /// Peers by node key.
    pub peer: Option<HashMap<String, PeerStatus>>,
}

/// One node in the status.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PeerStatus {
    /// Stable node id.
    #[serde(rename = "ID")]
    pub id: String,
    /// OS hostname.
    pub host_name: String,
    /// MagicDNS name with a trailing dot.
    #[serde(rename = "DNSName")]
    pub dns_name: String,
    /// Tailnet addresses.
    #[serde(rename = "TailscaleIPs")]
    pub tailscale_ips: Option<Vec<String>>,
    /// Addresses routed to this node (its own plus advertised routes).
    #[serde(rename = "AllowedIPs")]
    pub allowed_ips: Option<Vec<String>>,
    /// Whether control says it is connected.
    pub online: bool,
    /// Home DERP region code.
    pub relay: String,
    /// Direct UDP endpoint in use, if any.
    pub cur_addr: String,
}

/// `POST /localapi/v0/ping` result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PingResult {
    /// The pinged IP.
    #[serde(rename = "IP")]
    pub ip: String,
    /// Tailnet IP of the node that answered.
    #[serde(rename = "NodeIP")]
    pub node_ip: String,
    /// Name of the node that answered.
    pub node_name: String,
    /// Error text; empty on success.
    pub err: String,
    /// Round-trip time.
    pub latency_seconds: f64,
    /// ip:port when the pong came over a direct path.
    pub endpoint: String,
    /// ip:port:vni when relayed through a peer relay.
    pub peer_relay: String,
    /// Non-zero when relayed through DERP.
    #[serde(rename = "DERPRegionID")]
    pub derp_region_id: i32,
    /// DERP region code when relayed through DERP.
    #[serde(rename = "DERPRegionCode")]
    pub derp_region_code: String,
    /// Set when the IP is this node's own.
    #[serde(rename = "IsLocalIP")]
    pub is_local_ip: bool,
}

/// One message of the IPN bus (the fields the agent uses; every field is optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Notify {
    /// Backend error, e.g. an invalid auth key.
    pub err_message: Option<String>,
    /// ipn.State as a number: 2 NeedsLogin, 3 NeedsMachineAuth, 5 Starting, 6 Running.
    pub state: Option<i32>,
    /// Control wants an interactive login.
    #[serde(rename = "BrowseToURL")]
    pub browse_to_url: Option<String>,
    /// This node as control last described it (sent with every new netmap).
    pub self_change: Option<SelfNode>,
}

/// This node as control describes it in the netmap (the fields the agent uses).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SelfNode {
    /// The DERP region control tells peers to reach this node through; 0 while control does not
    /// know it yet.
    #[serde(rename = "HomeDERP")]
    pub home_derp: i32,
    /// The same from control servers older than `HomeDERP`: `127.3.3.40:<region>`.
    #[serde(rename = "DERP")]
    pub legacy_derp: String,
}

impl SelfNode {
    /// The home DERP region control has for this node, if it has one.
    pub fn home_derp_region(&self) -> Option<i32> {
        let legacy = || {
            self.legacy_derp
                .strip_prefix("127.3.3.40:")
                .and_then(|region| region.parse().ok())
        };
        Some(self.home_derp)
            .filter(|&region| region != 0)
            .or_else(legacy)
            .filter(|&region| region > 0)
    }
}

/// What `POST /localapi/v0/dial` said about a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialAnswer {
    /// The name resolved (tailscaled dialed it, or handed it back as a non-tailnet address).
    Resolved,
    /// The name did not resolve; tailscaled's reason.
    ResolveFailed(String),
    /// The name resolved but the dial failed; tailscaled's reason.
    DialFailed(String),
}

/// ipn.State values.
pub mod state {
    /// Waiting for a login.
    pub const NEEDS_LOGIN: i32 = 2;
    /// Waiting for an admin to approve the machine.
    pub const NEEDS_MACHINE_AUTH: i32 = 3;
    /// Logged in, waiting for a DERP or peer connection.
    pub const STARTING: i32 = 5;
    /// Up.
    pub const RUNNING: i32 = 6;
}

impl LocalApi {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, LocalApiError> {
        self.send_with_headers(method, path_and_query, body, &[])
            .await
    }

    async fn send_with_headers(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<hyper::Response<Incoming>, LocalApiError> {
        let what = format!(
            "{method} {}",
            path_and_query.split('?').next().unwrap_or("")
        );
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| LocalApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| LocalApiError::Http {
                what: what.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!("LocalAPI connection ended: {err}");
            }
        });
        let mut request = Request::builder()
            .method(method)
            .uri(format!("/localapi/v0/{path_and_query}"))
            .header(http::header::HOST, LOCALAPI_HOST)
            .header(http::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|err| LocalApiError::Status {
                what: what.clone(),
                status: StatusCode::BAD_REQUEST,
                body: err.to_string(),
            })?;
        sender
            .send_request(request)
            .await
            .map_err(|source| LocalApiError::Http { what, source })
    }

    /// Sends a request and reads the whole body, requiring `expect` as the status.
    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        expect: StatusCode,
    ) -> Result<Bytes, LocalApiError> {
        let what = format!(
            "{method} {}",
            path_and_query.split('?').next().unwrap_or("")
        );
        let response = self.send(method, path_and_query, body).await?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_MESSAGE_BYTES)
            .collect()
            .await
            .map_err(|err| match err.downcast::<hyper::Error>() {
                Ok(source) => LocalApiError::Http {
                    what: what.clone(),
                    source: *source,
                },
                Err(_) => LocalApiError::TooLarge {
                    what: what.clone(),
                    limit: MAX_MESSAGE_BYTES,
                },
            })?
            .to_bytes();
        if status != expect {
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            return Err(LocalApiError::Status {
                what,
                status,
                body: text.chars().take(500).collect(),
            });
        }
        Ok(bytes)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        what: &str,
        bytes: &[u8],
    ) -> Result<T, LocalApiError> {
        serde_json::from_slice(bytes).map_err(|source| LocalApiError::Decode {
            what: what.into(),
            source,
        })
    }

    /// Node status, with or without the peer list.
    pub async fn status(&self, peers: bool) -> Result<Status, LocalApiError> {
        let path = if peers {
            "status"
        } else {
            "status?peers=false"
        };
        let bytes = self.call(Method::GET, path, None, StatusCode::OK).await?;
        decode_status(&bytes)
    }

    /// The DERP map tailscaled uses, as raw JSON (`Regions` → `Nodes` with `HostName`, `IPv4`,
    /// `DERPPort`).
    pub async fn derp_map(&self) -> Result<serde_json::Value, LocalApiError> {
        let bytes = self
            .call(Method::GET, "derpmap", None, StatusCode::OK)
            .await?;
        Self::decode("GET derpmap", &bytes)
    }

    /// Current prefs as raw JSON (so fields this agent does not know survive a round trip).
    pub async fn prefs(&self) -> Result<serde_json::Value, LocalApiError> {
        let bytes = self
            .call(Method::GET, "prefs", None, StatusCode::OK)
            .await?;
        Self::decode("GET prefs", &bytes)
    }

    /// Validates prefs; returns tailscaled's complaint, if any (it answers 200 either way).
    pub async fn check_prefs(
        &self,
        prefs: &serde_json::Value,
    ) -> Result<Option<String>, LocalApiError> {
        let body = serde_json::to_vec(prefs).unwrap_or_default();
        let bytes = self
            .call(Method::POST, "check-prefs", Some(body), StatusCode::OK)
            .await?;
        let reply: serde_json::Value = Self::decode("POST check-prefs", &bytes)?;
        Ok(reply
            .get("Error")
            .and_then(|e| e.as_str())
            .filter(|e| !e.is_empty())
            .map(str::to_owned))
    }

    /// Starts the backend with these prefs and auth key. The key travels only in this body.
    pub async fn start(
        &self,
        auth_key: &str,
        prefs: &serde_json::Value,
    ) -> Result<(), LocalApiError> {
        let body = serde_json::json!({ "AuthKey": auth_key, "UpdatePrefs": prefs });
        self.call(
            Method::POST,
            "start",
            Some(serde_json::to_vec(&body).unwrap_or_default()),
            StatusCode::NO_CONTENT,
        )
        .await
        .map(drop)
    }

    /// Asks the backend to log in (needed when the node has no node key yet).
    pub async fn login_interactive(&self) -> Result<(), LocalApiError> {
        self.call(
            Method::POST,
            "login-interactive",
            None,
            StatusCode::NO_CONTENT,
        )
        .await
        .map(drop)
    }

    /// Logs the node out (an ephemeral node is removed from the tailnet at once).
    pub async fn logout(&self) -> Result<(), LocalApiError> {
        self.call(Method::POST, "logout", None, StatusCode::NO_CONTENT)
            .await
            .map(drop)
    }

    /// One ping of `ip` with the given type ("disco", "TSMP", "ICMP"). tailscaled has no
    /// server-side timeout for these, so the caller bounds it with `limit`.
    pub async fn ping(
        &self,
        ip: &str,
        kind: &str,
        limit: Duration,
    ) -> Result<PingResult, LocalApiError> {
        let path = format!("ping?ip={ip}&type={kind}");
        let call = self.call(Method::POST, &path, None, StatusCode::OK);
        let bytes =
            tokio::time::timeout(limit, call)
                .await
                .map_err(|_| LocalApiError::Timeout {
                    what: "POST ping".into(),
                    after: limit,
                })??;
        decode_ping(&bytes)
    }

    /// Asks tailscaled to dial `host:port` the way its SOCKS5 proxy would, to learn whether the
    /// name resolved: tailscaled (1.98 and later) resolves first and answers a failure of that
    /// step with 502 "resolve failure: …". A connection it opens is closed at once. The caller
    /// bounds the time.
    pub async fn dial(&self, host: &str, port: u16) -> Result<DialAnswer, LocalApiError> {
        let port = port.to_string();
        let response = self
            .send_with_headers(
                Method::POST,
                "dial",
                None,
                &[
                    ("Connection", "upgrade"),
                    ("Upgrade", "ts-dial"),
                    ("Dial-Host", host),
                    ("Dial-Port", &port),
                    ("Dial-Network", "tcp"),
                ],
            )
            .await?;
        let status = response.status();
        if matches!(status, StatusCode::SWITCHING_PROTOCOLS | StatusCode::OK) {
            // 101: a tunnel (dropped here); 200: a non-tailnet address to dial directly.
            return Ok(DialAnswer::Resolved);
        }
        let body = body_text(response).await;
        match (status, body.strip_prefix("resolve failure: ")) {
            (StatusCode::BAD_GATEWAY, Some(why)) => Ok(DialAnswer::ResolveFailed(why.to_owned())),
            (StatusCode::BAD_GATEWAY, None) => Ok(DialAnswer::DialFailed(body)),
            _ => Err(LocalApiError::Status {
                what: "POST dial".into(),
                status,
                body: body.chars().take(500).collect(),
            }),
        }
    }

    /// Opens the IPN bus. The response headers arrive only once the watcher is registered, so
    /// nothing that happens after this returns is missed.
    pub async fn watch_ipn_bus(&self, mask: u64) -> Result<BusWatcher, LocalApiError> {
        let path = format!("watch-ipn-bus?mask={mask}");
        let response = self.send(Method::GET, &path, None).await?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let body = body_text(response).await;
            return Err(LocalApiError::Status {
                what: "GET watch-ipn-bus".into(),
                status,
                body,
            });
        }
        Ok(BusWatcher {
            body: response.into_body(),
            lines: BusLines::default(),
        })
    }
}

/// The body of an answer that is not what was asked for, as text for an error.
async fn body_text(response: hyper::Response<Incoming>) -> String {
    http_body_util::Limited::new(response.into_body(), MAX_ERROR_BODY_BYTES)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_else(|_| format!("(an answer of more than {MAX_ERROR_BODY_BYTES} bytes)"))
}

/// An open IPN bus: newline-delimited JSON `ipn.Notify` messages.
pub struct BusWatcher {
    body: Incoming,
    lines: BusLines,
}

impl BusWatcher {
    /// The next message, or `None` when tailscaled closed the stream.
    pub async fn next(&mut self) -> Result<Option<Notify>, LocalApiError> {
        loop {
            if let Some(line) = self.lines.next_line() {
                return decode_notify(&line).map(Some);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.lines.push(&data)?;
                    }
                }
                Some(Err(source)) => {
                    return Err(LocalApiError::Http {
                        what: "watch-ipn-bus".into(),
                        source,
                    });
                }
                None => return Ok(None),
            }
        }
    }
}

/// The IPN bus's bytes cut into lines as they arrive in chunks of any size, holding at most
/// [`MAX_MESSAGE_BYTES`] of an unfinished line.
#[derive(Debug, Default)]
pub struct BusLines {
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no newline: a long message arriving in many
    /// chunks is scanned once, not once per chunk (which was quadratic in its length).
    scanned: usize,
}

impl BusLines {
    /// The next whole line that is not blank (its newline included), if one has arrived.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        while let Some(at) = self.buffer[self.scanned..].iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=self.scanned + at).collect();
            self.scanned = 0;
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Some(line);
            }
        }
        self.scanned = self.buffer.len();
        None
    }

    /// Appends a chunk; refuses one that would make the held bytes exceed the limit.
    pub fn push(&mut self, data: &[u8]) -> Result<(), LocalApiError> {
        if self.buffer.len() + data.len() > MAX_MESSAGE_BYTES {
            // One message this large would be held whole; stop reading instead.
            self.buffer = Vec::new();
            self.scanned = 0;
            return Err(LocalApiError::TooLarge {
                what: "watch-ipn-bus message".into(),
                limit: MAX_MESSAGE_BYTES,
            });
        }
        self.buffer.extend_from_slice(data);
        Ok(())
    }
}

/// A `status` answer (public for the agent's fuzz targets, like the two below).
pub fn decode_status(bytes: &[u8]) -> Result<Status, LocalApiError> {
    LocalApi::decode("GET status", bytes)
}

/// A `ping` answer.
pub fn decode_ping(bytes: &[u8]) -> Result<PingResult, LocalApiError> {
    LocalApi::decode("POST ping", bytes)
}

/// One IPN-bus line as a message.
pub fn decode_notify(line: &[u8]) -> Result<Notify, LocalApiError> {
    LocalApi::decode("watch-ipn-bus message", line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_home_derp_region_is_read_from_either_field_and_zero_means_unknown() {
        let region = |line: &str| {
            decode_notify(line.as_bytes())
                .unwrap()
                .self_change
                .and_then(|node| node.home_derp_region())
        };
        assert_eq!(
            region(r#"{"SelfChange":{"HomeDERP":7,"Name":"a."}}"#),
            Some(7)
        );
        assert_eq!(region(r#"{"SelfChange":{"DERP":"127.3.3.40:3"}}"#), Some(3));
        assert_eq!(region(r#"{"SelfChange":{"Name":"a."}}"#), None);
        assert_eq!(region(r#"{"SelfChange":{"HomeDERP":0,"DERP":""}}"#), None);
        assert_eq!(region(r#"{"SelfChange":{"DERP":"127.3.3.40:x"}}"#), None);
        assert_eq!(region(r#"{"State":6}"#), None);
    }

    #[test]
    fn bus_lines_come_whole_whatever_the_chunks_and_blank_ones_are_skipped() {
        let stream = b"{\"State\":2}\n\n  \n{\"ErrMessage\":\"invalid authkey\"}\n{\"St";
        for step in 1..stream.len() {
            let mut lines = BusLines::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(step) {
                lines.push(chunk).unwrap();
                while let Some(line) = lines.next_line() {
                    got.push(decode_notify(&line).unwrap());
                }
            }
            assert_eq!(got.len(), 2, "chunks of {step}");
            assert_eq!(got[0].state, Some(state::NEEDS_LOGIN));
            assert_eq!(got[1].err_message.as_deref(), Some("invalid authkey"));
        }
    }

    #[test]
    fn a_long_line_in_tiny_chunks_is_scanned_once() {
        // Found by the localapi_ipn_bus fuzz target running slowly: every chunk rescanned the
        // whole unfinished line, quadratic in its length. 4 MiB in 64-byte chunks would be some
        // 2^37 byte comparisons that way; once each now.
        let mut lines = BusLines::default();
        let mut line = vec![b' '; 4 << 20];
        line.extend_from_slice(b"{}\n");
        for chunk in line.chunks(64) {
            lines.push(chunk).unwrap();
            if let Some(whole) = lines.next_line() {
                assert_eq!(whole.len(), line.len());
                return;
            }
        }
        panic!("the line never came");
    }
}
