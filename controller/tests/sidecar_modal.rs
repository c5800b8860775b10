//! The sidecar through the fake Modal: `tailbox up` starts it in a fake sandbox and exits; later
//! `tailbox status`, `check` and `down --sandbox-id` reach it through `tailbox-agent attach` in
//! new execs, and `down` terminates the sandbox tailbox created. The agent inside drives a real
//! tailscaled into the lab's real tailnet.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use tailbox_testkit::agent::static_agent_binary;
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal};
use tailbox_testkit::lab::{Binaries, Lab};
use tailbox_testkit::{describe_output, last_json_line};

const TEST_TIMEOUT: Duration = Duration::from_secs(300);

async fn setup() -> (Lab, FakeModal, PathBuf) {
    Binaries::locate().await.unwrap();
    let agent = tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap();
    let lab = Lab::start().await.unwrap();
    let fake = FakeModal::start_with(FakeConfig::default().reaching(&lab))
        .await
        .unwrap();
    (lab, fake, agent)
}

/// Runs `tailbox args…` with the lab's key, control and targets in the environment, as a
/// developer would.
async fn tailbox(lab: &Lab, fake: &FakeModal, args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let child = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), home.path())
        .args(args)
        .envs(lab.developer_env())
        .envs(fake.env())
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("tailbox {args:?} did not finish"))
        .unwrap()
}

/// The sandbox's processes running `binary`.
fn running(fake: &FakeModal, sandbox_id: &str, binary: &Path) -> usize {
    let target = std::fs::canonicalize(binary).unwrap();
    fake.sandbox_processes(sandbox_id)
        .into_iter()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == target))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn up_then_status_check_and_down_reach_the_sidecar_through_new_execs() {
    let (lab, fake, agent) = setup().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let agent = agent.to_str().unwrap();
        let tailscaled = lab.bins().tailscaled();
        let tailscaled_arg = tailscaled.display().to_string();

        // Up, and tailbox exits leaving the sandbox and its sidecar running.
        let out = tailbox(
            &lab,
            &fake,
            &[
                "up",
                "--sandbox",
                "modal",
                "--json",
                "--agent",
                agent,
                "--tailscaled",
                &tailscaled_arg,
            ],
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\nlab:\n{}",
            describe_output(&out),
            lab.log_tails()
        );
        let up = last_json_line(&out);
        assert_eq!(up["state"], "running", "{up:#}");
        assert_eq!(up["backend"], "modal");
        let id = up["sandbox_id"].as_str().unwrap().to_owned();
        assert!(
            up["hostname"].as_str().unwrap().starts_with("modal-"),
            "{up:#}"
        );
        assert!(up["proxy_url"].as_str().unwrap().starts_with("socks5h://"));
        assert!(up["env"]["ALL_PROXY"].is_string(), "{up:#}");
        let record = fake.record();
        let sandbox = record.sandbox(&id).unwrap();
        assert!(
            sandbox.terminated_at.is_none(),
            "up leaves the sandbox running"
        );
        assert_eq!(running(&fake, &id, &tailscaled), 1);

        // Status through a new exec of `attach`.
        let out = tailbox(&lab, &fake, &["status", "--sandbox-id", &id, "--json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        let status = last_json_line(&out);
        assert_eq!(status["state"], "running", "{status:#}");
        assert_eq!(status["sandbox_id"], id.as_str());
        let attaches = |fake: &FakeModal| {
            fake.record()
                .execs
                .iter()
                .filter(|e| e.argv.iter().any(|a| a == "attach"))
                .count()
        };
        // One attach by `up` itself, one by `status`.
        assert_eq!(attaches(&fake), 2);

        // Check over the sidecar's node: every check passes, and no second tailscaled starts.
        let main_sha = lab.git_ref("refs/heads/main").unwrap().to_owned();
        let expect = format!("main={main_sha}");
        let out = tailbox(
            &lab,
            &fake,
            &[
                "check",
                "--sandbox-id",
                &id,
                "--json",
                "--expect-ref",
                &expect,
            ],
        )
        .await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        let report = &last_json_line(&out)["report"];
        assert_eq!(report["verdict"]["ok"], true, "{report:#}");
        assert_eq!(report["sandbox"]["sandbox_id"], id.as_str());
        let names = tailbox_testkit::assert_every_target_checked(report);
        assert!(!names.contains(&"daemon"), "{names:?}");
        assert_eq!(attaches(&fake), 3);
        assert_eq!(running(&fake, &id, &tailscaled), 1);
        // check leaves a sandbox it attached to running.
        assert!(fake.record().sandbox(&id).unwrap().terminated_at.is_none());

        // Down: the node logs out, the sidecar stops, and the sandbox tailbox created goes.
        let out = tailbox(&lab, &fake, &["down", "--sandbox-id", &id, "--json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        let down = last_json_line(&out);
        assert_eq!(down["logged_out"], true, "{down:#}");
        assert_eq!(down["sandbox"], "terminated", "{down:#}");
        assert!(fake.record().sandbox(&id).unwrap().terminated_at.is_some());

        // The auth key travelled only inside the gRPC stream.
        let record = fake.record();
        assert_eq!(record.places_holding(lab.auth_key()), Vec::<String>::new());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn down_leaves_a_sandbox_tailbox_did_not_create_and_status_needs_an_id() {
    let (lab, fake, _agent) = setup().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Which sandbox? On Modal, status and down need an id.
        let out = tailbox(&lab, &fake, &["status", "--sandbox", "modal"]).await;
        assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("`--sandbox-id` is needed"), "{stderr}");

        // A sandbox someone else created, with no sidecar: down says so and leaves it.
        let id = fake.create_sandbox_directly(&[]).await.unwrap();
        let agent = static_agent_binary();
        let out = tailbox(
            &lab,
            &fake,
            &[
                "down",
                "--sandbox-id",
                &id,
                "--json",
                "--agent",
                agent.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        let down = last_json_line(&out);
        assert_eq!(down["sidecar_was_running"], false, "{down:#}");
        assert_eq!(down["sandbox"], "not created by tailbox; left running");
        assert!(fake.record().sandbox(&id).unwrap().terminated_at.is_none());
    })
    .await
    .expect("test timed out");
}
