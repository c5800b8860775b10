//! `tailbox`: the controller CLI. See the crate docs for the module map.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tailbox::Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprint!("{}", tailbox::runtime_error(err));
            return ExitCode::from(tailbox::ExitStatus::Infrastructure.code());
        }
    };
    let status = runtime.block_on(tailbox::run_and_report(cli, &tailbox::ProcessEnv));
    // Don't wait for blocking tasks (e.g. a stuck stdin read) at exit.
    runtime.shutdown_background();
    ExitCode::from(status.code())
}

/// Controller diagnostics (not results) go to stderr, off unless TAILBOX_LOG is set.
fn init_logging() {
    let filter = std::env::var("TAILBOX_LOG").unwrap_or_else(|_| "off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}
