//! What a SOCKS5 proxy answers to the agent's CONNECT, through the agent's own tunnel code
//! (tokio-socks reads the reply; the agent classifies what went wrong). A proxy on loopback
//! answers each connection with the input and hangs up. The first input byte picks the target:
//! a tailnet IP, or a name (whose "general failure" makes the agent ask the LocalAPI).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Some((&which, reply)) = bytes.split_first() else {
        return;
    };
    let host = if which % 2 == 0 {
        "100.64.0.1:80"
    } else {
        "devhost.tail.example:80"
    };
    let reply = reply.to_vec();
    tailbox_fuzz::runtime().block_on(async move {
        // One listener for the whole run: a fresh port per input would run out of ports.
        static LISTENER: OnceLock<TcpListener> = OnceLock::new();
        let listener = match LISTENER.get() {
            Some(listener) => listener,
            None => {
                let bound = TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("a loopback port");
                LISTENER.get_or_init(|| bound)
            }
        };
        let proxy = listener.local_addr().expect("its address");
        let answer = async move {
            let (mut conn, _) = listener.accept().await.expect("the agent's connection");
            // Read the greeting (and the request, if it comes) without blocking on it.
            let mut scratch = [0u8; 512];
            let _ = tokio::time::timeout(Duration::from_millis(5), conn.read(&mut scratch)).await;
            let _ = conn.write_all(&reply).await;
            let _ = conn.shutdown().await;
        };
        let (outcome, ()) = tokio::join!(
            tokio::time::timeout(
                Duration::from_secs(10),
                tailbox_agent::fuzzing::socks_connect(proxy, host),
            ),
            answer,
        );
        assert!(
            outcome.is_ok(),
            "the tunnel did not end within 10 s of the proxy hanging up"
        );
    });
});
