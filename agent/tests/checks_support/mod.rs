//! What the HTTP and git check tests share: a lab with a logged-in sandbox node, check contexts,
//! result accessors, loopback stand-in servers on the dev host, a scripted SOCKS5 proxy for the
//! replies tailscaled never sends, and a stand-in tailscaled whose proxy port and readiness the
//! test drives (down, dying, back, gone for good).
//!
//! Each test file uses part of it.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tailbox_agent::checks::{Daemon, DaemonState, ProxyContext};
use tailbox_agent::localapi::LocalApi;
use tailbox_proto::agent::v1::{CheckResult, CheckStatus, FailureClass, Layer};
use tailbox_testkit::lab::{Binaries, Lab, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Generous: two tailscaleds per test, several tests in parallel on two cores.
pub const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// A lab plus a logged-in "sandbox" node that sees the dev-host peer in its netmap.
pub async fn sandbox() -> (Lab, Node) {
    Binaries::locate()
        .await
        .expect("the tailnet lab binaries (see lab/README.md)");
    let lab = Lab::start().await.expect("lab starts");
    let node = lab
        .start_logged_in_node("sandbox")
        .await
        .expect("sandbox node logs in and sees the peer");
    (lab, node)
}

/// What the supervisor says in tests of single checks: ready, for the life of the process.
static READY: LazyLock<watch::Sender<DaemonState>> =
    LazyLock::new(|| watch::channel(DaemonState::Ready).0);

/// A context for a check through a real node's proxy, with its LocalAPI, and a supervisor that
/// says it is ready.
pub fn ctx(node: &Node, budget: Duration) -> ProxyContext {
    ProxyContext::new(
        node.socks5_addr(),
        budget,
        Daemon::new(READY.subscribe(), LocalApi::new(node.socket())),
    )
}

/// A context for a check through whatever is at `socks_addr`, with no LocalAPI behind it.
pub fn ctx_at(socks_addr: SocketAddr, budget: Duration) -> ProxyContext {
    ProxyContext::new(
        socks_addr,
        budget,
        Daemon::new(READY.subscribe(), LocalApi::new(NO_SOCKET)),
    )
}

/// Where no LocalAPI socket is.
const NO_SOCKET: &str = "/nonexistent/tailscaled.sock";

pub fn status(r: &CheckResult) -> CheckStatus {
    CheckStatus::try_from(r.status).unwrap()
}

pub fn class(r: &CheckResult) -> FailureClass {
    FailureClass::try_from(r.failure_class).unwrap()
}

pub fn layer(r: &CheckResult) -> Layer {
    Layer::try_from(r.layer).unwrap()
}

/// Panics unless `result` failed on its deadline at `layer`, and `took` (the check's wall time)
/// was its `budget` and at most `slack` more: the deadline is kept, and not by much.
pub fn assert_deadline_kept(
    result: &CheckResult,
    layer_expected: Layer,
    took: Duration,
    budget: Duration,
    slack: Duration,
    what: &str,
) {
    assert_eq!(class(result), FailureClass::Deadline, "{what}: {result:#?}");
    assert_eq!(layer(result), layer_expected, "{what}: {result:#?}");
    assert!(
        took >= budget && took < budget + slack,
        "{what}: {took:?} for a budget of {budget:?}"
    );
}

/// A loopback port nothing listens on (bound, then released).
pub async fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback address nothing listens on.
pub async fn closed_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], closed_port().await))
}

/// A loopback HTTP server that answers every request with `response` (status line, headers
/// and body, verbatim) and keeps the head of every request it got.
pub struct FixedHttp {
    pub port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl FixedHttp {
    pub async fn start(response: impl Into<String>) -> Self {
        let response = response.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen_heads = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let response = response.clone();
                let heads = seen_heads.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    heads
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&seen).into_owned());
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { port, heads }
    }

    /// The request line and headers of every request so far.
    pub fn request_heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// The value of header `name` (any case) in a request head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Panics unless exactly one request reached the server, its first line starting with
/// `request_line`, carrying the tests' credentials (`cookuser`, `hunter2-Sup3rSecret`) as
/// basic auth and nowhere else.
pub fn assert_one_request_with_basic_auth(heads: &[String], request_line: &str) {
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(heads[0].starts_with(request_line), "{heads:?}");
    assert_eq!(
        header(&heads[0], "authorization"),
        Some("Basic Y29va3VzZXI6aHVudGVyMi1TdXAzclNlY3JldA=="),
        "{heads:?}"
    );
}

/// A stand-in for tailscaled's proxy port: forwards every connection on `at` to `to` (a real
/// node's proxy) until killed or dropped, which drops the listener and every live connection
/// at once, as a dying tailscaled does.
pub struct StandInProxy(JoinHandle<()>);

impl StandInProxy {
    pub async fn start(at: SocketAddr, to: SocketAddr) -> Self {
        let listener = TcpListener::bind(at).await.unwrap();
        Self(tokio::spawn(async move {
            // Owned by this task: aborting it drops every connection too.
            let mut conns = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }))
    }

    /// Stops it and waits until its port is free again.
    pub async fn kill(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for StandInProxy {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// tailscaled as a check sees it, driven by the test: its proxy port (a [`StandInProxy`] in
/// front of a real node's proxy, or nothing), what its supervisor says, and a LocalAPI (a real
/// node's, or none).
pub struct StandInDaemon {
    at: SocketAddr,
    proxy: Option<StandInProxy>,
    state: watch::Sender<DaemonState>,
    api: LocalApi,
}

impl StandInDaemon {
    /// Down: nothing on its proxy port, its supervisor says it is not ready, and its LocalAPI is
    /// `api_socket` (a real node's, for when it comes back, or a path where nothing is).
    pub async fn down(api_socket: &Path) -> Self {
        Self {
            at: closed_addr().await,
            proxy: None,
            state: watch::channel(DaemonState::NotReady).0,
            api: LocalApi::new(api_socket),
        }
    }

    /// Down, with no LocalAPI at all.
    pub async fn down_for_good() -> Self {
        Self::down(Path::new(NO_SOCKET)).await
    }

    /// Up and ready as `node`: its proxy port forwards to the node's, its LocalAPI is the
    /// node's.
    pub async fn up(node: &Node) -> Self {
        let mut daemon = Self::down(node.socket()).await;
        daemon.come_back(node.socks5_addr()).await;
        daemon
    }

    /// A context for a check through this daemon's proxy port.
    pub fn ctx(&self, budget: Duration) -> ProxyContext {
        ProxyContext::new(
            self.at,
            budget,
            Daemon::new(self.state.subscribe(), self.api.clone()),
        )
    }

    /// Dies: the proxy port and its connections go away, and the supervisor notices.
    pub async fn die(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.kill().await;
        }
        self.state.send_replace(DaemonState::NotReady);
    }

    /// Comes back on the same port, forwarding to `node_proxy`, and is ready.
    pub async fn come_back(&mut self, node_proxy: SocketAddr) {
        self.proxy = Some(StandInProxy::start(self.at, node_proxy).await);
        self.state.send_replace(DaemonState::Ready);
    }

    /// The supervisor gives up on it for good.
    pub fn gone(&self) {
        self.state.send_replace(DaemonState::Gone);
    }
}

/// How a [`ScriptedSocks5`] proxy answers.
#[derive(Debug, Clone)]
pub enum Socks5Script {
    /// Picks this method after the greeting (0xff: none acceptable) and says no more.
    Method(u8),
    /// Accepts "no authentication", reads the CONNECT, then writes these bytes verbatim.
    Reply(Vec<u8>),
    /// [`Socks5Script::Reply`] after a pause, as a dial nothing answers takes time.
    SlowReply(Duration, Vec<u8>),
    /// Opens the tunnel, and answers the first bytes sent through it with these.
    Tunnel(Vec<u8>),
}

/// A SOCKS5 proxy on loopback that answers every CONNECT as scripted: the reply codes and
/// malformed replies tailscaled's own proxy never sends (it answers every failure with 1).
pub struct ScriptedSocks5 {
    pub addr: SocketAddr,
}

impl ScriptedSocks5 {
    /// Answers every connection with `script`.
    pub async fn start(script: Socks5Script) -> Self {
        Self::start_each(vec![script]).await
    }

    /// Answers the first connection with the first script, and so on; the last one repeats.
    pub async fn start_each(scripts: Vec<Socks5Script>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut scripts = scripts.into_iter();
            let mut script = scripts.next().unwrap();
            while let Ok((mut s, _)) = listener.accept().await {
                let current = script.clone();
                if let Some(next) = scripts.next() {
                    script = next;
                }
                let script = current;
                tokio::spawn(async move {
                    let mut greeting = [0u8; 2];
                    s.read_exact(&mut greeting).await.unwrap();
                    let mut methods = vec![0u8; usize::from(greeting[1])];
                    s.read_exact(&mut methods).await.unwrap();
                    const OPENED: [u8; 10] = [5, 0, 0, 1, 100, 64, 0, 1, 0x1c, 0xfc];
                    let (pause, reply, answer) = match script {
                        Socks5Script::Method(m) => {
                            s.write_all(&[5, m]).await.unwrap();
                            return;
                        }
                        Socks5Script::Reply(reply) => (Duration::ZERO, reply, None),
                        Socks5Script::SlowReply(pause, reply) => (pause, reply, None),
                        Socks5Script::Tunnel(answer) => {
                            (Duration::ZERO, OPENED.to_vec(), Some(answer))
                        }
                    };
                    s.write_all(&[5, 0]).await.unwrap();
                    // VER CMD RSV ATYP, then the address and the port.
                    let mut head = [0u8; 4];
                    s.read_exact(&mut head).await.unwrap();
                    let len = match head[3] {
                        1 => 4,
                        4 => 16,
                        _ => usize::from(s.read_u8().await.unwrap()),
                    };
                    let mut rest = vec![0u8; len + 2];
                    s.read_exact(&mut rest).await.unwrap();
                    tokio::time::sleep(pause).await;
                    s.write_all(&reply).await.unwrap();
                    // Hold the connection until the client sends something or gives up on it.
                    let _ = s.read(&mut [0u8; 4096]).await;
                    if let Some(answer) = answer {
                        let _ = s.write_all(&answer).await;
                    }
                });
            }
        });
        Self { addr }
    }
}
