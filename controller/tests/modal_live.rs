//! Live: the real `tailbox` against real Modal (and, with an auth key, a real tailnet).
//!
//! Skipped unless `TAILBOX_LIVE=1`. It then needs its own credentials, never a developer's
//! everyday ones: `TAILBOX_TEST_MODAL_TOKEN_ID` and `TAILBOX_TEST_MODAL_TOKEN_SECRET` (optional:
//! `TAILBOX_TEST_MODAL_ENVIRONMENT`, `TAILBOX_TEST_MODAL_APP_NAME`, `TAILBOX_TEST_MODAL_IMAGE`,
//! `TAILBOX_TEST_TAILSCALE_TARBALL`). With `TAILBOX_TEST_TS_AUTHKEY` the sandbox joins the tailnet
//! and checks `TAILBOX_TEST_TAIL_IP`, `TAILBOX_TEST_HTTP_URL` and `TAILBOX_TEST_GIT_URL` (each
//! optional); without it the run is preflight only. See controller/README.md.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use serde_json::Value;
use tailbox_testkit::agent::static_agent_binary;

/// The live tests run one at a time, so each can check that `sandbox sweep --dry-run` lists
/// nothing of its own (or, at the end, anything at all) once it is done.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Image pull, scheduling, upload and the checks, with room to spare.
const TEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The environment for `tailbox`: only the test's own credentials and targets, renamed to what
/// tailbox reads.
fn live_env() -> Option<Vec<(&'static str, String)>> {
    if var("TAILBOX_LIVE").as_deref() != Some("1") {
        eprintln!(
            "skipped: set TAILBOX_LIVE=1 (and the TAILBOX_TEST_* credentials) to run against real Modal"
        );
        return None;
    }
    let required =
        |name: &str| var(name).unwrap_or_else(|| panic!("TAILBOX_LIVE=1 but {name} is not set"));
    let mut env = vec![
        ("MODAL_TOKEN_ID", required("TAILBOX_TEST_MODAL_TOKEN_ID")),
        (
            "MODAL_TOKEN_SECRET",
            required("TAILBOX_TEST_MODAL_TOKEN_SECRET"),
        ),
    ];
    for (from, to) in [
        ("TAILBOX_TEST_MODAL_ENVIRONMENT", "MODAL_ENVIRONMENT"),
        ("TAILBOX_TEST_MODAL_APP_NAME", "MODAL_APP_NAME"),
        ("TAILBOX_TEST_MODAL_IMAGE", "MODAL_IMAGE"),
        (
            "TAILBOX_TEST_TAILSCALE_TARBALL",
            "TAILBOX_TAILSCALE_TARBALL",
        ),
        ("TAILBOX_TEST_TS_AUTHKEY", "TS_AUTHKEY"),
        ("TAILBOX_TEST_TAIL_IP", "COOK_TAIL_IP"),
        ("TAILBOX_TEST_HTTP_URL", "COOK_HTTP_URL"),
        ("TAILBOX_TEST_GIT_URL", "COOK_GIT_URL"),
    ] {
        if let Some(value) = var(from) {
            env.push((to, value));
        }
    }
    Some(env)
}

async fn tailbox(env: &[(&'static str, String)], args: &[&str]) -> (Option<i32>, String, String) {
    let home = tempfile::tempdir().unwrap();
    let output = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), home.path())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn report(stdout: &str) -> Value {
    stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| e["report"].clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn live_check_in_a_real_modal_sandbox_then_reuse_it() {
    let Some(env) = live_env() else { return };
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let agent = tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap()
        .display()
        .to_string();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let base = [
            "check",
            "--sandbox",
            "modal",
            "--json",
            "--agent",
            agent.as_str(),
        ];

        // First run: create, upload, check; kept for the second run.
        let mut args = base.to_vec();
        args.push("--keep");
        let (code, stdout, stderr) = tailbox(&env, &args).await;
        let first = report(&stdout);
        assert_eq!(code, Some(0), "stderr:\n{stderr}\nreport:\n{first:#}");
        assert_eq!(first["verdict"]["ok"], true, "{first:#}");
        let id = first["sandbox"]["sandbox_id"].as_str().unwrap().to_owned();
        assert_ne!(first["sandbox"]["uploaded_bytes"], "0");

        // Second run in the same sandbox: nothing to upload.
        let mut args = base.to_vec();
        args.extend(["--sandbox-id", id.as_str()]);
        let (code, stdout, stderr) = tailbox(&env, &args).await;
        let second = report(&stdout);
        assert_eq!(code, Some(0), "stderr:\n{stderr}\nreport:\n{second:#}");
        assert_eq!(second["sandbox"]["uploaded_bytes"], "0", "{second:#}");

        // Clean up, and check nothing of ours is left running.
        let (code, _, stderr) = tailbox(&env, &["sandbox", "terminate", &id]).await;
        assert_eq!(code, Some(0), "{stderr}");
        let (code, stdout, stderr) = tailbox(&env, &["sandbox", "sweep", "--dry-run"]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            !stdout.contains(&id),
            "{id} still listed as running:\n{stdout}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn live_check_terminates_its_sandbox() {
    let Some(env) = live_env() else { return };
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let agent = tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap()
        .display()
        .to_string();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (code, stdout, stderr) = tailbox(
            &env,
            &["check", "--sandbox", "modal", "--json", "--agent", &agent],
        )
        .await;
        let report = report(&stdout);
        assert_eq!(code, Some(0), "stderr:\n{stderr}\nreport:\n{report:#}");
        let id = report["sandbox"]["sandbox_id"].as_str().unwrap().to_owned();
        let (code, listed, stderr) = tailbox(&env, &["sandbox", "sweep", "--dry-run"]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(!listed.contains(&id), "{id} was left running");
    })
    .await
    .expect("test timed out");
}

/// cook's flow on real Modal: `up` leaves a sandbox on the tailnet, later commands reach its
/// sidecar through new execs, and `down` terminates the sandbox. Needs `TAILBOX_TEST_TS_AUTHKEY`.
#[tokio::test(flavor = "multi_thread")]
async fn live_sidecar_up_status_check_down() {
    let Some(env) = live_env() else { return };
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    assert!(
        env.iter().any(|(name, _)| *name == "TS_AUTHKEY"),
        "TAILBOX_LIVE=1 runs the sidecar flow, which needs TAILBOX_TEST_TS_AUTHKEY"
    );
    let agent = tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap()
        .display()
        .to_string();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (code, stdout, stderr) = tailbox(
            &env,
            &[
                "up",
                "--sandbox",
                "modal",
                "--json",
                "--agent",
                &agent,
                "--lifetime",
                "30m",
            ],
        )
        .await;
        assert_eq!(code, Some(0), "stderr:\n{stderr}\nstdout:\n{stdout}");
        let up: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(up["state"], "running", "{up:#}");
        let id = up["sandbox_id"].as_str().unwrap().to_owned();

        let (code, stdout, stderr) = tailbox(
            &env,
            &["status", "--sandbox-id", &id, "--json", "--agent", &agent],
        )
        .await;
        assert_eq!(code, Some(0), "stderr:\n{stderr}\nstdout:\n{stdout}");

        let (code, stdout, stderr) = tailbox(
            &env,
            &["check", "--sandbox-id", &id, "--json", "--agent", &agent],
        )
        .await;
        let report = report(&stdout);
        assert_eq!(code, Some(0), "stderr:\n{stderr}\nreport:\n{report:#}");
        assert!(
            report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["name"] != "daemon"),
            "the check started a second tailscaled: {report:#}"
        );

        let (code, stdout, stderr) = tailbox(
            &env,
            &["down", "--sandbox-id", &id, "--json", "--agent", &agent],
        )
        .await;
        assert_eq!(code, Some(0), "stderr:\n{stderr}\nstdout:\n{stdout}");
        let down: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(down["sandbox"], "terminated", "{down:#}");

        let (code, listed, stderr) = tailbox(&env, &["sandbox", "sweep", "--dry-run"]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            listed.trim().is_empty(),
            "sweep --dry-run is not empty:\n{listed}"
        );
    })
    .await
    .expect("test timed out");
}
