//! What the sidecar tests share: a sidecar's state directory and the real agent binary started
//! in it as a script would start it, a gRPC channel over its socket, and the lab's `Up` request.
#![allow(dead_code, clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use tailbox_proto::agent::v1::sidecar_client::SidecarClient;
use tailbox_proto::agent::v1::{
    CheckRequest, ExpectedRef, GitTarget, HttpTarget, PingTarget, SidecarState, SidecarStatus,
    StatusRequest, UpRequest, UpResponse,
};
use tailbox_testkit::describe_output;
use tailbox_testkit::lab::Lab;
use tokio::process::Command;
use tonic::transport::Channel;

pub const AGENT: &str = env!("CARGO_BIN_EXE_tailbox-agent");

/// One sidecar's state directory, in a temp dir of its own. Dropping it kills a sidecar the
/// test left running (its tailscaled follows through `TS_PARENT_DEATH_FD`).
pub struct Sidecar {
    _dir: tempfile::TempDir,
    pub state_dir: PathBuf,
}

impl Sidecar {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tailbox-sidecar-")
            .tempdir()
            .unwrap();
        let state_dir = dir.path().join("state");
        Self {
            _dir: dir,
            state_dir,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("sidecar.sock")
    }

    /// `<agent> <args…> --state-dir <dir>`, with no proxy variables inherited.
    pub fn command(&self, agent: &str, args: &[&str]) -> Command {
        let mut command = Command::new(agent);
        command
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        isolate(&mut command);
        command
    }

    /// Runs a sidecar command of the agent under test to completion.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_with(AGENT, args).await
    }

    /// Runs a command to completion and checks its exit code.
    pub async fn expect(&self, args: &[&str], code: i32) -> Output {
        self.expect_with(AGENT, args, code).await
    }

    pub async fn expect_with(&self, agent: &str, args: &[&str], code: i32) -> Output {
        let out = self.run_with(agent, args).await;
        assert_eq!(out.status.code(), Some(code), "{}", describe_output(&out));
        out
    }

    pub async fn run_with(&self, agent: &str, args: &[&str]) -> Output {
        tokio::time::timeout(Duration::from_secs(60), self.command(agent, args).output())
            .await
            .unwrap_or_else(|_| panic!("`tailbox-agent {}` did not finish", args.join(" ")))
            .unwrap()
    }

    /// Starts the sidecar as a script would, and checks that the start returned at once with
    /// its stdout closed (the detached sidecar holds none of the exec's pipes).
    pub async fn start(&self) -> u32 {
        let out = self.expect(&["sidecar"], 0).await;
        assert!(out.stdout.is_empty(), "{}", describe_output(&out));
        self.pid()
    }

    pub fn pid(&self) -> u32 {
        std::fs::read_to_string(self.state_dir.join("sidecar.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A gRPC channel over the socket.
    pub async fn channel(&self) -> Channel {
        tailbox_testkit::unix_channel(&self.socket()).await.unwrap()
    }

    pub async fn sidecar(&self) -> SidecarClient<Channel> {
        SidecarClient::new(self.channel().await)
    }

    pub async fn status(&self) -> SidecarStatus {
        self.sidecar()
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Up, which must leave the node Running; returns the status.
    pub async fn up_running(&self, lab: &Lab, hostname: &str) -> SidecarStatus {
        let up = self.up(lab, hostname).await;
        let status = up.status.unwrap();
        assert_eq!(
            state(&status),
            SidecarState::Running,
            "{status:#?}\n{:#?}",
            up.checks
        );
        status
    }

    pub async fn up(&self, lab: &Lab, hostname: &str) -> UpResponse {
        self.sidecar()
            .await
            .up(up_request(lab, hostname))
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        tailbox_testkit::kill_by_pidfile(&self.state_dir.join("sidecar.pid"));
    }
}

/// No proxy or git settings from the host, and no `TAILBOX_SIDECAR_DIR` (tests pass the dir).
pub fn isolate(command: &mut Command) {
    tailbox_testkit::isolate_client(command.as_std_mut()).env_remove("TAILBOX_SIDECAR_DIR");
}

pub fn up_request(lab: &Lab, hostname: &str) -> UpRequest {
    UpRequest {
        tailnet: Some(lab.tailnet_config(hostname)),
        sandbox_id: String::new(),
        deadlines: None,
    }
}

/// A `Check` of the lab's dev host: a ping and an HTTP GET, and the git listing if `git`.
pub fn check_request(lab: &Lab, run_id: &str, git: bool) -> CheckRequest {
    CheckRequest {
        run_id: run_id.into(),
        ping_targets: vec![PingTarget {
            address: lab.peer_ipv4().to_string(),
        }],
        http_targets: vec![HttpTarget {
            url: lab.health_url(),
            expected_status: 0,
            expected_status_max: 0,
        }],
        git_targets: if git {
            vec![GitTarget {
                url: lab.git_url(),
                expected_refs: vec![ExpectedRef {
                    name: "refs/heads/main".into(),
                    sha: lab.git_ref("refs/heads/main").unwrap().into(),
                }],
            }]
        } else {
            Vec::new()
        },
        deadlines: None,
    }
}

pub fn state(status: &SidecarStatus) -> SidecarState {
    SidecarState::try_from(status.state).unwrap()
}

/// The resident set of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
