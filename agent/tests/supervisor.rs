//! The supervisor against a real tailscaled: restarts after each death until the budget is
//! spent, then reports the daemon gone for good.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use tailbox_agent::daemon::provision;
use tailbox_agent::daemon::supervisor::{Supervisor, SupervisorConfig};
use tailbox_agent::events::EventSink;
use tailbox_agent::preflight::Host;
use tailbox_proto::agent::v1::{DaemonConfig, event};
use tailbox_testkit::lab::{Binaries, Lab, processes_mentioning};

/// The pid of the tailscaled serving `socket` right now (found by its unique socket argument).
fn tailscaled_serving(socket: &str) -> u32 {
    let needle = format!("--socket={socket}");
    let hits = processes_mentioning(&needle).unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    hits[0].0
}

fn kill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_until_the_budget_is_spent_then_the_daemon_is_gone() {
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ts.sock");
        let daemon_config = DaemonConfig {
            tailscaled_path: lab.bins().tailscaled().display().to_string(),
            ..Default::default()
        };
        let binary = provision::find(&daemon_config, None, &Host::default())
            .await
            .unwrap();
        let (tx, mut events) = tokio::sync::mpsc::channel(4096);
        let config = SupervisorConfig {
            binary,
            socket: socket.clone(),
            state: "mem:".into(),
            state_dir: dir.path().join("state"),
            proxy_listen: "127.0.0.1:0".parse().unwrap(),
            env: lab.tailscaled_env(),
            max_restarts: 2,
            ready_timeout: Duration::from_secs(30),
            secrets: Vec::new(),
        };
        let (supervisor, evidence) = Supervisor::start(config, EventSink::new(tx)).await.unwrap();
        let socket = socket.display().to_string();
        assert_eq!(tailscaled_serving(&socket), evidence.pid);
        let readiness = supervisor.readiness();
        let proxy = supervisor.proxy();

        // Two deaths are within the budget: each is restarted and answers again, on the same
        // proxy address.
        for attempt in 1..=2 {
            let pid = tailscaled_serving(&socket);
            kill(pid);
            assert!(
                readiness
                    .wait_not_ready(tokio::time::Instant::now() + Duration::from_secs(10))
                    .await
            );
            assert!(readiness.wait().await, "restart #{attempt} came back");
            assert_ne!(tailscaled_serving(&socket), pid);
            assert_eq!(supervisor.proxy(), proxy);
            supervisor.api().status(false).await.unwrap();
        }
        // The third death spends the budget.
        kill(tailscaled_serving(&socket));
        assert!(
            readiness
                .wait_not_ready(tokio::time::Instant::now() + Duration::from_secs(10))
                .await
        );
        assert!(!readiness.wait().await, "gone for good");
        assert_eq!(supervisor.stop(Duration::from_secs(5)).await, "not running");

        let mut restarts = Vec::new();
        let mut gone_warning = false;
        while let Ok(item) = events.try_recv() {
            match item.unwrap().kind {
                Some(event::Kind::DaemonRestart(r)) => restarts.push(r),
                Some(event::Kind::Warning(w)) if w.code == "daemon-gone" => gone_warning = true,
                _ => {}
            }
        }
        let attempts: Vec<u32> = restarts.iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, [1, 2]);
        assert!(
            restarts.iter().all(|r| r.exit == "signal 9"),
            "{restarts:?}"
        );
        assert!(restarts.iter().all(|r| !r.log_tail.is_empty()));
        assert!(gone_warning, "the spent budget is reported");
        assert!(
            processes_mentioning(&format!("--socket={socket}"))
                .unwrap()
                .is_empty()
        );
    })
    .await
    .expect("test timed out");
}
