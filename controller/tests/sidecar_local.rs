//! `tailbox up`, `status`, `check` and `down` with the local backend, against the lab's real
//! tailnet: the sidecar keeps this machine's "sandbox" on the tailnet after tailbox exits, real
//! `git` and `curl` reach the dev host with the variables it hands out, `check` uses its node
//! instead of starting a second tailscaled, and `down` leaves nothing behind.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tailbox_testkit::agent::agent_binary;
use tailbox_testkit::lab::{Binaries, Lab};
use tailbox_testkit::scan::{ProcessScanner, processes};
use tailbox_testkit::{describe_output, last_json_line};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// One sidecar's state directory and the lab it joins.
struct Setup {
    _dir: tempfile::TempDir,
    state_dir: PathBuf,
    key_file: PathBuf,
}

impl Setup {
    fn new(lab: &Lab) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tailbox-up-")
            .tempdir()
            .unwrap();
        let key_file = dir.path().join("authkey");
        std::fs::write(&key_file, lab.auth_key()).unwrap();
        Self {
            state_dir: dir.path().join("sidecar"),
            key_file,
            _dir: dir,
        }
    }

    fn state_dir(&self) -> &str {
        self.state_dir.to_str().unwrap()
    }

    /// `tailbox <command> --sandbox local --state-dir … --agent …` plus `extra`.
    async fn tailbox(&self, lab: &Lab, command: &str, extra: &[&str]) -> Output {
        self.tailbox_with(&agent_binary(), lab, command, extra)
            .await
    }

    /// The same with another agent binary.
    async fn tailbox_with(&self, agent: &Path, lab: &Lab, command: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            command,
            "--sandbox",
            "local",
            "--state-dir",
            self.state_dir(),
            "--agent",
            agent.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let child =
            tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), std::env::temp_dir())
                .args(&args)
                .envs(lab.tailbox_env())
                .spawn()
                .unwrap();
        tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("tailbox {command} did not finish"))
            .unwrap()
    }

    async fn up(&self, lab: &Lab) -> Value {
        let out = self.up_with(&agent_binary(), lab, &[]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        last_json_line(&out)
    }

    /// `tailbox up` with `agent` and `extra` flags.
    async fn up_with(&self, agent: &Path, lab: &Lab, extra: &[&str]) -> Output {
        let key_file = self.key_file.to_str().unwrap().to_owned();
        let tailscaled = lab.bins().tailscaled().display().to_string();
        let mut args = vec![
            "--json",
            "--tailscaled",
            &tailscaled,
            "--control-url",
            lab.control_url(),
            "--auth-key-file",
            &key_file,
            "--hostname",
            "sidecar-up",
            // Tests run side by side: tailscaled picks a free proxy port.
            "--proxy-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        self.tailbox_with(agent, lab, "up", &args).await
    }

    async fn status(&self, lab: &Lab) -> (Option<i32>, Value) {
        let out = self.tailbox(lab, "status", &["--json"]).await;
        (out.status.code(), last_json_line(&out))
    }

    /// Runs `script` with exactly the variables `tailbox-agent env` prints, as a script in the
    /// sandbox would: `eval "$(tailbox-agent env)"`.
    async fn with_env(&self, script: &str) -> Output {
        let agent = agent_binary();
        let line = format!(
            "eval \"$('{}' env --state-dir '{}')\" && {script}",
            agent.display(),
            self.state_dir()
        );
        let mut command = tokio::process::Command::new("sh");
        command.args(["-c", &line]).kill_on_drop(true);
        tailbox_testkit::isolate_client(command.as_std_mut()).env_remove("TAILBOX_SIDECAR_DIR");
        tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("the script did not finish")
            .unwrap()
    }

    async fn clone_lab_repo(&self, lab: &Lab, into: &Path) -> Output {
        self.with_env(&format!(
            "git clone -q '{}' '{}' && git -C '{}' rev-parse HEAD",
            lab.git_url(),
            into.display(),
            into.display()
        ))
        .await
    }
}

impl Drop for Setup {
    /// A test that failed half-way leaves no sidecar behind (its tailscaled follows it through
    /// `TS_PARENT_DEATH_FD`).
    fn drop(&mut self) {
        tailbox_testkit::kill_by_pidfile(&self.state_dir.join("sidecar.pid"));
    }
}

/// Pids of the processes running `binary` (by /proc/<pid>/exe) whose parent runs `parent` with
/// `state_dir` or `serve` on its command line: the tailscaleds of this test's sidecar and of any
/// one-shot agent, whatever else (other tests' sidecars, other labs) runs on the machine.
fn children_running(binary: &Path, parent: &Path, state_dir: &str) -> Vec<u32> {
    let (binary, parent) = (
        std::fs::canonicalize(binary).unwrap(),
        std::fs::canonicalize(parent).unwrap(),
    );
    let all = processes();
    let ours = |ppid: u32| {
        all.iter().any(|p| {
            p.pid == ppid
                && p.exe.as_ref() == Some(&parent)
                && (p.cmdline().contains(state_dir) || p.args.iter().any(|arg| arg == "serve"))
        })
    };
    all.iter()
        .filter(|p| p.exe.as_ref() == Some(&binary) && ours(p.ppid))
        .map(|p| p.pid)
        .collect()
}

/// Processes whose command line names `needle` (the state dir: the sidecar and what it runs).
fn pids_naming(needle: &str) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.cmdline().contains(needle))
        .map(|p| p.pid)
        .collect()
}

async fn lab() -> Lab {
    // Building the lab binaries can take minutes on a cold cache: do it outside the timeout.
    Binaries::locate().await.unwrap();
    Lab::start().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn up_keeps_the_node_for_git_and_curl_check_reuses_it_and_down_leaves_nothing() {
    let lab = lab().await;
    let setup = Setup::new(&lab);
    tokio::time::timeout(TEST_TIMEOUT, async {
        let scanner = ProcessScanner::start(lab.auth_key());

        // Up: exits 0, and says where the node is and what other programs need.
        let up = setup.up(&lab).await;
        assert_eq!(up["state"], "running", "{up:#}");
        assert_eq!(up["backend"], "local");
        assert!(up["sandbox_id"].as_str().unwrap().starts_with("local-"));
        assert_eq!(up["hostname"], "sidecar-up");
        assert!(
            up["tailnet_ips"]
                .as_array()
                .unwrap()
                .iter()
                .any(|ip| ip.as_str().unwrap().starts_with("100.")),
            "{up:#}"
        );
        let proxy_url = up["proxy_url"].as_str().unwrap();
        assert!(proxy_url.starts_with("socks5h://127.0.0.1:"), "{up:#}");
        assert_eq!(up["env"]["ALL_PROXY"], proxy_url);
        assert_eq!(up["env"]["NO_PROXY"], "localhost,127.0.0.1,::1");
        assert_eq!(up["already_up"], false);

        // tailbox has exited; the sidecar and its tailscaled live on.
        let status_before = up["status"].clone();
        let sidecar_pid = u32::try_from(status_before["pid"].as_u64().unwrap()).unwrap();
        let tailscaled_pid =
            u32::try_from(status_before["tailscaled_pid"].as_u64().unwrap()).unwrap();
        assert!(tailbox_testkit::process_is_alive(
            i32::try_from(sidecar_pid).unwrap()
        ));

        // A second up finds the node up.
        let again = setup.up(&lab).await;
        assert_eq!(again["already_up"], true, "{again:#}");
        assert_eq!(again["status"]["pid"], status_before["pid"]);

        // Real git and curl with the variables `tailbox-agent env` prints.
        let clones = tempfile::tempdir().unwrap();
        let out = setup
            .clone_lab_repo(&lab, &clones.path().join("first"))
            .await;
        assert!(out.status.success(), "git clone: {}", describe_output(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            lab.git_ref("HEAD")
                .or_else(|| lab.git_ref("refs/heads/main"))
                .unwrap()
        );
        let out = setup
            .with_env(&format!("curl -fsS --max-time 20 '{}'", lab.health_url()))
            .await;
        assert!(out.status.success(), "curl: {}", describe_output(&out));

        // Status: Running, with the proxy.
        let (code, status) = setup.status(&lab).await;
        assert_eq!(code, Some(0), "{status:#}");
        assert_eq!(status["state"], "running");
        assert_eq!(status["status"]["proxy_url"], proxy_url);

        // Check over the sidecar's node while exactly one tailscaled of ours runs.
        let tailscaled_bin = lab.bins().tailscaled();
        let agent_bin = agent_binary();
        assert_eq!(
            children_running(&tailscaled_bin, &agent_bin, setup.state_dir()),
            vec![tailscaled_pid]
        );
        let most_seen = Arc::new(AtomicUsize::new(0));
        let watching = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (most_seen, watching) = (Arc::clone(&most_seen), Arc::clone(&watching));
            let (bin, parent) = (tailscaled_bin.clone(), agent_bin.clone());
            let state_dir = setup.state_dir().to_owned();
            tokio::task::spawn_blocking(move || {
                while watching.load(Ordering::SeqCst) {
                    let n = children_running(&bin, &parent, &state_dir).len();
                    most_seen.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let main_sha = lab.git_ref("refs/heads/main").unwrap().to_owned();
        let expect_ref = format!("main={main_sha}");
        let peer = lab.peer_ipv4().to_string();
        let health = lab.health_url();
        let git = lab.git_url();
        let out = setup
            .tailbox(
                &lab,
                "check",
                &[
                    "--json",
                    "--ping",
                    &peer,
                    "--http",
                    &health,
                    "--git",
                    &git,
                    "--expect-ref",
                    &expect_ref,
                ],
            )
            .await;
        watching.store(false, Ordering::SeqCst);
        sampler.await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        let report = &last_json_line(&out)["report"];
        assert_eq!(report["verdict"]["ok"], true, "{report:#}");
        let names = tailbox_testkit::assert_every_target_checked(report);
        assert!(
            !names.contains(&"daemon") && !names.contains(&"login"),
            "the check started its own daemon: {names:?}"
        );
        assert_eq!(
            most_seen.load(Ordering::SeqCst),
            1,
            "exactly one tailscaled of ours ran during the check"
        );

        // SIGKILL that tailscaled: the sidecar restarts it, Running again, and the clone works.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(tailscaled_pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let mut recovered = None;
        for _ in 0..120 {
            let (code, status) = setup.status(&lab).await;
            if code == Some(0) && status["status"]["daemon_restarts"] == 1 {
                recovered = Some(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let recovered = recovered.expect("the sidecar restarted tailscaled and is Running again");
        assert_ne!(
            recovered["status"]["tailscaled_pid"],
            status_before["tailscaled_pid"]
        );
        let out = setup
            .clone_lab_repo(&lab, &clones.path().join("second"))
            .await;
        assert!(
            out.status.success(),
            "git clone after the restart: {}",
            describe_output(&out)
        );

        // Down: the node logs out and nothing of ours is left.
        let out = setup.tailbox(&lab, "down", &["--json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        let down = last_json_line(&out);
        assert_eq!(down["sidecar_was_running"], true, "{down:#}");
        assert_eq!(down["logged_out"], true, "{down:#}");
        for _ in 0..100 {
            if pids_naming(setup.state_dir()).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(pids_naming(setup.state_dir()), Vec::<u32>::new());
        assert_eq!(
            children_running(&tailscaled_bin, &agent_bin, setup.state_dir()),
            Vec::<u32>::new()
        );

        // Status now says no sidecar runs, and how to start one; down again is fine.
        let out = setup.tailbox(&lab, "status", &[]).await;
        assert_eq!(out.status.code(), Some(3), "{}", describe_output(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error: No sidecar runs in"), "{stderr}");
        assert!(
            stderr.contains("hint: Start one with `tailbox up"),
            "{stderr}"
        );
        let out = setup.tailbox(&lab, "down", &[]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));

        let scan = scanner.stop();
        assert!(scan.scans > 5, "the scanner ran ({} scans)", scan.scans);
        assert!(
            scan.hits.is_empty(),
            "auth key in a process's argv or environment: {:#?}",
            scan.hits
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn up_without_an_auth_key_and_check_over_an_idle_sidecar_say_what_to_do() {
    let lab = lab().await;
    let setup = Setup::new(&lab);
    tokio::time::timeout(TEST_TIMEOUT, async {
        let out = setup.tailbox(&lab, "up", &[]).await;
        assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("error: `tailbox up` needs a Tailscale auth key"),
            "{stderr}"
        );
        assert!(stderr.contains("hint: Set `TS_AUTHKEY`"), "{stderr}");

        // A sidecar that was started but never brought up: check refuses to start a second
        // tailscaled beside it, and says how to go on.
        let agent = agent_binary();
        let out = tokio::process::Command::new(&agent)
            .args(["sidecar", "--state-dir", setup.state_dir()])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", describe_output(&out));
        let peer = lab.peer_ipv4().to_string();
        let out = setup.tailbox(&lab, "check", &["--ping", &peer]).await;
        assert_eq!(out.status.code(), Some(3), "{}", describe_output(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("is idle, so its node cannot be checked"),
            "{stderr}"
        );
        assert!(
            stderr.contains("hint: Bring it up with `tailbox up --sandbox local"),
            "{stderr}"
        );

        let (code, status) = setup.status(&lab).await;
        assert_eq!(code, Some(1), "an idle sidecar is not Running: {status:#}");
        assert_eq!(status["state"], "idle");

        let out = setup.tailbox(&lab, "down", &["--json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        assert_eq!(last_json_line(&out)["sidecar_was_running"], true);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_of_another_build_is_reported_and_replaced_only_on_request() {
    let lab = lab().await;
    let setup = Setup::new(&lab);
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Another build: the same program with other bytes, so another sha256.
        let builds = tempfile::tempdir().unwrap();
        let other = builds.path().join("tailbox-agent");
        let mut bytes = std::fs::read(agent_binary()).unwrap();
        bytes.extend_from_slice(b"another build");
        std::fs::write(&other, bytes).unwrap();
        std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let out = setup.up_with(&other, &lab, &[]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));

        // This build reaches it, uses it, and says it is another build.
        let (code, status) = setup.status(&lab).await;
        assert_eq!(code, Some(0), "{status:#}");
        let note = status["other_build"].as_str().unwrap_or_default();
        assert!(
            note.contains("the sidecar runs tailbox-agent"),
            "{status:#}"
        );
        assert!(note.contains("`tailbox up --replace`"), "{status:#}");

        // up with this build refuses to replace it silently...
        let out = setup.up_with(&agent_binary(), &lab, &[]).await;
        assert_eq!(out.status.code(), Some(3), "{}", describe_output(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("error: A sidecar of another version already runs in"),
            "{stderr}"
        );
        assert!(
            stderr.contains("hint: Run `tailbox up --replace`"),
            "{stderr}"
        );

        // ...and replaces it when asked.
        let out = setup.up_with(&agent_binary(), &lab, &["--replace"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
        let up = last_json_line(&out);
        assert_eq!(up["state"], "running", "{up:#}");
        assert!(up["other_build"].is_null(), "{up:#}");

        let out = setup.tailbox(&lab, "down", &[]).await;
        assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
    })
    .await
    .expect("test timed out");
}
