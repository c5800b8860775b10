//! The real `tailbox-agent` binaries for tests in other crates.
//!
//! Cargo only builds a package's own binaries for its integration tests, so tests of the
//! controller ask cargo for the agent here (a no-op when it is fresh).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// A gRPC channel over one byte stream that is already connected to an agent: a child's
/// stdin/stdout (`serve --stdio`, `attach`), joined with `tokio::io::join`. Single-use, as the
/// stream is.
pub async fn channel_over<IO>(io: IO) -> tonic::transport::Channel
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
        .unwrap_or_else(|err| panic!("connecting over the agent's stream: {err}"))
}

/// Path of a freshly built `tailbox-agent` (debug profile, for this machine). Panics with the
/// build output if the build fails: a missing agent must fail the test, never skip it.
pub fn agent_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| build_agent(&[], "tailbox-agent"))
        .clone()
}

/// Path of a freshly built static `tailbox-agent` for x86_64 Linux (musl, release profile),
/// the binary that is uploaded into sandboxes:
/// `cargo build --release --target x86_64-unknown-linux-musl -p tailbox-agent`.
/// Needs the musl target (`rustup target add x86_64-unknown-linux-musl`) and `musl-tools`.
/// Panics with the build output if the build fails.
pub fn static_agent_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        build_agent(
            &["--release", "--target", "x86_64-unknown-linux-musl"],
            "the static tailbox-agent (is the x86_64-unknown-linux-musl target installed, and musl-tools?)",
        )
    })
    .clone()
}

/// Runs `cargo build` for the agent with `extra` flags and returns the executable cargo reports.
fn build_agent(extra: &[&str], what: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--quiet"])
        .args(extra)
        .args([
            "--package",
            "tailbox-agent",
            "--bin",
            "tailbox-agent",
            "--message-format=json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|err| panic!("run cargo to build {what}: {err}"));
    assert!(
        output.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .find(|path| path.file_name().is_some_and(|n| n == "tailbox-agent"))
        .unwrap_or_else(|| panic!("cargo reported no executable for {what}"))
}
