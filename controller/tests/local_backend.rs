//! The real `tailbox` binary driving the real `tailbox-agent` binary over pipes.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sha2::Digest as _;
use tailbox_proto::arch::Arch;
use tailbox_testkit::agent::{agent_binary, static_agent_binary_for};

/// Runs `tailbox` with a clean environment (no credentials or targets leak in from the host).
fn tailbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tailbox"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("NO_COLOR", "1")
        .output()
        .expect("run tailbox")
}

/// `tailbox check --sandbox local --agent <the real agent>` plus `extra`.
fn check_with_agent(extra: &[&str]) -> Output {
    let agent = agent_binary();
    let mut args = vec![
        "check",
        "--sandbox",
        "local",
        "--agent",
        agent.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tailbox(&args)
}

fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .expect("stdout is UTF-8")
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
        })
        .collect()
}

/// The report of a `--json` run that must have exited 0.
fn passing_report(output: &Output) -> Value {
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events = json_lines(output);
    let report = events.last().expect("at least one event")["report"].clone();
    assert!(
        report.is_object(),
        "the last line is the report: {:?}",
        events.last()
    );
    report
}

fn first_line_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().trim_matches('"').to_owned())
}

#[test]
fn json_report_holds_true_preflight_facts_of_this_machine() {
    let output = check_with_agent(&["--json"]);
    let report = &passing_report(&output);
    let events = json_lines(&output);
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["verdict"]["ok"], true);
    assert_eq!(report["sandbox"]["backend"], "local");

    // Agent events are numbered densely from 1; controller events carry seq 0.
    let agent_seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_str().unwrap().parse::<u64>().unwrap())
        .filter(|&s| s != 0)
        .collect();
    assert_eq!(
        agent_seqs,
        (1..=agent_seqs.len() as u64).collect::<Vec<_>>()
    );
    assert!(
        events
            .iter()
            .any(|e| e["agent_hello"]["agent_sha256"] == report["agent"]["sha256"])
    );

    let preflight = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "preflight")
        .expect("a preflight check")["preflight"]
        .clone();

    // Compare with the machine, read independently of the agent's code.
    let id_u = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    assert_eq!(preflight["uid"].as_u64().unwrap().to_string(), id_u.trim());
    let uname_m =
        String::from_utf8(Command::new("uname").arg("-m").output().unwrap().stdout).unwrap();
    assert_eq!(preflight["uname"]["machine"], uname_m.trim());
    assert_eq!(preflight["arch"], std::env::consts::ARCH);
    let uname_r =
        String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_eq!(preflight["uname"]["release"], uname_r.trim());
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    assert_eq!(
        preflight["os_release"]["id"],
        first_line_value(&os_release, "ID=").unwrap()
    );
    assert_eq!(
        preflight["dev_net_tun_present"],
        Path::new("/dev/net/tun").exists()
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(
        preflight["capabilities"]["cap_eff"],
        first_line_value(&status, "CapEff:").unwrap()
    );
    assert_eq!(
        preflight["capabilities"]["no_new_privs"],
        first_line_value(&status, "NoNewPrivs:").unwrap() == "1"
    );
    let loader_exists = Path::new("/lib64/ld-linux-x86-64.so.2").exists();
    assert_eq!(
        preflight["glibc_loader_standard"]
            .as_str()
            .unwrap()
            .is_empty(),
        !loader_exists || std::env::consts::ARCH != "x86_64"
    );
    assert_eq!(
        preflight["ca_bundle_present"],
        !preflight["ca_bundle_path"].as_str().unwrap().is_empty()
    );
}

/// The static aarch64 agent, run under qemu-user on this machine (through binfmt_misc), sees an
/// aarch64 CPU: its preflight reports the architecture it runs on, not the one tailbox runs on.
#[test]
fn the_aarch64_agent_under_qemu_reports_aarch64_in_its_preflight() {
    let agent = static_agent_binary_for(Arch::Aarch64);
    tailbox_testkit::qemu::require_runnable(Arch::Aarch64, &agent);
    let output = tailbox(&[
        "check",
        "--sandbox",
        "local",
        "--agent",
        agent.to_str().unwrap(),
        "--json",
    ]);
    let report = &passing_report(&output);
    let preflight = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "preflight")
        .expect("a preflight check");
    assert_eq!(preflight["status"], "CHECK_STATUS_PASS", "{preflight:#}");
    assert_eq!(preflight["preflight"]["arch"], "aarch64");
    assert_eq!(preflight["preflight"]["uname"]["machine"], "aarch64");
    assert!(
        preflight["detail"].as_str().unwrap().contains("aarch64"),
        "{preflight:#}"
    );
    // The handshake checked the sha256 the agent computed of itself, under emulation.
    let agent_bytes = std::fs::read(&agent).unwrap();
    let sha256 = hex::encode(sha2::Sha256::digest(&agent_bytes));
    assert_eq!(report["agent"]["sha256"], sha256, "{report:#}");
}

/// Agents for both architectures, named as a directory and as a `:`-separated `TAILBOX_AGENT`:
/// a local run picks the one for this machine.
#[test]
fn a_directory_of_agents_runs_the_one_for_this_machine() {
    let host = Arch::host().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for arch in Arch::ALL {
        let link = dir.path().join(format!("tailbox-agent-{arch}"));
        std::os::unix::fs::symlink(static_agent_binary_for(arch), &link).unwrap();
        agents.push(link);
    }
    let host_sha = hex::encode(sha2::Sha256::digest(
        std::fs::read(static_agent_binary_for(host)).unwrap(),
    ));
    let by_dir = tailbox(&[
        "check",
        "--sandbox",
        "local",
        "--agent",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    let by_env = Command::new(env!("CARGO_BIN_EXE_tailbox"))
        .args(["check", "--sandbox", "local", "--json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("TAILBOX_AGENT", std::env::join_paths(&agents).unwrap())
        .output()
        .unwrap();
    for output in [by_dir, by_env] {
        let report = passing_report(&output);
        assert_eq!(report["agent"]["sha256"], host_sha, "{report:#}");
        let preflight = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "preflight")
            .unwrap()
            .clone();
        assert_eq!(preflight["preflight"]["arch"], host.name());
    }
}

#[test]
fn tailnet_checks_skip_with_a_reason_without_an_auth_key() {
    let output = check_with_agent(&[
        "--json",
        "--ping",
        "100.64.0.1",
        "--http",
        "http://100.64.0.1:7420/health",
        "--git",
        "http://user:hunter2@100.64.0.1:7420/git/a.git",
    ]);
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("hunter2"),
        "a URL password reached the output"
    );
    let events = json_lines(&output);
    let checks = events.last().unwrap()["report"]["checks"]
        .as_array()
        .unwrap()
        .clone();
    let skipped: Vec<_> = checks
        .iter()
        .filter(|c| c["status"] == "CHECK_STATUS_SKIP")
        .collect();
    assert_eq!(skipped.len(), 3, "{checks:#?}");
    for check in skipped {
        assert!(check["detail"].as_str().unwrap().contains("no auth key"));
        assert!(check["hint"].as_str().unwrap().contains("TS_AUTHKEY"));
    }
}

#[test]
fn human_output_shows_phases_on_stderr_and_a_table_on_stdout() {
    let output = check_with_agent(&[]);
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // stderr is not a terminal here, so progress is plain lines, not spinners.
    assert!(stderr.contains("» preflight"), "{stderr}");
    assert!(stderr.contains("✓ preflight"), "{stderr}");
    assert!(stdout.starts_with("CHECK"), "{stdout}");
    assert!(stdout.contains("verdict: ok"), "{stdout}");
}

#[test]
fn usage_errors_exit_2_with_a_hint() {
    let output = tailbox(&["check", "--sandbox", "local", "--ping", "not a host!"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("hint: "), "{stderr}");

    let output = tailbox(&[
        "check",
        "--sandbox",
        "local",
        "--agent",
        "/nonexistent/tailbox-agent",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cargo build -p tailbox-agent"), "{stderr}");

    let output = tailbox(&["check", "--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn an_agent_that_cannot_start_is_an_infrastructure_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("tailbox-agent");
    tailbox_testkit::write_executable(
        &fake,
        "#!/bin/sh\necho 'cannot run here: missing loader' >&2\nexit 127\n",
    );

    let output = tailbox(&[
        "check",
        "--sandbox",
        "local",
        "--agent",
        fake.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot run here: missing loader"),
        "{stderr}"
    );
    assert!(stderr.contains("exit status 127"), "{stderr}");
}

#[test]
fn report_file_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let output = check_with_agent(&["--quiet", "--report", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(report["schema_version"], 1);
    assert!(output.stderr.is_empty(), "--quiet prints no progress");
}
