//! The CPU architectures tailbox ships a static agent for, and their names in each tool's
//! vocabulary (uname, Rust, Go and Tailscale's tarballs, Nix, ELF).
//!
//! It lives in the contract crate because every crate needs the same table: the controller picks
//! the agent for a sandbox, xtask builds it, the tests and the fake Modal run it, and the Nix
//! flake's facts test compares against it.

use std::fmt;
use std::str::FromStr;

/// A CPU architecture with a static `tailbox-agent` build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// x86-64 (`amd64`).
    X86_64,
    /// 64-bit ARM (`arm64`).
    Aarch64,
}

/// ELF `e_machine` of x86-64 (`EM_X86_64`).
const EM_X86_64: u16 = 62;
/// ELF `e_machine` of 64-bit ARM (`EM_AARCH64`).
const EM_AARCH64: u16 = 183;

/// Bytes of an ELF header needed to read its machine: `e_ident` (16), `e_type` (2),
/// `e_machine` (2).
pub const ELF_MACHINE_PREFIX_LEN: usize = 20;

/// Why an ELF header names no architecture tailbox knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfArchError {
    /// Fewer than [`ELF_MACHINE_PREFIX_LEN`] bytes, or no ELF magic.
    #[error("it is not an ELF file")]
    NotElf,
    /// A 32-bit or big-endian ELF: no agent is built for those.
    #[error("it is a 32-bit or big-endian ELF file")]
    Not64BitLittleEndian,
    /// A 64-bit little-endian ELF for another machine.
    #[error("it is built for ELF machine {0}, which has no agent build (x86_64 and aarch64 do)")]
    UnknownMachine(u16),
}

impl Arch {
    /// Every architecture with an agent build.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The kernel's name, as `uname -m` prints it and Rust's `target_arch` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The Rust target the static agent is built for.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Go's `GOARCH`, which Tailscale's release tarballs also use
    /// (`tailscale_<version>_<go arch>.tgz`).
    pub fn go_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The Nix system double (`x86_64-linux`).
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux",
            Arch::Aarch64 => "aarch64-linux",
        }
    }

    /// ELF `e_machine`.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => EM_X86_64,
            Arch::Aarch64 => EM_AARCH64,
        }
    }

    /// The architecture with ELF machine `machine`.
    pub fn from_elf_machine(machine: u16) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.elf_machine() == machine)
    }

    /// The architecture an ELF file is built for, from its first
    /// [`ELF_MACHINE_PREFIX_LEN`] bytes (more are ignored).
    pub fn from_elf_header(bytes: &[u8]) -> Result<Arch, ElfArchError> {
        let header = bytes
            .get(..ELF_MACHINE_PREFIX_LEN)
            .filter(|h| h.starts_with(b"\x7fELF"))
            .ok_or(ElfArchError::NotElf)?;
        // e_ident[EI_CLASS] == ELFCLASS64 and e_ident[EI_DATA] == ELFDATA2LSB.
        if header[4] != 2 || header[5] != 1 {
            return Err(ElfArchError::Not64BitLittleEndian);
        }
        let machine = u16::from_le_bytes([header[18], header[19]]);
        Arch::from_elf_machine(machine).ok_or(ElfArchError::UnknownMachine(machine))
    }

    /// A 64-byte ELF64 little-endian executable header for this architecture with no program
    /// headers: the first bytes of a static binary for it, for tests and fakes.
    pub fn elf_header(self) -> Vec<u8> {
        let mut header = b"\x7fELF".to_vec();
        // ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
        header.extend([2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        header.extend(2u16.to_le_bytes()); // e_type: ET_EXEC
        header.extend(self.elf_machine().to_le_bytes());
        header.extend(1u32.to_le_bytes()); // e_version
        header.extend([0u8; 24]); // e_entry, e_phoff, e_shoff
        header.extend(0u32.to_le_bytes()); // e_flags
        header.extend(64u16.to_le_bytes()); // e_ehsize
        header.extend([0u8; 10]); // e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        header
    }

    /// The architecture this program was compiled for, when it has an agent build.
    pub fn host() -> Option<Arch> {
        std::env::consts::ARCH.parse().ok()
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Unknown architecture name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture {0:?} (known: x86_64 or amd64, aarch64 or arm64)")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;

    /// Accepts the kernel's, Go's and the Rust target's names: `x86_64`, `amd64`,
    /// `x86_64-unknown-linux-musl`, `aarch64`, `arm64`, `aarch64-unknown-linux-musl`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Arch::ALL
            .into_iter()
            .find(|a| s == a.name() || s == a.go_arch() || s == a.rust_target())
            .ok_or_else(|| UnknownArch(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::{Arch, ElfArchError};

    fn header(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = b"\x7fELF".to_vec();
        h.extend([class, data, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        h.extend(2u16.to_le_bytes()); // ET_EXEC
        h.extend(machine.to_le_bytes());
        h
    }

    #[test]
    fn names_round_trip_in_every_vocabulary() {
        for arch in Arch::ALL {
            for name in [arch.name(), arch.go_arch(), arch.rust_target()] {
                assert_eq!(name.parse::<Arch>().unwrap(), arch);
            }
            assert_eq!(Arch::from_elf_machine(arch.elf_machine()), Some(arch));
            assert_eq!(Arch::from_elf_header(&arch.elf_header()), Ok(arch));
            assert_eq!(arch.elf_header().len(), 64);
            assert!(arch.nix_system().starts_with(arch.name()));
        }
        assert!("riscv64".parse::<Arch>().is_err());
    }

    #[test]
    fn elf_headers_name_their_machine() {
        assert_eq!(Arch::from_elf_header(&header(2, 1, 62)), Ok(Arch::X86_64));
        assert_eq!(Arch::from_elf_header(&header(2, 1, 183)), Ok(Arch::Aarch64));
        assert_eq!(
            Arch::from_elf_header(&header(2, 1, 243)),
            Err(ElfArchError::UnknownMachine(243))
        );
        assert_eq!(
            Arch::from_elf_header(&header(1, 1, 62)),
            Err(ElfArchError::Not64BitLittleEndian)
        );
        assert_eq!(
            Arch::from_elf_header(b"#!/bin/sh\n"),
            Err(ElfArchError::NotElf)
        );
        assert_eq!(
            Arch::from_elf_header(&header(2, 1, 62)[..19]),
            Err(ElfArchError::NotElf)
        );
    }

    #[test]
    fn this_test_binary_is_the_host_architecture() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(Arch::from_elf_header(&me).ok(), Arch::host());
    }
}
