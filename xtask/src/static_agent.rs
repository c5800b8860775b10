//! `cargo xtask static-agent`: build tailbox-agent as a static Linux binary for each architecture
//! asked for, and prove it.
//!
//! The sandbox image may have no FHS loader (the Nix image has none), so the agent must not
//! need one: no PT_INTERP, no shared libraries, `file` must say it is statically linked, and its
//! ELF machine must be the architecture it was built for.
//!
//! The host's architecture builds with plain cargo (C code through `musl-gcc` from musl-tools).
//! Any other needs a C cross compiler for libgit2 and mimalloc: zig, driven by cargo-zigbuild,
//! both pinned in `scripts/cross-requirements.txt` and installed by `scripts/cross-toolchain`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tailbox_proto::arch::Arch;

/// The cargo profile of what ships (Cargo.toml: small over fast, fat LTO).
pub const PROFILE: &str = "dist";

/// The static agent's size budget, checked on every build: every new sandbox uploads all of it
/// (issue #9; docs/benchmarks.md has the measured sizes and what each lever saved).
pub const SIZE_BUDGET_BYTES: u64 = 5 * 1024 * 1024;

/// The budget that holds for `arch`. Both were measured from the `dist` build: x86_64
/// 5,153,624 bytes, aarch64 4,469,240 bytes.
pub fn size_budget(arch: Arch) -> Option<u64> {
    match arch {
        Arch::X86_64 | Arch::Aarch64 => Some(SIZE_BUDGET_BYTES),
    }
}

/// Builds the shipping (`dist` profile) agent for `arch` and verifies it; returns the binary's path.
pub fn build_and_verify(workspace: &Path, arch: Arch) -> Result<PathBuf> {
    let target = arch.rust_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    command.current_dir(workspace);
    let cross = Arch::host() != Some(arch);
    if cross {
        let bin_dir = cross_toolchain(workspace)?;
        // cargo finds the `zigbuild` subcommand on PATH; cargo-zigbuild finds zig as the
        // `ziglang` module of that venv's python.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(bin_dir.clone()).chain(std::env::split_paths(&path)),
        )
        .context("put the cross toolchain on PATH")?;
        command
            .env("PATH", path)
            .env("CARGO_ZIGBUILD_PYTHON_PATH", bin_dir.join("python"))
            .arg("zigbuild");
    } else {
        command.arg("build");
    }
    let status = command
        .args([
            "--locked",
            "--profile",
            PROFILE,
            "--package",
            "tailbox-agent",
            "--target",
            target,
        ])
        .status()
        .context("run cargo build for the static agent")?;
    if !status.success() {
        let needs = if cross {
            "the pinned zig toolchain (scripts/cross-toolchain)"
        } else {
            "the musl-tools package"
        };
        bail!(
            "building the static {arch} agent failed ({status}); it needs `rustup target add {target}` and {needs}; scripts/setup installs both"
        );
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target_dir.join(target).join(PROFILE).join("tailbox-agent");
    verify(&binary, arch)?;
    if let Some(budget) = size_budget(arch) {
        within_budget(&binary, budget)?;
    }
    Ok(binary)
}

/// Fails if `binary` is larger than `budget` bytes.
pub fn within_budget(binary: &Path, budget: u64) -> Result<u64> {
    let size = std::fs::metadata(binary)
        .with_context(|| format!("read {}", binary.display()))?
        .len();
    if size > budget {
        bail!(
            "{} is {size} bytes, over the static agent's budget of {budget} bytes ({:.2} MiB > {:.2} MiB); see docs/benchmarks.md for what makes it smaller",
            binary.display(),
            size as f64 / 1048576.0,
            budget as f64 / 1048576.0
        );
    }
    Ok(size)
}

/// The bin dir of the pinned cross toolchain, which `scripts/setup` installs.
fn cross_toolchain(workspace: &Path) -> Result<PathBuf> {
    let script = workspace.join("scripts/cross-toolchain");
    let output = Command::new(&script)
        .arg("--check")
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().last() {
        Some(dir) if output.status.success() => Ok(PathBuf::from(dir.trim())),
        _ => bail!(
            "the C cross toolchain for the static agent is missing: {}run scripts/setup",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Fails unless `binary` is a static ELF executable for `arch`.
pub fn verify(binary: &Path, arch: Arch) -> Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .with_context(|| format!("{} is not an ELF file", binary.display()))?;
    if elf.header.e_machine != arch.elf_machine() {
        bail!(
            "{} is built for ELF machine {}, not {arch}",
            binary.display(),
            goblin::elf::header::machine_to_str(elf.header.e_machine)
        );
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

    use tailbox_proto::arch::Arch;

    use super::{verify, within_budget};

    fn host() -> Arch {
        Arch::host().expect("tests run on an architecture with an agent build")
    }

    #[test]
    fn a_dynamically_linked_binary_is_refused() {
        // Test binaries for the host (glibc) have an ELF interpreter.
        let me = std::env::current_exe().unwrap();
        let err = verify(&me, host()).expect_err("this test binary is dynamically linked");
        assert!(
            format!("{err:#}").contains("has an ELF interpreter"),
            "{err:#}"
        );
    }

    #[test]
    fn a_binary_for_another_architecture_is_refused() {
        let me = std::env::current_exe().unwrap();
        let other = Arch::ALL.into_iter().find(|&a| a != host()).unwrap();
        let err = verify(&me, other).expect_err("this test binary is for the host");
        assert!(
            format!("{err:#}").contains(&format!("not {other}")),
            "{err:#}"
        );
    }

    #[test]
    fn a_binary_over_the_size_budget_is_refused() {
        let me = std::env::current_exe().unwrap();
        let size = std::fs::metadata(&me).unwrap().len();
        assert_eq!(within_budget(&me, size).unwrap(), size);
        let err = within_budget(&me, size - 1).expect_err("one byte over");
        assert!(
            format!("{err:#}").contains("over the static agent's budget"),
            "{err:#}"
        );
    }

    #[test]
    fn a_file_that_is_not_elf_is_refused() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let err = verify(&manifest, host()).expect_err("Cargo.toml is not a binary");
        assert!(format!("{err:#}").contains("is not an ELF file"), "{err:#}");
    }
}
