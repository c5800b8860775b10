//! Fan-out on this machine against the lab's real tailnet: `tailbox check --sandbox local
//! --count 3 --json` runs three agents at once, each with its own tailscaled, state directory,
//! proxy port and hostname, and ends with one aggregated report.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tailbox_testkit::agent::agent_binary;
use tailbox_testkit::lab::{Binaries, Lab};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `tailbox check --sandbox local` against the lab with `extra` flags: stdout, stderr and
/// the exit code.
async fn check_local(lab: &Lab, extra: &[&str]) -> (String, String, Option<i32>) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("authkey");
    std::fs::write(&key, lab.auth_key()).unwrap();
    let mut args: Vec<String> = vec!["check".into(), "--sandbox".into(), "local".into()];
    args.extend(lab.local_agent_flags(&agent_binary(), &key));
    args.extend(lab.every_target_flags());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let out = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), dir.path())
        .args(&args)
        .envs(lab.tailbox_env())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (stdout, stderr, out.status.code())
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A proto3 JSON duration ("0.250s") in seconds.
fn seconds(value: &Value) -> f64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a duration: {value}"));
    text.trim_end_matches('s').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_local_agents_pass_and_the_aggregate_has_percentiles() {
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (stdout, stderr, code) = check_local(&lab, &["--count", "3", "--json"]).await;
        assert_eq!(
            code,
            Some(0),
            "stderr:\n{stderr}\nlab:\n{}",
            lab.log_tails()
        );
        let lines = json_lines(&stdout);

        // Every line but the last is one sandbox's, labelled with its slot and sandbox id.
        let (last, sandbox_lines) = lines.split_last().unwrap();
        let mut ids_by_slot = std::collections::BTreeMap::new();
        for line in sandbox_lines {
            let slot = line["slot"].as_u64().unwrap();
            assert!((1..=3).contains(&slot), "{line}");
            let id = line["sandbox_id"].as_str().unwrap();
            assert!(
                id.starts_with("local-"),
                "every sandbox line has its id: {line}"
            );
            assert!(
                line["event"].is_object() || line["sandbox"].is_object(),
                "{line}"
            );
            let first = ids_by_slot.entry(slot).or_insert_with(|| id.to_owned());
            assert_eq!(first, id, "one sandbox id per slot");
        }
        assert_eq!(ids_by_slot.len(), 3, "{ids_by_slot:?}");

        let fleet = &last["fleet_report"];
        assert!(fleet.is_object(), "the last line is the aggregate: {last}");
        assert_eq!(fleet["schema_version"], 1);
        assert_eq!(fleet["backend"], "local");
        assert_eq!(fleet["requested"], 3);
        assert_eq!(fleet["parallel"], 3, "the default is min(N, 8)");
        assert_eq!(fleet["ok"], true, "{fleet:#}");
        assert_eq!(fleet["exit_code"], 0);
        let sandboxes = fleet["sandboxes"].as_array().unwrap();
        assert_eq!(sandboxes.len(), 3);
        let mut hostnames = BTreeSet::new();
        let mut proxies = BTreeSet::new();
        let mut sockets = BTreeSet::new();
        for sandbox in sandboxes {
            assert_eq!(
                sandbox["status"], "FLEET_SANDBOX_STATUS_PASSED",
                "{sandbox:#}"
            );
            let report = &sandbox["report"];
            assert_eq!(report["verdict"]["ok"], true, "{report:#}");
            for check in report["checks"].as_array().unwrap() {
                assert_eq!(check["status"], "CHECK_STATUS_PASS", "{check:#}");
            }
            hostnames.insert(report["tailnet"]["hostname"].as_str().unwrap().to_owned());
            let daemon = report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "daemon")
                .unwrap();
            proxies.insert(
                daemon["daemon"]["proxy_address"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            sockets.insert(daemon["daemon"]["socket_path"].as_str().unwrap().to_owned());
            assert!(seconds(&sandbox["time_to_running"]) > 0.0, "{sandbox:#}");
            assert!(
                seconds(&sandbox["wall_time"]) >= seconds(&sandbox["time_to_running"]),
                "{sandbox:#}"
            );
        }
        assert_eq!(hostnames.len(), 3, "one hostname each: {hostnames:?}");
        assert!(
            hostnames.iter().all(|h| h.starts_with("tailbox-local-")),
            "{hostnames:?}"
        );
        assert_eq!(proxies.len(), 3, "one proxy port each: {proxies:?}");
        assert_eq!(sockets.len(), 3, "one state directory each: {sockets:?}");

        assert_eq!(
            fleet["by_status"],
            serde_json::json!([{"status": "FLEET_SANDBOX_STATUS_PASSED", "count": 3}])
        );
        assert_eq!(fleet["by_failure_class"], serde_json::json!([]));
        for name in [
            "create_time",
            "time_to_running",
            "ping_latency",
            "http_time_to_first_byte",
            "git_time",
        ] {
            let dist = &fleet[name];
            assert_eq!(dist["count"], 3, "{name}: {dist:#}");
            let (p50, p95, max) = (
                seconds(&dist["p50"]),
                seconds(&dist["p95"]),
                seconds(&dist["max"]),
            );
            assert!(p50 <= p95 && p95 <= max, "{name}: {dist:#}");
            assert!(max > 0.0, "{name}: {dist:#}");
            assert!(
                ids_by_slot
                    .values()
                    .any(|id| *id == dist["max_sandbox"]["sandbox_id"]),
                "{name}: the max names its sandbox: {dist:#}"
            );
        }
        let paths = &fleet["path_mix"];
        let pings: u64 = ["direct", "derp", "peer_relay"]
            .iter()
            .map(|p| paths[p].as_u64().unwrap())
            .sum();
        assert_eq!(pings, 3, "every ping has a path: {paths:#}");
        let slowest = fleet["slowest"]["sandbox_id"].as_str().unwrap();
        assert!(ids_by_slot.values().any(|id| id == slowest), "{fleet:#}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_human_summary_names_every_sandbox_and_the_percentiles() {
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let report_path = dir.path().join("fleet.json");
        let report_arg = report_path.display().to_string();
        let (stdout, stderr, code) =
            check_local(&lab, &["--count", "2", "--report", &report_arg]).await;
        assert_eq!(code, Some(0), "stderr:\n{stderr}");
        // On stdout: a row per sandbox, the counts, the percentiles, the verdict.
        assert!(stdout.starts_with("SANDBOX"), "{stdout}");
        assert!(
            stdout.contains("sandboxes: 2 passed, 0 failed, 0 errors"),
            "{stdout}"
        );
        assert!(stdout.contains("time to Running"), "{stdout}");
        assert!(stdout.contains("slowest: #"), "{stdout}");
        assert!(
            stdout.contains("verdict: ok (2 of 2 sandboxes passed)"),
            "{stdout}"
        );
        // Without a terminal: plain lines, each naming its sandbox.
        assert!(stderr.contains("[#1 local-"), "{stderr}");
        assert!(stderr.contains("[#2 local-"), "{stderr}");
        assert!(stderr.contains("✓ #1 local-"), "{stderr}");
        let fleet: Value =
            serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
        assert_eq!(
            fleet["requested"], 2,
            "--report holds the aggregate: {fleet:#}"
        );
        assert_eq!(fleet["sandboxes"].as_array().unwrap().len(), 2);
    })
    .await
    .unwrap();
}
