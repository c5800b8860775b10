//! `tailbox check --sandbox local` against the lab's real tailnet: a real control server and DERP,
//! a real dev-host tailscaled with real HTTP and git servers, and the agent driving a real
//! tailscaled of its own.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tailbox_proto::arch::Arch;
use tailbox_testkit::agent::{agent_binary, static_agent_binary, static_agent_binary_for};
use tailbox_testkit::lab::{Binaries, Lab};
use tailbox_testkit::scan::ProcessScanner;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Generous bound for one whole test; the lab needs a few seconds, runs well under ten.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Output of one `tailbox` run.
struct Run {
    events: Vec<Value>,
    stderr: String,
    code: Option<i32>,
}

impl Run {
    fn report(&self) -> &Value {
        tailbox_testkit::report_of(&self.events, &self.stderr)
    }

    fn check(&self, name: &str) -> &Value {
        self.checks(name).into_iter().next().unwrap_or_else(|| {
            panic!(
                "no {name} check in {:#}\nstderr:\n{}",
                self.report()["checks"],
                self.stderr
            )
        })
    }

    fn checks(&self, name: &str) -> Vec<&Value> {
        self.report()["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == name)
            .collect()
    }
}

/// The common flags: the lab's control, its env knobs, its tailscaled, a key file, and a proxy
/// port tailscaled picks (tests run in parallel).
fn base_args(lab: &Lab, key_file: &std::path::Path) -> Vec<String> {
    let agent = agent_binary();
    vec![
        "check".into(),
        "--sandbox".into(),
        "local".into(),
        "--json".into(),
        "--agent".into(),
        agent.display().to_string(),
        "--tailscaled".into(),
        lab.bins().tailscaled().display().to_string(),
        "--control-url".into(),
        lab.control_url().into(),
        "--auth-key-file".into(),
        key_file.display().to_string(),
        "--proxy-listen".into(),
        "127.0.0.1:0".into(),
        // A sidecar someone left running must not stand in for the one-shot agent under test.
        "--no-sidecar".into(),
    ]
}

/// [`base_args`] with the lab's own key in a fresh directory (kept alive by the caller).
fn lab_args(lab: &Lab) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let args = base_args(lab, &key_file(&dir, lab.auth_key()));
    (dir, args)
}

fn key_file(dir: &tempfile::TempDir, key: &str) -> PathBuf {
    let path = dir.path().join("authkey");
    std::fs::write(&path, key).unwrap();
    path
}

/// Runs tailbox to completion; `on_event` sees each JSON event as it arrives, with tailbox's pid.
async fn run_tailbox(lab: &Lab, args: Vec<String>, mut on_event: impl FnMut(&Value, u32)) -> Run {
    let mut child =
        tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), std::env::temp_dir())
            .args(&args)
            .envs(lab.tailbox_env())
            .spawn()
            .unwrap();
    let stderr_task = tailbox_testkit::collect_stderr(&mut child);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut events = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        let event: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        on_event(&event, child.id().unwrap_or_default());
        events.push(event);
    }
    let status = child.wait().await.unwrap();
    Run {
        events,
        stderr: stderr_task.await.unwrap(),
        code: status.code(),
    }
}

async fn lab() -> Lab {
    // Building the lab binaries can take minutes on a cold cache: do it outside the timeout.
    Binaries::locate().await.unwrap();
    Lab::start().await.unwrap()
}

fn status(check: &Value) -> &str {
    check["status"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_every_check_passes_with_real_evidence() {
    let lab = lab().await;
    let run = every_check(&lab, &agent_binary(), &lab.bins().tailscaled()).await;
    assert_eq!(preflight_arch(&run), std::env::consts::ARCH);
}

/// The aarch64 static agent and an arm64 tailscaled (cross-built from the lab's pin) run under
/// qemu-user on this machine, against the same real lab, and every check passes.
#[tokio::test(flavor = "multi_thread")]
async fn the_aarch64_agent_and_tailscaled_under_qemu_pass_every_check() {
    let lab = lab().await;
    let agent = tokio::task::spawn_blocking(|| static_agent_binary_for(Arch::Aarch64))
        .await
        .unwrap();
    let tailscaled = lab.bins().tailscaled_for(Arch::Aarch64).unwrap();
    tailbox_testkit::qemu::require_runnable(Arch::Aarch64, &agent);
    tailbox_testkit::qemu::require_runnable(Arch::Aarch64, &tailscaled);
    let run = every_check(&lab, &agent, &tailscaled).await;
    assert_eq!(preflight_arch(&run), "aarch64");
    let preflight = &run.check("preflight")["preflight"];
    assert_eq!(preflight["uname"]["machine"], "aarch64");
}

/// The static agent's peak RSS budget for a whole run with every check. Measured 5.4–5.5 MiB
/// (docs/benchmarks.md, B5); the budget is that plus a margin of about 45% for differences
/// between machines, kernels and runs, and stays under issue #9's target of 12 MiB. Memory,
/// unlike time, is deterministic enough to assert.
const AGENT_PEAK_RSS_BUDGET_KIB: u64 = 8 * 1024;

/// The agent that ships (static, `dist` profile) stays within its memory budget in a real run
/// with every check. Its peak (VmHWM) is read from /proc while it runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_static_agent_stays_within_its_memory_budget_in_a_run() {
    let lab = lab().await;
    let agent = tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap();
    let sampler = PeakRss::start(agent.clone());
    every_check(&lab, &agent, &lab.bins().tailscaled()).await;
    let peak = sampler.stop();
    assert!(peak > 0, "never saw {} run", agent.display());
    eprintln!(
        "static agent peak RSS in a run: {peak} KiB (budget {AGENT_PEAK_RSS_BUDGET_KIB} KiB)"
    );
    assert!(
        peak <= AGENT_PEAK_RSS_BUDGET_KIB,
        "the static agent's peak RSS was {peak} KiB, over its budget of {AGENT_PEAK_RSS_BUDGET_KIB} KiB"
    );
}

/// Tracks the highest VmHWM of any process running `exe` whose parent is this test's `tailbox`.
struct PeakRss {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakRss {
    fn start(exe: PathBuf) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let tailbox = std::fs::canonicalize(env!("CARGO_BIN_EXE_tailbox")).unwrap();
        let exe = std::fs::canonicalize(exe).unwrap();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let all = tailbox_testkit::scan::processes();
                let child_of_tailbox = |ppid: u32| {
                    all.iter()
                        .any(|p| p.pid == ppid && p.exe.as_ref() == Some(&tailbox))
                };
                for agent in all
                    .iter()
                    .filter(|p| p.exe.as_ref() == Some(&exe) && child_of_tailbox(p.ppid))
                {
                    peak = peak.max(agent.status_kib("VmHWM:").unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        Self { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn preflight_arch(run: &Run) -> &str {
    run.check("preflight")["preflight"]["arch"]
        .as_str()
        .unwrap()
}

/// Runs `agent` with `tailscaled` against every target of the lab and checks that each check
/// passed with real evidence.
async fn every_check(lab: &Lab, agent: &Path, tailscaled: &Path) -> Run {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_key_dir, mut args) = lab_args(lab);
        set_flag(&mut args, "--agent", agent);
        set_flag(&mut args, "--tailscaled", tailscaled);
        args.extend(lab.every_target_flags());
        let main_sha = lab.git_ref("refs/heads/main").unwrap().to_owned();
        let run = run_tailbox(lab, args, |_, _| {}).await;
        assert_eq!(
            run.code,
            Some(0),
            "stderr:\n{}\nreport:\n{:#}",
            run.stderr,
            run.report()
        );
        let report = run.report();
        assert_eq!(report["verdict"]["ok"], true);

        // The tailnet IP the lab's control assigned: in the tailnet range, not the peer's.
        let login = run.check("login");
        let self_v4: std::net::Ipv4Addr = login["login"]["self_ips"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(self_v4.octets()[0], 100);
        assert_eq!(self_v4.octets()[1] & 0xc0, 64);
        assert_ne!(self_v4, lab.peer_ipv4());
        assert_eq!(report["tailnet"]["self_ips"], login["login"]["self_ips"]);
        // Login waits until control has the node's home DERP region, the lab's only one, so
        // the dev host can answer the node's first handshake (agent/src/login.rs).
        assert_eq!(login["login"]["home_derp_region"], 1, "{login:#}");
        let warnings = report["warnings"].as_array().unwrap();
        assert!(
            !warnings.iter().any(|w| w["code"] == "no-home-derp"),
            "{warnings:#?}"
        );

        let ping = run.check("ping");
        assert!(
            matches!(status(ping), "CHECK_STATUS_PASS" | "CHECK_STATUS_WARN"),
            "{ping:#}"
        );
        let latency = ping["ping"]["latency"].as_str().unwrap();
        assert!(latency.ends_with('s') && latency != "0s", "{latency}");
        assert_eq!(ping["ping"]["node_ip"], lab.peer_ipv4().to_string());

        let http = run.check("http");
        assert_eq!(status(http), "CHECK_STATUS_PASS", "{http:#}");
        assert_eq!(http["http"]["status_code"], 200);
        assert!(
            http["http"]["body_prefix"]
                .as_str()
                .unwrap()
                .starts_with("ok")
        );

        let git = run.check("git");
        assert_eq!(status(git), "CHECK_STATUS_PASS", "{git:#}");
        assert_eq!(git["git"]["head_sha"], main_sha);
        let comparison = &git["git"]["comparisons"][0];
        assert_eq!(comparison["actual"], main_sha);
        assert_eq!(comparison["matched"], true);

        assert_eq!(
            report["teardown"]["logged_out"], true,
            "{:#}",
            report["teardown"]
        );
        assert_eq!(report["teardown"]["daemon_stop"], "sigterm");
        run
    })
    .await
    .expect("test timed out")
}

/// Replaces the value after `flag` in `args`.
fn set_flag(args: &mut [String], flag: &str, value: &Path) {
    let at = args.iter().position(|a| a == flag).unwrap() + 1;
    args[at] = value.display().to_string();
}

#[tokio::test(flavor = "multi_thread")]
async fn http_500_missing_repo_and_wrong_sha_are_classified() {
    let lab = lab().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_key_dir, mut args) = lab_args(&lab);
        let missing_repo = lab.git_url().replace("lab.git", "no-such-repo.git");
        args.extend([
            "--http".into(),
            format!("{}/status/500", lab.http_base_url()),
            "--git".into(),
            missing_repo.clone(),
            "--git".into(),
            lab.git_url(),
            "--expect-ref".into(),
            format!("main={}", "0".repeat(40)),
        ]);
        let run = run_tailbox(&lab, args, |_, _| {}).await;
        assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
        let http = run.check("http");
        assert_eq!(
            http["failure_class"], "FAILURE_CLASS_HTTP_STATUS",
            "{http:#}"
        );
        assert_eq!(http["http"]["status_code"], 500);
        assert!(!http["hint"].as_str().unwrap().is_empty());
        let gits = run.checks("git");
        let missing = gits.iter().find(|g| g["target"] == missing_repo).unwrap();
        assert_eq!(
            missing["failure_class"], "FAILURE_CLASS_GIT_NOT_FOUND",
            "{missing:#}"
        );
        assert!(!missing["hint"].as_str().unwrap().is_empty());
        let mismatched = gits.iter().find(|g| g["target"] == lab.git_url()).unwrap();
        assert_eq!(
            mismatched["failure_class"], "FAILURE_CLASS_GIT_REF_MISMATCH",
            "{mismatched:#}"
        );
        let comparison = &mismatched["git"]["comparisons"][0];
        assert_eq!(comparison["matched"], false);
        assert_eq!(
            comparison["actual"],
            lab.git_ref("refs/heads/main").unwrap()
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_auth_key_appears_in_no_argv_environment_log_or_report() {
    let lab = lab().await;
    let key = lab.auth_key().to_owned();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let mut args = base_args(&lab, &key_file(&dir, &key));
        args.extend([
            "--ping".into(),
            lab.peer_ipv4().to_string(),
            "--http".into(),
            lab.health_url(),
            "--verbose".into(),
        ]);
        // Scan every process on the machine, repeatedly, for as long as the run lasts.
        let scanner = ProcessScanner::start(&key);
        let mut agent_pid = None;
        let mut tailscaled_pid = None;
        let run = run_tailbox(&lab, args, |event, _| {
            if let Some(pid) = event["agent_hello"]["pid"].as_u64() {
                agent_pid = Some(pid as u32);
            }
            if let Some(pid) = event["check"]["daemon"]["pid"].as_u64() {
                tailscaled_pid = Some(pid as u32);
            }
        })
        .await;
        let scan = scanner.stop();
        assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
        assert!(
            scan.scans > 5,
            "the scanner ran during the run ({} scans)",
            scan.scans
        );
        // The scanner saw the processes that handled the key.
        assert!(scan.pids_seen.contains(&agent_pid.unwrap()));
        assert!(scan.pids_seen.contains(&tailscaled_pid.unwrap()));
        assert!(
            scan.hits.is_empty(),
            "auth key found in process argv/env: {:?}",
            scan.hits
        );

        let stdout: String = run.events.iter().map(|e| e.to_string()).collect();
        assert!(
            !stdout.contains(&key),
            "auth key in the JSON events or report"
        );
        assert!(
            !run.stderr.contains(&key),
            "auth key in the logs (stderr, --verbose)"
        );
        assert!(run.stderr.contains("agent:"), "verbose logs were produced");
        assert!(
            run.events
                .iter()
                .any(|e| e["log"]["source"] == "LOG_SOURCE_TAILSCALED"),
            "tailscaled's log lines were streamed"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spike_socket_and_a_state_file_can_be_chosen() {
    let lab = lab().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ts.sock");
        let state = dir.path().join("ts.state");
        let mut args = base_args(&lab, &key_file(&dir, lab.auth_key()));
        args.extend([
            "--tailscaled-socket".into(),
            socket.display().to_string(),
            "--tailscaled-state".into(),
            state.display().to_string(),
            "--ping".into(),
            lab.peer_ipv4().to_string(),
        ]);
        let run = run_tailbox(&lab, args, |_, _| {}).await;
        assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
        let daemon = &run.check("daemon")["daemon"];
        assert_eq!(daemon["socket_path"], socket.display().to_string());
        assert_eq!(daemon["state"], state.display().to_string());
        // tailscaled really kept its state there (a file store writes JSON).
        let stored = std::fs::read_to_string(&state).unwrap();
        assert!(stored.trim_start().starts_with('{'), "{stored}");
        assert_eq!(run.report()["teardown"]["logged_out"], true);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_by_name_and_redirects_work_end_to_end() {
    let lab = lab().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_key_dir, mut args) = lab_args(&lab);
        args.extend([
            // cook's COOK_TAIL_HOSTNAME, the MagicDNS name, and a typo of it.
            "--ping".into(),
            "devhost".into(),
            "--ping".into(),
            lab.peer_fqdn(),
            "--ping".into(),
            "devhots".into(),
            "--netmap-timeout".into(),
            "3s".into(),
            // A redirect expected as such, and a chain that is followed to /health.
            "--http".into(),
            format!("302={}", lab.redirect_url(1)),
            "--http".into(),
            lab.redirect_url(2),
        ]);
        let run = run_tailbox(&lab, args, |_, _| {}).await;
        assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
        let by_target = |name: &str, target: &str| {
            *run.checks(name)
                .iter()
                .find(|c| c["target"] == target)
                .unwrap_or_else(|| panic!("no {name} check of {target}: {:#}", run.report()))
        };
        for name in ["devhost".to_owned(), lab.peer_fqdn()] {
            assert_eq!(status(by_target("netmap", &name)), "CHECK_STATUS_PASS");
            let ping = by_target("ping", &name);
            assert!(
                matches!(status(ping), "CHECK_STATUS_PASS" | "CHECK_STATUS_WARN"),
                "{ping:#}"
            );
            assert_eq!(ping["ping"]["node_ip"], lab.peer_ipv4().to_string());
        }
        let unknown = by_target("netmap", "devhots");
        assert_eq!(unknown["failure_class"], "FAILURE_CLASS_PEER_NOT_IN_NETMAP");
        assert_eq!(unknown["netmap"]["closest_peers"][0], lab.peer_fqdn());
        assert!(
            unknown["detail"]
                .as_str()
                .unwrap()
                .contains(&lab.peer_fqdn()),
            "{unknown:#}"
        );
        let ping = by_target("ping", "devhots");
        assert_eq!(ping["failure_class"], "FAILURE_CLASS_PEER_NOT_IN_NETMAP");
        assert_eq!(
            run.report()["verdict"]["first_failed_layer"],
            "LAYER_PEER_VISIBLE"
        );

        let expected = by_target("http", &lab.redirect_url(1));
        assert_eq!(status(expected), "CHECK_STATUS_PASS", "{expected:#}");
        assert_eq!(expected["http"]["status_code"], 302);
        let followed = by_target("http", &lab.redirect_url(2));
        assert_eq!(status(followed), "CHECK_STATUS_PASS", "{followed:#}");
        assert_eq!(followed["http"]["final_url"], lab.health_url());
        assert_eq!(followed["http"]["redirects"].as_array().unwrap().len(), 2);
    })
    .await
    .expect("test timed out");
}
