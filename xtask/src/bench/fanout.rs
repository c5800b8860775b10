//! B7: fan-out. `tailbox check --sandbox modal --count N` on the fake Modal with 100 ms added to
//! every `SandboxCreate`, its wall time against the same command for one sandbox. Runs have no
//! auth key and no targets (each sandbox gets the agent uploaded and runs its preflight): the
//! figure is what fan-out itself costs (creates, uploads and execs, `--parallel` at its default),
//! not N tailscaleds on a 2-core machine.
//!
//! Until `tailbox check` has `--count` (issue #10), B7 is "not available": the flag is looked
//! for in `tailbox check --help`, so B7 runs as soon as the binary has it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal, Faults};
use tokio::process::Command;

use super::{STEP_TIMEOUT, Stats, ms};

/// The fake's added latency on each `SandboxCreate`.
pub const CREATE_LATENCY: Duration = Duration::from_millis(100);

/// What B7 found.
pub enum FanOut {
    /// This `tailbox` has no `--count`.
    NotAvailable(&'static str),
    /// Wall times in ms: one sandbox, and N.
    Measured { n: usize, one: Stats, many: Stats },
}

/// `rounds` alternating pairs: one sandbox, then `n` (the other way round on odd rounds).
pub async fn measure(
    tailbox: &Path,
    agent: &Path,
    home: &Path,
    n: usize,
    rounds: usize,
) -> Result<FanOut> {
    if !has_count(tailbox).await? {
        return Ok(FanOut::NotAvailable(
            "not available: `tailbox check --count` has not landed",
        ));
    }
    let fake = FakeModal::start_with(FakeConfig::default())
        .await
        .context("starting the fake Modal (B7 needs root, as its sandboxes do)")?;
    fake.set_faults(Faults {
        latency: [("SandboxCreate".to_owned(), CREATE_LATENCY)].into(),
        ..Faults::default()
    });
    let wall = |count: usize| {
        let mut command = Command::new(tailbox);
        command
            .args(["check", "--sandbox", "modal", "--json", "--agent"])
            .arg(agent)
            .args(["--count", &count.to_string()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .envs(fake.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        async move {
            let started = Instant::now();
            let output = tokio::time::timeout(STEP_TIMEOUT, command.output())
                .await
                .context("tailbox check --count did not finish")?
                .context("running tailbox check --count")?;
            if !output.status.success() {
                bail!(
                    "tailbox check --count {count} failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Ok(ms(started.elapsed()))
        }
    };
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            one.push(wall(1).await?);
            many.push(wall(n).await?);
        } else {
            many.push(wall(n).await?);
            one.push(wall(1).await?);
        }
    }
    let created = fake.record().sandboxes.len();
    let expected = rounds * (n + 1);
    if created != expected {
        bail!("the fake Modal saw {created} sandboxes created, not {expected}");
    }
    Ok(FanOut::Measured {
        n,
        one: Stats::of(one),
        many: Stats::of(many),
    })
}

/// Whether `tailbox check` takes `--count`.
async fn has_count(tailbox: &Path) -> Result<bool> {
    let mut help = Command::new(tailbox);
    help.args(["check", "--help"]);
    let output = super::output_of(help, "tailbox check --help").await?;
    if !output.status.success() {
        bail!("`tailbox check --help` failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).contains("--count"))
}
