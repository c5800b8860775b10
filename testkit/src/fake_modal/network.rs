//! Each fake sandbox's own network: a network namespace with only loopback and a veth link to a
//! private "uplink" namespace, in which the fake itself is the only thing listening.
//!
//! ```text
//!  sandbox netns                          uplink netns                 this machine
//!  127.0.0.1:P  (forwarder) ──► eth0 198.18.0.2 ══veth══ 198.18.0.1:P (forwarder) ──► 127.0.0.1:P
//! ```
//!
//! A real sandbox reaches Tailscale's control plane, DERP and STUN over the internet; a fake one
//! reaches exactly the lab's ([`Uplink`]s), at the same `127.0.0.1:P` addresses the lab announces
//! (its control URL, its DERP map), through two forwarders and a real veth link. Everything else
//! on this machine, the dev host's servers included, is out of reach: the sandbox has no route
//! but the veth's /30, and nothing but the fake's forwarders listens in the uplink namespace.
//! Both namespaces are created by threads of this process and held by file descriptors, so they
//! vanish with the fake (or with this process) and leave nothing behind on the machine.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::task::JoinHandle;

/// The uplink's end of the veth.
const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The sandbox's end (198.18.0.0/15 is reserved for network tests, RFC 2544).
const SANDBOX_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// A service on this machine's loopback that fake sandboxes may reach at the same address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    /// A TCP port (the lab's control server, its DERP server).
    Tcp(SocketAddrV4),
    /// A UDP port (the lab's STUN server).
    Udp(SocketAddrV4),
}

/// A network namespace, kept alive by its file descriptor.
pub(crate) struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// A new, empty network namespace (only a `lo`, down).
    pub(crate) fn new() -> io::Result<Self> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: unshare(2) changes only this (short-lived) thread's namespace.
                    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let fd = std::fs::File::open("/proc/thread-self/ns/net")?;
                    Ok(Self { fd: fd.into() })
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })
    }

    /// The namespace's inode, which `/proc/<pid>/ns/net` of its processes links to.
    pub(crate) fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::File::from(self.fd.try_clone()?).metadata()?.ino())
    }

    /// A path other processes can open to reach this namespace.
    fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }

    /// Runs `f` on a fresh thread inside this namespace (sockets it creates stay in it).
    fn enter<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let fd = self.fd.as_raw_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns(2) on a namespace fd we own; it moves only this thread, which
                    // ends when `f` returns.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    f()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })
    }

    /// For a forked child before exec: join this namespace.
    pub(crate) fn join_in_child(&self) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
        let fd = self.fd.as_raw_fd();
        move || {
            // SAFETY: setns(2) is async-signal-safe; the fd stays open while the fake lives.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }

    /// Runs `ip -batch -` with `commands` inside this namespace.
    async fn ip(&self, commands: &str) -> io::Result<()> {
        let mut ip = tokio::process::Command::new("ip");
        ip.args(["-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure only calls setns(2).
        unsafe {
            ip.pre_exec(self.join_in_child());
        }
        let mut child = ip.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running `ip` (iproute2, installed by scripts/setup): {e}"),
            )
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            tokio::io::AsyncWriteExt::write_all(&mut stdin, commands.as_bytes()).await?;
        }
        let output = child.wait_with_output().await?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "`ip -batch -` failed ({}) on:\n{commands}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }
}

/// Where a forwarder opens its outgoing connections.
#[derive(Clone)]
struct Target {
    /// `None`: this machine's own namespace.
    netns: Option<Arc<NetNs>>,
    addr: SocketAddr,
}

impl Target {
    async fn tcp(&self) -> io::Result<tokio::net::TcpStream> {
        let socket = match &self.netns {
            Some(netns) => netns.enter(TcpSocket::new_v4)?,
            None => TcpSocket::new_v4()?,
        };
        socket.connect(self.addr).await
    }

    async fn udp(&self) -> io::Result<UdpSocket> {
        let bind = || std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0));
        let socket = match &self.netns {
            Some(netns) => netns.enter(bind)?,
            None => bind()?,
        };
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        // Connected: it only ever hears back from the target.
        socket.connect(self.addr).await?;
        Ok(socket)
    }
}

/// A sandbox's network: its namespace, its uplink and the forwarders between them.
pub(crate) struct SandboxNetwork {
    pub(crate) netns: Arc<NetNs>,
    _uplink: Arc<NetNs>,
    forwarders: Mutex<Vec<JoinHandle<()>>>,
}

impl SandboxNetwork {
    /// Takes the uplinks down (the sandbox has ended).
    pub(crate) fn disconnect(&self) {
        let forwarders = std::mem::take(&mut *super::lock(&self.forwarders));
        for forwarder in forwarders {
            forwarder.abort();
        }
    }
}

impl Drop for SandboxNetwork {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl SandboxNetwork {
    /// Creates the namespaces, the veth link and a forwarder pair for each uplink.
    pub(crate) async fn create(uplinks: &[Uplink]) -> io::Result<Self> {
        let netns = Arc::new(NetNs::new()?);
        let uplink = Arc::new(NetNs::new()?);
        uplink
            .ip(&format!(
                "link add up0 type veth peer name eth0 netns {sandbox}\n\
                 addr add {UPLINK_ADDR}/30 dev up0\n\
                 link set up0 up\n",
                sandbox = netns.path()
            ))
            .await?;
        netns
            .ip(&format!(
                "addr add {SANDBOX_ADDR}/30 dev eth0\nlink set eth0 up\nlink set lo up\n"
            ))
            .await?;
        let mut forwarders = Vec::new();
        for uplink_service in uplinks {
            let (Uplink::Tcp(host) | Uplink::Udp(host)) = *uplink_service;
            let on_uplink = SocketAddr::from((UPLINK_ADDR, host.port()));
            // sandbox 127.0.0.1:P → uplink 198.18.0.1:P, then uplink → this machine's 127.0.0.1:P.
            let hops = [
                (
                    &netns,
                    SocketAddr::V4(host),
                    Target {
                        netns: Some(Arc::clone(&netns)),
                        addr: on_uplink,
                    },
                ),
                (
                    &uplink,
                    on_uplink,
                    Target {
                        netns: None,
                        addr: SocketAddr::V4(host),
                    },
                ),
            ];
            for (listen_ns, listen, target) in hops {
                let forwarder = match uplink_service {
                    Uplink::Tcp(_) => {
                        let listener = listen_ns.enter(|| {
                            let listener = std::net::TcpListener::bind(listen)?;
                            listener.set_nonblocking(true)?;
                            Ok(listener)
                        })?;
                        tokio::spawn(forward_tcp(TcpListener::from_std(listener)?, target))
                    }
                    Uplink::Udp(_) => {
                        let socket = listen_ns.enter(|| {
                            let socket = std::net::UdpSocket::bind(listen)?;
                            socket.set_nonblocking(true)?;
                            Ok(socket)
                        })?;
                        tokio::spawn(forward_udp(UdpSocket::from_std(socket)?, target))
                    }
                };
                forwarders.push(forwarder);
            }
        }
        Ok(Self {
            netns,
            _uplink: uplink,
            forwarders: Mutex::new(forwarders),
        })
    }
}

/// A network namespace whose only way out is the given services of this machine, reached at
/// their own `127.0.0.1:P` addresses as a fake sandbox reaches them (see the module docs). For
/// tests that run a whole `tailbox` in it: without a DERP uplink the sandbox has no relay, and
/// since the dev host's own UDP endpoints are out of reach, the DERP relay is its only path.
pub struct IsolatedNetwork(SandboxNetwork);

impl IsolatedNetwork {
    /// Creates the namespaces, the link and a forwarder pair for each of `uplinks`.
    pub async fn create(uplinks: &[Uplink]) -> io::Result<Self> {
        SandboxNetwork::create(uplinks).await.map(Self)
    }

    /// For a forked child before exec (`Command::pre_exec`): join the namespace.
    pub fn join_in_child(&self) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
        self.0.netns.join_in_child()
    }
}

async fn forward_tcp(listener: TcpListener, target: Target) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = target.tcp().await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// Relays datagrams: one connected upstream socket per client, whose answers go back to it.
async fn forward_udp(socket: UdpSocket, target: Target) {
    let socket = Arc::new(socket);
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok((n, client)) = socket.recv_from(&mut buf).await {
        let upstream = match upstreams.get(&client) {
            Some(upstream) => Arc::clone(upstream),
            None => {
                let Ok(upstream) = target.udp().await else {
                    continue;
                };
                let upstream = Arc::new(upstream);
                upstreams.insert(client, Arc::clone(&upstream));
                let (back, from) = (Arc::clone(&socket), Arc::clone(&upstream));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.recv(&mut buf).await {
                        if back.send_to(&buf[..n], client).await.is_err() {
                            return;
                        }
                    }
                });
                upstream
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// Kills every process in `netns` (a sandbox's processes, however they detached), until none is
/// left. Processes are found by their `/proc/<pid>/ns/net` link, which a process loses as it
/// exits.
pub(crate) fn kill_processes_in(netns: &NetNs) {
    let Ok(inode) = netns.inode() else {
        return;
    };
    let link = format!("net:[{inode}]");
    // A process may fork while we look, and a killed one takes a moment to go: look again
    // until none is left (for up to 5 s).
    for _ in 0..500 {
        let mut found = false;
        for pid in processes_with_netns(&link) {
            found = true;
            // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Pids whose network namespace link reads `link` (zombies have none and are skipped).
pub(crate) fn processes_with_netns(link: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.as_os_str() == std::ffi::OsStr::new(link))
        })
        .collect()
}
