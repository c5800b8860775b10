//! The supervisor against a real tailscaled: restarts after each death until the budget is
//! spent, then reports the daemon gone for good; a healthy period resets the budget; a stuck
//! one is killed at once at the end.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tailbox_agent::daemon::provision;
use tailbox_agent::daemon::supervisor::{Supervisor, SupervisorConfig};
use tailbox_agent::events::EventSink;
use tailbox_agent::preflight::Host;
use tailbox_proto::agent::v1::{DaemonConfig, DaemonRestart, event};
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

/// Where [`start_supervisor`] puts tailscaled's socket.
fn socket_of(dir: &Path) -> String {
    dir.join("ts.sock").display().to_string()
}

/// Starts a supervisor for the lab's tailscaled in `dir`, with port-0 proxies, and returns it with
/// its evidence and its event stream.
async fn start_supervisor(
    lab: &Lab,
    dir: &Path,
    max_restarts: u32,
    healthy_period: Duration,
) -> (
    Supervisor,
    tailbox_proto::agent::v1::DaemonEvidence,
    tokio::sync::mpsc::Receiver<tailbox_agent::events::EventItem>,
) {
    let daemon_config = DaemonConfig {
        tailscaled_path: lab.bins().tailscaled().display().to_string(),
        ..Default::default()
    };
    let binary = provision::find(&daemon_config, None, &Host::default())
        .await
        .unwrap();
    let (tx, events) = tokio::sync::mpsc::channel(4096);
    let config = SupervisorConfig {
        binary,
        socket: PathBuf::from(socket_of(dir)),
        state: "mem:".into(),
        state_dir: dir.join("state"),
        proxy_listen: "127.0.0.1:0".parse().unwrap(),
        env: lab.tailscaled_env(),
        max_restarts,
        healthy_period,
        ready_timeout: Duration::from_secs(30),
        secrets: Vec::new(),
    };
    let (supervisor, evidence) = Supervisor::start(config, EventSink::new(tx)).await.unwrap();
    (supervisor, evidence, events)
}

/// Kills the tailscaled serving `socket` and waits until the supervisor has brought a new one
/// up (true) or given up (false).
async fn kill_and_wait(supervisor: &Supervisor, socket: &str) -> bool {
    let readiness = supervisor.daemon();
    kill(tailscaled_serving(socket));
    assert!(
        readiness
            .wait_not_ready(tokio::time::Instant::now() + Duration::from_secs(10))
            .await
    );
    readiness.wait().await
}

/// The `total` of each restart event.
fn supervisor_restarts(restarts: &[DaemonRestart]) -> Vec<u32> {
    restarts.iter().map(|r| r.total).collect()
}

/// The restart events received so far.
fn restart_events(
    events: &mut tokio::sync::mpsc::Receiver<tailbox_agent::events::EventItem>,
) -> Vec<DaemonRestart> {
    let mut restarts = Vec::new();
    while let Ok(item) = events.try_recv() {
        if let Some(event::Kind::DaemonRestart(r)) = item.unwrap().kind {
            restarts.push(r);
        }
    }
    restarts
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_until_the_budget_is_spent_then_the_daemon_is_gone() {
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let (supervisor, evidence, mut events) =
            start_supervisor(&lab, dir.path(), 2, Duration::from_secs(3600)).await;
        let socket = socket_of(dir.path());
        assert_eq!(tailscaled_serving(&socket), evidence.pid);
        assert_eq!(supervisor.pid(), Some(evidence.pid));
        let proxy = supervisor.proxy();
        // Port 0 gives tailscaled two listeners, both announced and both kept across restarts.
        let http_proxy = supervisor.http_proxy();
        assert_ne!(http_proxy.port(), 0);

        // Two deaths are within the budget: each is restarted and answers again, on the same
        // proxy address.
        for attempt in 1..=2 {
            let pid = tailscaled_serving(&socket);
            assert!(
                kill_and_wait(&supervisor, &socket).await,
                "restart #{attempt} came back"
            );
            assert_ne!(tailscaled_serving(&socket), pid);
            assert_eq!(supervisor.pid(), Some(tailscaled_serving(&socket)));
            assert_eq!(supervisor.proxy(), proxy);
            assert_eq!(supervisor.http_proxy(), http_proxy);
            supervisor.api().status(false).await.unwrap();
        }
        // The third death spends the budget.
        assert!(!kill_and_wait(&supervisor, &socket).await, "gone for good");
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
        assert_eq!(supervisor_restarts(&restarts), [1, 2]);
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

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_period_gives_the_daemon_a_fresh_restart_budget() {
    let lab = Lab::start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let healthy = Duration::from_secs(2);
        let (supervisor, _, mut events) = start_supervisor(&lab, dir.path(), 1, healthy).await;
        let socket = socket_of(dir.path());

        // One restart is the whole budget...
        assert!(kill_and_wait(&supervisor, &socket).await);
        // ...but after a healthy period, the next death is restart #1 of a fresh budget.
        tokio::time::sleep(healthy + Duration::from_millis(500)).await;
        assert!(
            kill_and_wait(&supervisor, &socket).await,
            "the budget was reset"
        );
        // A death right after that restart spends the fresh budget: a crash loop still ends.
        assert!(!kill_and_wait(&supervisor, &socket).await, "gone for good");

        let restarts = restart_events(&mut events);
        let attempts: Vec<u32> = restarts.iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, [1, 1], "{restarts:?}");
        assert_eq!(supervisor_restarts(&restarts), [1, 2]);
        assert_eq!(supervisor.restarts(), 2);
        assert_eq!(supervisor.pid(), None);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_daemon_is_killed_at_once_without_a_logout() {
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let (supervisor, evidence, _events) =
            start_supervisor(&lab, dir.path(), 2, Duration::from_secs(3600)).await;
        // Stopped, the process holds its socket but answers nothing, and ignores SIGTERM.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(evidence.pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        let started = Instant::now();
        let teardown = supervisor.leave_tailnet(Duration::from_secs(15)).await;
        let took = started.elapsed();
        assert_eq!(teardown.daemon_stop, "sigkill", "{teardown:?}");
        assert!(
            !teardown.logout_attempted && !teardown.logged_out,
            "{teardown:?}"
        );
        assert!(
            teardown.logout_error.contains("did not answer"),
            "{teardown:?}"
        );
        // One health probe (1 s), then the kill: nowhere near the 15 s grace.
        assert!(took < Duration::from_secs(3), "took {took:?}");
        let socket = socket_of(dir.path());
        assert!(
            processes_mentioning(&format!("--socket={socket}"))
                .unwrap()
                .is_empty()
        );
    })
    .await
    .expect("test timed out");
}
