//! A first `tailbox check` with nothing to check over the tailnet (issue #16): it runs what it
//! can, then says in one block what it did not check and which variables or flags would make it
//! check, and exits 0 (nothing failed). The real binaries: `tailbox`, the agent, and for the
//! auth-key case the lab's real tailnet.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tailbox_testkit::agent::agent_binary;
use tailbox_testkit::lab::{Binaries, Lab};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// What every variant of the block names.
const TARGET_HELP: [&str; 5] = [
    "`COOK_TAIL_IP` or pass `--ping HOST`",
    "`COOK_HTTP_URL` or pass `--http URL`",
    "`COOK_GIT_URL` or pass `--git URL`",
    "`--expect-ref NAME=SHA`",
    "`cargo xtask demo`",
];

/// Runs `tailbox` with only PATH, an empty HOME and `env` (no Modal credentials, so `auto`
/// picks the local backend).
async fn tailbox(args: &[&str], env: &[(&str, String)]) -> (Output, String, String) {
    let home = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailbox"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    (output, stdout, stderr)
}

/// The block, from its first line to the end of stderr.
fn block(stderr: &str) -> &str {
    let start = stderr
        .find("not checked: ")
        .unwrap_or_else(|| panic!("no \"not checked\" block:\n{stderr}"));
    &stderr[start..]
}

#[tokio::test(flavor = "multi_thread")]
async fn no_key_and_no_targets_runs_the_preflight_then_says_what_would_check_the_rest() {
    let agent = tokio::task::spawn_blocking(agent_binary).await.unwrap();
    let agent = agent.display().to_string();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (output, stdout, stderr) = tailbox(&["check", "--agent", &agent, "--no-sidecar"], &[]).await;
        // Not a failure: exit 0.
        assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(
            stderr.starts_with("sandbox: local (no Modal credentials are configured)"),
            "{stderr}"
        );
        // The table has the preflight and nothing else.
        let rows: Vec<&str> = stdout
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect();
        assert_eq!(rows.len(), 1, "{stdout}");
        let cells: Vec<&str> = rows[0].split_whitespace().take(3).collect();
        assert_eq!(cells, ["preflight", "-", "pass"], "{stdout}");
        assert!(stdout.contains("verdict: ok (1 passed"), "{stdout}");

        // One block after the run says what was not checked and what would check it.
        let block = block(&stderr);
        assert!(
            block.starts_with("not checked: with no auth key the sandbox joined no tailnet; nothing was pinged, fetched or cloned\n"),
            "{block}"
        );
        assert!(
            block.contains("set `TS_AUTHKEY` (ephemeral, pre-authorized) or pass `--auth-key-file PATH`"),
            "{block}"
        );
        for help in TARGET_HELP {
            assert!(block.contains(help), "{help} is not in\n{block}");
        }
        assert_eq!(block.lines().count(), 6, "{block}");
        // It comes after the run: nothing follows it.
        assert!(block.ends_with("in a tailbox checkout\n"), "{block}");

        // JSON stays the proto's report, one object per line, and nothing for people leaks in.
        let (output, stdout, stderr) = tailbox(&["check", "--agent", &agent, "--no-sidecar", "--json"], &[]).await;
        assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
        let events: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let report = &events.last().unwrap()["report"];
        assert_eq!(report["verdict"]["ok"], true, "{report:#}");
        let checks: Vec<&str> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(checks, ["preflight"], "{report:#}");
        assert!(!stderr.contains("not checked"), "{stderr}");

        // A fan-out says it once, after the summary, for all its sandboxes.
        let fanout = ["check", "--agent", &agent, "--no-sidecar", "--count", "2"];
        let (output, stdout, stderr) = tailbox(&fanout, &[]).await;
        assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
        assert_eq!(stderr.matches("not checked: ").count(), 1, "{stderr}");
        let fanout_block = self::block(&stderr);
        assert!(
            fanout_block.starts_with("not checked: with no auth key no sandbox joined a tailnet;"),
            "{fanout_block}"
        );
        for help in TARGET_HELP {
            assert!(fanout_block.contains(help), "{help} is not in\n{fanout_block}");
        }
        let mut json = fanout.to_vec();
        json.push("--json");
        let (output, stdout, stderr) = tailbox(&json, &[]).await;
        assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(!stderr.contains("not checked"), "{stderr}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_auth_key_and_no_targets_checks_login_and_status_then_says_what_would_check_the_rest() {
    Binaries::locate().await.unwrap();
    let agent = tokio::task::spawn_blocking(agent_binary).await.unwrap();
    let agent = agent.display().to_string();
    let lab = Lab::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tailscaled = lab.bins().tailscaled().display().to_string();
        let env = [
            (
                "TS_AUTHKEY",
                format!("file:{}", lab.auth_key_file().display()),
            ),
            ("TS_CONTROL_URL", lab.control_url().to_owned()),
            (
                "TAILBOX_TAILSCALED_ENV",
                serde_json::to_string(&lab.tailscaled_env()).unwrap(),
            ),
        ];
        let args = [
            "check",
            "--agent",
            &agent,
            "--tailscaled",
            &tailscaled,
            "--proxy-listen",
            "127.0.0.1:0",
            "--no-sidecar",
        ];
        let (output, stdout, stderr) = tailbox(&args, &env).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{stdout}\n{stderr}\nlab:\n{}",
            lab.log_tails()
        );
        // It checked what it could: the login and the node's status on the lab's tailnet.
        let status_of = |name: &str| {
            stdout
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} row:\n{stdout}"))
                .split_whitespace()
                .nth(2)
                .unwrap()
                .to_owned()
        };
        for check in ["preflight", "daemon", "login", "status"] {
            assert_eq!(status_of(check), "pass", "{check}:\n{stdout}");
        }
        assert!(
            !stdout.lines().any(|l| ["ping ", "http ", "git ", "netmap "]
                .iter()
                .any(|p| l.starts_with(p))),
            "{stdout}"
        );
        assert!(stdout.contains("verdict: ok ("), "{stdout}");

        // The block says the same as without a key, for the targets only.
        let block = block(&stderr);
        assert!(
            block.starts_with("not checked: no targets were given, so nothing on the dev host was pinged, fetched or cloned\n"),
            "{block}"
        );
        assert!(!block.contains("TS_AUTHKEY"), "{block}");
        for help in TARGET_HELP {
            assert!(block.contains(help), "{help} is not in\n{block}");
        }
        assert_eq!(block.lines().count(), 5, "{block}");
        assert!(!stdout.contains(lab.auth_key()) && !stderr.contains(lab.auth_key()));

        // A fan-out whose sandboxes joined says the same, once.
        let mut fanout = args.to_vec();
        fanout.extend(["--count", "2"]);
        let (output, stdout, stderr) = tailbox(&fanout, &env).await;
        assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
        assert_eq!(stderr.matches("not checked: ").count(), 1, "{stderr}");
        assert!(
            self::block(&stderr).starts_with("not checked: no targets were given,"),
            "{stderr}"
        );
    })
    .await
    .expect("test timed out");
}
