//! Servers that misbehave on purpose, for the fault matrix. Each listens on this machine's
//! loopback; the lab's dev-host tailscaled forwards tailnet connections to `127.0.0.1` on the
//! same port, so a sandbox reaches one at `http://<dev host's tailnet IP>:<port>/`, through the
//! real tailnet. Each reads what the client sent first (a request head, a SOCKS greeting), then
//! misbehaves.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How a [`FaultServer`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Bytes that are not HTTP (nor SOCKS), then the connection closes.
    Garbage,
    /// A valid `200 OK` head announcing a 1 MiB body, 1 KiB of it, then a TCP reset.
    ResetMidBody,
    /// What a smart-HTTP git server sends (`200`, the upload-pack advertisement's content type),
    /// with a body that is not pkt-lines.
    GitGarbageAdvertisement,
}

/// The bytes of [`Misbehaviour::Garbage`].
pub const GARBAGE: &[u8] = b"\x00\x17this is not HTTP: \xff\xfe garbage from a broken server\r\n";

/// A loopback server that answers every connection with one [`Misbehaviour`]; stops on drop.
pub struct FaultServer {
    port: u16,
    task: JoinHandle<()>,
}

impl FaultServer {
    /// Listens on `127.0.0.1:0`.
    pub async fn start(misbehaviour: Misbehaviour) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, misbehaviour));
            }
        });
        Ok(Self { port, task })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://<host>:<port><path>`.
    pub fn url(&self, host: IpAddr, path: &str) -> String {
        format!("http://{host}:{}{path}", self.port)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, misbehaviour: Misbehaviour) {
    let mut first = [0u8; 4096];
    if !matches!(stream.read(&mut first).await, Ok(n) if n > 0) {
        return;
    }
    let _ = match misbehaviour {
        Misbehaviour::Garbage => stream.write_all(GARBAGE).await,
        Misbehaviour::ResetMidBody => {
            // Dropped without a shutdown: the reset is the point.
            let _ = reset_mid_body(&mut stream).await;
            return;
        }
        Misbehaviour::GitGarbageAdvertisement => {
            let body = "this is not a pkt-line advertisement\n";
            let head = format!(
                "HTTP/1.1 200 OK\r\n\
                 Content-Type: application/x-git-upload-pack-advertisement\r\n\
                 Cache-Control: no-cache\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(format!("{head}{body}").as_bytes()).await
        }
    };
    let _ = stream.shutdown().await;
}

async fn reset_mid_body(stream: &mut TcpStream) -> std::io::Result<()> {
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
              Content-Length: 1048576\r\n\r\n",
        )
        .await?;
    stream.write_all(&[b'x'; 1024]).await?;
    stream.flush().await?;
    // Let the part arrive before the reset, so the client is mid-body when it comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SO_LINGER 0: closing sends RST instead of FIN.
    stream.set_zero_linger()
}
