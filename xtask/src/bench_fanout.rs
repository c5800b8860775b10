//! B7: fan-out. `tailbox check --sandbox modal --count N` (N = 50; 10 with `--quick`) through
//! the fake Modal, each `SandboxCreate` answered after 100 ms, against one sandbox
//! (`--count 1`) on the same fake, alternating. Every sandbox uploads the agent, starts a real
//! tailscaled in its own network namespace, joins the lab's tailnet and runs ping, HTTP and git;
//! the figure is the wall time of the whole run, N against 1 (the ideal with `--parallel 8` is
//! about N/8).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal};
use tailbox_testkit::lab::Lab;

use super::{Pair, STEP_TIMEOUT};

/// The create latency the issue measures the fan-out with.
const CREATE_LATENCY: Duration = Duration::from_millis(100);

/// B7's figures.
pub(super) struct Fanout {
    /// How many sandboxes the fan-out ran.
    pub n: u32,
    /// Wall time of N sandboxes (tailbox) against one (baseline).
    pub pair: Pair,
    /// The last fan-out's aggregate (its percentiles), as JSON.
    pub last_report: Value,
}

/// Runs B7 for `rounds` pairs.
pub(super) async fn measure(
    tailbox: &Path,
    agent: &Path,
    lab: &Lab,
    quick: bool,
    rounds: usize,
) -> Result<Fanout> {
    let n = if quick { 10 } else { 50 };
    let fake = FakeModal::start_with(FakeConfig::default().reaching(lab)).await?;
    fake.update_faults(|f| {
        f.latency.insert("SandboxCreate".into(), CREATE_LATENCY);
    });
    let mut many = Vec::new();
    let mut one = Vec::new();
    let mut last_report = Value::Null;
    for round in 0..rounds {
        eprintln!(
            "bench: B7 round {}/{rounds}: {n} sandboxes and 1",
            round + 1
        );
        let order: [u32; 2] = if round % 2 == 0 { [n, 1] } else { [1, n] };
        for count in order {
            let (wall, report) = run(tailbox, agent, lab, &fake, count).await?;
            if count == n {
                many.push(wall);
                last_report = report;
            } else {
                one.push(wall);
            }
        }
    }
    Ok(Fanout {
        n,
        pair: Pair::new(many, one),
        last_report,
    })
}

/// One `tailbox check --sandbox modal --count COUNT`; its wall time and last JSON line.
async fn run(
    tailbox: &Path,
    agent: &Path,
    lab: &Lab,
    fake: &FakeModal,
    count: u32,
) -> Result<(Duration, Value)> {
    let home = tempfile::tempdir().context("creating a HOME for tailbox")?;
    let started = Instant::now();
    let child = tailbox_testkit::tailbox_command(tailbox, home.path())
        .args(["check", "--sandbox", "modal", "--json", "--count"])
        .arg(count.to_string())
        .arg("--agent")
        .arg(agent)
        .arg("--tailscaled")
        .arg(lab.bins().tailscaled())
        .envs(lab.developer_env())
        .envs(fake.env())
        .spawn()
        .context("starting tailbox")?;
    let output = tokio::time::timeout(STEP_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("tailbox --count {count} took over {STEP_TIMEOUT:?}"))??;
    let wall = started.elapsed();
    if !output.status.success() {
        bail!(
            "tailbox check --count {count} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(last).unwrap_or(Value::Null);
    Ok((wall, report))
}
