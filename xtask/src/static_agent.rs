//! `cargo xtask static-agent`: build tailbox-agent as a static x86_64 Linux binary and prove it.
//!
//! The sandbox image may have no FHS loader (the Nix image has none), so the agent must not
//! need one: no PT_INTERP, and `file` must say it is statically linked.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The target the agent ships for.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds (release, musl) and verifies; returns the binary's path.
pub fn build_and_verify(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--locked",
            "--release",
            "--package",
            "tailbox-agent",
            "--target",
            TARGET,
        ])
        .status()
        .context("run cargo build for the static agent")?;
    if !status.success() {
        bail!(
            "building the static agent failed ({status}); it needs `rustup target add {TARGET}` and the musl-tools package (scripts/setup installs both)"
        );
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target_dir
        .join(TARGET)
        .join("release")
        .join("tailbox-agent");
    verify(&binary)?;
    Ok(binary)
}

/// Fails unless `binary` is a static x86_64 ELF executable.
pub fn verify(binary: &Path) -> Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .with_context(|| format!("{} is not an ELF file", binary.display()))?;
    if elf.header.e_machine != goblin::elf::header::EM_X86_64 {
        bail!("{} is not an x86_64 binary", binary.display());
    }
    if let Some(interp) = elf.interpreter {
        bail!(
            "{} has an ELF interpreter ({interp}); it is dynamically linked",
            binary.display()
        );
    }
    if !elf.libraries.is_empty() {
        bail!(
            "{} needs shared libraries: {:?}",
            binary.display(),
            elf.libraries
        );
    }
    // Belt and braces: the tool people use to check this must agree.
    let output = Command::new("file")
        .arg(binary)
        .output()
        .context("run `file` (apt-get install file)")?;
    let description = String::from_utf8_lossy(&output.stdout);
    if !(description.contains("statically linked") || description.contains("static-pie linked")) {
        bail!("`file` does not call it static: {description}");
    }
    Ok(())
}
