//! A minimal SOCKS5 CONNECT client (RFC 1928, no authentication), written for diagnosis.
//!
//! General-purpose clients turn a failure reply into an opaque error, and some reject the whole
//! reply when its bound address is malformed, which older tailscaled versions send on every
//! failure (ATYP 0x00, tailscale/tailscale#6144). This one reports the reply code it got, notes a
//! malformed address instead of failing on it, and says which step failed, so a failed dial can
//! be told apart from a proxy that is not there.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `general failure`: what tailscaled answers for every dial error.
pub(crate) const REPLY_GENERAL_FAILURE: u8 = 1;

/// Why a SOCKS5 CONNECT did not produce a tunnel.
#[derive(Debug)]
pub(crate) enum SocksFailure {
    /// The TCP connection to the proxy itself failed (usually: nothing listens there).
    ProxyUnreachable(io::Error),
    /// The proxy accepted and then closed or reset the connection during the handshake.
    ProxyClosed(io::Error),
    /// The proxy rejected the "no authentication" method.
    AuthRequired,
    /// The listener did not answer like a SOCKS5 server.
    NotSocks5(String),
    /// The proxy answered the CONNECT with a failure reply.
    Reply {
        /// RFC 1928 REP field.
        code: u8,
        /// The address type of the reply when it was not a valid one (tailscale#6144).
        malformed_atyp: Option<u8>,
        /// Time from sending the CONNECT until the reply arrived: tailscaled gives up dialing
        /// after 5 s, so a reply after about that long means the dial timed out.
        waited: Duration,
    },
    /// The destination cannot be expressed in a SOCKS5 request.
    InvalidTarget(&'static str),
}

/// Human text for a reply code.
pub(crate) fn reply_text(code: u8) -> &'static str {
    match code {
        0 => "succeeded",
        1 => "general failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unassigned reply code",
    }
}

/// Opens a tunnel to `host:port` through the SOCKS5 proxy at `proxy`. Names are sent to the
/// proxy unresolved (socks5h). The caller bounds the time this takes.
pub(crate) async fn connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
) -> Result<TcpStream, SocksFailure> {
    let request = connect_request(host, port)?;
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(SocksFailure::ProxyUnreachable)?;
    // The git protocol sends many small packets; Nagle plus delayed ACKs would add ~40 ms each.
    let _ = stream.set_nodelay(true);

    stream
        .write_all(&[5, 1, 0])
        .await
        .map_err(SocksFailure::ProxyClosed)?;
    let mut method = [0u8; 2];
    stream
        .read_exact(&mut method)
        .await
        .map_err(SocksFailure::ProxyClosed)?;
    if method[0] != 5 {
        return Err(SocksFailure::NotSocks5(format!(
            "greeting answered with version byte {:#04x}",
            method[0]
        )));
    }
    match method[1] {
        0 => {}
        0xff => return Err(SocksFailure::AuthRequired),
        other => {
            return Err(SocksFailure::NotSocks5(format!(
                "proxy picked method {other:#04x}, which was not offered"
            )));
        }
    }

    stream
        .write_all(&request)
        .await
        .map_err(SocksFailure::ProxyClosed)?;
    let sent = Instant::now();
    let mut head = [0u8; 3];
    stream
        .read_exact(&mut head)
        .await
        .map_err(SocksFailure::ProxyClosed)?;
    let waited = sent.elapsed();
    if head[0] != 5 {
        return Err(SocksFailure::NotSocks5(format!(
            "CONNECT answered with version byte {:#04x}",
            head[0]
        )));
    }
    if head[1] != 0 {
        // The bound address of a failure reply carries nothing; only look at its type, and only
        // to say so when it is malformed. A proxy that sent just three bytes is fine too.
        let mut atyp = [0u8; 1];
        let malformed_atyp =
            match tokio::time::timeout(Duration::from_millis(50), stream.read_exact(&mut atyp))
                .await
            {
                Ok(Ok(_)) if !matches!(atyp[0], 1 | 3 | 4) => Some(atyp[0]),
                _ => None,
            };
        return Err(SocksFailure::Reply {
            code: head[1],
            malformed_atyp,
            waited,
        });
    }
    read_bound_address(&mut stream).await?;
    Ok(stream)
}

/// Encodes the CONNECT request: IP literals as such, anything else as a domain name.
fn connect_request(host: &str, port: u16) -> Result<Vec<u8>, SocksFailure> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut req = vec![5, 1, 0];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        Ok(IpAddr::V6(v6)) => {
            req.push(4);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            let len = u8::try_from(host.len())
                .map_err(|_| SocksFailure::InvalidTarget("host name longer than 255 bytes"))?;
            if len == 0 {
                return Err(SocksFailure::InvalidTarget("empty host name"));
            }
            req.push(3);
            req.push(len);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    Ok(req)
}

/// Reads (and discards) the bound address of a success reply, leaving the stream at the first
/// byte from the destination.
async fn read_bound_address(stream: &mut TcpStream) -> Result<(), SocksFailure> {
    let mut atyp = [0u8; 1];
    stream
        .read_exact(&mut atyp)
        .await
        .map_err(SocksFailure::ProxyClosed)?;
    let len = match atyp[0] {
        1 => 4,
        4 => 16,
        3 => {
            let mut n = [0u8; 1];
            stream
                .read_exact(&mut n)
                .await
                .map_err(SocksFailure::ProxyClosed)?;
            usize::from(n[0])
        }
        other => {
            return Err(SocksFailure::NotSocks5(format!(
                "success reply with address type {other:#04x}"
            )));
        }
    };
    let mut rest = vec![0u8; len + 2];
    stream
        .read_exact(&mut rest)
        .await
        .map_err(SocksFailure::ProxyClosed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot fake proxy: checks the greeting, answers it with `method`, then reads the
    /// request and writes `reply` verbatim.
    async fn fake_proxy(method: u8, reply: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            s.read_exact(&mut greeting).await.unwrap();
            assert_eq!(greeting, [5, 1, 0]);
            s.write_all(&[5, method]).await.unwrap();
            if method != 0 {
                return;
            }
            let mut req = [0u8; 10];
            s.read_exact(&mut req).await.unwrap();
            s.write_all(&reply).await.unwrap();
            s.write_all(b"payload").await.unwrap();
            // Hold the connection open long enough for the client to read.
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        addr
    }

    #[test]
    fn requests_encode_ips_and_names() {
        assert_eq!(
            connect_request("100.64.0.1", 80).unwrap(),
            [5, 1, 0, 1, 100, 64, 0, 1, 0, 80]
        );
        let v6 = connect_request("[fd7a:115c:a1e0::1]", 443).unwrap();
        assert_eq!(&v6[..4], &[5, 1, 0, 4]);
        assert_eq!(v6.len(), 4 + 16 + 2);
        assert_eq!(
            connect_request("devhost", 7420).unwrap(),
            [
                5, 1, 0, 3, 7, b'd', b'e', b'v', b'h', b'o', b's', b't', 0x1c, 0xfc
            ]
        );
        assert!(matches!(
            connect_request(&"a".repeat(256), 1),
            Err(SocksFailure::InvalidTarget(_))
        ));
    }

    #[tokio::test]
    async fn success_leaves_the_stream_at_the_payload() {
        let proxy = fake_proxy(0, vec![5, 0, 0, 1, 127, 0, 0, 1, 0x12, 0x34]).await;
        let mut s = connect(proxy, "100.64.0.1", 80).await.unwrap();
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"payload");
    }

    #[tokio::test]
    async fn failure_reply_with_atyp_zero_is_a_reply_not_a_parse_error() {
        // What tailscaled before the fix of tailscale#6144 sent for a failed dial.
        let proxy = fake_proxy(0, vec![5, 1, 0, 0]).await;
        match connect(proxy, "100.64.0.1", 80).await {
            Err(SocksFailure::Reply {
                code: 1,
                malformed_atyp: Some(0),
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn well_formed_failure_reply_is_not_flagged() {
        let proxy = fake_proxy(0, vec![5, 1, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        match connect(proxy, "100.64.0.1", 80).await {
            Err(SocksFailure::Reply {
                code: 1,
                malformed_atyp: None,
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn auth_demand_and_missing_proxy_are_typed() {
        let proxy = fake_proxy(0xff, Vec::new()).await;
        assert!(matches!(
            connect(proxy, "100.64.0.1", 80).await,
            Err(SocksFailure::AuthRequired)
        ));

        // A port we just closed: nothing listens there.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = connect(closed, "100.64.0.1", 80).await.unwrap_err();
        assert!(matches!(err, SocksFailure::ProxyUnreachable(_)), "{err:?}");
    }
}
