//! `tailbox-agent`: the in-sandbox half of tailbox.
//!
//! `tailbox-agent serve --stdio` serves the `tailbox.agent.v1` gRPC service on its own stdin/stdout.
//! Stdout is the wire: every log line and panic message goes to stderr, and the lints below keep
//! stray prints out of the code.
#![deny(clippy::print_stdout, clippy::disallowed_methods)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tailbox_agent::{logging, server, stdio};

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Serve on this process's stdin/stdout (the only transport today).
    #[arg(long, required = true)]
    stdio: bool,

    /// Log filter for stderr, in tracing-subscriber's EnvFilter syntax.
    #[arg(long, default_value = "warn,tailbox_agent=info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    debug_assert!(args.stdio);
    // First, before any thread or library can write to fd 1: move the wire off fds 0/1.
    let wire = match stdio::take_stdio() {
        Ok(wire) => wire,
        Err(err) => {
            logging::emergency(&format!(
                "cannot take stdin/stdout for the gRPC wire: {err}"
            ));
            return ExitCode::from(70);
        }
    };
    logging::init(&args.log);
    logging::install_panic_hook();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tailbox-agent")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(server::serve_stdio(wire)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("serve failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
