//! Finding the lab's binaries: `tailscaled`, `tailscale`, `tailbox-lab` and `containerboot`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use tailbox_proto::arch::Arch;

use super::process::require_executable;

/// Env var naming a directory that already holds the lab binaries (e.g. what CI built).
pub const BIN_DIR_ENV: &str = "TAILBOX_TAILNET_BIN_DIR";

/// The repository's build script. Compile-time path: testkit is only used from this checkout.
pub fn build_script() -> PathBuf {
    let testkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    testkit.parent().unwrap_or(testkit).join("lab/build.sh")
}

/// Where the lab's programs live.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

// Resolved once per process; parallel tests share the answer instead of each running the
// build script.
static RESOLVED: Mutex<Option<Binaries>> = Mutex::new(None);

impl Binaries {
    /// Finds the binaries: `$TAILBOX_TAILNET_BIN_DIR` if set, else whatever `lab/build.sh`
    /// reports, building them first if they are not cached (that takes minutes once).
    pub async fn locate() -> Result<Self> {
        tokio::task::spawn_blocking(Self::locate_blocking)
            .await
            .context("binary lookup task")?
    }

    /// Blocking form of [`Binaries::locate`].
    pub fn locate_blocking() -> Result<Self> {
        let mut resolved = RESOLVED
            .lock()
            .map_err(|_| anyhow::anyhow!("an earlier lab binary lookup panicked"))?;
        if let Some(b) = resolved.as_ref() {
            return Ok(b.clone());
        }
        let bins = Self::resolve(std::env::var_os(BIN_DIR_ENV).map(PathBuf::from))?;
        *resolved = Some(bins.clone());
        Ok(bins)
    }

    /// The lookup behind [`Binaries::locate`], uncached: `bin_dir` is the value of
    /// `$TAILBOX_TAILNET_BIN_DIR`, if set.
    pub fn resolve(bin_dir: Option<PathBuf>) -> Result<Self> {
        match bin_dir {
            Some(dir) => Self::from_dir(dir).with_context(|| {
                format!(
                    "{BIN_DIR_ENV} does not point at the lab binaries; run {} and set \
                     {BIN_DIR_ENV} to the directory it prints (or unset it)",
                    build_script().display()
                )
            }),
            None => Self::from_dir(run_build_script()?),
        }
    }

    /// Uses binaries in `dir`, checking that all four are there.
    pub fn from_dir(dir: PathBuf) -> Result<Self> {
        let bins = Self { dir };
        for p in [
            bins.tailscaled(),
            bins.tailscale(),
            bins.lab(),
            bins.containerboot(),
        ] {
            require_executable(&p)?;
        }
        Ok(bins)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tailscaled(&self) -> PathBuf {
        self.dir.join("tailscaled")
    }

    pub fn tailscale(&self) -> PathBuf {
        self.dir.join("tailscale")
    }

    /// `tailscaled` built for `arch` from the same pin (`lab/build.sh` cross-builds the
    /// architectures this machine is not), checked to exist.
    pub fn tailscaled_for(&self, arch: Arch) -> Result<PathBuf> {
        self.for_arch(arch, "tailscaled")
    }

    /// `tailscale` (the CLI) built for `arch`, checked to exist.
    pub fn tailscale_for(&self, arch: Arch) -> Result<PathBuf> {
        self.for_arch(arch, "tailscale")
    }

    fn for_arch(&self, arch: Arch, name: &str) -> Result<PathBuf> {
        let path = self
            .dir
            .join(format!("linux-{}", arch.go_arch()))
            .join(name);
        require_executable(&path).with_context(|| {
            format!(
                "the lab has no {arch} {name}; run {} (it builds one per architecture)",
                build_script().display()
            )
        })?;
        Ok(path)
    }

    /// Tailscale's container entrypoint (`cmd/containerboot`), the benchmark's baseline.
    pub fn containerboot(&self) -> PathBuf {
        self.dir.join("containerboot")
    }

    /// Our control/DERP/STUN and dev-host program.
    pub fn lab(&self) -> PathBuf {
        self.dir.join("tailbox-lab")
    }
}

fn run_build_script() -> Result<PathBuf> {
    let script = build_script();
    // stderr is inherited so a first-time build shows its progress instead of looking hung.
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); the tailnet lab needs its binaries. Run it by hand to see why, \
             or set {BIN_DIR_ENV} to a directory holding tailscaled, tailscale and tailbox-lab",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("{} printed no bin dir", script.display()))?;
    Ok(PathBuf::from(dir.trim()))
}
