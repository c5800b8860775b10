//! Which CPU architecture a sandbox has, and which agent and tailscale binaries fit it.
//!
//! **Learning the architecture with no tool in the image.** Images need not have `uname`, a
//! shell or anything else, so tailbox asks the one program every Modal sandbox runs for it:
//! Modal's own `modal-sandbox-fs-tools`, which tailbox already needs for uploads. Its
//! `ReadFile` of `/proc/self/exe` reads the helper's own executable, a native ELF for the CPU
//! the sandbox runs on (gVisor and runc both run native code), and the ELF header's `e_machine`
//! names that CPU. Only the first 20 bytes are read; the rest of the stream is dropped. Other
//! sources were weighed and left: `/proc/sys/kernel/arch` is missing from older kernels and
//! gVisor, `/proc/cpuinfo` differs per architecture and per runtime, and Modal's `Image.arch`
//! is not known when attaching to an existing sandbox.
//!
//! **Agents.** `--agent` takes files and directories, as many as needed: each file's
//! architecture comes from its ELF header (names are not trusted), and a directory is searched
//! for `tailbox-agent` and `tailbox-agent-<arch>` files and cargo's `<target>/release/tailbox-agent`
//! (so `--agent target` finds both static builds). Each must be static: the image may have no
//! loader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;
use goblin::elf::header::{ET_DYN, ET_EXEC};
use tailbox_proto::arch::{Arch, ELF_MACHINE_PREFIX_LEN};

use crate::backend::modal::LocalBinary;
use crate::error::{CliError, CliResult};
use crate::modal::fs;
use crate::modal::router::Router;

/// The file whose ELF header names the sandbox's CPU: the fs-tools process's own executable.
const SELF_EXE: &str = "/proc/self/exe";

/// The build command for `arch`'s static agent, for hints.
pub fn static_build_command(arch: Arch) -> String {
    format!("cargo xtask static-agent --target {}", arch.rust_target())
}

/// Why the agents or the tailscale binaries do not fit.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// An agent named on the command line could not be read.
    #[error("Failed to read the agent binary {}", path.display())]
    ReadAgent {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An agent that is not a static ELF executable for a known architecture.
    #[error("The agent {} cannot run in a sandbox", path.display())]
    NotStatic {
        /// The path given.
        path: PathBuf,
        /// Why not.
        #[source]
        why: NotStaticError,
    },
    /// Two agents for one architecture.
    #[error("Two agents for {arch} were given: {} and {}", first.display(), second.display())]
    Duplicate {
        /// The architecture.
        arch: Arch,
        /// One of them.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// A directory with no static agent in it.
    #[error("Failed to find a static tailbox-agent in {}", dir.display())]
    EmptyDirectory {
        /// The directory given.
        dir: PathBuf,
    },
    /// No agent was given and none was found next to tailbox.
    #[error("Failed to find a static tailbox-agent to upload next to tailbox")]
    NoneFound,
    /// The sandbox's architecture has no agent among those given.
    #[error(
        "The sandbox is {sandbox}, but no {sandbox} agent was given (have: {})",
        list(have)
    )]
    NoAgentFor {
        /// The sandbox's architecture.
        sandbox: Arch,
        /// The architectures of the agents at hand.
        have: Vec<Arch>,
    },
    /// The tailscale tarball is for another architecture than the sandbox.
    #[error("The tailscale tarball {} holds {found} binaries, but the sandbox is {sandbox}", tarball.display())]
    TailscaleMismatch {
        /// The tarball.
        tarball: PathBuf,
        /// What its binaries are built for.
        found: Arch,
        /// The sandbox's architecture.
        sandbox: Arch,
    },
    /// A binary in the tailscale tarball is not an ELF for a known architecture.
    #[error("The tailscale tarball's {} is not a Linux binary tailbox can push", path.display())]
    TailscaleNotElf {
        /// The binary, as `<tarball>/<member>`.
        path: PathBuf,
        /// Why.
        #[source]
        why: tailbox_proto::arch::ElfArchError,
    },
    /// tailscaled and tailscale in one tarball disagree.
    #[error("The tailscale tarball {} mixes architectures: tailscaled is {tailscaled}, tailscale is {tailscale}", tarball.display())]
    TailscaleMixed {
        /// The tarball.
        tarball: PathBuf,
        /// tailscaled's.
        tailscaled: Arch,
        /// tailscale's.
        tailscale: Arch,
    },
}

/// Why a binary is not a static executable tailbox can upload.
#[derive(Debug, thiserror::Error)]
pub enum NotStaticError {
    /// Not an ELF file at all.
    #[error("it is not an ELF executable ({0})")]
    NotElf(String),
    /// An ELF for a machine without an agent build.
    #[error(transparent)]
    Machine(#[from] tailbox_proto::arch::ElfArchError),
    /// An object file or core dump.
    #[error("it is not an executable")]
    NotExecutable,
    /// It needs a loader.
    #[error(
        "it is dynamically linked (program interpreter {0}), and sandbox images need not have that loader"
    )]
    Dynamic(String),
}

fn list(archs: &[Arch]) -> String {
    if archs.is_empty() {
        return "none".into();
    }
    archs
        .iter()
        .map(|a| a.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<ArchError> for CliError {
    fn from(err: ArchError) -> Self {
        let message = err.to_string();
        let (kind, hint) = match &err {
            ArchError::ReadAgent { .. }
            | ArchError::NotStatic { .. }
            | ArchError::EmptyDirectory { .. }
            | ArchError::NoneFound => (
                CliError::usage(message),
                "Build the static agents with `cargo xtask static-agent --target x86_64-unknown-linux-musl --target aarch64-unknown-linux-musl` and pass `--agent target` (or set `TAILBOX_AGENT`).".to_owned(),
            ),
            ArchError::Duplicate { arch, .. } => (
                CliError::usage(message),
                format!("Pass one `--agent` for {arch}."),
            ),
            ArchError::NoAgentFor { sandbox, .. } => (
                CliError::usage(message),
                format!(
                    "Build the {sandbox} agent with `{}` and pass it with `--agent` (or a directory holding one agent per architecture, such as `--agent target`).",
                    static_build_command(*sandbox)
                ),
            ),
            ArchError::TailscaleMismatch { sandbox, .. } => (
                CliError::usage(message),
                format!(
                    "Pass the {sandbox} tarball, tailscale_<version>_{}.tgz from pkgs.tailscale.com.",
                    sandbox.go_arch()
                ),
            ),
            ArchError::TailscaleNotElf { .. } | ArchError::TailscaleMixed { .. } => (
                CliError::usage(message),
                "Pass a release tarball from pkgs.tailscale.com such as tailscale_1.x.y_amd64.tgz or tailscale_1.x.y_arm64.tgz.".to_owned(),
            ),
        };
        let source = match err {
            ArchError::ReadAgent { source, .. } => Some(anyhow::Error::new(source)),
            ArchError::NotStatic { why, .. } => Some(anyhow::Error::new(why)),
            ArchError::TailscaleNotElf { why, .. } => Some(anyhow::Error::new(why)),
            _ => None,
        };
        let error = kind.with_hint(hint);
        match source {
            Some(source) => error.with_source(source),
            None => error,
        }
    }
}

/// The architecture of a static ELF executable, or why it is not one.
pub fn static_executable_arch(bytes: &[u8]) -> Result<Arch, NotStaticError> {
    let elf = Elf::parse(bytes).map_err(|e| NotStaticError::NotElf(e.to_string()))?;
    let arch = Arch::from_elf_header(bytes)?;
    if !matches!(elf.header.e_type, ET_EXEC | ET_DYN) {
        return Err(NotStaticError::NotExecutable);
    }
    if let Some(interp) = elf.interpreter {
        return Err(NotStaticError::Dynamic(interp.to_owned()));
    }
    Ok(arch)
}

/// The static agents at hand, at most one per architecture.
#[derive(Clone, Default)]
pub struct AgentSet {
    agents: BTreeMap<Arch, LocalBinary>,
}

impl AgentSet {
    /// Loads the agents `paths` name: files (each must be a static agent) and directories
    /// (searched; what is not a static agent is passed over).
    pub fn load(paths: &[PathBuf]) -> Result<Self, ArchError> {
        let mut set = Self::default();
        for path in paths {
            if path.is_dir() {
                let before = set.agents.len();
                for candidate in candidates_in(path) {
                    if let Some(agent) = read_static(&candidate) {
                        set.insert(agent)?;
                    }
                }
                if set.agents.len() == before {
                    return Err(ArchError::EmptyDirectory { dir: path.clone() });
                }
            } else {
                let bytes = std::fs::read(path).map_err(|source| ArchError::ReadAgent {
                    path: path.clone(),
                    source,
                })?;
                let arch = static_executable_arch(&bytes).map_err(|why| ArchError::NotStatic {
                    path: path.clone(),
                    why,
                })?;
                set.insert((arch, LocalBinary::new(path.clone(), bytes)))?;
            }
        }
        Ok(set)
    }

    /// The first static agent per architecture where `tailbox` looks by default
    /// ([`crate::backend::default_agent_dirs`]); a dynamically linked agent next to `tailbox`
    /// (a plain `cargo build`) is passed over.
    pub fn find_default() -> Result<Self, ArchError> {
        let mut set = Self::default();
        for dir in crate::backend::default_agent_dirs() {
            for candidate in candidates_in(&dir) {
                if let Some((arch, agent)) = read_static(&candidate) {
                    set.agents.entry(arch).or_insert(agent);
                }
            }
        }
        if set.agents.is_empty() {
            return Err(ArchError::NoneFound);
        }
        Ok(set)
    }

    fn insert(&mut self, (arch, agent): (Arch, LocalBinary)) -> Result<(), ArchError> {
        if let Some(first) = self.agents.get(&arch) {
            // The same file reached twice (a directory and a file in it) is one agent.
            if first.sha256 == agent.sha256 {
                return Ok(());
            }
            return Err(ArchError::Duplicate {
                arch,
                first: first.path.clone(),
                second: agent.path,
            });
        }
        self.agents.insert(arch, agent);
        Ok(())
    }

    /// The architectures there is an agent for.
    pub fn archs(&self) -> Vec<Arch> {
        self.agents.keys().copied().collect()
    }

    /// The agent for a sandbox of `arch`.
    pub fn for_arch(&self, arch: Arch) -> Result<&LocalBinary, ArchError> {
        self.agents.get(&arch).ok_or_else(|| ArchError::NoAgentFor {
            sandbox: arch,
            have: self.archs(),
        })
    }
}

/// `tailbox-agent`, or `tailbox-agent-<suffix>` without a dot (`tailbox-agent-aarch64`), which
/// leaves out cargo's `tailbox-agent.d` and the like.
fn is_agent_name(name: &str) -> bool {
    name == "tailbox-agent"
        || name
            .strip_prefix("tailbox-agent-")
            .is_some_and(|s| !s.is_empty() && !s.contains('.'))
}

/// Where an agent may sit in `dir`: files with an agent name ([`is_agent_name`]), and cargo's
/// `<target>/release/tailbox-agent` for each target with an agent build.
fn candidates_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_agent_name)
        })
        .collect();
    found.sort();
    found.extend(
        Arch::ALL
            .iter()
            .map(|a| dir.join(a.rust_target()).join("release/tailbox-agent")),
    );
    found.retain(|p| p.is_file());
    found
}

/// `path` read as a static agent, or `None` if it is not one.
fn read_static(path: &Path) -> Option<(Arch, LocalBinary)> {
    let bytes = std::fs::read(path).ok()?;
    let arch = static_executable_arch(&bytes).ok()?;
    Some((arch, LocalBinary::new(path.to_path_buf(), bytes)))
}

/// The sandbox's CPU architecture, learned through fs-tools (see the module docs).
pub async fn sandbox_arch(router: &Router) -> CliResult<Arch> {
    let header = fs::read_prefix(router, SELF_EXE, ELF_MACHINE_PREFIX_LEN).await?;
    Arch::from_elf_header(&header).map_err(|why| {
        CliError::infra("Failed to learn the sandbox's CPU architecture")
            .with_source(anyhow::anyhow!(
                "the ELF header of {SELF_EXE} (modal-sandbox-fs-tools): {why}"
            ))
            .with_hint(
                "tailbox has agents for x86_64 and aarch64 sandboxes only; check the image's platform.",
            )
    })
}

/// The architecture of the tailscale binaries from `tarball`, checked to be one.
pub fn tailscale_arch(
    tarball: &Path,
    tailscaled: &LocalBinary,
    tailscale: Option<&LocalBinary>,
) -> Result<Arch, ArchError> {
    let arch_of = |binary: &LocalBinary| {
        Arch::from_elf_header(&binary.bytes).map_err(|why| ArchError::TailscaleNotElf {
            path: binary.path.clone(),
            why,
        })
    };
    let tailscaled = arch_of(tailscaled)?;
    if let Some(cli) = tailscale {
        let tailscale = arch_of(cli)?;
        if tailscale != tailscaled {
            return Err(ArchError::TailscaleMixed {
                tarball: tarball.to_path_buf(),
                tailscaled,
                tailscale,
            });
        }
    }
    Ok(tailscaled)
}

/// Fails unless tailscale binaries built for `found` can run in a sandbox of `sandbox`.
pub fn check_tailscale_fits(tarball: &Path, found: Arch, sandbox: Arch) -> Result<(), ArchError> {
    if found == sandbox {
        Ok(())
    } else {
        Err(ArchError::TailscaleMismatch {
            tarball: tarball.to_path_buf(),
            found,
            sandbox,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortest static executable: an ELF header with no program headers.
    fn minimal_static_elf(arch: Arch) -> Vec<u8> {
        arch.elf_header()
    }

    #[test]
    fn a_static_elf_names_its_architecture() {
        for arch in Arch::ALL {
            assert_eq!(
                static_executable_arch(&minimal_static_elf(arch)).unwrap(),
                arch
            );
        }
    }

    #[test]
    fn a_dynamic_elf_is_refused_with_its_interpreter() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = static_executable_arch(&me).unwrap_err();
        assert!(
            matches!(err, NotStaticError::Dynamic(_)),
            "{err}: the test binary is dynamically linked"
        );
        assert!(err.to_string().contains("program interpreter"));
    }

    #[test]
    fn a_directory_yields_one_agent_per_architecture_and_refuses_two_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let x86 = dir.path().join("tailbox-agent-x86_64");
        std::fs::write(&x86, minimal_static_elf(Arch::X86_64)).unwrap();
        let arm_dir = dir.path().join("aarch64-unknown-linux-musl/release");
        std::fs::create_dir_all(&arm_dir).unwrap();
        std::fs::write(
            arm_dir.join("tailbox-agent"),
            minimal_static_elf(Arch::Aarch64),
        )
        .unwrap();
        std::fs::write(dir.path().join("tailbox-agent.txt"), "not an agent").unwrap();

        let set = AgentSet::load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(set.archs(), vec![Arch::X86_64, Arch::Aarch64]);
        assert_eq!(set.for_arch(Arch::X86_64).unwrap().path, x86);
        // Naming a file inside the directory again is the same agent, not a duplicate.
        let set = AgentSet::load(&[dir.path().to_path_buf(), x86.clone()]).unwrap();
        assert_eq!(set.archs().len(), 2);

        let mut other = minimal_static_elf(Arch::X86_64);
        other.push(0);
        let second = dir.path().join("tailbox-agent-other");
        std::fs::write(&second, other).unwrap();
        let err = AgentSet::load(&[dir.path().to_path_buf()]).err().unwrap();
        assert!(
            matches!(
                err,
                ArchError::Duplicate {
                    arch: Arch::X86_64,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_missing_architecture_names_the_sandbox_and_the_build_command() {
        let dir = tempfile::tempdir().unwrap();
        let x86 = dir.path().join("agent");
        std::fs::write(&x86, minimal_static_elf(Arch::X86_64)).unwrap();
        let set = AgentSet::load(&[x86]).unwrap();
        let err: CliError = set.for_arch(Arch::Aarch64).err().unwrap().into();
        assert_eq!(
            err.message,
            "The sandbox is aarch64, but no aarch64 agent was given (have: x86_64)"
        );
        let hint = err.hint.unwrap();
        assert!(
            hint.contains("cargo xtask static-agent --target aarch64-unknown-linux-musl"),
            "{hint}"
        );
    }

    #[test]
    fn a_tarball_for_another_architecture_names_both() {
        let err: CliError = check_tailscale_fits(Path::new("t.tgz"), Arch::X86_64, Arch::Aarch64)
            .unwrap_err()
            .into();
        assert_eq!(
            err.message,
            "The tailscale tarball t.tgz holds x86_64 binaries, but the sandbox is aarch64"
        );
        assert!(err.hint.unwrap().contains("tailscale_<version>_arm64.tgz"));
        assert!(check_tailscale_fits(Path::new("t.tgz"), Arch::Aarch64, Arch::Aarch64).is_ok());
    }
}
