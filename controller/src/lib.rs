#![doc = include_str!("../README.md")]
//!
//! Module map, from the bottom layer up (a module only uses modules listed before it; the
//! `layers` test checks this):
//! - [`env`]: every environment variable; [`secret`]: redaction; [`process`]: how a process
//!   ended; [`output`]: the only stdout writer.
//! - [`modal`]: a native client for Modal's gRPC API, with its own error type.
//! - [`transport`]: gRPC over a byte stream.
//! - [`backend`]: where the agent runs (this machine or a Modal sandbox), behind one
//!   `Backend`/`Sandbox` abstraction with its own error type.
//! - [`session`]: handshake, `Run` and the event stream with one agent, shown through an
//!   observer.
//! - [`cli`]: flags; [`plan`]: flags and environment validated into a plan; [`progress`]: the
//!   live lines on a terminal; [`render`]: progress, tables and JSON; [`error`]: every layer's error worded for people, with hints
//!   and exit codes.
//! - [`fleet`]: a fan-out's sandboxes folded into one report, its exit-code policy and summary.
//! - [`pictures`]: `--timeline` and `--report-html`, drawn from the reports.
//! - [`app`]: the subcommands.
//!
//! The binary is the product; this library exists for the binary and for the integration
//! tests, which reach the internals only through [`testing`].

mod app;
mod backend;
mod cli;
mod env;
mod error;
mod fleet;
mod modal;
mod output;
mod pictures;
mod plan;
mod process;
mod progress;
mod render;
mod secret;
mod session;
mod transport;

pub use app::{run_and_report, runtime_error};
pub use cli::Cli;
pub use env::ProcessEnv;
pub use error::ExitStatus;

/// Writes the man pages, `tailbox.1` and one per subcommand (`tailbox-check.1`, …), generated
/// from the same clap definitions as `--help`, into `dir` (replacing the pages it had), and
/// returns their paths. `cargo xtask man` runs it on `controller/man/`.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "1") {
            std::fs::remove_file(path)?;
        }
    }
    let mut command = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    command.build();
    let mut pages = Vec::new();
    write_man_page(&command, dir, &mut pages)?;
    pages.sort();
    Ok(pages)
}

/// One command's page, then its subcommands'. clap_mangen renders every section but the text
/// after the options, which it would fill like prose: there, `Exit codes:` and `Examples:`
/// become sections of their own, their lines kept as written.
fn write_man_page(
    command: &clap::Command,
    dir: &std::path::Path,
    pages: &mut Vec<std::path::PathBuf>,
) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_page(sub, dir, pages)?;
    }
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if command.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if command.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut page)?;
    }
    if let Some(after) = command.get_after_help() {
        let mut roff = roff::Roff::new();
        for line in after.to_string().lines() {
            match line.strip_suffix(':') {
                Some(title) if !line.starts_with(' ') => {
                    roff.control("fi", []);
                    roff.control("SH", [title.to_uppercase().as_str()]);
                    roff.control("nf", []);
                }
                _ => {
                    roff.text([roff::roman(line)]);
                }
            }
        }
        roff.control("fi", []);
        roff.to_writer(&mut page)?;
    }
    if command.get_version().is_some() {
        man.render_version_section(&mut page)?;
    }
    let path = dir.join(man.get_filename());
    std::fs::write(&path, page)?;
    pages.push(path);
    Ok(())
}

/// What the integration tests drive directly: the Modal client against the fake Modal, and a
/// session against an in-memory agent. Not for other uses.
pub mod testing {
    pub use crate::backend::{AgentProcess, ProcessExit};
    pub use crate::env::MapEnv;
    pub use crate::error::CliError;
    pub use crate::modal::client::ModalClient;
    pub use crate::modal::router::Router;
    pub use crate::modal::stdio::{ExecReader, ExecWriter, Fd};
    pub use crate::modal::{ModalError, config, fs};
    pub use crate::plan::OutputMode;
    pub use crate::render::Renderer;
    pub use crate::session::{SessionOutcome, run as run_session};
}

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing` only): each feeds outside
/// bytes to the code that reads them, as tailbox does, and lets the result be dropped. Not for
/// other uses.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use tailbox_proto::agent::v1::agent_client::AgentClient;
    use tailbox_proto::agent::v1::{HelloRequest, RunRequest};
    use tokio::io::{AsyncRead, AsyncWrite};

    use crate::env::MapEnv;
    use crate::error::CliError;
    use crate::modal::config;
    use crate::modal::fs::{self, ExecOutput};
    use crate::process::ProcessExit;

    /// fs-tools' `Stat` output (exit code, stdout, stderr): read as tailbox reads it, the
    /// execute bit included, and any error worded for people.
    pub fn fs_tools_stat(code: i32, stdout: &[u8], stderr: &[u8]) {
        let output = ExecOutput {
            exit: ProcessExit::Code(code),
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
        };
        match fs::stat_answer("inspect /fuzz in the sandbox".into(), &output) {
            Ok(info) => {
                let _ = info.and_then(|i| i.executable());
            }
            Err(err) => {
                let _ = CliError::from(err).render();
            }
        }
    }

    /// A Modal config file's text, with `MODAL_PROFILE` set or not: resolved as tailbox does,
    /// and any error worded for people.
    pub fn modal_config(text: &str, profile: Option<&str>) {
        let env = MapEnv::from_pairs(profile.map(|p| ("MODAL_PROFILE", p)));
        if let Err(err) = config::resolve_text(&env, "/fuzz/.modal.toml".into(), text) {
            let _ = CliError::from(err).render();
        }
    }

    /// The agent's side of the wire (its stdout, as the exec's stdio carries it) in `io`:
    /// tailbox's gRPC channel over it, a `Hello`, then a `Run` whose events are read to the end.
    pub async fn agent_wire<IO>(io: IO) -> Result<(), String>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let channel = crate::transport::connect(io)
            .await
            .map_err(|e| e.to_string())?;
        let mut client = AgentClient::new(channel);
        client
            .hello(HelloRequest::default())
            .await
            .map_err(|e| e.to_string())?;
        let mut events = client
            .run(RunRequest::default())
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        while let Some(_event) = events.message().await.map_err(|e| e.to_string())? {}
        Ok(())
    }
}
