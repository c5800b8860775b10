//! The real `tailbox-agent` binaries for tests in other crates.
//!
//! Cargo only builds a package's own binaries for its integration tests, so tests of the
//! controller ask cargo for the agent here (a no-op when it is fresh).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use tailbox_proto::arch::Arch;

/// Wraps a reader (an agent's stdout) and keeps a copy of every byte read through it.
pub struct Recorder<R> {
    inner: R,
    copy: std::sync::Arc<Mutex<Vec<u8>>>,
}

impl<R> Recorder<R> {
    /// The recorder, and where its copy accumulates.
    pub fn new(inner: R) -> (Self, std::sync::Arc<Mutex<Vec<u8>>>) {
        let copy = std::sync::Arc::default();
        (
            Self {
                inner,
                copy: std::sync::Arc::clone(&copy),
            },
            copy,
        )
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Recorder<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.copy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(&new);
        poll
    }
}

/// A gRPC channel over one byte stream that is already connected to an agent: a child's
/// stdin/stdout (`serve --stdio`, `attach`), joined with `tokio::io::join`. Single-use, as the
/// stream is. Panics if the connection fails (see [`try_channel_over`]).
pub async fn channel_over<IO>(io: IO) -> tonic::transport::Channel
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    try_channel_over(io)
        .await
        .unwrap_or_else(|err| panic!("connecting over the agent's stream: {err}"))
}

/// [`channel_over`], with the connection's failure as an error.
pub async fn try_channel_over<IO>(
    io: IO,
) -> Result<tonic::transport::Channel, tonic::transport::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let io = std::sync::Arc::new(std::sync::Mutex::new(Some(io)));
    tonic::transport::Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_| {
            let io = io.lock().ok().and_then(|mut io| io.take());
            async move {
                io.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the agent's stream is single-use"))
            }
        }))
        .await
}

/// `agent serve --stdio` as the controller runs it: stdin and stdout piped (the gRPC wire),
/// stderr discarded (pipe it with `.stderr(…)` to read it), killed when dropped.
pub fn serve_stdio_command(agent: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(agent);
    command
        .args(["serve", "--stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// Path of a freshly built `tailbox-agent` (debug profile, for this machine). Panics with the
/// build output if the build fails: a missing agent must fail the test, never skip it.
pub fn agent_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(build_debug_agent).clone()
}

/// Path of a freshly built static `tailbox-agent` for this machine's architecture (musl, release
/// profile), the binary that is uploaded into sandboxes. See [`static_agent_binary_for`].
pub fn static_agent_binary() -> PathBuf {
    static_agent_binary_for(Arch::host().expect("tests run on an architecture with an agent build"))
}

/// Path of a freshly built and verified static `tailbox-agent` for `arch`, built by the command
/// CI runs, `cargo xtask static-agent --target <arch's musl target>` (a no-op when fresh). The
/// host's architecture needs the musl target and `musl-tools`; another also needs the pinned
/// zig toolchain (`scripts/setup` installs all of them). Panics with the build output if the
/// build fails: a missing agent must fail the test, never skip it.
pub fn static_agent_binary_for(arch: Arch) -> PathBuf {
    static PATHS: Mutex<BTreeMap<Arch, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut paths = PATHS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    paths
        .entry(arch)
        .or_insert_with(|| build_static_agent(arch))
        .clone()
}

fn build_static_agent(arch: Arch) -> PathBuf {
    let output = cargo(
        &[
            "run",
            "--quiet",
            "--locked",
            "--package",
            "xtask",
            "--",
            "static-agent",
            "--target",
            arch.rust_target(),
        ],
        &format!("the static {arch} agent (scripts/setup installs what its build needs)"),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("cargo xtask static-agent printed no path for {arch}"));
    PathBuf::from(path.trim())
}

/// Runs `cargo build` for the agent and returns the executable cargo reports.
fn build_debug_agent() -> PathBuf {
    let what = "tailbox-agent";
    let output = cargo(
        &[
            "build",
            "--quiet",
            "--package",
            "tailbox-agent",
            "--bin",
            "tailbox-agent",
            "--message-format=json",
        ],
        what,
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .find(|path| path.file_name().is_some_and(|n| n == "tailbox-agent"))
        .unwrap_or_else(|| panic!("cargo reported no executable for {what}"))
}

/// Runs cargo with `args` in the workspace; panics with its stderr unless it succeeds.
fn cargo(args: &[&str], what: &str) -> Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|err| panic!("run cargo to build {what}: {err}"));
    assert!(
        output.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
