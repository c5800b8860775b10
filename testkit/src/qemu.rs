//! Running binaries built for another architecture, as the aarch64 tests do on an x86_64
//! machine: the kernel hands every foreign ELF it is asked to exec to qemu-user through
//! binfmt_misc, so the agent and the tailscaled it spawns both run emulated, with no wrapper.
//! `scripts/setup` installs qemu-user-static and registers it (Debian's own binfmt line for the
//! architecture, with the `F` flag so it also works inside the fake Modal's mount namespaces).

use std::path::Path;
use std::process::Command;

use tailbox_proto::arch::Arch;

/// Where binfmt_misc lists its handlers.
const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// Panics, saying what to do, unless `binary` (built for `arch`) runs here: `binary --version`
/// must succeed. Native binaries always pass.
pub fn require_runnable(arch: Arch, binary: &Path) {
    let output = Command::new(binary).arg("--version").output();
    match output {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{} --version failed ({}):\n{}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) => panic!(
            "{} ({arch}) cannot run on this {} machine: {err}. Foreign binaries run through \
             qemu-user registered with binfmt_misc ({}: {}); run scripts/setup as root",
            binary.display(),
            std::env::consts::ARCH,
            BINFMT_MISC,
            handler_state(arch)
        ),
    }
}

/// What binfmt_misc says about the qemu handler for `arch`, for the failure message.
fn handler_state(arch: Arch) -> String {
    let handler = Path::new(BINFMT_MISC).join(format!("qemu-{}", arch.name()));
    match std::fs::read_to_string(&handler) {
        Ok(text) => text.lines().next().unwrap_or("empty").to_owned(),
        Err(_) if !Path::new(BINFMT_MISC).join("status").exists() => "not mounted".into(),
        Err(_) => format!("no {} handler", handler.display()),
    }
}
