//! B4: the agent's upload into a Modal sandbox, through the fake Task Command Router with a slow
//! link (`Faults::router_rtt`, `Faults::router_bandwidth`), against its floor: the agent's bytes
//! at the link's speed plus one round trip. Then the same sandbox again (`--sandbox-id`): a
//! re-run uploads nothing, as the agent's path names its sha256.
//!
//! Each round is the real `tailbox check --sandbox modal --json` with no auth key and no
//! targets: the sandbox is created, the agent uploaded and run (its preflight), and the upload
//! phase's own duration and the report's `uploaded_bytes` are read from the JSON lines.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal, Faults};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

use super::{STEP_TIMEOUT, Stats, ms, parse_proto_duration};

/// The link B4 runs over.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Added to every router call.
    pub rtt: Duration,
    /// Bytes per second, each way.
    pub bandwidth: u64,
}

/// What B4 measured.
pub struct Upload {
    /// The upload phase of a fresh sandbox, in ms.
    pub first: Stats,
    /// Bytes each fresh sandbox got.
    pub first_bytes: Vec<u64>,
    /// The upload phase when the same sandbox is used again, in ms.
    pub again: Stats,
    /// Bytes each re-run uploaded (0 when content addressing works).
    pub again_bytes: Vec<u64>,
    /// Router calls the fresh upload phase made, and the re-run's (the fake's record).
    pub router_calls: (usize, usize),
    /// The upload phase of a fresh sandbox with no limit on the link: tailbox's and the fake's
    /// own time, in ms.
    pub unlimited: Stats,
}

impl Upload {
    /// bytes / bandwidth + one round trip, in ms.
    pub fn floor_ms(link: Link, bytes: u64) -> f64 {
        ms(Duration::from_secs_f64(bytes as f64 / link.bandwidth as f64) + link.rtt)
    }
}

/// `rounds` fresh sandboxes, each uploaded to and then reused once.
pub async fn measure(
    tailbox: &Path,
    agent: &Path,
    home: &Path,
    link: Link,
    rounds: usize,
) -> Result<Upload> {
    let fake = FakeModal::start_with(FakeConfig::default())
        .await
        .context("starting the fake Modal (B4 needs root, as its sandboxes do)")?;
    let limited = Faults {
        router_rtt: Some(link.rtt),
        router_bandwidth: Some(link.bandwidth),
        ..Faults::default()
    };
    let run = |extra: &[&str]| {
        let mut command = Command::new(tailbox);
        command
            .args(["check", "--sandbox", "modal", "--json", "--keep", "--agent"])
            .arg(agent)
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .envs(fake.env());
        command
    };
    let router_calls = || {
        fake.record()
            .calls
            .iter()
            .filter(|c| c.service == "router")
            .count()
    };
    let mut figures = Upload {
        first: Stats::of(Vec::new()),
        first_bytes: Vec::new(),
        again: Stats::of(Vec::new()),
        again_bytes: Vec::new(),
        router_calls: (0, 0),
        unlimited: Stats::of(Vec::new()),
    };
    let (mut first, mut again, mut unlimited) = (Vec::new(), Vec::new(), Vec::new());
    let mut created = Vec::new();
    for _ in 0..rounds {
        fake.set_faults(Faults::default());
        let free = upload_phase(run(&[])).await?;
        unlimited.push(ms(free.took));
        created.push(free.sandbox_id);

        fake.set_faults(limited.clone());
        let calls_before = router_calls();
        let fresh = upload_phase(run(&[])).await?;
        let calls_fresh = router_calls() - calls_before;
        first.push(ms(fresh.took));
        figures.first_bytes.push(fresh.bytes);

        let calls_before = router_calls();
        let reused =
            upload_phase(run(&["--sandbox-id", &fresh.sandbox_id, "--no-sidecar"])).await?;
        let calls_again = router_calls() - calls_before;
        again.push(ms(reused.took));
        figures.again_bytes.push(reused.bytes);
        figures.router_calls = (calls_fresh, calls_again);
        created.push(fresh.sandbox_id);
    }
    let mut terminate = Command::new(tailbox);
    terminate
        .args(["sandbox", "terminate"])
        .args(&created)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .envs(fake.env());
    fake.set_faults(Faults::default());
    super::expect_ok(terminate, "tailbox sandbox terminate").await?;
    figures.first = Stats::of(first);
    figures.again = Stats::of(again);
    figures.unlimited = Stats::of(unlimited);
    Ok(figures)
}

/// One run's upload phase.
struct Phase {
    sandbox_id: String,
    took: Duration,
    bytes: u64,
}

async fn upload_phase(mut command: Command) -> Result<Phase> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running tailbox check --sandbox modal")?;
    let stderr = tailbox_testkit::collect_stderr(&mut child);
    let stdout = child.stdout.take().context("tailbox's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut took = None;
    let mut report = Value::Null;
    let status = tokio::time::timeout(STEP_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let finished = &event["phase_finished"];
            if finished["phase"] == "PHASE_UPLOAD" {
                took = finished["duration"].as_str().and_then(parse_proto_duration);
            }
            if !event["report"].is_null() {
                report = event["report"].clone();
            }
        }
        child.wait().await
    })
    .await
    .context("tailbox check --sandbox modal did not finish")?
    .context("waiting for tailbox")?;
    let stderr = stderr.await.unwrap_or_default();
    if !status.success() {
        bail!("tailbox check --sandbox modal failed ({status}):\n{stderr}");
    }
    let sandbox = &report["sandbox"];
    let sandbox_id = sandbox["sandbox_id"]
        .as_str()
        .context("the report names no sandbox")?
        .to_owned();
    // proto3 JSON: a uint64 is a string.
    let bytes = match &sandbox["uploaded_bytes"] {
        Value::Null => 0,
        Value::String(text) => text.parse().context("uploaded_bytes is not a number")?,
        other => other.as_u64().context("uploaded_bytes is not a number")?,
    };
    Ok(Phase {
        sandbox_id,
        took: took.context("tailbox printed no upload phase")?,
        bytes,
    })
}
