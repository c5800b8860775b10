//! Seeded random Ctrl-C on a local run against the lab: whenever the SIGINT lands, nothing of
//! the run is left behind, and a node that had logged in is logged out. Its own test binary, so
//! no other test starts agents or tailscaleds while it counts them.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tailbox_testkit::agent::agent_binary;
use tailbox_testkit::lab::{Binaries, Lab};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const TEST_TIMEOUT: Duration = Duration::from_secs(600);
const RUNS: usize = 20;

/// Pids of the processes running any of `binaries`.
fn running(binaries: &[PathBuf]) -> BTreeSet<u32> {
    tailbox_testkit::scan::processes()
        .into_iter()
        .filter(|p| p.exe.as_ref().is_some_and(|exe| binaries.contains(exe)))
        .map(|p| p.pid)
        .collect()
}

/// The whole run's events, as tailbox wrote them, and how it ended.
struct Interrupted {
    events: Vec<Value>,
    code: Option<i32>,
    signal: Option<i32>,
}

/// A full local check against the lab, interrupted `after` its start.
async fn check_interrupted(lab: &Lab, key_file: &Path, after: Duration) -> Interrupted {
    let agent = agent_binary();
    let tailscaled = lab.bins().tailscaled();
    let peer = lab.peer_ipv4().to_string();
    let home = tempfile::tempdir().unwrap();
    let mut child = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), home.path())
        .args(["check", "--sandbox", "local", "--json", "--no-sidecar"])
        .arg("--agent")
        .arg(&agent)
        .arg("--tailscaled")
        .arg(&tailscaled)
        .args([
            "--control-url",
            lab.control_url(),
            "--proxy-listen",
            "127.0.0.1:0",
        ])
        .arg("--auth-key-file")
        .arg(key_file)
        .args([
            "--ping",
            &peer,
            "--http",
            &lab.health_url(),
            "--git",
            &lab.git_url(),
        ])
        .envs(lab.tailbox_env())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    let interrupter = tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut events = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(event) = serde_json::from_str::<Value>(&line) {
            events.push(event);
        }
    }
    let status = child.wait().await.unwrap();
    // A run that ended first needs no interrupt (and its pid may be reused).
    interrupter.abort();
    Interrupted {
        events,
        code: status.code(),
        signal: std::os::unix::process::ExitStatusExt::signal(&status),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_random_ctrl_c_leaves_nothing_and_logs_a_logged_in_node_out() {
    let seed = tailbox_testkit::fault_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("authkey");
    std::fs::write(&key_file, lab.auth_key()).unwrap();
    let binaries = [
        std::fs::canonicalize(agent_binary()).unwrap(),
        std::fs::canonicalize(lab.bins().tailscaled()).unwrap(),
    ];
    tokio::time::timeout(TEST_TIMEOUT, async {
        // What runs before any check: the lab's own tailscaled.
        let baseline = running(&binaries);
        // A clean run says how long a whole run takes here.
        let started = Instant::now();
        let clean = check_interrupted(&lab, &key_file, Duration::from_secs(3600)).await;
        assert_eq!(clean.code, Some(0), "seed {seed}: the clean run failed");
        let whole = started.elapsed();

        let (mut interrupted, mut logged_out) = (0, 0);
        for run_no in 0..RUNS {
            let at = whole.mul_f64(rng.f64());
            let run = check_interrupted(&lab, &key_file, at).await;
            let what = format!("seed {seed}, run {run_no}, SIGINT at {at:?}");
            // 130 when interrupted, 0 when it had finished; killed by the signal itself only
            // before tailbox listens for it, when it has started nothing.
            assert!(
                matches!(run.code, Some(0 | 130)) || run.signal == Some(libc::SIGINT),
                "{what}: exit {:?} / signal {:?}",
                run.code,
                run.signal
            );

            // Nothing of the run is left: the agent and its tailscaled are gone.
            let mut left = BTreeSet::new();
            for _ in 0..200 {
                left = running(&binaries).difference(&baseline).copied().collect();
                if left.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(left.is_empty(), "{what}: left running: {left:?}");

            // A node that logged in was logged out, and the report says so.
            let logged_in = run.events.iter().any(|e| {
                e["check"]["name"] == "login" && e["check"]["status"] == "CHECK_STATUS_PASS"
            });
            if logged_in {
                let report = run
                    .events
                    .iter()
                    .rev()
                    .find(|e| e["report"].is_object())
                    .unwrap_or_else(|| panic!("{what}: logged in, but no report arrived"));
                assert_eq!(
                    report["report"]["teardown"]["logged_out"], true,
                    "{what}: {:#}",
                    report["report"]["teardown"]
                );
                if run.code == Some(130) {
                    logged_out += 1;
                }
            }
            if run.code == Some(130) {
                interrupted += 1;
            }
        }
        eprintln!(
            "{RUNS} runs: {interrupted} interrupted, {logged_out} of them after the login (logged out)"
        );
    })
    .await
    .expect("test timed out");
}
