//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` for `--time` seconds each, from the
//! committed corpus in `fuzz/corpus/<target>/`; fails on the first crash, naming the input that
//! caused it. `--list` prints the targets; `--capture` records fresh seeds from the lab into the
//! corpus (see [`capture`]).
//!
//! The targets are built once with nightly (`cargo +nightly fuzz build`, which `scripts/setup`
//! installs) and without a sanitizer: the code under test is safe Rust, so what the fuzzer looks
//! for is panics (overflow checks and debug assertions are on), hangs and runaway memory, and
//! AddressSanitizer would only slow every input down. What a run finds beyond the committed
//! corpus goes to `target/fuzz/corpus/<target>/` (kept between runs, never committed); a crashing
//! input to `target/fuzz/artifacts/<target>/`; the build to `target/fuzz/build/` (`target` is
//! `CARGO_TARGET_DIR` when set).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

mod capture;

/// `cargo xtask fuzz` options.
#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    time: u64,
    /// Print the targets and exit
    #[arg(long)]
    list: bool,
    /// Record seeds from a real lab (LocalAPI answers and IPN-bus lines, SOCKS5 replies, git
    /// answers, the agent's gRPC wire) into fuzz/corpus/, then exit
    #[arg(long, conflicts_with = "list")]
    capture: bool,
    /// Only these targets (default: all)
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
}

/// Longest one input may take before libFuzzer calls it a hang. The slowest targets bound
/// themselves well below this (a tunnel or a call must end within 10 s of the peer hanging up).
const INPUT_TIMEOUT_SECS: u64 = 15;

pub async fn run(workspace: &Path, args: FuzzArgs) -> Result<ExitCode> {
    let fuzz_dir = workspace.join("fuzz");
    if args.capture {
        capture::run(&fuzz_dir.join("corpus")).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let all = targets(&fuzz_dir).await?;
    if args.list {
        for target in &all {
            println!("{target}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let chosen: Vec<String> = if args.targets.is_empty() {
        all
    } else {
        for target in &args.targets {
            if !all.contains(target) {
                bail!(
                    "no fuzz target {target:?}; the targets are {}",
                    all.join(", ")
                );
            }
        }
        args.targets
    };
    // Everything cargo-fuzz builds and finds lives under the workspace's target directory (CI
    // keeps that one between runs).
    let scratch = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from)
        .join("fuzz");
    let build_dir = path_str(&scratch.join("build"))?;
    eprintln!("building {} fuzz targets with nightly", chosen.len());
    cargo_fuzz(
        &fuzz_dir,
        &["build", "--sanitizer", "none", "--target-dir", &build_dir],
    )
    .status()
    .await
    .context("running `cargo +nightly fuzz build` (scripts/setup installs cargo-fuzz)")?
    .success()
    .then_some(())
    .context("`cargo +nightly fuzz build` failed")?;
    let mut failed = Vec::new();
    for target in &chosen {
        match run_target(&fuzz_dir, &scratch, &build_dir, target, args.time).await? {
            None => {}
            Some(why) => failed.push(format!("{target}: {why}")),
        }
    }
    if failed.is_empty() {
        eprintln!(
            "fuzz: {} targets, {}s each, no crashes",
            chosen.len(),
            args.time
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for failure in &failed {
            eprintln!("error: {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// `cargo +nightly fuzz <args>` in `fuzz/`, without the variables of the stable cargo that runs
/// xtask (they would pin its toolchain).
fn cargo_fuzz(fuzz_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command
        .arg("+nightly")
        .arg("fuzz")
        .args(args)
        .current_dir(fuzz_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR");
    command
}

/// The targets `fuzz/Cargo.toml` declares, as cargo-fuzz lists them.
async fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let out = cargo_fuzz(fuzz_dir, &["list"])
        .output()
        .await
        .context("running `cargo +nightly fuzz list` (scripts/setup installs cargo-fuzz)")?;
    if !out.status.success() {
        bail!(
            "`cargo +nightly fuzz list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Runs one target for `secs`; `Some(why)` when it crashed, hung or ran out of memory.
async fn run_target(
    fuzz_dir: &Path,
    scratch: &Path,
    build_dir: &str,
    target: &str,
    secs: u64,
) -> Result<Option<String>> {
    let found = scratch.join("corpus").join(target);
    let artifacts = scratch.join("artifacts").join(target);
    let log = scratch.join("logs").join(format!("{target}.log"));
    // Only this run's crash is in the artifacts directory.
    let _ = std::fs::remove_dir_all(&artifacts);
    for dir in [&found, &artifacts, &scratch.join("logs")] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = fuzz_dir.join("corpus").join(target);
    if !seeds.is_dir() {
        bail!(
            "{target} has no committed corpus at {}; run `cargo xtask fuzz --capture`",
            seeds.display()
        );
    }
    // libFuzzer writes what it finds into the first directory; the committed seeds stay as they
    // are.
    let dirs = [path_str(&found)?, path_str(&seeds)?];
    let flags = [
        format!("-max_total_time={secs}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        format!("-artifact_prefix={}/", path_str(&artifacts)?),
        "-print_final_stats=1".to_owned(),
    ];
    let mut args = vec![
        "run",
        "--sanitizer",
        "none",
        "--target-dir",
        build_dir,
        target,
    ];
    args.extend(dirs.iter().map(String::as_str));
    args.push("--");
    args.extend(flags.iter().map(String::as_str));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let status = cargo_fuzz(fuzz_dir, &args)
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .await
        .with_context(|| format!("running fuzz target {target}"))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
            .to_owned()
    };
    if status.success() {
        eprintln!(
            "{target}: {} inputs in {secs}s, corpus {} seeds + {} found, no crash",
            stat("number_of_executed_units"),
            count(&seeds),
            count(&found),
        );
        return Ok(None);
    }
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    eprintln!("{target} failed; the end of {}:", log.display());
    for line in tail.into_iter().rev() {
        eprintln!("  {line}");
    }
    let input = std::fs::read_dir(&artifacts)
        .ok()
        .and_then(|entries| entries.flatten().map(|e| e.path()).next())
        .map_or_else(|| "no input saved".to_owned(), |p| p.display().to_string());
    Ok(Some(format!(
        "crashed ({status}); input {input}; repeat it with `cd fuzz && cargo +nightly fuzz run \
         --sanitizer none --target-dir {build_dir} {target} {input}`"
    )))
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Where a target's committed seeds live.
pub(crate) fn corpus_dir(corpus: &Path, target: &str) -> PathBuf {
    corpus.join(target)
}
