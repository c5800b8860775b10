//! Repository tooling, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! - `cargo xtask demo`: the whole product on this machine (the lab, `tailbox check` on the
//!   local backend and through the fake Modal, teardown); exits 0 only if both runs passed.
//! - `cargo xtask lab up`: start the local tailnet lab in the foreground and print what to
//!   export to point tailbox (or the spike) at it; Ctrl-C tears it down. See `lab/README.md`.
//! - `cargo xtask lab build`: build or find the lab binaries and print their directory.
//! - `cargo xtask static-agent [--target T]...`: build the static (musl) agent for each target
//!   (default: this machine's architecture) and verify it is static and built for that
//!   architecture; prints one path per target.
//! - `cargo xtask man`: regenerate the man pages in `controller/man/` from tailbox's clap
//!   definitions (`controller/tests/man.rs` fails when they are stale).
//! - `cargo xtask schema`: regenerate the JSON Schemas in `docs/schema/` from the proto
//!   (`proto/tests/schema.rs` fails when they are stale).
//! - `cargo xtask bench [--quick]`: tailbox side by side with the spike's way and containerboot
//!   on the real lab; a table of ratios on stdout, the figures as JSON (see `bench.rs`).
//! - `cargo xtask fuzz [--time SECONDS] [--list] [--capture] [TARGET]...`: the cargo-fuzz
//!   targets in `fuzz/`, each for SECONDS from the committed corpus; `--capture` records seeds
//!   from the lab (see `fuzz.rs`).

mod bench;
mod demo;
mod fuzz;
mod static_agent;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tailbox_proto::arch::Arch;
use tailbox_testkit::lab::{BIN_DIR_ENV, Binaries, Lab};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tailbox developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole job on this machine, no account needed: build what is missing, bring up the
    /// local tailnet lab and a fake Modal, run `tailbox check` with every check on the local
    /// backend and through the fake Modal, tear down. Exits 0 only if both runs passed
    Demo,
    /// The local tailnet lab: real tailscaled + Tailscale's test control on loopback
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Build the static musl agent and verify it; prints one path per target
    StaticAgent {
        /// Target to build: `x86_64-unknown-linux-musl` or `aarch64-unknown-linux-musl` (an
        /// architecture name such as `aarch64` or `arm64` also works); repeat for several.
        /// Default: this machine's architecture
        #[arg(long = "target", value_name = "TARGET")]
        targets: Vec<Arch>,
    },
    /// Regenerate tailbox's man pages in controller/man/ from its clap definitions
    Man,
    /// Regenerate the JSON Schemas of the report and the `--json` events in docs/schema/ from the
    /// proto
    Schema,
    /// Benchmarks on the real lab: tailbox against the spike's way and containerboot
    Bench(bench::BenchArgs),
    /// Run every fuzz target (cargo-fuzz, nightly) for a while from the committed corpus; list
    /// them; or record fresh seeds from the lab
    Fuzz(fuzz::FuzzArgs),
}

#[derive(Subcommand)]
enum LabCommand {
    /// Start a lab in the foreground, print the variables to export, tear down on Ctrl-C
    Up {
        /// Also write the `export` lines to this file, for `source` in another shell
        #[arg(long)]
        env_file: Option<PathBuf>,
    },
    /// Build (or reuse cached) lab binaries and print their directory
    Build,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (xtask lives inside it).
fn workspace() -> Result<PathBuf> {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .context("xtask lives inside the workspace")
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Bench(args) => bench::run(&workspace()?, args)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Demo => demo::run(&workspace()?).await,
        Command::Fuzz(args) => fuzz::run(&workspace()?, args).await,
        Command::Lab {
            command: LabCommand::Build,
        } => {
            let bins = Binaries::locate().await?;
            println!("{}", bins.dir().display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab {
            command: LabCommand::Up { env_file },
        } => lab_up(env_file).await.map(|()| ExitCode::SUCCESS),
        Command::Man => {
            let dir = workspace()?.join("controller/man");
            let written = tailbox::write_man_pages(&dir)
                .with_context(|| format!("writing the man pages to {}", dir.display()))?;
            for page in written {
                println!("{}", page.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            let dir = workspace()?.join("docs/schema");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (file, text) in tailbox_proto::schema::generate_files()? {
                let path = dir.join(file);
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::StaticAgent { mut targets } => {
            let workspace = workspace()?;
            if targets.is_empty() {
                targets
                    .push(Arch::host().context(
                        "this machine's architecture has no agent build; pass --target",
                    )?);
            }
            for arch in targets {
                let binary = static_agent::build_and_verify(&workspace, arch)?;
                let size = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0);
                eprintln!(
                    "static {arch} agent OK: ELF machine {arch}, no ELF interpreter, no shared libraries, {size} bytes (budget: {})",
                    static_agent::size_budget(arch)
                        .map_or_else(|| "none yet".to_owned(), |b| format!("{b} bytes"))
                );
                println!("{}", binary.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn lab_up(env_file: Option<PathBuf>) -> Result<()> {
    eprintln!("starting the tailnet lab (the first run builds tailscale, which takes minutes)...");
    let lab = Lab::start().await?;

    let tailscaled_env: BTreeMap<String, String> = lab.tailscaled_env();
    let exports = [
        // The lab's own throwaway key: it is only good against this loopback control.
        ("TS_AUTHKEY", lab.auth_key().to_owned()),
        ("TS_CONTROL_URL", lab.control_url().to_owned()),
        ("COOK_TAIL_IP", lab.peer_ipv4().to_string()),
        ("COOK_HTTP_URL", lab.health_url()),
        ("COOK_GIT_URL", lab.git_url()),
        (
            "TAILBOX_TAILSCALED_ENV",
            serde_json::to_string(&tailscaled_env).context("encoding the tailscaled env")?,
        ),
        (BIN_DIR_ENV, lab.bins().dir().display().to_string()),
    ];
    let mut script = String::new();
    for (name, value) in &exports {
        script.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }

    println!("# tailbox lab is up; paste these into another shell (Ctrl-C here tears it down)");
    print!("{script}");
    if let Some(path) = &env_file {
        std::fs::write(path, &script).with_context(|| format!("writing {}", path.display()))?;
        println!("# also written to {}", path.display());
    }
    println!("#");
    println!("# dev-host peer {} / {}", lab.peer_ipv4(), lab.peer_ipv6());
    println!(
        "#   try: curl --socks5-hostname {} $COOK_HTTP_URL",
        lab.peer_socks5_addr()
    );
    println!(
        "#   try: ALL_PROXY=socks5h://{} git ls-remote $COOK_GIT_URL",
        lab.peer_socks5_addr()
    );
    for (name, sha) in lab.git_refs() {
        println!("#   ref {sha} {name}");
    }
    let env_words: Vec<String> = tailscaled_env
        .iter()
        .map(|(k, v)| format!("{k}={}", shell_quote(v)))
        .collect();
    println!("#   tailscaled env: {}", env_words.join(" "));
    println!("#   logs: {}", lab.dir().join("logs").display());
    println!(
        "#   peer CLI: {} --socket={} status",
        lab.bins().tailscale().display(),
        lab.peer().socket().display()
    );

    let outcome = tokio::select! {
        r = wait_for_shutdown() => r,
        e = watch_lab(&lab) => Err(e),
    };
    eprintln!("tearing the lab down");
    drop(lab);
    if let Some(path) = env_file {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

/// Resolves only if a lab process dies, so a person sees it instead of a silently broken lab.
async fn watch_lab(lab: &Lab) -> anyhow::Error {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Err(e) = lab.check_alive() {
            return e;
        }
    }
}

async fn wait_for_shutdown() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}

/// Single-quotes a value for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("http://x:1/a"), "'http://x:1/a'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
