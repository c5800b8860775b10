//! An agent killed in the middle of its event stream: the controller must say so promptly, with
//! the agent's stderr tail and the documented exit code, and must not hang or panic.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::{Duration, Instant};

use serde_json::Value;
use tailbox_testkit::agent::agent_binary;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// A stand-in tailscaled that never opens its LocalAPI, so the agent stays in the daemon phase
/// (mid-stream) until killed. Like the real one, it exits when TS_PARENT_DEATH_FD closes.
const HANGING_TAILSCALED: &str = r#"#!/bin/bash
if [ "$1" = "--version" ]; then echo "1.0.0-hanging"; exit 0; fi
echo "hanging tailscaled: never ready" >&2
read -r -u "$TS_PARENT_DEATH_FD" _
exit 1
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_is_an_infrastructure_error_with_its_stderr_tail() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let agent = agent_binary();
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("tailscaled");
        tailbox_testkit::write_executable(&fake, HANGING_TAILSCALED);
        let key = dir.path().join("key");
        std::fs::write(&key, "tskey-auth-unused").unwrap();

        let mut child = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), dir.path())
            .args([
                "check",
                "--sandbox",
                "local",
                "--json",
                "--proxy-listen",
                "127.0.0.1:0",
            ])
            .arg("--agent")
            .arg(&agent)
            .arg("--tailscaled")
            .arg(&fake)
            .arg("--auth-key-file")
            .arg(&key)
            .spawn()
            .unwrap();
        let stderr_task = tailbox_testkit::collect_stderr(&mut child);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut agent_pid = None;
        let mut killed_at = None;
        let mut last_event = Value::Null;
        while let Some(line) = lines.next_line().await.unwrap() {
            let event: Value = serde_json::from_str(&line).unwrap();
            if let Some(pid) = event["agent_hello"]["pid"].as_u64() {
                agent_pid = Some(pid as i32);
            }
            if killed_at.is_none() && event["phase_started"]["phase"] == "PHASE_DAEMON" {
                // Mid-stream: the agent is waiting for its tailscaled. Kill it outright.
                let pid = nix::unistd::Pid::from_raw(agent_pid.unwrap());
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
                killed_at = Some(Instant::now());
            }
            last_event = event;
        }
        let status = child.wait().await.unwrap();
        let killed_at = killed_at.expect("the run reached the daemon phase");
        let stderr = stderr_task.await.unwrap();

        assert_eq!(status.code(), Some(3), "stderr:\n{stderr}");
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "reported promptly: {:?}",
            killed_at.elapsed()
        );
        assert!(
            last_event["report"].is_null(),
            "no report after the agent died"
        );
        assert!(
            stderr.contains("error: The agent died in the middle of the run"),
            "{stderr}"
        );
        assert!(stderr.contains("killed by signal 9"), "{stderr}");
        // The agent's own last words are in the tail.
        assert!(stderr.contains("agent stderr (last"), "{stderr}");
        assert!(stderr.contains("serving tailbox.agent.v1"), "{stderr}");
        assert!(stderr.contains("hint: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    })
    .await
    .expect("test timed out");
}
