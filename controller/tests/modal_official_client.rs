//! Modal's own Python client (`modal==1.6.4`, from the virtualenv `scripts/setup` makes) drives
//! the fake Modal through the spike's flow: app lookup, a registry image, a sandbox with tags,
//! env, a secret and a timeout, execs with stdin and stdout as text and bytes, files written
//! with the filesystem API (fs-tools `WriteFile`, what tailbox's upload uses), listing by tag,
//! terminate and wait, an entrypoint that exits and a sandbox that times out. A fake and a
//! client written by the same hands can share a misunderstanding; Modal's client cannot.
//!
//! The script (`testkit/python/official_client_flow.py`) asserts what the client saw; this test
//! asserts what the fake saw: nothing refused, the Python SDK's identity, the RPCs of each step.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tailbox_testkit::fake_modal::FakeModal;
use tailbox_testkit::modal_descriptors::cache_dir;
use tailbox_testkit::process_is_alive;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../testkit/python/official_client_flow.py"
);
const REQUIREMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../testkit/python/requirements.txt"
);

/// The venv's python, if `testkit/python/make_venv.py` installed exactly today's pins; else a
/// loud failure that says how to get it (never a skip).
fn venv_python() -> PathBuf {
    let venv = cache_dir().join("modal-official-client").join("venv");
    let stamp = std::fs::read_to_string(venv.join("requirements.stamp")).unwrap_or_default();
    let wanted = std::fs::read_to_string(REQUIREMENTS).unwrap();
    assert!(
        stamp == wanted,
        "the virtualenv with Modal's official client at {} is missing or stale; run \
         scripts/setup (or python3 testkit/python/make_venv.py)",
        venv.display()
    );
    venv.join("bin").join("python")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_modal_client_runs_the_spike_flow_against_the_fake() {
    let python = venv_python();
    let fake = FakeModal::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        TEST_TIMEOUT,
        tokio::process::Command::new(&python)
            .arg(SCRIPT)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .envs(fake.env())
            // tailbox creates V1 sandboxes (as the Go SDK's Create does); the fake serves those.
            .env("MODAL_SANDBOX_V2", "0")
            .env("MODAL_DISABLE_API_PROXY", "1")
            .env("MODAL_CONFIG_PATH", home.path().join("no-modal.toml"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the official client's flow timed out")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let record = fake.record();
    assert!(
        output.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{stderr}\nrefusals: {:?}",
        output.status,
        record.refusals
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    // Nothing the official client sent was refused.
    assert!(record.refusals.is_empty(), "{:?}", record.refusals);

    // It identified itself as the Python SDK, with no libmodal version and, for V1, no auth
    // token (which is why the fake does not require one).
    for call in record.calls.iter().filter(|c| c.service == "control") {
        assert_eq!(call.headers["x-modal-client-type"], "1", "{}", call.rpc);
        assert_eq!(
            call.headers["x-modal-client-version"], "1.6.4",
            "{}",
            call.rpc
        );
        assert!(!call.headers.contains_key("x-modal-libmodal-version"));
        assert!(
            !call.headers.contains_key("x-modal-auth-token"),
            "{}",
            call.rpc
        );
    }
    // Router calls carry only the bearer JWT of Modal's headers.
    for call in record.calls.iter().filter(|c| c.service == "router") {
        assert_eq!(call.headers["authorization"], "<redacted>");
        assert!(!call.headers.keys().any(|k| k.starts_with("x-modal-")));
    }

    // The RPCs of the spike's flow.
    let rpcs: BTreeSet<&str> = record.calls.iter().map(|c| c.rpc.as_str()).collect();
    for rpc in [
        "AppGetOrCreate",
        "EnvironmentGetOrCreate",
        "ImageGetOrCreate",
        "ImageJoinStreaming",
        "SecretGetOrCreate",
        "SandboxCreate",
        "SandboxGetTaskId",
        "TaskGetCommandRouterAccess",
        "TaskExecStart",
        "TaskExecStdinWrite",
        "TaskExecStdinWriteStream",
        "TaskExecStdioRead",
        "TaskExecWait",
        "SandboxList",
        "SandboxTerminate",
        "SandboxWait",
    ] {
        assert!(rpcs.contains(rpc), "{rpc} was never called: {rpcs:?}");
    }

    // The sandbox as created: tags, and the env and the secret merged into its environment.
    let sandbox_id = seen["sandbox_id"].as_str().unwrap();
    let sandbox = record.sandbox(sandbox_id).unwrap();
    assert!(
        sandbox
            .tags
            .contains(&("created-by".into(), "official-client".into()))
    );
    assert_eq!(sandbox.timeout_secs, 600);
    assert_eq!(sandbox.env["FROM_ENV"], "env-value");
    assert_eq!(sandbox.env["FROM_SECRET"], "secret-value");
    assert!(sandbox.terminated_at.is_some());

    // The filesystem API went through fs-tools WriteFile, whole.
    assert!(
        record
            .files_written
            .iter()
            .any(|f| f == "/tmp/official/hello.txt")
    );
    let big = fake.host_path(sandbox_id, "/tmp/official/big.bin").unwrap();
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 600_000);

    // Terminating the sandbox ended the process an exec had left running, and everything else
    // in it; the other two sandboxes ended on their own.
    let pid = i32::try_from(seen["background_pid"].as_i64().unwrap()).unwrap();
    assert!(!process_is_alive(pid), "process {pid} outlived its sandbox");
    for id in [
        sandbox_id,
        seen["exited_sandbox_id"].as_str().unwrap(),
        seen["timed_out_sandbox_id"].as_str().unwrap(),
    ] {
        assert!(fake.sandbox_processes(id).is_empty(), "{id} still runs");
        assert!(record.sandbox(id).unwrap().terminated_at.is_some(), "{id}");
    }
}
