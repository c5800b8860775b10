//! Fan-out through the fake Modal: `tailbox check --count N` creates N sandboxes (each create
//! answered after 100 ms, as the latency), uploads the real static agent into each, and
//! each agent drives a real tailscaled into the lab's tailnet. Ctrl-C in mid-fan-out terminates
//! every sandbox created, all within 3 s (the fake records when).
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tailbox_testkit::agent::static_agent_binary;
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal, Record};
use tailbox_testkit::lab::{Binaries, Lab};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// The create latency the issue asks the fan-out to be measured with.
const CREATE_LATENCY: Duration = Duration::from_millis(100);
const TEST_TIMEOUT: Duration = Duration::from_secs(420);

async fn agent() -> PathBuf {
    tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap()
}

/// `tailbox args…` against the fake, as a developer runs it with the lab's key, control and
/// targets in the environment when there is a lab.
fn tailbox(
    fake: &FakeModal,
    lab: Option<&Lab>,
    home: &Path,
    args: &[&str],
) -> tokio::process::Command {
    let mut command = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), home);
    command.args(args).envs(fake.env());
    if let Some(lab) = lab {
        command.envs(lab.developer_env());
    }
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_sandboxes_all_pass_with_a_slow_create() {
    Binaries::locate().await.unwrap();
    let agent = agent().await;
    let lab = Lab::start().await.unwrap();
    let fake = FakeModal::start_with(FakeConfig::default().reaching(&lab))
        .await
        .unwrap();
    fake.update_faults(|f| {
        f.latency.insert("SandboxCreate".into(), CREATE_LATENCY);
    });
    tokio::time::timeout(TEST_TIMEOUT, async {
        let home = tempfile::tempdir().unwrap();
        let tailscaled = lab.bins().tailscaled().display().to_string();
        let out = tailbox(
            &fake,
            Some(&lab),
            home.path(),
            &[
                "check",
                "--sandbox",
                "modal",
                "--count",
                "20",
                "--json",
                "--agent",
                agent.to_str().unwrap(),
                "--tailscaled",
                &tailscaled,
            ],
        )
        .output()
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "stderr:\n{stderr}\nlast line: {}\nlab:\n{}",
            stdout.lines().last().unwrap_or_default(),
            lab.log_tails()
        );
        let lines: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let (last, sandbox_lines) = lines.split_last().unwrap();
        for line in sandbox_lines {
            assert!(
                line["sandbox_id"].as_str().unwrap().starts_with("sb-"),
                "every event carries its sandbox id: {line}"
            );
        }

        let fleet = &last["fleet_report"];
        assert_eq!(fleet["requested"], 20, "{last}");
        assert_eq!(fleet["parallel"], 8, "the default is min(N, 8)");
        assert_eq!(fleet["ok"], true);
        let sandboxes = fleet["sandboxes"].as_array().unwrap();
        assert_eq!(sandboxes.len(), 20);
        let ids: BTreeSet<&str> = sandboxes
            .iter()
            .map(|s| s["sandbox_id"].as_str().unwrap())
            .collect();
        let hostnames: BTreeSet<&str> = sandboxes
            .iter()
            .map(|s| s["hostname"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 20, "{ids:?}");
        assert_eq!(hostnames.len(), 20, "one hostname each: {hostnames:?}");
        for sandbox in sandboxes {
            assert_eq!(
                sandbox["status"], "FLEET_SANDBOX_STATUS_PASSED",
                "{sandbox:#}"
            );
            let id = sandbox["sandbox_id"].as_str().unwrap();
            let id8: String = id.chars().take(8).collect();
            assert_eq!(
                sandbox["hostname"].as_str().unwrap(),
                format!("modal-{id8}"),
                "{sandbox:#}"
            );
        }
        assert_eq!(fleet["create_time"]["count"], 20);
        let p50 = fleet["create_time"]["p50"].as_str().unwrap();
        let p50: f64 = p50.trim_end_matches('s').parse().unwrap();
        assert!(
            p50 >= CREATE_LATENCY.as_secs_f64(),
            "a create takes at least the fake's latency: {:#}",
            fleet["create_time"]
        );
        for name in [
            "time_to_running",
            "ping_latency",
            "http_time_to_first_byte",
            "git_time",
        ] {
            assert_eq!(fleet[name]["count"], 20, "{name}: {:#}", fleet[name]);
        }

        // The fake saw 20 sandboxes, each terminated at the end.
        let record = fake.record();
        assert_eq!(record.sandboxes.len(), 20);
        for sandbox in &record.sandboxes {
            assert!(ids.contains(sandbox.id.as_str()), "{}", sandbox.id);
            assert!(
                sandbox.terminated_at.is_some(),
                "{} left running",
                sandbox.id
            );
        }
    })
    .await
    .unwrap();
}

/// Starts a fan-out of `count`, `parallel` at once, with `rpc` held for a minute, and sends
/// SIGINT once `reached` holds: every sandbox the fake created must be terminated within 3 s,
/// and tailbox exits 130 with the aggregate as its last line.
async fn ctrl_c_mid_fan_out(
    agent: &Path,
    count: u32,
    parallel: u32,
    rpc: &str,
    reached: impl Fn(&Record) -> bool,
) {
    let fake = FakeModal::start().await.unwrap();
    fake.update_faults(|f| {
        f.latency.insert("SandboxCreate".into(), CREATE_LATENCY);
        f.latency.insert(rpc.to_owned(), Duration::from_secs(60));
    });
    let home = tempfile::tempdir().unwrap();
    let (count_arg, parallel_arg) = (count.to_string(), parallel.to_string());
    let mut child = tailbox(
        &fake,
        None,
        home.path(),
        &[
            "check",
            "--sandbox",
            "modal",
            "--json",
            "--count",
            &count_arg,
            "--parallel",
            &parallel_arg,
            "--agent",
            agent.to_str().unwrap(),
        ],
    )
    .spawn()
    .unwrap();
    let stderr_task = tailbox_testkit::collect_stderr(&mut child);
    let stdout = child.stdout.take().unwrap();
    let stdout_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });
    fake.wait_for(Duration::from_secs(120), |r| reached(r))
        .await
        .unwrap_or_else(|e| panic!("{rpc}: {e:#}"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    let interrupted_at = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{rpc}: tailbox did not exit after SIGINT"))
        .unwrap();
    let lines = stdout_task.await.unwrap();
    let stderr = stderr_task.await.unwrap();
    assert_eq!(status.code(), Some(130), "{rpc}: stderr:\n{stderr}");

    let record = fake.record();
    assert!(
        record.sandboxes.len() >= parallel as usize,
        "{rpc}: {} sandboxes were created",
        record.sandboxes.len()
    );
    let late = Record::late_terminations(&record.sandboxes, interrupted_at, Duration::from_secs(3));
    assert_eq!(
        late,
        Vec::<String>::new(),
        "{rpc}, after SIGINT; stderr:\n{stderr}"
    );
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let fleet = &last["fleet_report"];
    assert_eq!(fleet["interrupted"], true, "{last}");
    assert_eq!(fleet["exit_code"], 130);
    assert_eq!(fleet["sandboxes"].as_array().unwrap().len(), count as usize);
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_agents_run_terminates_every_sandbox_within_3s() {
    // Built outside the timeout: minutes on a cold cache.
    let agent = agent().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Six agents wait on their handshake (their output held back); four slots never start.
        ctrl_c_mid_fan_out(&agent, 10, 6, "TaskExecStdioRead", |r| {
            r.agent_execs().len() >= 6
        })
        .await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_creates_are_in_flight_terminates_every_sandbox_within_3s() {
    // Built outside the timeout: minutes on a cold cache.
    let agent = agent().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Five sandboxes exist but no id came back: they are found by the run's tag.
        ctrl_c_mid_fan_out(&agent, 5, 5, "SandboxCreate", |r| r.sandboxes.len() >= 5).await;
    })
    .await
    .unwrap();
}
