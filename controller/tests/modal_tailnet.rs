//! The whole product path with no internet: `tailbox check --sandbox modal` against the fake
//! Modal, the real static agent uploaded into a fake sandbox, and that agent driving a real
//! tailscaled into the lab's real tailnet (testkit `Lab`) and checking the lab's dev host.
//!
//! The fake sandbox has a network namespace of its own that reaches only the lab's control,
//! DERP and STUN servers, as a Modal sandbox reaches Tailscale's: the dev host's servers are
//! out of its reach except over the tailnet.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tailbox_proto::arch::Arch;
use tailbox_proto::modal::task_command_router::task_exec_wait_response::ExitStatus;
use tailbox_testkit::agent::{static_agent_binary, static_agent_binary_for};
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal};
use tailbox_testkit::lab::{Binaries, Lab};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    report: Value,
}

impl Run {
    fn check(&self, name: &str) -> &Value {
        self.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {:#}", self.report))
    }

    fn status(&self, name: &str) -> &str {
        self.check(name)["status"].as_str().unwrap_or_default()
    }
}

/// Builds the lab binaries and the static agent outside any timeout (minutes on a cold cache),
/// then starts a lab and a fake Modal.
async fn setup(config: FakeConfig) -> (Lab, FakeModal, std::path::PathBuf) {
    Binaries::locate().await.unwrap();
    let agent = tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap();
    let lab = Lab::start().await.unwrap();
    let fake = FakeModal::start_with(config.reaching(&lab)).await.unwrap();
    (lab, fake, agent)
}

/// `tailbox check --sandbox modal` with the lab's key, control, knobs and targets (as env, the
/// way a developer runs it) plus `extra`.
async fn check_in_lab(lab: &Lab, fake: &FakeModal, agent: &Path, extra: &[String]) -> Run {
    let home = tempfile::tempdir().unwrap();
    let main_sha = lab.git_ref("refs/heads/main").unwrap().to_owned();
    let mut args: Vec<String> = [
        "check",
        "--sandbox",
        "modal",
        "--json",
        "--agent",
        agent.to_str().unwrap(),
        "--expect-ref",
        &format!("main={main_sha}"),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend_from_slice(extra);
    let output = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), home.path())
        .args(&args)
        .envs(lab.developer_env())
        .envs(fake.env())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let report = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| e["report"].clone())
        .unwrap_or_default();
    let run = Run {
        code: output.status.code(),
        stdout,
        stderr,
        report,
    };
    assert_eq!(
        run.code,
        Some(0),
        "stderr:\n{}\nreport:\n{:#}\nlab:\n{}",
        run.stderr,
        run.report,
        lab.log_tails()
    );
    run
}

/// Every check passed, the sandbox is gone, and the auth key travelled only inside the gRPC
/// stream to the agent: in no exec's argv or environment, no header, no output.
fn assert_every_check_passed_and_nothing_leaked(run: &Run, lab: &Lab, fake: &FakeModal) {
    let report = &run.report;
    assert_eq!(report["verdict"]["ok"], true, "{report:#}");
    assert_eq!(report["sandbox"]["backend"], "modal");
    assert_eq!(run.status("login"), "CHECK_STATUS_PASS", "{report:#}");
    assert!(
        matches!(
            run.status("ping"),
            "CHECK_STATUS_PASS" | "CHECK_STATUS_WARN"
        ),
        "{report:#}"
    );
    assert_eq!(run.status("http"), "CHECK_STATUS_PASS", "{report:#}");
    assert_eq!(run.status("git"), "CHECK_STATUS_PASS", "{report:#}");
    assert_eq!(
        run.check("git")["git"]["head_sha"],
        lab.git_ref("refs/heads/main").unwrap()
    );

    let record = fake.record();
    assert_eq!(record.sandboxes.len(), 1);
    assert!(record.sandboxes[0].terminated_at.is_some());
    let key = lab.auth_key();
    assert_eq!(record.places_holding(key), Vec::<String>::new());
    assert!(!run.stdout.contains(key) && !run.stderr.contains(key));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_in_a_fake_modal_sandbox_passes_every_check_on_the_lab_tailnet() {
    let (lab, fake, agent) = setup(FakeConfig::default()).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tailscaled = lab.bins().tailscaled().display().to_string();
        let run = check_in_lab(&lab, &fake, &agent, &["--tailscaled".into(), tailscaled]).await;
        assert_every_check_passed_and_nothing_leaked(&run, &lab, &fake);
        assert_eq!(
            run.check("daemon")["daemon"]["source"],
            "DAEMON_SOURCE_REQUEST_PATH"
        );
    })
    .await
    .expect("test timed out");
}

/// This machine's global IPv4 addresses, from `ip -4 -o addr show scope global`.
fn global_ipv4s() -> Vec<Ipv4Addr> {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dev_host_is_out_of_a_fake_sandboxs_reach_except_over_the_tailnet() {
    let (lab, fake, agent) = setup(FakeConfig::default()).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tailscaled = lab.bins().tailscaled().display().to_string();
        let extra = ["--tailscaled".into(), tailscaled, "--keep".into()];
        let run = check_in_lab(&lab, &fake, &agent, &extra).await;
        // Over the tailnet, the agent's checks reach the dev host's HTTP server...
        assert_eq!(run.status("http"), "CHECK_STATUS_PASS", "{:#}", run.report);
        let sandbox_id = run.report["sandbox"]["sandbox_id"].as_str().unwrap();
        let sandbox = fake.attach(sandbox_id).await.unwrap();
        let connect = |url: String| {
            let sandbox = &sandbox;
            async move {
                let argv = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", &url];
                sandbox.exec(&argv).await.unwrap()
            }
        };

        // ...while the same server, directly, answers this machine but not the sandbox (curl's
        // exit 7: could not connect).
        let port = lab.http_port();
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let direct = connect(format!("http://127.0.0.1:{port}/health")).await;
        assert_eq!(direct.exit, ExitStatus::Code(7), "{direct:?}");

        // Nor does anything else on this machine: a server on all of its addresses, and the far
        // end of the sandbox's own link, where only the lab's ports are forwarded.
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for ip in global_ipv4s() {
            tokio::net::TcpStream::connect((ip, port)).await.unwrap();
            let output = connect(format!("http://{ip}:{port}/")).await;
            assert_eq!(output.exit, ExitStatus::Code(7), "{ip}: {output:?}");
        }
        let output = connect(format!("http://198.18.0.1:{}/", lab.http_port())).await;
        assert_eq!(output.exit, ExitStatus::Code(7), "{output:?}");

        // The way out is the lab's control, at the very address the lab announced.
        let output = connect(format!("{}/healthz", lab.control_url())).await;
        assert_eq!(output.exit, ExitStatus::Code(0), "{output:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn tailscale_pushed_from_a_release_tarball_joins_the_lab_tailnet() {
    // No tailscaled on the sandbox's PATH: only the pushed one can be used.
    let (lab, fake, agent) = setup(FakeConfig {
        path: Some("/nonexistent-bin".into()),
        ..FakeConfig::default()
    })
    .await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        // A release-shaped tarball of the lab's tailscale build.
        let dir = tempfile::tempdir().unwrap();
        let tarball = dir.path().join("tailscale_1.102.3_amd64.tgz");
        {
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&tarball).unwrap(),
                flate2::Compression::fast(),
            );
            let mut tar = tar::Builder::new(gz);
            for (name, path) in [
                ("tailscaled", lab.bins().tailscaled()),
                ("tailscale", lab.bins().tailscale()),
            ] {
                tar.append_path_with_name(path, format!("tailscale_1.102.3_amd64/{name}"))
                    .unwrap();
            }
            tar.into_inner().unwrap().finish().unwrap();
        }
        let run = check_in_lab(
            &lab,
            &fake,
            &agent,
            &["--tailscale-tarball".into(), tarball.display().to_string()],
        )
        .await;
        assert_every_check_passed_and_nothing_leaked(&run, &lab, &fake);
        let sha = hex::encode(Sha256::digest(
            std::fs::read(lab.bins().tailscaled()).unwrap(),
        ));
        let daemon = &run.check("daemon")["daemon"];
        assert_eq!(daemon["source"], "DAEMON_SOURCE_PUSHED", "{daemon:#}");
        assert_eq!(daemon["path"], format!("/tmp/tailbox/bin/tailscaled-{sha}"));
    })
    .await
    .expect("test timed out");
}

/// A release-shaped tarball (`tailscale_<version>_<goarch>.tgz`) of the lab's tailscale build
/// for `arch`.
fn lab_tailscale_tarball(lab: &Lab, dir: &Path, arch: Arch) -> std::path::PathBuf {
    let stem = format!("tailscale_1.102.3_{}", arch.go_arch());
    let tarball = dir.join(format!("{stem}.tgz"));
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&tarball).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    for (name, path) in [
        ("tailscaled", lab.bins().tailscaled_for(arch).unwrap()),
        ("tailscale", lab.bins().tailscale_for(arch).unwrap()),
    ] {
        tar.append_path_with_name(path, format!("{stem}/{name}"))
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    tarball
}

/// An aarch64 Modal sandbox (the fake's fs-tools is an aarch64 binary, and only aarch64
/// executables run in it, under qemu-user here) with no tailscale in its image: tailbox asks it
/// its architecture through fs-tools' `ReadFile`, uploads the aarch64 agent from a directory
/// holding both, checks the arm64 tarball against it and pushes it, and every check passes on
/// the lab's tailnet.
#[tokio::test(flavor = "multi_thread")]
async fn an_aarch64_sandbox_gets_the_aarch64_agent_and_tailscale_and_passes_every_check() {
    let (lab, fake, host_agent) = setup(FakeConfig {
        arch: Arch::Aarch64,
        path: Some("/nonexistent-bin".into()),
        ..FakeConfig::default()
    })
    .await;
    let arm_agent = tokio::task::spawn_blocking(|| static_agent_binary_for(Arch::Aarch64))
        .await
        .unwrap();
    let arm_tailscaled = lab.bins().tailscaled_for(Arch::Aarch64).unwrap();
    tailbox_testkit::qemu::require_runnable(Arch::Aarch64, &arm_agent);
    tailbox_testkit::qemu::require_runnable(Arch::Aarch64, &arm_tailscaled);
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        // Both agents in one directory, as `--agent DIR` takes them.
        let agents = dir.path().join("agents");
        std::fs::create_dir(&agents).unwrap();
        for (arch, agent) in [
            (Arch::host().unwrap(), &host_agent),
            (Arch::Aarch64, &arm_agent),
        ] {
            std::os::unix::fs::symlink(agent, agents.join(format!("tailbox-agent-{arch}")))
                .unwrap();
        }
        let tarball = lab_tailscale_tarball(&lab, dir.path(), Arch::Aarch64);
        let run = check_in_lab(
            &lab,
            &fake,
            &agents,
            &["--tailscale-tarball".into(), tarball.display().to_string()],
        )
        .await;
        assert_every_check_passed_and_nothing_leaked(&run, &lab, &fake);

        let sha = |path: &Path| hex::encode(Sha256::digest(std::fs::read(path).unwrap()));
        assert_eq!(run.report["agent"]["sha256"], sha(&arm_agent));
        let preflight = &run.check("preflight")["preflight"];
        assert_eq!(preflight["arch"], "aarch64", "{preflight:#}");
        assert_eq!(preflight["uname"]["machine"], "aarch64");
        let daemon = &run.check("daemon")["daemon"];
        assert_eq!(daemon["source"], "DAEMON_SOURCE_PUSHED", "{daemon:#}");
        assert_eq!(
            daemon["path"],
            format!("/tmp/tailbox/bin/tailscaled-{}", sha(&arm_tailscaled))
        );

        // The architecture came from fs-tools' own binary, asked before anything was written.
        let record = fake.record();
        let asked = record
            .execs
            .iter()
            .position(|e| {
                e.argv.get(1).map(String::as_str)
                    == Some(r#"{"ReadFile":{"path":"/proc/self/exe"}}"#)
            })
            .expect("the sandbox was asked its architecture");
        let first_write = record
            .execs
            .iter()
            .position(|e| e.argv.get(1).is_some_and(|a| a.contains("WriteFile")))
            .unwrap();
        assert!(asked < first_write, "{:#?}", record.execs);
        assert!(
            record.files_written.contains(&format!(
                "/tmp/tailbox/bin/tailbox-agent-{}",
                sha(&arm_agent)
            )),
            "{:?}",
            record.files_written
        );
        assert!(
            !record
                .files_written
                .iter()
                .any(|f| f.contains(&sha(&host_agent))),
            "the x86_64 agent was uploaded too: {:?}",
            record.files_written
        );
    })
    .await
    .expect("test timed out");
}
