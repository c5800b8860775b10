//! The lab is a real tailnet: real tailscaled, real control, real DERP, real git.
//!
//! These never skip: if the binaries are missing, `Lab::start` fails and says to run
//! `lab/build.sh`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tailbox_testkit::describe_output;
use tailbox_testkit::lab::{Binaries, Lab, LabConfig, processes_mentioning, random_auth_key};
use tokio::process::Command;
use tokio::time::timeout;

/// Generous: two tailscaleds per test, several tests in parallel on two cores.
const TEST_DEADLINE: Duration = Duration::from_secs(180);

/// Finds (or, on a cold cache, builds for minutes) the binaries before a test's deadline starts.
async fn binaries_ready() {
    Binaries::locate()
        .await
        .expect("the tailnet lab binaries (see lab/README.md)");
}

/// A command with proxy-related and git-config variables from the host removed, so what we
/// measure is the lab, not the developer's shell.
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    tailbox_testkit::isolate_client(cmd.as_std_mut());
    cmd.kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_node_joins_and_reaches_the_dev_host() {
    binaries_ready().await;
    timeout(TEST_DEADLINE, async {
        let lab = Lab::start().await.expect("lab starts");

        // A second tailscaled, configured only through what the lab hands out, logged in with
        // the real CLI.
        let client = lab
            .start_node("client")
            .await
            .expect("client tailscaled starts");
        let up = client
            .tailscale()
            .arg("up")
            .arg(format!("--login-server={}", lab.control_url()))
            .arg(format!("--auth-key=file:{}", lab.auth_key_file().display()))
            .args(["--hostname=client", "--accept-dns=false", "--timeout=60s"])
            .output()
            .await
            .unwrap();
        assert!(
            up.status.success(),
            "tailscale up failed: {}",
            describe_output(&up)
        );
        let status = client
            .wait_for_state("Running", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!status.tailscale_ips.is_empty(), "{:?}", status.raw);

        // Disco ping over the real data path. It stops at the first direct pong; DERP-only
        // pongs still prove the tailnet, and then the CLI exits 1 with "direct connection not
        // established", which is accepted too.
        let peer_ip = lab.peer_ipv4().to_string();
        let ping = client
            .tailscale()
            .args(["ping", "--c=10", "--timeout=5s", &peer_ip])
            .output()
            .await
            .unwrap();
        let ping_out = String::from_utf8_lossy(&ping.stdout);
        let ping_err = String::from_utf8_lossy(&ping.stderr);
        assert!(
            ping_out.contains("pong from devhost")
                && (ping.status.success()
                    || ping_err.contains("direct connection not established")),
            "tailscale ping failed: {}\n{}",
            describe_output(&ping),
            lab.log_tails()
        );

        // HTTP through the client's SOCKS5 proxy to the dev host's tailnet address.
        let socks = client.socks5_addr().to_string();
        let curl = clean_command("curl")
            .args(["-fsS", "--max-time", "30", "--socks5-hostname", &socks])
            .arg(lab.health_url())
            .output()
            .await
            .unwrap();
        assert!(
            curl.status.success(),
            "curl failed: {}",
            describe_output(&curl)
        );
        assert_eq!(String::from_utf8_lossy(&curl.stdout), "ok");

        // git smart HTTP (protocol v2) through the same proxy, checked against the bare repo.
        let ls_remote = clean_command("git")
            .env("ALL_PROXY", format!("socks5h://{socks}"))
            .args(["-c", "protocol.version=2", "ls-remote"])
            .arg(lab.git_url())
            .output()
            .await
            .unwrap();
        assert!(
            ls_remote.status.success(),
            "git ls-remote failed: {}",
            describe_output(&ls_remote)
        );
        let listed: BTreeMap<String, String> = String::from_utf8_lossy(&ls_remote.stdout)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(sha, name)| (name.to_owned(), sha.to_owned()))
            .collect();
        for name in [
            "HEAD",
            "refs/heads/main",
            "refs/heads/feature",
            "refs/tags/v0.1.0",
        ] {
            let want = lab
                .git_ref(name)
                .unwrap_or_else(|| panic!("lab has no {name}"));
            assert_eq!(
                listed.get(name).map(String::as_str),
                Some(want),
                "{name}: {listed:?}"
            );
        }
        assert_eq!(lab.git_ref("HEAD"), lab.git_ref("refs/heads/main"));
        assert_ne!(
            lab.git_ref("refs/heads/main"),
            lab.git_ref("refs/heads/feature")
        );

        // Nothing in the lab tried to leave through the egress trap...
        assert_eq!(lab.trap_hits().await.unwrap(), 0, "{}", lab.log_tails());
        // ...and the proxies every node is given are that trap: they refuse and count.
        let env = lab.tailscaled_env();
        for (var, url, codes) in [
            ("HTTP_PROXY", "http://egress.invalid/", "403/000"),
            ("HTTPS_PROXY", "https://egress.invalid/", "000/403"),
        ] {
            let refused = clean_command("curl")
                .args(["-sS", "-o", "/dev/null", "--max-time", "10"])
                .args([
                    "-w",
                    "%{http_code}/%{http_connect}",
                    "--proxy",
                    &env[var],
                    url,
                ])
                .output()
                .await
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&refused.stdout),
                codes,
                "{var}: {}",
                describe_output(&refused)
            );
        }
        assert_eq!(lab.trap_hits().await.unwrap(), 2, "{}", lab.log_tails());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_auth_key_is_refused() {
    binaries_ready().await;
    timeout(TEST_DEADLINE, async {
        // A control that insists on a key we choose; the node brings another one.
        let lab = Lab::start_with(LabConfig::default().auth_key(random_auth_key()))
            .await
            .expect("lab starts");
        let intruder = lab.start_node("intruder").await.unwrap();
        let wrong = random_auth_key();
        assert_ne!(wrong, lab.auth_key());

        let err = intruder
            .up(lab.control_url(), &wrong, Duration::from_secs(30))
            .await
            .expect_err("control must refuse the wrong key");
        let msg = format!("{err:#}");
        assert!(msg.contains("invalid authkey"), "unexpected error: {msg}");

        let status = intruder.status().await.unwrap();
        assert_ne!(status.backend_state, "Running", "{:?}", status.raw);
        assert!(status.tailscale_ips.is_empty(), "{:?}", status.raw);
        // The daemon itself reports why: "... The last login error was: invalid authkey".
        assert!(
            status.health.iter().any(|h| h.contains("invalid authkey")),
            "{:?}",
            status.health
        );
    })
    .await
    .expect("test timed out");
}

/// (pid, start time) of a process, or None if it is gone. The start time guards against pid
/// reuse.
fn identity(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counted after the parenthesised command name.
    let after = stat.rsplit_once(')')?.1;
    let start = after.split_whitespace().nth(19)?.to_owned();
    Some((pid, start))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lab_leaves_nothing_behind() {
    binaries_ready().await;
    timeout(TEST_DEADLINE, async {
        let lab = Lab::start().await.expect("lab starts");
        let dir = lab.dir().to_string_lossy().into_owned();
        let pids = lab.pids();
        assert_eq!(pids.len(), 3, "control, dev host, peer");
        let alive: Vec<_> = pids.iter().map(|&p| identity(p)).collect();
        assert!(
            alive.iter().all(Option::is_some),
            "all lab processes run: {pids:?}"
        );
        let mentioning = processes_mentioning(&dir).unwrap();
        assert!(
            mentioning.len() >= 3,
            "lab processes carry the lab dir in argv: {mentioning:?}"
        );
        lab.check_alive().expect("every lab process is running");
        // The auth key is in a file, never on anyone's command line.
        assert_eq!(processes_mentioning(lab.auth_key()).unwrap(), vec![]);

        drop(lab);

        for before in alive.into_iter().flatten() {
            assert_ne!(
                identity(before.0),
                Some(before.clone()),
                "pid {} survived",
                before.0
            );
        }
        assert_eq!(
            processes_mentioning(&dir).unwrap(),
            vec![],
            "processes still mention {dir}"
        );
        assert!(!Path::new(&dir).exists(), "lab dir {dir} was not removed");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_control_closes_its_port_and_nodes_get_their_own_dirs() {
    binaries_ready().await;
    timeout(TEST_DEADLINE, async {
        let mut lab = Lab::start().await.expect("lab starts");
        let addr = lab.control_url().trim_start_matches("http://").to_owned();
        tokio::net::TcpStream::connect(&addr)
            .await
            .expect("control listens");

        lab.stop_control();
        lab.check_alive()
            .expect("a deliberately stopped control is not a failure");
        assert!(
            tokio::net::TcpStream::connect(&addr).await.is_err(),
            "control still accepts connections at {addr}"
        );

        // A node started now has nothing to log in to, and says so rather than hanging.
        let late = lab.start_node("late").await.unwrap();
        assert!(!late.dir().starts_with(lab.dir()));
        let err = late
            .up(lab.control_url(), lab.auth_key(), Duration::from_secs(5))
            .await
            .expect_err("no control, no login");
        assert!(format!("{err:#}").contains("timeout"), "{err:#}");
        let late_pid = late.pid();
        drop(late);
        assert!(
            identity(late_pid).is_none(),
            "node tailscaled survived its drop"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lab_process_that_dies_is_reported_with_its_log() {
    binaries_ready().await;
    timeout(TEST_DEADLINE, async {
        let lab = Lab::start().await.expect("lab starts");
        lab.check_alive().expect("every lab process is running");
        let devhost_dir = lab.dir().join("devhost");
        let devhost =
            processes_mentioning(&format!("devhost --dir={}", devhost_dir.display())).unwrap();
        let [(pid, _)] = devhost[..] else {
            panic!("expected one dev host process: {devhost:?}");
        };
        assert!(lab.pids().contains(&pid), "{pid} not in {:?}", lab.pids());

        let kill = Command::new("sh")
            .args(["-c", "kill -s KILL \"$1\"", "sh", &pid.to_string()])
            .output()
            .await
            .unwrap();
        assert!(
            kill.status.success(),
            "kill failed: {}",
            describe_output(&kill)
        );

        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        let err = loop {
            match lab.check_alive() {
                Err(e) => break format!("{e:#}"),
                Ok(()) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(()) => panic!("check_alive never noticed the dev host die"),
            }
        };
        assert!(
            err.contains("devhost exited unexpectedly (killed by signal 9)"),
            "{err}"
        );
        // The tail of its log comes along, so the failure says what the process last did.
        assert!(err.contains("devhost serving http on"), "{err}");
    })
    .await
    .expect("test timed out");
}

#[test]
fn missing_binaries_fail_loudly_and_name_the_build_script() {
    let err = Binaries::resolve(Some("/nonexistent/tailbox-lab-bin".into()))
        .expect_err("no binaries there");
    let msg = format!("{err:#}");
    assert!(msg.contains("lab/build.sh"), "{msg}");
    assert!(msg.contains("tailscaled"), "{msg}");
}
