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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::verify;

    #[test]
    fn a_dynamically_linked_binary_is_refused() {
        // Test binaries for the host (x86_64 glibc) have an ELF interpreter.
        let me = std::env::current_exe().unwrap();
        let err = verify(&me).expect_err("this test binary is dynamically linked");
        assert!(
            format!("{err:#}").contains("has an ELF interpreter"),
            "{err:#}"
        );
    }

    #[test]
    fn a_file_that_is_not_elf_is_refused() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let err = verify(&manifest).expect_err("Cargo.toml is not a binary");
        assert!(format!("{err:#}").contains("is not an ELF file"), "{err:#}");
    }
}
