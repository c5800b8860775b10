//! `cargo xtask demo`: the whole product on this machine, with no account and no internet.
//!
//! 1. Builds what is missing: `tailbox` (debug) and a static agent (a *debug* build for this
//!    machine's musl target), then the lab's binaries through `lab/build.sh` (the Go build takes
//!    minutes the first time; a line says it is still going).
//! 2. Brings up the real local tailnet ([`Lab`]: Tailscale's test control with DERP, a real
//!    tailscaled dev-host peer, real HTTP and `git http-backend`) and the fake Modal
//!    ([`FakeModal`]: sandboxes are process trees in network namespaces of their own).
//! 3. Runs the real `tailbox check` twice with every check (ping, HTTP, git with an expected
//!    ref), configured the way a user configures it (`TS_AUTHKEY`, `TS_CONTROL_URL`,
//!    `COOK_*`): first `--sandbox local`, then `--sandbox modal` against the fake Modal
//!    (create, upload, exec, terminate). Its output is the user's, unchanged.
//! 4. Tears everything down and exits 0 only if both runs passed; 130 after Ctrl-C (or SIGTERM),
//!    which is passed on to a running `tailbox` so it cleans up its own way first.
//!
//! Why a debug static agent: the Modal backend uploads only static agents, and the local backend
//! runs one just as well, so one build serves both runs. The release build (fat LTO, one codegen
//! unit) takes several times longer to compile, and a newcomer waits for every minute of it.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tailbox_proto::arch::Arch;
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal};
use tailbox_testkit::lab::{BIN_DIR_ENV, Lab};
use tokio::signal::unix::{SignalKind, signal};

use crate::static_agent;

/// How often a line says the lab's Go build is still running.
const BUILD_PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// How long `tailbox` gets to clean up after the interrupt is passed on (it promises seconds).
const CHILD_CLEANUP_GRACE: Duration = Duration::from_secs(45);
/// The only variables of the user's environment the `tailbox` runs get: the user's own tailnet
/// and Modal settings (`TS_*`, `COOK_*`, `MODAL_*`, `~/.modal.toml` through `HOME`) must not
/// point a run away from the lab.
const PASSED_ON: &[&str] = &[
    "PATH",
    "TERM",
    "COLORTERM",
    "NO_COLOR",
    "CLICOLOR",
    "CLICOLOR_FORCE",
    "LANG",
    "LC_ALL",
    "TMPDIR",
];

/// How the demo ended, as an exit code.
pub async fn run(workspace: &Path) -> Result<ExitCode> {
    let arch = Arch::host().context("this machine's architecture has no agent build")?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo's fake Modal gives each sandbox a network namespace of its own, which needs root\n\
             hint: Run `cargo xtask demo` as root (CI and `scripts/test` do)."
        );
    }
    say("building what is missing (the first time takes minutes; later runs reuse the builds)");
    // `xtask` is selected too, though only the `tailbox` binary is built: cargo resolves the
    // dependencies' features over the selected packages, and with xtask among them they are the
    // ones `cargo xtask` was just compiled with, so the binary reuses every crate already built.
    // `--package tailbox` alone resolves fewer features (no tonic server, for one), which changes
    // serde's and so recompiles nearly everything a second time (docs/benchmarks.md).
    let tailbox = cargo_build(
        workspace,
        "tailbox",
        &[
            "--package",
            "xtask",
            "--package",
            "tailbox",
            "--bin",
            "tailbox",
        ],
    )
    .await?;
    let agent = cargo_build(
        workspace,
        "tailbox-agent",
        &[
            "--package",
            "tailbox-agent",
            "--bin",
            "tailbox-agent",
            "--target",
            arch.rust_target(),
        ],
    )
    .await?;
    static_agent::verify(&agent, arch)?;
    say(&format!(
        "built tailbox and a static {arch} agent ({})",
        agent.display()
    ));
    lab_binaries(workspace).await?;

    // From here on Ctrl-C and SIGTERM are ours: everything started below is torn down.
    let mut signals = Signals::new()?;
    Ok(match demo(&tailbox, &agent, &mut signals).await? {
        Outcome::Passed => {
            say("ok: ping, HTTP and git passed on the local backend and through the fake Modal");
            say("next: README.md, \"Using it\", for your own tailnet and Modal");
            ExitCode::SUCCESS
        }
        Outcome::Failed => {
            say("FAILED: see the output above");
            ExitCode::FAILURE
        }
        Outcome::Interrupted => {
            say("interrupted; everything the demo started is torn down");
            ExitCode::from(130)
        }
    })
}

enum Outcome {
    Passed,
    Failed,
    Interrupted,
}

/// The lab, the fake Modal and both runs; both are torn down when this returns or is dropped.
async fn demo(tailbox: &Path, agent: &Path, signals: &mut Signals) -> Result<Outcome> {
    say("starting the tailnet lab: control with DERP and STUN, and a dev host on the tailnet");
    let Some(lab) = signals.unless_interrupted(Lab::start()).await else {
        return Ok(Outcome::Interrupted);
    };
    let lab = lab.context("starting the tailnet lab")?;
    say(&format!(
        "lab up in {}: dev host {} ({}) serves HTTP and a git repo over the tailnet",
        lab.dir().display(),
        tailbox_testkit::lab::PEER_HOSTNAME,
        lab.peer_ipv4()
    ));
    let fake = FakeModal::start_with(FakeConfig::default().reaching(&lab));
    let Some(fake) = signals.unless_interrupted(fake).await else {
        return Ok(Outcome::Interrupted);
    };
    let fake = fake.context("starting the fake Modal")?;
    say(&format!(
        "fake Modal up at {}: its sandboxes reach only the lab's control, DERP and STUN",
        fake.server_url()
    ));
    let home = tempfile::Builder::new()
        .prefix("tailbox-demo-home-")
        .tempdir()
        .context("creating an empty HOME for tailbox")?;
    let main_sha = lab
        .git_ref("refs/heads/main")
        .context("the lab's repo has no main branch")?
        .to_owned();

    // What a user sets for a real tailnet, pointed at the lab. The key travels as a file.
    let variables = [
        (
            "TS_AUTHKEY",
            format!("file:{}", lab.auth_key_file().display()),
        ),
        ("TS_CONTROL_URL", lab.control_url().to_owned()),
        ("COOK_TAIL_IP", lab.peer_ipv4().to_string()),
        ("COOK_HTTP_URL", lab.health_url()),
        ("COOK_GIT_URL", lab.git_url()),
    ];
    let tailscaled_env = serde_json::to_string(&lab.tailscaled_env())
        .context("encoding the lab's tailscaled environment")?;
    let expect_ref = format!("main={main_sha}");
    let tailscaled = lab.bins().tailscaled().display().to_string();
    let agent = agent.display().to_string();
    let common = [
        "--expect-ref",
        &expect_ref,
        "--agent",
        &agent,
        "--tailscaled",
        &tailscaled,
    ];
    let command =
        |sandbox: &str, extra: &[&str], more_env: &[(String, String)]| {
            let mut command = tokio::process::Command::new(tailbox);
            command
                .arg("check")
                .args(["--sandbox", sandbox])
                .args(common)
                .args(extra)
                .env_clear()
                .envs(PASSED_ON.iter().filter_map(|name| {
                    std::env::var_os(name).map(|value| (name.to_string(), value))
                }))
                .env("HOME", home.path())
                .envs(variables.iter().map(|(k, v)| (*k, v.as_str())))
                .env("TAILBOX_TAILSCALED_ENV", &tailscaled_env)
                .envs(more_env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null());
            let shown: Vec<String> = std::iter::once("tailbox check".to_owned())
                .chain(
                    ["--sandbox", sandbox]
                        .iter()
                        .chain(&common)
                        .chain(extra)
                        .map(|a| a.to_string()),
                )
                .collect();
            (command, shown.join(" "))
        };

    let mut passed = true;
    let mut env_shown = String::new();
    for (name, value) in &variables {
        env_shown.push_str(&format!("\n  export {name}={value}"));
    }
    say(&format!(
        "the lab's tailnet, as you would point tailbox at yours (plus the lab's tailscaled \
         knobs in TAILBOX_TAILSCALED_ENV):{env_shown}"
    ));

    say("run 1 of 2: the local backend (the agent runs as a child process on this machine)");
    // Another tailscaled here may hold the default proxy port; let this one pick a free port.
    // A sidecar of the user's may run here too: the demo brings up a node of its own.
    let (local, shown) = command(
        "local",
        &["--proxy-listen", "127.0.0.1:0", "--no-sidecar"],
        &[],
    );
    let local = run_tailbox(local, &shown, signals).await?;
    let Some(local) = local else {
        return Ok(Outcome::Interrupted);
    };
    passed &= report("the local backend", local);

    say(
        "run 2 of 2: the fake Modal (a sandbox is created, the agent uploaded and run in it, \
         the sandbox terminated)",
    );
    let (modal, shown) = command("modal", &[], &fake.env());
    let modal = run_tailbox(modal, &shown, signals).await?;
    let Some(modal) = modal else {
        return Ok(Outcome::Interrupted);
    };
    passed &= report("the fake Modal", modal);
    passed &= fake_modal_saw(&fake);

    if !passed {
        say(&format!("the lab's last log lines:\n{}", lab.log_tails()));
    }
    say("tearing down the fake Modal and the lab");
    drop(fake);
    drop(lab);
    Ok(if passed {
        Outcome::Passed
    } else {
        Outcome::Failed
    })
}

/// Says how one run ended; true if it passed.
fn report(what: &str, status: ExitStatus) -> bool {
    if status.success() {
        say(&format!("{what}: passed"));
        true
    } else {
        say(&format!("{what}: FAILED ({status})"));
        false
    }
}

/// What the fake Modal saw of the run: one sandbox, the agent uploaded and run, the sandbox
/// terminated. True if all of it happened.
fn fake_modal_saw(fake: &FakeModal) -> bool {
    let record = fake.record();
    let agent_execs = record.agent_execs().len();
    let terminated = record
        .sandboxes
        .iter()
        .filter(|s| s.terminated_at.is_some())
        .count();
    say(&format!(
        "the fake Modal saw {} sandbox(es) created, {} file(s) uploaded ({} bytes), {agent_execs} \
         agent exec(s), {terminated} sandbox(es) terminated",
        record.sandboxes.len(),
        record.files_written.len(),
        record.bytes_written,
    ));
    let ok = record.sandboxes.len() == 1
        && terminated == 1
        && agent_execs >= 1
        && record.bytes_written > 0;
    if !ok {
        say("the fake Modal did not see one sandbox created, uploaded to, run in and terminated");
    }
    ok
}

/// Runs one `tailbox check` with its output going straight to the user. `None` if interrupted:
/// the interrupt is passed on and `tailbox` is given time to clean up.
async fn run_tailbox(
    mut command: tokio::process::Command,
    shown: &str,
    signals: &mut Signals,
) -> Result<Option<ExitStatus>> {
    say(&format!("$ {shown}"));
    // Its own process group: a terminal's Ctrl-C reaches only the demo, which passes it on
    // exactly once (a second one would tell tailbox to stop waiting for the agent's report).
    command.process_group(0).kill_on_drop(true);
    let mut child = command.spawn().context("starting tailbox")?;
    let pid = child.id().context("tailbox exited at once")?;
    tokio::select! {
        status = child.wait() => Ok(Some(status.context("waiting for tailbox")?)),
        signal = signals.recv_kind() => {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
            let _ = nix::sys::signal::kill(pid, signal);
            say("passing the interrupt on to tailbox and waiting for it to clean up");
            tokio::select! {
                _ = child.wait() => {}
                () = signals.recv() => {}
                () = tokio::time::sleep(CHILD_CLEANUP_GRACE) => {}
            }
            let _ = child.kill().await;
            Ok(None)
        }
    }
}

/// Ctrl-C and SIGTERM, listened for from the moment this exists.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// The next Ctrl-C (SIGINT) or SIGTERM.
    async fn recv_kind(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::SIGINT,
            _ = self.terminate.recv() => Signal::SIGTERM,
        }
    }

    async fn recv(&mut self) {
        self.recv_kind().await;
    }

    /// `work`'s output, or `None` (and `work` dropped) if an interrupt comes first.
    async fn unless_interrupted<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            value = work => Some(value),
            () = self.recv() => None,
        }
    }
}

/// Builds one binary with cargo (its progress on stderr) and returns the path cargo reports.
async fn cargo_build(workspace: &Path, name: &str, args: &[&str]) -> Result<PathBuf> {
    say(&format!("cargo build {}", args.join(" ")));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = tokio::process::Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--locked",
            "--message-format=json-render-diagnostics",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its progress, for people (tokio's `output()` would capture it).
        .stderr(Stdio::inherit())
        .spawn()
        .context("running cargo build")?
        .wait_with_output()
        .await
        .context("waiting for cargo build")?;
    if !output.status.success() {
        bail!(
            "building {name} failed ({}); the output above says why. `scripts/setup` installs \
             what the build needs (the musl target and musl-tools for the agent)",
            output.status
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .find(|path| path.file_name().is_some_and(|n| n == name))
        .with_context(|| format!("cargo reported no executable named {name}"))
}

/// Makes sure the lab's binaries are built (the lab then finds them through `lab/build.sh`,
/// or `TAILBOX_TAILNET_BIN_DIR` if set), saying every little while that a build is going on.
async fn lab_binaries(workspace: &Path) -> Result<()> {
    if std::env::var_os(BIN_DIR_ENV).is_some() {
        say(&format!("lab binaries: {BIN_DIR_ENV} names them"));
        return Ok(());
    }
    let script = workspace.join("lab/build.sh");
    let started = Instant::now();
    let mut child = tokio::process::Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", script.display()))?;
    let mut stdout = child.stdout.take().context("build.sh's stdout")?;
    let read = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text).await;
        text
    });
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + BUILD_PROGRESS_EVERY,
        BUILD_PROGRESS_EVERY,
    );
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.context("waiting for lab/build.sh")?,
            _ = tick.tick() => say(&format!(
                "still building the lab's tailscale and control ({}s so far; 4-5 minutes the first time)",
                started.elapsed().as_secs()
            )),
        }
    };
    let stdout = read.await.unwrap_or_default();
    if !status.success() {
        bail!(
            "{} failed ({status}); the output above says why (it needs Go; `scripts/setup` installs it)",
            script.display()
        );
    }
    let dir = stdout.lines().last().unwrap_or_default().trim().to_owned();
    say(&format!("lab binaries: {dir}"));
    Ok(())
}

/// One line of the demo's own narration, on stderr.
fn say(text: &str) {
    eprintln!("demo: {text}");
}
