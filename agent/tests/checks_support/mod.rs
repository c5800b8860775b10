//! What the HTTP and git check tests share: a lab with a logged-in sandbox node, check contexts,
//! result accessors, loopback stand-in servers on the dev host, and a stand-in tailscaled whose
//! proxy port and readiness the test drives (down, dying, back, gone for good).
//!
//! Each test file uses part of it.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tailbox_agent::checks::{DaemonReady, DaemonState, ProxyContext};
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

/// A context for a check through the proxy at `socks_addr`, with a daemon that is always ready.
pub fn ctx(socks_addr: SocketAddr, budget: Duration) -> ProxyContext {
    ProxyContext {
        socks_addr,
        deadline: tokio::time::Instant::now() + budget,
        daemon: DaemonReady::always(),
    }
}

pub fn status(r: &CheckResult) -> CheckStatus {
    CheckStatus::try_from(r.status).unwrap()
}

pub fn class(r: &CheckResult) -> FailureClass {
    FailureClass::try_from(r.failure_class).unwrap()
}

pub fn layer(r: &CheckResult) -> Layer {
    Layer::try_from(r.layer).unwrap()
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
/// front of a real node's proxy, or nothing) and what its supervisor says.
pub struct StandInDaemon {
    at: SocketAddr,
    proxy: Option<StandInProxy>,
    state: watch::Sender<DaemonState>,
}

impl StandInDaemon {
    /// Down: nothing on its proxy port, and its supervisor says it is not ready.
    pub async fn down() -> Self {
        Self {
            at: closed_addr().await,
            proxy: None,
            state: watch::channel(DaemonState::NotReady).0,
        }
    }

    /// Up and ready, its proxy port forwarding to `node_proxy`.
    pub async fn up(node_proxy: SocketAddr) -> Self {
        let mut daemon = Self::down().await;
        daemon.come_back(node_proxy).await;
        daemon
    }

    /// A context for a check through this daemon's proxy port.
    pub fn ctx(&self, budget: Duration) -> ProxyContext {
        ProxyContext {
            socks_addr: self.at,
            deadline: tokio::time::Instant::now() + budget,
            daemon: DaemonReady::new(self.state.subscribe()),
        }
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
