//! `cargo xtask bench [--quick]`: tailbox measured side by side with the spike's way and with
//! containerboot, on the real lab (control, DERP, a dev-host tailscaled with HTTP and git).
//!
//! Each pair runs alternately (tailbox first on even rounds, the baseline first on odd ones) so
//! drift on a shared machine hits both sides alike. Every figure is the median with the min–max
//! over the rounds. The table of ratios goes to stdout and the figures, as JSON, to a file
//! (`target/bench/bench.json` unless `--json PATH`). Timings are reported, never judged: the
//! budgets CI asserts are sizes and memory (see `docs/benchmarks.md`).
//!
//! - B1: the checks phase (the agent's own phase duration from the report) against the spike's
//!   separate processes on the same targets: `tailscale status`, `tailscale ping -c 1`,
//!   `curl --socks5-hostname`, `ALL_PROXY=socks5h://… git ls-remote`; and both against the
//!   floor, one request per check from the bench's own process the moment a node is Running
//!   (`floor.rs`), which shows how much of B1 is the tailnet's and the servers' own.
//! - B2: start to Running (the agent's daemon + login phases) against spawning tailscaled,
//!   polling its socket and `tailscale up`; and both against the floor, a bare LocalAPI client
//!   in the bench's own process (`floor.rs`), which shows how much of B2 is tailscaled's own.
//! - B3: the whole `tailbox check --sandbox local` against the whole spike sequence (the same
//!   steps, then `tailscale logout` and stopping tailscaled).
//! - B5: the agent's peak RSS in a run, and an idle sidecar's RSS, against containerboot's own
//!   process (built by `lab/build.sh` from the same pin, userspace mode against the lab);
//!   tailscaled's beside each for context.
//! - B4: the agent's upload through the fake Modal's router over a slow link, against
//!   bytes / bandwidth + one round trip; and what a re-run uploads (`upload.rs`).
//! - B6: gRPC over stdio: unary p50/p99 against a pipe echo of the same bytes, streamed events
//!   per second, the static musl agent against a glibc build (`stdio.rs`).
//! - B7: fan-out, N = 50 sandboxes through the fake Modal with a 100 ms create, against one
//!   (`bench_fanout.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tailbox_proto::agent::v1::sidecar_client::SidecarClient;
use tailbox_proto::agent::v1::{SidecarState, UpRequest};
use tailbox_proto::arch::Arch;
use tailbox_testkit::lab::Lab;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::static_agent;

#[path = "bench_fanout.rs"]
mod fanout;
mod floor;
mod stdio;
mod upload;

/// What `cargo xtask bench` was asked for.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A short smoke run for CI: two rounds, a debug controller, a 2 s idle for the memory
    /// figures. The figures are printed like a full run's but are too few to quote.
    #[arg(long)]
    quick: bool,

    /// Rounds (pairs) per benchmark [default: 9, or 2 with --quick].
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,

    /// How long the sidecar and containerboot sit idle before their RSS is read, e.g. `60s`
    /// [default: 60s, or 2s with --quick].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    idle: Option<Duration>,

    /// Bench this agent instead of building the static one: another build, or a wrapper script
    /// that `exec`s one with a setting to compare (docs/benchmarks.md, levers).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,

    /// Also measure B6 (gRPC over stdio) on this agent build and print the static agent's
    /// figures against it: e.g. the agent as it was before a change, built from its commit.
    #[arg(long, value_name = "PATH")]
    compare_agent: Option<PathBuf>,

    /// Where to write the figures as JSON [default: target/bench/bench.json].
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// How long any one step may take before the bench gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(workspace: &Path, args: BenchArgs) -> Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 9 }).max(1);
    let idle = args
        .idle
        .unwrap_or(Duration::from_secs(if args.quick { 2 } else { 60 }));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let json_path = args
        .json
        .unwrap_or_else(|| target_dir.join("bench").join("bench.json"));

    eprintln!("bench: building the controller and the static agent");
    let tailbox = build_tailbox(workspace, &target_dir, !args.quick)?;
    let agent = match args.agent {
        Some(agent) => {
            std::path::absolute(&agent).with_context(|| format!("resolving {}", agent.display()))?
        }
        None => {
            let host = Arch::host().context("this machine's architecture has no agent build")?;
            static_agent::build_and_verify(workspace, host)?
        }
    };
    let agent_bytes = std::fs::metadata(&agent)
        .with_context(|| format!("reading {}", agent.display()))?
        .len();

    eprintln!("bench: starting the lab");
    let lab = Lab::start().await?;
    let work = tempfile::Builder::new()
        .prefix("tailbox-bench-")
        .tempdir()
        .context("creating the bench's temp dir")?;
    let key_file = work.path().join("authkey");
    write_private(&key_file, lab.auth_key())?;
    let setup = Setup {
        lab: &lab,
        tailbox: tailbox.clone(),
        agent: agent.clone(),
        key_file,
        work: work.path().to_owned(),
    };

    let mut tailbox_runs = Vec::new();
    let mut spike_runs = Vec::new();
    let mut floor_runs = Vec::new();
    for round in 0..rounds {
        eprintln!("bench: round {}/{rounds}", round + 1);
        // Each of the three goes first, second and third in turn.
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => tailbox_runs.push(setup.tailbox_run(round).await?),
                1 => spike_runs.push(setup.spike_run(round).await?),
                _ => floor_runs.push(setup.floor_run(round).await?),
            }
        }
    }

    eprintln!(
        "bench: idle memory: sidecar and containerboot side by side for {}",
        humantime::format_duration(idle)
    );
    let (sidecar, containerboot) =
        tokio::try_join!(setup.idle_sidecar(idle), setup.containerboot(idle))?;
    eprintln!("bench: B7, fan-out through the fake Modal");
    let b7 = fanout::measure(&setup.tailbox, &agent, &lab, args.quick, rounds).await?;
    let lab_tailscaled = lab.bins().tailscaled();
    drop(setup);
    drop(lab);

    eprintln!(
        "bench: B4: uploads through the fake Modal's router ({} round trip, {} MiB/s)",
        humantime::format_duration(UPLOAD_LINK.rtt),
        UPLOAD_LINK.bandwidth >> 20
    );
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).context("creating the bench's HOME")?;
    let uploads = upload::measure(&tailbox, &agent, &home, UPLOAD_LINK, rounds).await?;
    if uploads.again_bytes.iter().any(|&b| b != 0) {
        bail!(
            "a re-run uploaded {:?} bytes: the agent's upload is not content-addressed",
            uploads.again_bytes
        );
    }
    let upload_floor = upload::Upload::floor_ms(UPLOAD_LINK, agent_bytes);
    if uploads.first.min < upload_floor {
        bail!(
            "an upload took {:.1}ms, under its floor of {upload_floor:.1}ms: the fake's link \
             model is broken",
            uploads.first.min
        );
    }

    eprintln!("bench: B6: gRPC over stdio, the musl agent and a glibc build");
    let glibc_agent = build_glibc_agent(workspace, &target_dir, !args.quick)?;
    let sizes = if args.quick {
        stdio::Sizes {
            calls: 500,
            events: 1000,
            streams: rounds,
        }
    } else {
        stdio::Sizes {
            calls: 5000,
            events: 5000,
            streams: rounds,
        }
    };
    let musl_stdio = stdio::agent(&agent, sizes).await?;
    let glibc_stdio = stdio::agent(&glibc_agent, sizes).await?;
    let echo = stdio::pipe_echo(musl_stdio.hello_bytes.0 as usize, sizes.calls).await?;
    let compared_stdio = match &args.compare_agent {
        Some(path) => Some((path, stdio::agent(path, sizes).await?)),
        None => None,
    };

    let b1 = Pair::new(
        tailbox_runs.iter().map(|r| r.checks).collect(),
        spike_runs.iter().map(|r| r.checks).collect(),
    );
    let b2 = Pair::new(
        tailbox_runs.iter().map(|r| r.daemon_login).collect(),
        spike_runs.iter().map(|r| r.to_running).collect(),
    );
    let b3 = Pair::new(
        tailbox_runs.iter().map(|r| r.wall).collect(),
        spike_runs.iter().map(|r| r.wall).collect(),
    );
    let agent_peak = Stats::of(
        tailbox_runs
            .iter()
            .map(|r| r.agent_peak_kib as f64)
            .collect(),
    );
    let tailscaled_peak = Stats::of(
        tailbox_runs
            .iter()
            .map(|r| r.tailscaled_peak_kib as f64)
            .collect(),
    );

    // Where the checks phase goes: each check's own duration (they overlap where they run
    // concurrently, so they need not add up to the phase).
    let mut per_check: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in &tailbox_runs {
        for (name, took) in &run.check_times {
            per_check.entry(name.clone()).or_default().push(ms(*took));
        }
    }
    let per_check: BTreeMap<String, Stats> = per_check
        .into_iter()
        .map(|(name, samples)| (name, Stats::of(samples)))
        .collect();

    let mut table = Table::default();
    table.time("B1", "checks phase", "spike: 4 processes", &b1);
    for (name, stats) in &per_check {
        table.stats("B1", &format!("  {name} check"), stats);
    }
    let mut spike_steps: Vec<(&str, Vec<f64>)> = Vec::new();
    for run in &spike_runs {
        for (name, took) in &run.steps {
            match spike_steps.iter_mut().find(|(n, _)| n == name) {
                Some((_, samples)) => samples.push(ms(*took)),
                None => spike_steps.push((name, vec![ms(*took)])),
            }
        }
    }
    let spike_steps: Vec<(&str, Stats)> = spike_steps
        .into_iter()
        .map(|(name, samples)| (name, Stats::of(samples)))
        .collect();
    for (name, stats) in &spike_steps {
        table.stats("B1", &format!("  spike: {name}"), stats);
    }
    let floor_part = |part: fn(&floor::ChecksFloor) -> Duration| {
        Stats::of(floor_runs.iter().map(|r| ms(part(&r.checks))).collect())
    };
    // (JSON key, row, figures)
    let b1_floor_parts = [
        ("ping", "disco ping", floor_part(|c| c.ping)),
        (
            "http",
            "HTTP GET through the tailnet",
            floor_part(|c| c.http),
        ),
        (
            "git_connect",
            "git's SOCKS5 connection open",
            floor_part(|c| c.git_connect),
        ),
        (
            "git",
            "git listing through the tailnet",
            floor_part(|c| c.git),
        ),
        (
            "git_server_on_loopback",
            "git listing on loopback (server alone)",
            floor_part(|c| c.git_server),
        ),
    ];
    // A round over a second waited out a lost first WireGuard handshake (5 s; `floor.rs`).
    let over_a_second = |phases: Vec<Duration>| {
        phases
            .into_iter()
            .filter(|d| *d > Duration::from_secs(1))
            .count()
    };
    let b1_stalls = [
        (
            "tailbox",
            over_a_second(tailbox_runs.iter().map(|r| r.checks).collect()),
        ),
        (
            "spike",
            over_a_second(spike_runs.iter().map(|r| r.checks).collect()),
        ),
        (
            "floor",
            over_a_second(floor_runs.iter().map(|r| r.checks.phase).collect()),
        ),
    ];
    table.context(
        "B1",
        "  rounds over 1 s (a lost first handshake)",
        &format!(
            "tailbox {}, spike {}, floor {} (of {rounds} each)",
            b1_stalls[0].1, b1_stalls[1].1, b1_stalls[2].1
        ),
    );
    let (b1_floor, b1_spike_floor) = table.floor(
        "B1",
        "checks phase against the floor",
        "floor: one request per check",
        Sides {
            tailbox: tailbox_runs.iter().map(|r| r.checks).collect(),
            spike: spike_runs.iter().map(|r| r.checks).collect(),
            floor: floor_runs.iter().map(|r| r.checks.phase).collect(),
        },
        &b1_floor_parts
            .iter()
            .map(|(_, row, stats)| (*row, stats))
            .collect::<Vec<_>>(),
    );
    table.time("B2", "start to Running", "spike: spawn, poll, up", &b2);
    let b2_parts = Pair::new(
        tailbox_runs.iter().map(|r| r.daemon).collect(),
        spike_runs.iter().map(|r| r.to_socket).collect(),
    );
    table.time(
        "B2",
        "  daemon phase / spike to socket",
        "spawn to socket accepting",
        &b2_parts,
    );
    let b2_login = Pair::new(
        tailbox_runs
            .iter()
            .map(|r| r.daemon_login - r.daemon)
            .collect(),
        spike_runs
            .iter()
            .map(|r| r.to_running - r.to_socket)
            .collect(),
    );
    table.time("B2", "  login phase", "`tailscale up`", &b2_login);
    let ready = Stats::of(tailbox_runs.iter().map(|r| ms(r.daemon_ready)).collect());
    table.stats("B2", "  of the daemon phase: spawn to LocalAPI", &ready);
    let version = version_floor(&lab_tailscaled, rounds.max(5)).await?;
    table.stats(
        "B2",
        "  of the daemon phase: tailscaled --version",
        &version,
    );
    let floor_socket = Stats::of(floor_runs.iter().map(|r| ms(r.login.to_socket)).collect());
    let floor_backend = Stats::of(
        floor_runs
            .iter()
            .map(|r| ms(r.login.to_backend - r.login.to_socket))
            .collect(),
    );
    let floor_register = Stats::of(
        floor_runs
            .iter()
            .map(|r| ms(r.login.to_running - r.login.to_backend))
            .collect(),
    );
    let floor_home_derp = Stats::of(
        floor_runs
            .iter()
            .map(|r| ms(r.login.to_home_derp - r.login.to_running))
            .collect(),
    );
    let (b2_floor, spike_floor) = table.floor(
        "B2",
        "start to Running against the floor",
        "floor: bare LocalAPI client",
        Sides {
            tailbox: tailbox_runs.iter().map(|r| r.daemon_login).collect(),
            spike: spike_runs.iter().map(|r| r.to_running).collect(),
            floor: floor_runs.iter().map(|r| r.login.to_running).collect(),
        },
        &[
            ("spawn to socket accepting", &floor_socket),
            ("socket to backend up", &floor_backend),
            ("backend up to Running", &floor_register),
            (
                "Running to a home DERP region (in tailbox's login)",
                &floor_home_derp,
            ),
        ],
    );
    table.time("B3", "whole run", "spike: whole sequence", &b3);
    table.memory(
        "B5",
        "agent peak RSS in a run",
        &agent_peak,
        "containerboot peak RSS",
        containerboot.peak_kib,
    );
    table.memory(
        "B5",
        &format!(
            "idle sidecar RSS after {}",
            humantime::format_duration(idle)
        ),
        &Stats::of(vec![sidecar.rss_kib as f64]),
        "idle containerboot RSS",
        containerboot.rss_kib,
    );
    table.context(
        "B5",
        "tailscaled peak RSS in a run (context)",
        &format!("{} KiB", tailscaled_peak.median.round()),
    );
    table.context(
        "B5",
        "tailscaled beside sidecar / containerboot",
        &format!(
            "{} KiB / {} KiB",
            sidecar.tailscaled_rss_kib, containerboot.tailscaled_rss_kib
        ),
    );
    table.context(
        "B5",
        "containerboot start to ready (context)",
        &format!("{:.1}ms", ms(containerboot.ready)),
    );
    table.context("size", "static agent", &format!("{agent_bytes} bytes"));
    table.versus(
        "B4",
        "upload into a new sandbox",
        &format!("{:.1}ms", uploads.first.median),
        &format!(
            "{upload_floor:.1}ms floor: {agent_bytes} B at {} MiB/s + 1 RTT",
            UPLOAD_LINK.bandwidth >> 20
        ),
        uploads.first.median / upload_floor,
    );
    table.context(
        "B4",
        "  its range; router calls",
        &format!(
            "{:.1}–{:.1}ms; {} calls",
            uploads.first.min, uploads.first.max, uploads.router_calls.0
        ),
    );
    table.stats("B4", "  the same with no link limits", &uploads.unlimited);
    table.context(
        "B4",
        "re-run in the same sandbox",
        &format!(
            "{:.1}ms ({:.1}–{:.1}), {} calls, {} bytes uploaded",
            uploads.again.median,
            uploads.again.min,
            uploads.again.max,
            uploads.router_calls.1,
            uploads.again_bytes.iter().max().copied().unwrap_or(0)
        ),
    );
    let p = |stats: &Stats, p: f64| stdio::percentile(stats, p);
    table.versus(
        "B6",
        "unary Hello p50 / p99 (µs)",
        &format!(
            "{:.0} / {:.0}",
            p(&musl_stdio.hello_us, 50.0),
            p(&musl_stdio.hello_us, 99.0)
        ),
        &format!(
            "{:.0} / {:.0} pipe echo of {} B (cat)",
            p(&echo, 50.0),
            p(&echo, 99.0),
            musl_stdio.hello_bytes.0
        ),
        p(&musl_stdio.hello_us, 50.0) / p(&echo, 50.0),
    );
    table.context(
        "B6",
        "  bytes per Hello, each way",
        &format!(
            "{} B out, {} B back",
            musl_stdio.hello_bytes.0, musl_stdio.hello_bytes.1
        ),
    );
    table.context(
        "B6",
        "streamed events/s",
        &format!(
            "{:.0} ({:.0}–{:.0}), {} events a run",
            musl_stdio.events_per_s.median,
            musl_stdio.events_per_s.min,
            musl_stdio.events_per_s.max,
            musl_stdio.events_per_stream
        ),
    );
    let glibc_kind = if args.quick {
        "glibc debug"
    } else {
        "glibc dist"
    };
    table.stdio_versus("musl static", &musl_stdio, glibc_kind, &glibc_stdio);
    if let Some((path, compared)) = &compared_stdio {
        table.stdio_versus(
            "static agent against --compare-agent",
            &musl_stdio,
            &path.display().to_string(),
            compared,
        );
    }
    table.time(
        "B7",
        &format!("fan-out: {} sandboxes, wall time", b7.n),
        "one sandbox",
        &b7.pair,
    );
    print!("{}", table.render(rounds));

    let figures = json!({
        "schema": 1,
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "machine": machine(),
        "quick": args.quick,
        "rounds": rounds,
        "idle_s": idle.as_secs_f64(),
        "static_agent_bytes": agent_bytes,
        "B1_checks_ms": b1.json(),
        "B1_tailbox_check_ms": per_check.iter().map(|(name, stats)| (name.clone(), stats.json())).collect::<serde_json::Map<_, _>>(),
        "B2_start_to_running_ms": b2.json(),
        "B2_tailbox_daemon_phase_ms": Stats::of(tailbox_runs.iter().map(|r| ms(r.daemon)).collect()).json(),
        "B2_spike_to_socket_ms": Stats::of(spike_runs.iter().map(|r| ms(r.to_socket)).collect()).json(),
        "B2_tailbox_spawn_to_localapi_ms": ready.json(),
        "B2_tailscaled_version_ms": version.json(),
        "B2_login_ms": b2_login.json(),
        "B2_floor_ms": {
            "tailbox_against_floor": b2_floor.json(),
            "spike_against_floor": spike_floor.json(),
            "spawn_to_socket": floor_socket.json(),
            "socket_to_backend": floor_backend.json(),
            "backend_to_running": floor_register.json(),
            "running_to_home_derp": floor_home_derp.json(),
        },
        "B1_rounds_over_1s": b1_stalls.iter().map(|(side, n)| ((*side).to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "B1_floor_ms": {
            "tailbox_against_floor": b1_floor.json(),
            "spike_against_floor": b1_spike_floor.json(),
            "parts": b1_floor_parts.iter().map(|(key, _, stats)| ((*key).to_owned(), stats.json())).collect::<serde_json::Map<_, _>>(),
        },
        "B1_spike_step_ms": spike_steps.iter().map(|(name, stats)| ((*name).to_owned(), stats.json())).collect::<serde_json::Map<_, _>>(),
        "B3_whole_run_ms": b3.json(),
        "B5_memory_kib": {
            "agent_peak_in_run": agent_peak.json(),
            "tailscaled_peak_in_run": tailscaled_peak.json(),
            "idle_sidecar": sidecar.rss_kib,
            "idle_sidecar_tailscaled": sidecar.tailscaled_rss_kib,
            "containerboot_peak": containerboot.peak_kib,
            "containerboot_idle": containerboot.rss_kib,
            "containerboot_tailscaled_idle": containerboot.tailscaled_rss_kib,
            "containerboot_ready_ms": ms(containerboot.ready),
        },
        "B4_upload": {
            "rtt_ms": ms(UPLOAD_LINK.rtt),
            "bandwidth_bytes_per_s": UPLOAD_LINK.bandwidth,
            "agent_bytes": agent_bytes,
            "floor_ms": upload_floor,
            "new_sandbox_ms": uploads.first.json(),
            "new_sandbox_bytes": uploads.first_bytes,
            "new_sandbox_router_calls": uploads.router_calls.0,
            "new_sandbox_no_link_limits_ms": uploads.unlimited.json(),
            "ratio": uploads.first.median / upload_floor,
            "rerun_ms": uploads.again.json(),
            "rerun_bytes": uploads.again_bytes,
            "rerun_router_calls": uploads.router_calls.1,
        },
        "B6_stdio": {
            "calls": sizes.calls,
            "pipe_echo_us": echo.json(),
            "musl": stdio_json(&musl_stdio),
            "glibc": stdio_json(&glibc_stdio),
            "glibc_build": glibc_kind,
            "compared": compared_stdio.as_ref().map(|(path, figures)| json!({
                "agent": path.display().to_string(),
                "figures": stdio_json(figures),
            })),
        },
        "B7_fanout_wall_ms": {
            "n": b7.n,
            "create_latency_ms": 100,
            "n_against_one": b7.pair.json(),
            "last_fleet_report": b7.last_report,
        },
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&figures).context("encoding the figures")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!("bench: figures written to {}", json_path.display());
    Ok(())
}

/// The wall time of `tailscaled --version`, which the agent runs before starting tailscaled
/// (part of B2's daemon phase), `times` times.
async fn version_floor(tailscaled: &Path, times: usize) -> Result<Stats> {
    let mut samples = Vec::with_capacity(times);
    for _ in 0..times {
        let mut command = Command::new(tailscaled);
        command.arg("--version");
        let started = Instant::now();
        expect_ok(command, "tailscaled --version").await?;
        samples.push(ms(started.elapsed()));
    }
    Ok(Stats::of(samples))
}

/// The link B4 uploads over: a distant worker's round trip and a modest uplink.
const UPLOAD_LINK: upload::Link = upload::Link {
    rtt: Duration::from_millis(50),
    bandwidth: 20 << 20,
};

fn stdio_json(figures: &stdio::AgentStdio) -> Value {
    json!({
        "hello_us": figures.hello_us.json(),
        "hello_p50_us": stdio::percentile(&figures.hello_us, 50.0),
        "hello_p99_us": stdio::percentile(&figures.hello_us, 99.0),
        "hello_bytes_out": figures.hello_bytes.0,
        "hello_bytes_back": figures.hello_bytes.1,
        "events_per_s": figures.events_per_s.json(),
        "events_per_stream": figures.events_per_stream,
    })
}

/// The agent for this machine with glibc, for B6: what `cargo build --release` makes (it shares
/// its dependencies with the release controller), or a debug build with `--quick`.
fn build_glibc_agent(workspace: &Path, target_dir: &Path, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "--locked", "--package", "tailbox-agent"]);
    if release {
        command.arg("--release");
    }
    let status = command
        .status()
        .context("running cargo build for the glibc agent")?;
    if !status.success() {
        bail!("building the glibc agent failed ({status})");
    }
    Ok(target_dir
        .join(if release { "release" } else { "debug" })
        .join("tailbox-agent"))
}

/// `cargo build -p tailbox` (release for a full run); returns the binary.
fn build_tailbox(workspace: &Path, target_dir: &Path, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.current_dir(workspace).args([
        "build",
        "--locked",
        "--package",
        "tailbox",
        "--bin",
        "tailbox",
    ]);
    if release {
        command.arg("--release");
    } else {
        // A debug build with xtask selected resolves the features `cargo xtask` was compiled
        // with, so it reuses those crates instead of building them again (as the demo does).
        command.args(["--package", "xtask"]);
    }
    let status = command
        .status()
        .context("running cargo build for tailbox")?;
    if !status.success() {
        bail!("building tailbox failed ({status})");
    }
    Ok(target_dir
        .join(if release { "release" } else { "debug" })
        .join("tailbox"))
}

struct Setup<'a> {
    lab: &'a Lab,
    tailbox: PathBuf,
    agent: PathBuf,
    key_file: PathBuf,
    work: PathBuf,
}

/// One `tailbox check --sandbox local`.
struct TailboxRun {
    wall: Duration,
    /// Each check's own duration, by check name, in the report's order.
    check_times: Vec<(String, Duration)>,
    checks: Duration,
    daemon: Duration,
    /// From spawning tailscaled until its LocalAPI answered (the daemon check's evidence).
    daemon_ready: Duration,
    daemon_login: Duration,
    agent_peak_kib: u64,
    tailscaled_peak_kib: u64,
}

/// The last `lines` lines of a log file, for an error (or why it cannot be read).
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({} cannot be read: {e})", path.display()),
    }
}

/// One pass of the floors (`floor.rs`).
struct FloorRun {
    login: floor::LoginFloor,
    checks: floor::ChecksFloor,
}

/// One pass of the spike's way.
struct SpikeRun {
    wall: Duration,
    to_socket: Duration,
    to_running: Duration,
    checks: Duration,
    /// Each step of the checks, by name, in order.
    steps: Vec<(&'static str, Duration)>,
}

struct IdleSidecar {
    rss_kib: u64,
    tailscaled_rss_kib: u64,
}

struct Containerboot {
    ready: Duration,
    peak_kib: u64,
    rss_kib: u64,
    tailscaled_rss_kib: u64,
}

impl Setup<'_> {
    async fn tailbox_run(&self, round: usize) -> Result<TailboxRun> {
        let lab = self.lab;
        let tailscaled_env = serde_json::to_string(&lab.tailscaled_env())?;
        let started = Instant::now();
        let mut child = Command::new(&self.tailbox)
            .args(["check", "--sandbox", "local", "--json", "--agent"])
            .arg(&self.agent)
            .arg("--tailscaled")
            .arg(lab.bins().tailscaled())
            .args(["--control-url", lab.control_url(), "--auth-key-file"])
            .arg(&self.key_file)
            // A one-shot agent even if a sidecar runs in the default directory.
            .args([
                "--proxy-listen",
                "127.0.0.1:0",
                "--no-sidecar",
                "--hostname",
            ])
            .arg(format!("bench-tailbox-{round}"))
            .args(["--ping", &lab.peer_ipv4().to_string()])
            .args(["--http", &lab.health_url(), "--git", &lab.git_url()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.work)
            .env("TAILBOX_TAILSCALED_ENV", tailscaled_env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.tailbox.display()))?;
        let pid = child.id().context("tailbox exited at once")?;
        let stderr = tailbox_testkit::collect_stderr(&mut child);
        let sampler = PeakSampler::start(pid, self.tailbox.clone(), lab.bins().tailscaled());
        let stdout = child.stdout.take().context("tailbox's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut last = None;
        let finished = tokio::time::timeout(STEP_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                last = Some(line);
            }
            child.wait().await
        })
        .await
        .context("tailbox check did not finish")?
        .context("waiting for tailbox")?;
        let wall = started.elapsed();
        let (agent_peak_kib, tailscaled_peak_kib) = sampler.stop().await;
        let stderr = stderr.await.unwrap_or_default();
        let report: Value = last
            .as_deref()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .map(|event| event["report"].clone())
            .unwrap_or(Value::Null);
        if !finished.success() || report["verdict"]["ok"] != Value::Bool(true) {
            bail!("tailbox check failed ({finished}):\n{report:#}\n{stderr}");
        }
        let phase = |name: &str| -> Result<Duration> {
            report["phases"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["phase"] == name)
                .and_then(|p| p["duration"].as_str())
                .and_then(parse_proto_duration)
                .with_context(|| format!("the report has no {name} duration: {report:#}"))
        };
        let daemon = phase("PHASE_DAEMON")?;
        let daemon_ready = report["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "daemon")
            .and_then(|c| c["daemon"]["time_to_ready"].as_str())
            .and_then(parse_proto_duration)
            .with_context(|| format!("the daemon check has no time to ready: {report:#}"))?;
        let check_times = report["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let name = c["name"].as_str()?.to_owned();
                Some((name, parse_proto_duration(c["duration"].as_str()?)?))
            })
            // B1's rows: the checks over the tailnet, not the bring-up's (B2 has those).
            .filter(|(name, _)| !["preflight", "daemon", "login"].contains(&name.as_str()))
            .collect();
        Ok(TailboxRun {
            wall,
            check_times,
            checks: phase("PHASE_CHECKS")?,
            daemon,
            daemon_ready,
            daemon_login: daemon + phase("PHASE_LOGIN")?,
            agent_peak_kib,
            tailscaled_peak_kib,
        })
    }

    /// The spike's way on the same targets: tailscaled spawned by hand, its socket polled,
    /// `tailscale up`, then one process per check, then logout and stop.
    async fn spike_run(&self, round: usize) -> Result<SpikeRun> {
        let lab = self.lab;
        let dir = self.work.join(format!("spike-{round}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("ts.sock");
        let proxy = format!("127.0.0.1:{}", free_port()?);
        let started = Instant::now();
        let mut tailscaled = self.spawn_tailscaled(&dir, &proxy)?;
        // The spike's readiness: poll the socket until it accepts a connection (every 10 ms,
        // which flatters the spike's way).
        tokio::time::timeout(STEP_TIMEOUT, async {
            while tokio::net::UnixStream::connect(&socket).await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .context("tailscaled's socket never accepted a connection")?;
        let to_socket = started.elapsed();
        let tailscale = |args: &[&str]| {
            let mut command = Command::new(lab.bins().tailscale());
            command
                .arg(format!("--socket={}", socket.display()))
                .args(args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default());
            command
        };
        let key_arg = format!("--authkey=file:{}", self.key_file.display());
        let login = format!("--login-server={}", lab.control_url());
        let hostname = format!("--hostname=bench-spike-{round}");
        expect_ok(
            tailscale(&["up", &key_arg, &login, &hostname, "--accept-dns=false"]),
            "tailscale up",
        )
        .await?;
        let to_running = started.elapsed();

        let checks_started = Instant::now();
        let mut steps = Vec::new();
        let mut step_started = Instant::now();
        let mut step = |name: &'static str| {
            steps.push((name, step_started.elapsed()));
            step_started = Instant::now();
        };
        expect_ok(tailscale(&["status"]), "tailscale status").await?;
        step("tailscale status");
        let peer = lab.peer_ipv4().to_string();
        let ping = output_of(tailscale(&["ping", "-c", "1", &peer]), "tailscale ping").await?;
        step("tailscale ping -c 1");
        // `-c 1` exits 1 when the one pong came through DERP; a pong is what the spike wanted.
        if !String::from_utf8_lossy(&ping.stdout).contains("pong") {
            bail!("tailscale ping got no pong: {}", text(&ping));
        }
        let mut curl = Command::new("curl");
        curl.args(["-fsS", "-o", "/dev/null", "--socks5-hostname", &proxy])
            .arg(lab.health_url())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        expect_ok(curl, "curl --socks5-hostname").await?;
        step("curl --socks5-hostname");
        let mut git = Command::new("git");
        git.args(["ls-remote", &lab.git_url()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &dir)
            .env("ALL_PROXY", format!("socks5h://{proxy}"));
        tailbox_testkit::isolate_client(git.as_std_mut())
            .env("ALL_PROXY", format!("socks5h://{proxy}"));
        expect_ok(git, "git ls-remote").await?;
        step("git ls-remote");
        let checks = checks_started.elapsed();

        expect_ok(tailscale(&["logout"]), "tailscale logout").await?;
        terminate(&mut tailscaled).await?;
        Ok(SpikeRun {
            wall: started.elapsed(),
            to_socket,
            to_running,
            checks,
            steps,
        })
    }

    /// The floors of B2 and B1: tailscaled spawned as for the spike's way, brought to Running
    /// by a bare LocalAPI client in this process, one request per check at once, then logged
    /// out and stopped.
    async fn floor_run(&self, round: usize) -> Result<FloorRun> {
        let lab = self.lab;
        let dir = self.work.join(format!("floor-{round}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("ts.sock");
        let proxy = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, free_port()?));
        let started = Instant::now();
        let mut tailscaled = self.spawn_tailscaled(&dir, &proxy.to_string())?;
        let login = tokio::time::timeout(
            STEP_TIMEOUT,
            floor::login(
                started,
                &socket,
                lab.control_url(),
                &format!("bench-floor-{round}"),
                lab.auth_key(),
            ),
        )
        .await
        .context("the bare LocalAPI client never saw Running")?
        .context("bringing tailscaled to Running with a bare LocalAPI client")?;
        let targets = floor::Targets {
            peer: lab.peer_ipv4(),
            http_port: lab.http_port(),
            http_path: "/health",
            git_port: lab.git_port(),
            git_path: lab.git_path(),
        };
        let api = tailbox_localapi::LocalApi::new(&socket);
        let checks = tokio::time::timeout(STEP_TIMEOUT, floor::checks(&api, proxy, &targets))
            .await
            .context("the floor's checks did not finish")
            .and_then(|checks| checks)
            .with_context(|| {
                format!(
                    "B1's floor: one request per check; tailscaled's log ends:\n{}\nthe lab's:\n{}",
                    log_tail(&dir.join("tailscaled.log"), 40),
                    lab.log_tails()
                )
            })?;
        floor::logout(&socket).await?;
        terminate(&mut tailscaled).await?;
        Ok(FloorRun { login, checks })
    }

    /// tailscaled as the spike starts it: userspace, its socket, state and logs in `dir`, a
    /// SOCKS5 proxy on `proxy`, its output in `dir/tailscaled.log`.
    fn spawn_tailscaled(&self, dir: &Path, proxy: &str) -> Result<Child> {
        let lab = self.lab;
        Command::new(lab.bins().tailscaled())
            .arg("--tun=userspace-networking")
            .arg(format!("--socket={}", dir.join("ts.sock").display()))
            .arg(format!("--state={}", dir.join("ts.state").display()))
            .arg(format!("--statedir={}", dir.display()))
            .arg(format!("--socks5-server={proxy}"))
            .args(["--port=0", "--no-logs-no-support"])
            .env_clear()
            .envs(lab.tailscaled_env())
            .env("TS_LOGS_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("tailscaled.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning tailscaled")
    }

    /// Starts a sidecar, brings its node up, lets it sit idle, reads its RSS, takes it down.
    async fn idle_sidecar(&self, idle: Duration) -> Result<IdleSidecar> {
        let lab = self.lab;
        let state_dir = self.work.join("sidecar");
        let sidecar = |args: &[&str]| {
            let mut command = Command::new(&self.agent);
            command
                .args(args)
                .arg("--state-dir")
                .arg(&state_dir)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .stdin(Stdio::null())
                .kill_on_drop(true);
            command
        };
        expect_ok(sidecar(&["sidecar"]), "tailbox-agent sidecar").await?;
        let socket = state_dir.join("sidecar.sock");
        let channel = tailbox_testkit::unix_channel(&socket)
            .await
            .context("connecting to the sidecar's socket")?;
        let up = UpRequest {
            tailnet: Some(lab.tailnet_config("bench-sidecar")),
            sandbox_id: String::new(),
            deadlines: None,
        };
        let result = async {
            let status = tokio::time::timeout(STEP_TIMEOUT, SidecarClient::new(channel).up(up))
                .await
                .context("the sidecar's Up did not answer")?
                .context("the sidecar's Up failed")?
                .into_inner()
                .status
                .context("Up returned no status")?;
            if status.state() != SidecarState::Running {
                bail!("the sidecar's node is not Running: {status:?}");
            }
            tokio::time::sleep(idle).await;
            let pid: u32 = std::fs::read_to_string(state_dir.join("sidecar.pid"))
                .context("reading the sidecar's pidfile")?
                .trim()
                .parse()
                .context("the sidecar's pidfile holds no pid")?;
            Ok(IdleSidecar {
                rss_kib: status_kib(pid, "VmRSS").context("the sidecar's RSS")?,
                tailscaled_rss_kib: status_kib(status.tailscaled_pid, "VmRSS").unwrap_or(0),
            })
        }
        .await;
        expect_ok(sidecar(&["down"]), "tailbox-agent down").await?;
        result
    }

    /// containerboot in userspace mode against the lab, as `docs/benchmarks.md` describes:
    /// its own process's peak RSS while booting and its RSS after sitting idle.
    async fn containerboot(&self, idle: Duration) -> Result<Containerboot> {
        let lab = self.lab;
        let dir = self.work.join("containerboot");
        let state = dir.join("state");
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        let key_file = dir.join("authkey");
        write_private(&key_file, lab.auth_key())?;
        let health = free_port()?;
        let socks = free_port()?;
        let bin_dir = lab.bins().dir().to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env: BTreeMap<String, String> = [
            ("PATH", path),
            ("HOME", dir.display().to_string()),
            ("TS_USERSPACE", "true".into()),
            ("TS_KUBE_SECRET", String::new()),
            ("TS_STATE_DIR", state.display().to_string()),
            ("TS_SOCKET", dir.join("ts.sock").display().to_string()),
            ("TS_AUTHKEY", format!("file:{}", key_file.display())),
            ("TS_AUTH_ONCE", "true".into()),
            ("TS_HOSTNAME", "bench-containerboot".into()),
            (
                "TS_EXTRA_ARGS",
                format!("--login-server={}", lab.control_url()),
            ),
            (
                "TS_TAILSCALED_EXTRA_ARGS",
                "--port=0 --no-logs-no-support".into(),
            ),
            ("TS_SOCKS5_SERVER", format!("127.0.0.1:{socks}")),
            ("TS_ENABLE_HEALTH_CHECK", "true".into()),
            ("TS_LOCAL_ADDR_PORT", format!("127.0.0.1:{health}")),
            ("TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT", "false".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(lab.tailscaled_env())
        .collect();
        let started = Instant::now();
        let mut child = Command::new(lab.bins().containerboot())
            .env_clear()
            .envs(&env)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning containerboot")?;
        let pid = child.id().context("containerboot exited at once")?;
        let stderr = child.stderr.take().context("containerboot's stderr")?;
        let log_path = dir.join("containerboot.log");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let log_task = tokio::spawn(async move {
            let mut log = String::new();
            let mut ready = Some(ready_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Startup complete")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
                log.push_str(&line);
                log.push('\n');
            }
            let _ = std::fs::write(log_path, &log);
            log
        });
        let ready = tokio::time::timeout(STEP_TIMEOUT, ready_rx).await;
        if !matches!(ready, Ok(Ok(()))) {
            let _ = child.kill().await;
            let log = log_task.await.unwrap_or_default();
            bail!("containerboot never logged `Startup complete`:\n{log}");
        }
        let ready = started.elapsed();
        tokio::time::sleep(idle).await;
        let tailscaled = children_of(pid)
            .into_iter()
            .find(|&child| exe_is(child, &lab.bins().tailscaled()));
        let figures = Containerboot {
            ready,
            peak_kib: status_kib(pid, "VmHWM").context("containerboot's peak RSS")?,
            rss_kib: status_kib(pid, "VmRSS").context("containerboot's RSS")?,
            tailscaled_rss_kib: tailscaled
                .and_then(|pid| status_kib(pid, "VmRSS"))
                .unwrap_or(0),
        };
        terminate(&mut child).await?;
        let _ = log_task.await;
        Ok(figures)
    }
}

/// Samples the peak RSS (VmHWM) of the agent (`root`'s child: a local run's only one) and of
/// tailscaled among the agent's children, until stopped; VmHWM only grows, so the last reading
/// is the peak. A child that still runs `root`'s program is skipped: between fork and exec it
/// is a copy of tailbox, and its figures are tailbox's.
struct PeakSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl PeakSampler {
    fn start(root: u32, root_exe: PathBuf, tailscaled: PathBuf) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut agent_peak, mut tailscaled_peak) = (0, 0);
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                for child in children_of(root) {
                    if exe_is(child, &root_exe) {
                        continue;
                    }
                    if let Some(kib) = status_kib(child, "VmHWM") {
                        agent_peak = agent_peak.max(kib);
                    }
                    for grandchild in children_of(child) {
                        if exe_is(grandchild, &tailscaled)
                            && let Some(kib) = status_kib(grandchild, "VmHWM")
                        {
                            tailscaled_peak = tailscaled_peak.max(kib);
                        }
                    }
                }
            }
            (agent_peak, tailscaled_peak)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (u64, u64) {
        let _ = self.stop.send(());
        self.task.await.unwrap_or((0, 0))
    }
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    // Field 4, after the parenthesised command (which may hold spaces).
                    let rest = stat.rsplit_once(") ")?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn exe_is(pid: u32, path: &Path) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    std::fs::canonicalize(path).is_ok_and(|p| p == exe)
}

/// A `/proc/<pid>/status` field in KiB, such as VmRSS or VmHWM.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), field)
}

/// A `Field:   123 kB` line of a /proc file, in KiB.
fn kib_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

async fn output_of(mut command: Command, what: &str) -> Result<std::process::Output> {
    command.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(STEP_TIMEOUT, command.output())
        .await
        .with_context(|| format!("`{what}` did not finish"))?
        .with_context(|| format!("running `{what}`"))
}

async fn expect_ok(command: Command, what: &str) -> Result<()> {
    let output = output_of(command, what).await?;
    if !output.status.success() {
        bail!("`{what}` failed ({}): {}", output.status, text(&output));
    }
    Ok(())
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// SIGTERM, then a wait (SIGKILL after 10 s).
async fn terminate(child: &mut Child) -> Result<()> {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn write_private(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(secret.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// A proto3 JSON duration such as `"0.029123s"`.
fn parse_proto_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median and range of some samples.
#[derive(Clone, Debug)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
    samples: Vec<f64>,
}

impl Stats {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => samples[n / 2],
            _ => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
        };
        Self {
            median,
            min: samples.first().copied().unwrap_or(f64::NAN),
            max: samples.last().copied().unwrap_or(f64::NAN),
            samples,
        }
    }

    /// `12.3ms (10.1–15.0)`: the median and the range, of samples in milliseconds.
    fn ms_text(&self) -> String {
        format!("{:.1}ms ({:.1}–{:.1})", self.median, self.min, self.max)
    }

    fn json(&self) -> Value {
        json!({
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "samples": self.samples,
        })
    }
}

/// The three sides of a benchmark with a floor, one sample per round each.
struct Sides {
    tailbox: Vec<Duration>,
    spike: Vec<Duration>,
    floor: Vec<Duration>,
}

/// tailbox's samples against a baseline's, in milliseconds.
struct Pair {
    tailbox: Stats,
    baseline: Stats,
}

impl Pair {
    fn new(tailbox: Vec<Duration>, baseline: Vec<Duration>) -> Self {
        Self {
            tailbox: Stats::of(tailbox.into_iter().map(ms).collect()),
            baseline: Stats::of(baseline.into_iter().map(ms).collect()),
        }
    }

    fn ratio(&self) -> f64 {
        self.tailbox.median / self.baseline.median
    }

    fn json(&self) -> Value {
        json!({
            "tailbox": self.tailbox.json(),
            "baseline": self.baseline.json(),
            "ratio": self.ratio(),
        })
    }
}

#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
}

impl Table {
    fn time(&mut self, id: &str, what: &str, baseline: &str, pair: &Pair) {
        self.rows.push([
            id.into(),
            what.into(),
            pair.tailbox.ms_text(),
            format!("{} {}", pair.baseline.ms_text(), baseline),
            format!("{:.2}×", pair.ratio()),
        ]);
    }

    fn memory(&mut self, id: &str, what: &str, ours: &Stats, baseline: &str, theirs: u64) {
        let ours_text = if ours.samples.len() > 1 {
            format!("{:.0} KiB ({:.0}–{:.0})", ours.median, ours.min, ours.max)
        } else {
            format!("{:.0} KiB", ours.median)
        };
        self.rows.push([
            id.into(),
            what.into(),
            ours_text,
            format!("{theirs} KiB {baseline}"),
            format!("{:.2}×", ours.median / theirs as f64),
        ]);
    }

    /// A row with tailbox's figure, the baseline's, and their ratio.
    /// A context row of milliseconds: the median and the range.
    fn stats(&mut self, id: &str, what: &str, stats: &Stats) {
        self.context(id, what, &stats.ms_text());
    }

    /// A benchmark against its floor: tailbox against it, the spike's way against it, and the
    /// floor's parts. Returns the two pairs (tailbox, spike) against the floor.
    fn floor(
        &mut self,
        id: &str,
        what: &str,
        floor_name: &str,
        sides: Sides,
        parts: &[(&str, &Stats)],
    ) -> (Pair, Pair) {
        let ours = Pair::new(sides.tailbox, sides.floor.clone());
        self.time(id, what, floor_name, &ours);
        let spike = Pair::new(sides.spike, sides.floor);
        self.versus(
            id,
            "  the spike's way against the floor",
            &format!("{:.1}ms", spike.tailbox.median),
            &format!("{:.1}ms floor", spike.baseline.median),
            spike.ratio(),
        );
        for (part, stats) in parts {
            self.stats(id, &format!("  floor: {part}"), stats);
        }
        (ours, spike)
    }

    fn versus(&mut self, id: &str, what: &str, ours: &str, baseline: &str, ratio: f64) {
        self.rows.push([
            id.into(),
            what.into(),
            ours.into(),
            baseline.into(),
            format!("{ratio:.2}×"),
        ]);
    }

    /// B6's two rows for the static agent against another build: Hello p50 and events/s.
    fn stdio_versus(
        &mut self,
        what: &str,
        ours: &stdio::AgentStdio,
        theirs_name: &str,
        theirs: &stdio::AgentStdio,
    ) {
        let (our_hello, their_hello) = (
            stdio::percentile(&ours.hello_us, 50.0),
            stdio::percentile(&theirs.hello_us, 50.0),
        );
        self.versus(
            "B6",
            &format!("{what}: Hello p50"),
            &format!("{our_hello:.0}µs"),
            &format!("{their_hello:.0}µs {theirs_name}"),
            our_hello / their_hello,
        );
        let (our_events, their_events) = (ours.events_per_s.median, theirs.events_per_s.median);
        self.versus(
            "B6",
            &format!("{what}: events/s"),
            &format!("{our_events:.0}"),
            &format!("{their_events:.0} {theirs_name}"),
            our_events / their_events,
        );
    }

    fn context(&mut self, id: &str, what: &str, value: &str) {
        self.rows.push([
            id.into(),
            what.into(),
            value.into(),
            String::new(),
            String::new(),
        ]);
    }

    fn render(&self, rounds: usize) -> String {
        let header = [
            "BENCH",
            "WHAT",
            &format!("TAILBOX (median of {rounds}, min–max)"),
            "BASELINE",
            "RATIO",
        ];
        let mut widths = header.map(|h| h.chars().count());
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(w - cell.chars().count() + 2));
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(header);
        for row in &self.rows {
            out.push_str(&line(row.each_ref().map(String::as_str)));
        }
        out
    }
}

/// What the figures were measured on.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_owned())
            })
        })
        .unwrap_or_default();
    let mem_kib = kib_field("/proc/meminfo", "MemTotal");
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_kib": mem_kib,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Stats, parse_proto_duration};

    #[test]
    fn medians_and_ranges() {
        let s = Stats::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stats::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn proto_json_durations() {
        assert_eq!(
            parse_proto_duration("0.029s"),
            Some(Duration::from_millis(29))
        );
        assert_eq!(parse_proto_duration("3s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_proto_duration("29ms"), None);
    }
}
