//! The agent's side of the wire as the exec's stdio carries it to tailbox: HTTP/2 frames of gRPC
//! (tailbox's channel reads them for `Hello` and a `Run`'s events). The input is the agent's
//! stdout, delivered in chunks whose size the first byte seeds, as the router's reads deliver
//! them; then stdout ends.
#![no_main]

use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Some((&seed, stdout)) = bytes.split_first() else {
        return;
    };
    let step = usize::from(seed) * 16 + 1;
    let stdout = stdout.to_vec();
    tailbox_fuzz::runtime().block_on(async move {
        let (agent_stdout, mut writer) = tokio::io::duplex(64 << 10);
        let feed = tokio::spawn(async move {
            for chunk in stdout.chunks(step) {
                if writer.write_all(chunk).await.is_err() {
                    return;
                }
            }
            let _ = writer.shutdown().await;
        });
        // The agent's stdin: what tailbox writes goes nowhere.
        let io = tokio::io::join(agent_stdout, tokio::io::sink());
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), tailbox::fuzzing::agent_wire(io)).await;
        // tailbox's keep-alive pings are what end a connection that goes quiet; a stream that
        // ended must end the call well before them.
        assert!(
            outcome.is_ok(),
            "the call did not end within 5 s of the agent's stdout ending"
        );
        let _ = feed.await;
    });
});
