//! What tools and people get from a real run against the lab: every `--json` line and the
//! `--report` file validate against the committed JSON Schemas (`docs/schema/`); `--timeline`
//! draws the phases on stderr; `--report-html` writes a page that headless Chromium draws, with
//! the waterfall, the checks with failures first, and the hints.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};
use tailbox_testkit::agent::agent_binary;
use tailbox_testkit::chromium;
use tailbox_testkit::contract::{Contract, Document};
use tailbox_testkit::lab::{Binaries, Lab};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs the real `tailbox check --sandbox local` against the lab with every kind of target, one
/// of them failing (a 503), and returns (exit code, JSON lines, stderr).
async fn run(lab: &Lab, extra: &[String]) -> (Option<i32>, Vec<Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("authkey");
    std::fs::write(&key, lab.auth_key()).unwrap();
    let mut args: Vec<String> = [
        "check",
        "--sandbox",
        "local",
        "--json",
        "--no-sidecar",
        "--proxy-listen",
        "127.0.0.1:0",
        "--color",
        "never",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(lab.local_agent_flags(&agent_binary(), &key));
    args.extend([
        "--ping".into(),
        lab.peer_ipv4().to_string(),
        "--http".into(),
        lab.health_url(),
        "--http".into(),
        format!("{}/status/503", lab.http_base_url()),
        "--git".into(),
        lab.git_url(),
    ]);
    args.extend(extra.iter().cloned());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailbox"))
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env(
            "TAILBOX_TAILSCALED_ENV",
            serde_json::to_string(&lab.tailscaled_env()).unwrap(),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let events = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nstderr:\n{stderr}"))
        })
        .collect();
    (output.status.code(), events, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_runs_events_report_timeline_and_html_page() {
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let report_path = out.path().join("report.json");
    let html_path = out.path().join("report.html");
    let (code, events, stderr) = run(
        &lab,
        &[
            "--report".into(),
            report_path.display().to_string(),
            "--report-html".into(),
            html_path.display().to_string(),
            "--timeline".into(),
        ],
    )
    .await;
    assert_eq!(code, Some(1), "the 503 fails the run\nstderr:\n{stderr}");

    // The contract: every line, and the report file, against the committed schemas.
    let contract = Contract::load(&workspace());
    assert!(events.len() > 10, "only {} events:\n{stderr}", events.len());
    let mut kinds = std::collections::BTreeSet::new();
    for event in &events {
        contract.assert_valid(Document::Event, event);
        let kind = event
            .as_object()
            .unwrap()
            .keys()
            .find(|k| !["seq", "time"].contains(&k.as_str()))
            .cloned()
            .unwrap_or_default();
        kinds.insert(kind);
    }
    for kind in [
        "phase_started",
        "phase_finished",
        "check_started",
        "check",
        "report",
    ] {
        assert!(kinds.contains(kind), "no {kind} event among {kinds:?}");
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    contract.assert_valid(Document::Report, &report);
    assert_eq!(&report, &events.last().unwrap()["report"]);
    // The schema is not a formality: the same report with a wrong type or a missing field fails.
    let mut broken = report.clone();
    broken["checks"][0]["duration"] = json!(1.5);
    assert!(!contract.is_valid(Document::Report, &broken));
    let mut broken = report.clone();
    broken["verdict"].as_object_mut().unwrap().remove("ok");
    assert!(!contract.is_valid(Document::Report, &broken));
    let mut broken = events[0].clone();
    broken["seq"] = json!(3);
    assert!(
        !contract.is_valid(Document::Event, &broken),
        "uint64 is a string"
    );

    // The controller's phases lead the report's, so the waterfall starts at the sandbox.
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "PHASE_SANDBOX",
            "PHASE_PREFLIGHT",
            "PHASE_DAEMON",
            "PHASE_LOGIN",
            "PHASE_CHECKS",
            "PHASE_TEARDOWN"
        ]
    );

    // --timeline: a row per phase, in order, on stderr after the table.
    let sandbox_id = report["sandbox"]["sandbox_id"].as_str().unwrap();
    let timeline: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with(&format!("timeline of {sandbox_id}: ")))
        .collect();
    assert!(timeline.len() >= 8, "no timeline on stderr:\n{stderr}");
    let rows: Vec<&str> = timeline[2..8]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        rows,
        [
            "sandbox",
            "preflight",
            "tailscaled",
            "login",
            "checks",
            "teardown"
        ],
        "{stderr}"
    );
    assert!(timeline[2..8].iter().all(|l| l.contains('█')), "{stderr}");
    assert!(
        timeline[6].ends_with("FAIL"),
        "the checks phase failed:\n{stderr}"
    );

    // --report-html: drawn by a real browser.
    let page = std::fs::read_to_string(&html_path).unwrap();
    for external in ["<script", "src=", "href=", "@import", "url("] {
        assert!(
            !page.contains(external),
            "{external} in the page: it must be self-contained"
        );
    }
    let shot = out.path().join("report.png");
    let rendered = chromium::render(&html_path, &shot);
    assert_drawn(&rendered, &report, 1);
}

/// The same for a fan-out of three local sandboxes: every line is a `FleetEvent`, the aggregate
/// validates, the timeline has a row per sandbox, and the page has three lanes, the aggregate's
/// figures and the histograms. Its screenshot is the README's (`scripts/report-screenshot`).
#[tokio::test(flavor = "multi_thread")]
async fn a_real_fan_outs_lines_aggregate_timeline_and_html_page() {
    Binaries::locate().await.unwrap();
    let lab = Lab::start().await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let report_path = out.path().join("fleet.json");
    let html_path = out.path().join("fleet.html");
    let (code, lines, stderr) = run(
        &lab,
        &[
            "--count".into(),
            "3".into(),
            "--report".into(),
            report_path.display().to_string(),
            "--report-html".into(),
            html_path.display().to_string(),
            "--timeline".into(),
        ],
    )
    .await;
    assert_eq!(
        code,
        Some(1),
        "the 503 fails every sandbox\nstderr:\n{stderr}"
    );

    let contract = Contract::load(&workspace());
    for line in &lines {
        contract.assert_valid(Document::FleetEvent, line);
        // What a sandbox line carries is a plain event, valid on its own too.
        if line["event"].is_object() {
            contract.assert_valid(Document::Event, &line["event"]);
        }
    }
    let fleet: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    contract.assert_valid(Document::FleetReport, &fleet);
    assert_eq!(&fleet, &lines.last().unwrap()["fleet_report"]);
    let sandboxes = fleet["sandboxes"].as_array().unwrap();
    assert_eq!(sandboxes.len(), 3);
    for sandbox in sandboxes {
        contract.assert_valid(Document::Report, &sandbox["report"]);
    }
    let mut broken = fleet.clone();
    broken["sandboxes"][0]["slot"] = json!("1");
    assert!(!contract.is_valid(Document::FleetReport, &broken));

    // --timeline: one row per sandbox, each named, and a legend.
    let timeline: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("timeline of 3 sandboxes: "))
        .collect();
    assert!(timeline.len() >= 6, "no timeline on stderr:\n{stderr}");
    for sandbox in sandboxes {
        let id = sandbox["sandbox_id"].as_str().unwrap();
        assert!(
            timeline[2..5]
                .iter()
                .any(|l| l.trim_start().starts_with(id)),
            "no row for {id}:\n{stderr}"
        );
    }
    assert!(timeline[5].contains("s sandbox"), "no legend:\n{stderr}");

    let shot = out.path().join("fleet.png");
    let rendered = chromium::render(&html_path, &shot);
    assert_drawn(&rendered, &sandboxes[0]["report"], 3);
    let dom = &rendered.dom;
    assert!(
        dom.contains("<section id=\"fleet\">"),
        "no aggregate figures:\n{dom}"
    );
    assert!(dom.contains("<td>time to Running</td><td>3</td>"), "{dom}");
    for metric in [
        "sandbox_create",
        "time_to_running",
        "ping_latency",
        "http_ttfb",
        "git_time",
    ] {
        assert!(
            dom.contains(&format!("data-metric=\"{metric}\" data-samples=\"")),
            "no {metric} histogram:\n{dom}"
        );
    }
    if let Ok(keep) = std::env::var("TAILBOX_REPORT_SCREENSHOT") {
        std::fs::copy(&shot, &keep).unwrap();
        eprintln!("screenshot copied to {keep}");
    }
}

/// What the page must show once drawn: `sandboxes` lanes in the waterfall, every check of the
/// report in the table with failures first, each hint, and pixels of the phases' colours.
fn assert_drawn(rendered: &chromium::Rendered, report: &Value, sandboxes: usize) {
    let dom = &rendered.dom;
    assert!(
        dom.contains(&format!("data-sandboxes=\"{sandboxes}\"")),
        "the page is not for {sandboxes} sandbox(es):\n{dom}"
    );
    assert!(
        dom.contains("<svg id=\"waterfall-svg\""),
        "no waterfall:\n{dom}"
    );
    let phases = report["phases"].as_array().unwrap().len();
    let lanes = dom.matches("<g class=\"lane\"").count();
    assert_eq!(
        lanes,
        if sandboxes == 1 { phases } else { sandboxes },
        "{dom}"
    );
    assert!(
        dom.matches("<rect class=\"phase ").count() >= phases,
        "{dom}"
    );
    let rows: Vec<&str> = dom
        .split("<tr class=\"check ")
        .skip(1)
        .map(|r| r.split('"').next().unwrap())
        .collect();
    let checks = report["checks"].as_array().unwrap().len() * sandboxes;
    assert_eq!(rows.len(), checks, "{dom}");
    assert_eq!(rows[0], "fail", "failures first: {rows:?}");
    let first_pass = rows.iter().position(|r| *r == "pass").unwrap();
    assert!(rows[first_pass..].iter().all(|r| *r == "pass"), "{rows:?}");
    for check in report["checks"].as_array().unwrap() {
        let status = check["status"].as_str().unwrap();
        let hint = check["hint"].as_str().unwrap();
        if matches!(status, "CHECK_STATUS_FAIL" | "CHECK_STATUS_WARN") && !hint.is_empty() {
            let escaped = hint
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            assert!(dom.contains(&escaped), "hint {hint:?} is not on the page");
        }
    }

    // The screenshot is a drawing, not a blank page: much of it differs from the background,
    // and the login and checks bars are there in their colours.
    let pixels = chromium::count_pixels(&rendered.png, &[[0xe8, 0x84, 0x5c], [0xb5, 0x73, 0xb5]]);
    assert!(
        pixels.drawn * 50 > pixels.total,
        "the screenshot is nearly blank: {pixels:?}"
    );
    assert!(
        pixels.of_colour.iter().all(|n| *n > 50),
        "the login or checks bar is not drawn: {pixels:?}"
    );
}
