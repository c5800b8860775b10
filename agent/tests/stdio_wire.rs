//! The agent binary's stdout is the gRPC wire and nothing else.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tailbox_proto::agent::v1::agent_client::AgentClient;
use tailbox_proto::agent::v1::{
    DaemonConfig, Deadlines, HelloRequest, RunRequest, TailnetConfig, event,
};
use tailbox_testkit::agent::{Recorder, channel_over, serve_stdio_command};
use tokio::io::AsyncReadExt as _;

/// Splits `bytes` into HTTP/2 frames; fails if anything is not a well-formed frame of a known type.
fn parse_http2_frames(bytes: &[u8]) -> Result<Vec<(u8, u32)>, String> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 9)
            .ok_or_else(|| format!("truncated frame header at byte {at}"))?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let kind = header[3];
        if kind > 9 {
            return Err(format!(
                "unknown frame type {kind} at byte {at}: {:?}",
                String::from_utf8_lossy(&bytes[at..(at + 40).min(bytes.len())])
            ));
        }
        if length > 16_384 * 64 {
            return Err(format!("implausible frame length {length} at byte {at}"));
        }
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        at += 9 + length;
        if at > bytes.len() {
            return Err("truncated frame payload".into());
        }
        frames.push((kind, stream));
    }
    Ok(frames)
}

/// A client over the child's stdio, and the copy of every byte its stdout sent.
async fn connect(
    child: &mut tokio::process::Child,
) -> (AgentClient<tonic::transport::Channel>, Arc<Mutex<Vec<u8>>>) {
    let (stdout, copy) = Recorder::new(child.stdout.take().unwrap());
    let stdin = child.stdin.take().unwrap();
    (
        AgentClient::new(channel_over(tokio::io::join(stdout, stdin)).await),
        copy,
    )
}

/// A stand-in tailscaled that makes noise everywhere it can: on its own stdout and stderr, and
/// straight into its parent's fd 1 through /proc, which would corrupt the wire if the agent had
/// not moved it. It never opens a LocalAPI, so each run fails in its daemon phase, quickly.
const NOISY_TAILSCALED: &str = r#"#!/bin/bash
if [ "$1" = "--version" ]; then echo "1.0.0-noisy"; echo "noise from --version"; exit 0; fi
for i in $(seq 1 40); do
  echo "stray stdout noise $i" > "/proc/$PPID/fd/1"
  echo "child stdout noise $i"
  echo "child stderr noise $i" >&2
  sleep 0.01
done
read -r -u "$TS_PARENT_DEATH_FD" _
"#;

#[tokio::test]
async fn only_grpc_reaches_stdout_while_children_and_logs_make_noise() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let tailscaled = dir.path().join("tailscaled");
        tailbox_testkit::write_executable(&tailscaled, NOISY_TAILSCALED);

        let mut child = serve_stdio_command(env!("CARGO_BIN_EXE_tailbox-agent"))
            // Debug logging relays every line tailscaled writes: heavy logging on stderr.
            .args(["--log", "debug"])
            .env("TMPDIR", dir.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr_task = tailbox_testkit::collect_stderr(&mut child);
        let (mut client, copy) = connect(&mut child).await;

        // Keep the connection busy while the noise runs: handshakes and whole runs.
        let request = RunRequest {
            tailnet: Some(TailnetConfig {
                auth_key: "tskey-auth-unused".into(),
                daemon: Some(DaemonConfig {
                    tailscaled_path: tailscaled.display().to_string(),
                    proxy_listen: "127.0.0.1:0".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            deadlines: Some(Deadlines {
                daemon_start: Some(pbjson_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut reports = 0;
        for _ in 0..3 {
            client.hello(HelloRequest::default()).await.unwrap();
            let mut stream = client.run(request.clone()).await.unwrap().into_inner();
            while let Some(event) = stream.message().await.unwrap() {
                if matches!(event.kind, Some(event::Kind::Report(_))) {
                    reports += 1;
                }
            }
        }
        assert_eq!(reports, 3);
        drop(client);

        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the agent exits after stdin closes")
            .unwrap();
        let stderr = stderr_task.await.unwrap();
        assert!(
            status.success(),
            "{status}: {}",
            &stderr[stderr.len().saturating_sub(3000)..]
        );

        // The noise really happened, and it went to stderr...
        assert!(
            stderr.contains("stray stdout noise"),
            "stderr lacks the noise written into the agent's fd 1"
        );
        assert!(
            stderr.contains("child stdout noise"),
            "stderr lacks the child's relayed output"
        );
        // ...while stdout carried nothing but well-formed HTTP/2 frames.
        let bytes = copy.lock().unwrap().clone();
        assert!(!bytes.is_empty());
        let frames =
            parse_http2_frames(&bytes).unwrap_or_else(|e| panic!("stdout is not pure HTTP/2: {e}"));
        assert_eq!(
            frames.first().map(|f| f.0),
            Some(4),
            "the server speaks first with SETTINGS"
        );
        assert!(
            frames.iter().any(|&(kind, _)| kind == 0),
            "DATA frames carried the events"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_agent_exits_cleanly_when_stdin_closes() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut child = serve_stdio_command(env!("CARGO_BIN_EXE_tailbox-agent"))
            .spawn()
            .unwrap();
        drop(child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("exits promptly")
            .unwrap();
        assert!(status.success(), "{status}");
        let mut out = Vec::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        // An HTTP/2 server may have sent its SETTINGS; nothing else.
        parse_http2_frames(&out).unwrap();
    })
    .await
    .expect("test timed out");
}

#[test]
fn a_terminal_or_file_on_stdin_is_refused_with_an_explanation() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tailbox-agent"))
        .args(["serve", "--stdio"])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expects pipes or a socket from the tailbox controller"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}
