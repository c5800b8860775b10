//! `tailbox-agent`: the in-sandbox half of tailbox.
//!
//! `tailbox-agent serve --stdio` serves the `tailbox.agent.v1` gRPC service on its own stdin/stdout;
//! `tailbox-agent sidecar` keeps a node up for the sandbox's life, and `attach`, `status`, `env`
//! and `down` reach it. Stdout is the wire (or, for `status` and `env`, data written by the
//! `output` module): every log line and panic message goes to stderr, and the lints below keep
//! stray prints out of the code.
#![deny(clippy::print_stdout, clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use tailbox_agent::commands::{self, Failure};
use tailbox_agent::sidecar::start::StartOptions;
use tailbox_agent::sidecar::{DEFAULT_STATE_DIR, StateDir, daemon, exit};
use tailbox_agent::{logging, server, stdio};

#[cfg(all(target_env = "musl", feature = "mimalloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes shared by the sidecar commands, for `--help`.
const SIDECAR_EXIT_CODES: &str = "\
Exit codes:
  0  done (the sidecar serves; the node is Running; the variables were printed; it is down)
  1  it did not work (the sidecar failed to start; the node is not Running or not up; the logout failed)
  2  usage error
  3  no sidecar answers in the state directory
  4  another sidecar holds the state directory (another version: use `--replace`)";

const DEFAULT_LOG_FILTER: &str = "warn,tailbox_agent=info";

/// The in-sandbox half of tailbox.
#[derive(Debug, Parser)]
#[command(name = "tailbox-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the tailbox.agent.v1 gRPC service.
    Serve(ServeArgs),
    /// Keep this sandbox on the tailnet: start the sidecar (or reuse the running one) and return
    /// once it serves on its socket; bring the node up with `tailbox up`.
    #[command(after_help = SIDECAR_EXIT_CODES)]
    Sidecar(SidecarArgs),
    /// Bridge stdin/stdout to the sidecar's socket, so the controller reaches the running sidecar
    /// through a new exec as it reaches `serve --stdio`.
    #[command(after_help = SIDECAR_EXIT_CODES)]
    Attach(StateDirArg),
    /// Print the sidecar's status; exit 0 when the node is Running.
    #[command(after_help = SIDECAR_EXIT_CODES)]
    Status(StatusArgs),
    /// Print the variables that send other programs through the tailnet proxy:
    /// `eval "$(tailbox-agent env)"`.
    #[command(after_help = SIDECAR_EXIT_CODES)]
    Env(EnvArgs),
    /// Log the node out, stop tailscaled and end the sidecar (nothing running is fine).
    #[command(after_help = SIDECAR_EXIT_CODES)]
    Down(DownArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Serve on this process's stdin/stdout (the only transport today).
    #[arg(long, required = true)]
    stdio: bool,

    /// Log filter for stderr, as `level,target=level,...` (tracing-subscriber's Targets syntax).
    #[arg(long, default_value = DEFAULT_LOG_FILTER)]
    log: String,
}

#[derive(Debug, Clone, clap::Args)]
struct StateDirArg {
    /// The sidecar's directory: its socket, lock, pidfile and log, and tailscaled's state.
    #[arg(long, env = "TAILBOX_SIDECAR_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct SidecarArgs {
    #[command(flatten)]
    state_dir: StateDirArg,

    /// Take down a running sidecar of another version (its node logs out) and start this one.
    #[arg(long)]
    replace: bool,

    /// Run the sidecar in this process instead of detaching (for an init system or a container
    /// entrypoint); logs go to stderr.
    #[arg(long)]
    foreground: bool,

    /// How long the sidecar may take to serve, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// The sidecar's log filter, as `level,target=level,...` (tracing-subscriber's Targets syntax).
    #[arg(long, default_value = DEFAULT_LOG_FILTER)]
    log: String,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    state_dir: StateDirArg,

    /// Print one JSON object (the proto3 JSON of `SidecarStatus`).
    #[arg(long)]
    json: bool,

    /// Wait up to this long for the node to be Running (and for the sidecar to answer), e.g. `30s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
}

#[derive(Debug, clap::Args)]
struct EnvArgs {
    #[command(flatten)]
    state_dir: StateDirArg,

    /// Print one JSON object mapping names to values instead of `export` lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct DownArgs {
    #[command(flatten)]
    state_dir: StateDirArg,

    /// Time for the logout and for stopping tailscaled, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Sidecar(args) if args.foreground => sidecar_foreground(args),
        Command::Sidecar(args) => {
            logging::init(&args.log);
            let options = StartOptions {
                state_dir: StateDir::new(args.state_dir.state_dir),
                replace: args.replace,
                log: args.log,
                timeout: args.timeout,
            };
            script(async move { commands::sidecar(&options).await })
        }
        Command::Attach(args) => attach(args),
        Command::Status(args) => {
            logging::init("warn");
            let state_dir = StateDir::new(args.state_dir.state_dir);
            script(async move { commands::status(&state_dir, args.json, args.wait).await })
        }
        Command::Env(args) => {
            logging::init("warn");
            let state_dir = StateDir::new(args.state_dir.state_dir);
            script(async move { commands::env(&state_dir, args.json).await })
        }
        Command::Down(args) => {
            logging::init("warn");
            let state_dir = StateDir::new(args.state_dir.state_dir);
            script(async move { commands::down(&state_dir, args.grace).await })
        }
    }
}

/// Runs a command on a small runtime and turns its outcome into the exit code.
fn script(command: impl Future<Output = Result<u8, Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return ExitCode::from(Failure::new(exit::FAILED, &err).report()),
    };
    match runtime.block_on(command) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => ExitCode::from(failure.report()),
    }
}

/// Takes stdin/stdout off fds 0/1 (see `stdio`), or exits.
fn take_wire() -> Result<stdio::Wire, ExitCode> {
    stdio::take_stdio().map_err(|err| {
        logging::emergency(&format!(
            "cannot take stdin/stdout for the gRPC wire: {err}"
        ));
        ExitCode::from(70)
    })
}

fn attach(args: StateDirArg) -> ExitCode {
    // First, before anything can write to fd 1: the wire is the controller's.
    let wire = match take_wire() {
        Ok(wire) => wire,
        Err(code) => return code,
    };
    logging::init("warn");
    logging::install_panic_hook();
    let state_dir = StateDir::new(args.state_dir);
    script(async move { commands::attach(&state_dir, wire).await })
}

fn sidecar_foreground(args: SidecarArgs) -> ExitCode {
    // The sidecar never writes to stdout; make sure nothing else does either, and that no child
    // holds the terminal's or the exec's stdin.
    if let Err(code) = take_wire() {
        return code;
    }
    logging::init(&args.log);
    logging::install_panic_hook();
    let Some(runtime) = multi_thread_runtime() else {
        return ExitCode::from(70);
    };
    let state_dir = StateDir::new(args.state_dir.state_dir);
    match runtime.block_on(daemon::run(state_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => ExitCode::from(Failure::new(err.exit_code(), &err).report()),
    }
}

fn multi_thread_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tailbox-agent")
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            None
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    debug_assert!(args.stdio);
    // First, before any thread or library can write to fd 1: move the wire off fds 0/1.
    let wire = match take_wire() {
        Ok(wire) => wire,
        Err(code) => return code,
    };
    logging::init(&args.log);
    logging::install_panic_hook();
    let Some(runtime) = multi_thread_runtime() else {
        return ExitCode::from(70);
    };
    match runtime.block_on(server::serve_stdio(wire)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("serve failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
