//! Which agent fits which sandbox: the static agents at hand, at most one per CPU architecture,
//! and the architecture of a binary from its ELF header.
//!
//! `--agent` takes files and directories, as many as needed. Each file's architecture comes from
//! its ELF header (names are not trusted); a directory is searched for `tailbox-agent` and
//! `tailbox-agent-<suffix>` files and for cargo's `<target>/release/tailbox-agent`, so
//! `--agent target` finds both `cargo xtask static-agent` builds. An agent for a sandbox must be
//! static: the image may have no loader. How a Modal sandbox's own architecture is learned is in
//! [`super::modal`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tailbox_proto::arch::Arch;

use super::modal::LocalBinary;
use super::{ElfProblem, SandboxError};

/// A static agent read for upload.
#[derive(Clone)]
pub struct Agent {
    /// Where it was found.
    pub path: PathBuf,
    /// Its content and sha256.
    pub binary: LocalBinary,
}

/// The static agents at hand, at most one per architecture.
#[derive(Clone, Default)]
pub struct AgentSet {
    agents: BTreeMap<Arch, Agent>,
}

impl AgentSet {
    /// Loads the agents `paths` name: files (each must be a static agent) and directories
    /// (searched; what is not a static agent in them is passed over, but one must be there).
    pub fn load(paths: &[PathBuf]) -> Result<Self, SandboxError> {
        let mut set = Self::default();
        for path in paths {
            if path.is_dir() {
                let mut found = false;
                for candidate in candidates_in(path) {
                    if let Some((arch, agent)) = read_static(&candidate) {
                        set.insert(arch, agent)?;
                        found = true;
                    }
                }
                if !found {
                    return Err(SandboxError::NoAgentInDirectory { dir: path.clone() });
                }
            } else {
                let (arch, agent) = load_static(path)?;
                set.insert(arch, agent)?;
            }
        }
        Ok(set)
    }

    /// The first static agent per architecture in `dirs` (where `tailbox` looks by default); a
    /// dynamically linked agent (a plain `cargo build`) is passed over.
    pub fn find_in(dirs: &[PathBuf]) -> Result<Self, SandboxError> {
        let mut set = Self::default();
        for dir in dirs {
            for candidate in candidates_in(dir) {
                if let Some((arch, agent)) = read_static(&candidate) {
                    set.agents.entry(arch).or_insert(agent);
                }
            }
        }
        if set.agents.is_empty() {
            return Err(SandboxError::AgentMissing {
                static_needed: true,
            });
        }
        Ok(set)
    }

    fn insert(&mut self, arch: Arch, agent: Agent) -> Result<(), SandboxError> {
        if let Some(first) = self.agents.get(&arch) {
            // The same file reached twice (a directory and a file in it) is one agent.
            if first.binary.sha256 == agent.binary.sha256 {
                return Ok(());
            }
            return Err(SandboxError::DuplicateAgent {
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
    pub fn for_arch(&self, arch: Arch) -> Result<&Agent, SandboxError> {
        self.agents
            .get(&arch)
            .ok_or_else(|| SandboxError::NoAgentFor {
                sandbox: arch,
                have: self.archs(),
            })
    }
}

/// Reads `path` and checks it is a static agent; its architecture and content.
pub fn load_static(path: &Path) -> Result<(Arch, Agent), SandboxError> {
    let bytes = std::fs::read(path).map_err(|source| SandboxError::AgentUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let arch = static_executable_arch(&bytes).map_err(|problem| SandboxError::AgentNotStatic {
        path: path.to_path_buf(),
        problem,
    })?;
    let agent = Agent {
        path: path.to_path_buf(),
        binary: LocalBinary::new(bytes),
    };
    Ok((arch, agent))
}

/// The architecture of a static ELF executable, or why it is not one tailbox can upload.
pub fn static_executable_arch(bytes: &[u8]) -> Result<Arch, ElfProblem> {
    use goblin::elf::Elf;
    use goblin::elf::header::{ET_DYN, ET_EXEC};
    let elf = Elf::parse(bytes).map_err(|e| ElfProblem::NotElf(e.to_string()))?;
    let arch = Arch::from_elf_header(bytes)?;
    if !matches!(elf.header.e_type, ET_EXEC | ET_DYN) {
        return Err(ElfProblem::NotExecutable);
    }
    if let Some(interp) = elf.interpreter {
        return Err(ElfProblem::Dynamic(interp.to_owned()));
    }
    Ok(arch)
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
fn read_static(path: &Path) -> Option<(Arch, Agent)> {
    load_static(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_elf_names_its_architecture() {
        for arch in Arch::ALL {
            assert_eq!(static_executable_arch(&arch.elf_header()).unwrap(), arch);
        }
    }

    #[test]
    fn a_dynamic_elf_is_refused_with_its_interpreter() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = static_executable_arch(&me).unwrap_err();
        assert!(
            matches!(err, ElfProblem::Dynamic(_)),
            "{err}: the test binary is dynamically linked"
        );
    }

    #[test]
    fn a_directory_yields_one_agent_per_architecture_and_refuses_two_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let x86 = dir.path().join("tailbox-agent-x86_64");
        std::fs::write(&x86, Arch::X86_64.elf_header()).unwrap();
        let arm_dir = dir.path().join("aarch64-unknown-linux-musl/release");
        std::fs::create_dir_all(&arm_dir).unwrap();
        std::fs::write(arm_dir.join("tailbox-agent"), Arch::Aarch64.elf_header()).unwrap();
        std::fs::write(dir.path().join("tailbox-agent.d"), "not an agent").unwrap();

        let set = AgentSet::load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(set.archs(), vec![Arch::X86_64, Arch::Aarch64]);
        assert_eq!(set.for_arch(Arch::X86_64).unwrap().path, x86);
        // Naming a file inside the directory again is the same agent, not a duplicate.
        let set = AgentSet::load(&[dir.path().to_path_buf(), x86.clone()]).unwrap();
        assert_eq!(set.archs().len(), 2);

        let mut other = Arch::X86_64.elf_header();
        other.push(0);
        std::fs::write(dir.path().join("tailbox-agent-other"), other).unwrap();
        let err = AgentSet::load(&[dir.path().to_path_buf()]).err().unwrap();
        assert!(
            matches!(
                err,
                SandboxError::DuplicateAgent {
                    arch: Arch::X86_64,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_directory_without_an_agent_is_refused_and_a_missing_arch_names_what_there_is() {
        let dir = tempfile::tempdir().unwrap();
        let err = AgentSet::load(&[dir.path().to_path_buf()]).err().unwrap();
        assert!(
            matches!(err, SandboxError::NoAgentInDirectory { .. }),
            "{err}"
        );
        let x86 = dir.path().join("agent");
        std::fs::write(&x86, Arch::X86_64.elf_header()).unwrap();
        let set = AgentSet::load(&[x86]).unwrap();
        let err = set.for_arch(Arch::Aarch64).err().unwrap();
        assert_eq!(
            err.to_string(),
            "The sandbox is aarch64, but no aarch64 agent was given (have: x86_64)"
        );
    }
}
