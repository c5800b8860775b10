//! The real `tailbox-agent` binary for tests in other crates.
//!
//! Cargo only builds a package's own binaries for its integration tests, so tests of the
//! controller ask cargo for the agent here (a no-op when it is fresh).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of a freshly built `tailbox-agent` (debug profile). Panics with the build output if the
/// build fails: a missing agent must fail the test, never skip it.
pub fn agent_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--package",
                "tailbox-agent",
                "--bin",
                "tailbox-agent",
                "--message-format=json",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo to build tailbox-agent");
        assert!(
            output.status.success(),
            "building tailbox-agent failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["reason"] == "compiler-artifact")
            .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .find(|path| path.file_name().is_some_and(|n| n == "tailbox-agent"))
            .expect("cargo reported no tailbox-agent executable")
    })
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
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "x86_64-unknown-linux-musl",
                "--package",
                "tailbox-agent",
                "--bin",
                "tailbox-agent",
                "--message-format=json",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo to build the static tailbox-agent");
        assert!(
            output.status.success(),
            "building the static tailbox-agent failed (is the x86_64-unknown-linux-musl target installed, and musl-tools?):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["reason"] == "compiler-artifact")
            .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .find(|path| path.file_name().is_some_and(|n| n == "tailbox-agent"))
            .expect("cargo reported no static tailbox-agent executable")
    })
    .clone()
}
