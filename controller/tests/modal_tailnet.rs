//! The whole product path with no internet: `tailbox check --sandbox modal` against the fake
//! Modal, the real static agent uploaded into a fake sandbox, and that agent driving a real
//! tailscaled into the lab's real tailnet (testkit `Lab`) and checking the lab's dev host.
//!
//! The fake sandbox shares this machine's network namespace, so the agent reaches the lab's
//! control server on 127.0.0.1 as a Modal sandbox reaches Tailscale's control plane.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tailbox_testkit::agent::static_agent_binary;
use tailbox_testkit::fake_modal::FakeModal;
use tailbox_testkit::lab::{Binaries, Lab};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

fn status(check: &Value) -> &str {
    check["status"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_in_a_fake_modal_sandbox_passes_every_check_on_the_lab_tailnet() {
    // Building the lab binaries and the static agent can take minutes on a cold cache: do it
    // outside the timeout.
    Binaries::locate().await.unwrap();
    let agent = tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap();
    let lab = Lab::start().await.unwrap();
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("authkey");
        std::fs::write(&key_file, lab.auth_key()).unwrap();
        let main_sha = lab.git_ref("refs/heads/main").unwrap().to_owned();
        let args: Vec<String> = vec![
            "check".into(),
            "--sandbox".into(),
            "modal".into(),
            "--json".into(),
            "--agent".into(),
            agent.display().to_string(),
            "--tailscaled".into(),
            lab.bins().tailscaled().display().to_string(),
            "--control-url".into(),
            lab.control_url().into(),
            "--auth-key-file".into(),
            key_file.display().to_string(),
            // Fake sandboxes share this machine's ports; let tailscaled pick one.
            "--proxy-listen".into(),
            "127.0.0.1:0".into(),
            "--ping".into(),
            lab.peer_ipv4().to_string(),
            "--http".into(),
            lab.health_url(),
            "--git".into(),
            lab.git_url(),
            "--expect-ref".into(),
            format!("main={main_sha}"),
        ];
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailbox"))
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env(
                "TAILBOX_TAILSCALED_ENV",
                serde_json::to_string(&lab.tailscaled_env()).unwrap(),
            )
            .envs(fake.env())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        let events: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let report = events
            .last()
            .map(|e| e["report"].clone())
            .unwrap_or_default();
        assert_eq!(
            output.status.code(),
            Some(0),
            "stderr:\n{stderr}\nreport:\n{report:#}\nlab:\n{}",
            lab.log_tails()
        );
        assert_eq!(report["verdict"]["ok"], true, "{report:#}");
        assert_eq!(report["sandbox"]["backend"], "modal");
        let checks = report["checks"].as_array().unwrap();
        let check = |name: &str| {
            checks
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no {name} check: {report:#}"))
        };
        assert_eq!(status(check("login")), "CHECK_STATUS_PASS", "{report:#}");
        assert!(
            matches!(
                status(check("ping")),
                "CHECK_STATUS_PASS" | "CHECK_STATUS_WARN"
            ),
            "{report:#}"
        );
        assert_eq!(status(check("http")), "CHECK_STATUS_PASS", "{report:#}");
        assert_eq!(status(check("git")), "CHECK_STATUS_PASS", "{report:#}");
        assert_eq!(check("git")["git"]["head_sha"], main_sha);

        let record = fake.record();
        assert_eq!(record.sandboxes.len(), 1);
        assert!(record.sandboxes[0].terminated_at.is_some());
        // The auth key travelled only inside the gRPC stream to the agent: not in any exec's
        // argv or environment, nor in any header, nor in the output.
        let key = lab.auth_key();
        assert!(
            record
                .execs
                .iter()
                .all(|e| e.argv.iter().all(|a| !a.contains(key)))
        );
        assert!(
            record
                .calls
                .iter()
                .all(|c| c.headers.values().all(|v| !v.contains(key)))
        );
        assert!(record.sandboxes[0].env.values().all(|v| !v.contains(key)));
        assert!(!stdout.contains(key) && !stderr.contains(key));
    })
    .await
    .expect("test timed out");
}
