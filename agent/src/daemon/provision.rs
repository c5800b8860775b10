//! Finding a tailscaled that can run here.
//!
//! Order: the path the request names; `tailscaled` on PATH; binaries the controller pushed. A
//! dynamically linked binary whose ELF interpreter is missing (the Nix-image case the spike hit)
//! is run through a glibc loader found on this machine.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tailbox_proto::agent::v1::{DaemonConfig, DaemonSource};

use crate::preflight;

/// A tailscaled binary and how to run it.
#[derive(Debug, Clone)]
pub struct DaemonBinary {
    /// Where it came from.
    pub source: DaemonSource,
    /// The binary.
    pub path: PathBuf,
    /// Loader to run it through, when its own interpreter is missing.
    pub loader: Option<PathBuf>,
}

impl DaemonBinary {
    /// A command that runs this binary (through the loader if needed).
    pub fn command(&self) -> tokio::process::Command {
        match &self.loader {
            Some(loader) => {
                let mut cmd = tokio::process::Command::new(loader);
                if let Some(lib_dir) = loader.parent() {
                    cmd.arg("--library-path").arg(lib_dir);
                }
                cmd.arg(&self.path);
                cmd
            }
            None => tokio::process::Command::new(&self.path),
        }
    }
}

/// Why no tailscaled could be used.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// No candidate existed.
    #[error("no tailscaled found (tried: {tried})")]
    NotFound {
        /// Every place looked at.
        tried: String,
    },
    /// A candidate exists but cannot be run.
    #[error("{path} cannot be run: {why}")]
    Unusable {
        /// The candidate.
        path: PathBuf,
        /// Why, in words.
        why: String,
        /// Why, for choosing the hint.
        because: Unusable,
    },
}

/// What makes a tailscaled unusable; each asks for a different fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// The path the request named is not there.
    Missing,
    /// It lacks the execute bit.
    NotExecutable,
    /// It cannot be read, is not a program, or needs a loader the sandbox lacks.
    NotRunnable,
    /// It ran, but `tailscaled --version` failed.
    VersionFailed,
}

/// Finds tailscaled. `path_var` is the sandbox's PATH; `host` roots the loader search.
pub async fn find(
    config: &DaemonConfig,
    path_var: Option<&str>,
    host: &preflight::Host,
) -> Result<DaemonBinary, ProvisionError> {
    let mut tried = Vec::new();
    let mut candidates: Vec<(DaemonSource, PathBuf)> = Vec::new();
    if !config.tailscaled_path.is_empty() {
        candidates.push((
            DaemonSource::RequestPath,
            PathBuf::from(&config.tailscaled_path),
        ));
    }
    for dir in path_var
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
    {
        candidates.push((DaemonSource::Path, Path::new(dir).join("tailscaled")));
    }
    if !config.pushed_tailscaled_path.is_empty() {
        candidates.push((
            DaemonSource::Pushed,
            PathBuf::from(&config.pushed_tailscaled_path),
        ));
    }
    for (source, path) in candidates {
        tried.push(path.display().to_string());
        if !path.is_file() {
            if source == DaemonSource::RequestPath {
                // An explicit path that does not exist is a mistake worth naming, not skipping.
                return Err(ProvisionError::Unusable {
                    path,
                    why: "it does not exist".into(),
                    because: Unusable::Missing,
                });
            }
            continue;
        }
        return prepare(source, path, host).await;
    }
    Err(ProvisionError::NotFound {
        tried: tried.join(", "),
    })
}

async fn prepare(
    source: DaemonSource,
    path: PathBuf,
    host: &preflight::Host,
) -> Result<DaemonBinary, ProvisionError> {
    let unusable = |why: String| ProvisionError::Unusable {
        path: path.clone(),
        why,
        because: Unusable::NotRunnable,
    };
    let mode = std::fs::metadata(&path)
        .map_err(|e| unusable(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o111 == 0 {
        return Err(ProvisionError::Unusable {
            path: path.clone(),
            why: "it is not executable".into(),
            because: Unusable::NotExecutable,
        });
    }
    let interpreter = elf_interpreter(&path).map_err(unusable)?;
    let loader = match interpreter {
        Some(interp) if !Path::new(&interp).exists() => Some(
            find_loader(&interp, host).ok_or_else(|| {
                unusable(format!(
                    "it is dynamically linked against {interp}, which is missing, and no glibc loader was found under /nix/store"
                ))
            })?,
        ),
        _ => None,
    };
    Ok(DaemonBinary {
        source,
        path,
        loader,
    })
}

/// The PT_INTERP of an ELF file; `None` for a static binary or a `#!` script (a wrapper around
/// tailscaled is legitimate, and the kernel resolves its interpreter itself).
///
/// Reads only the ELF header, the program headers and the interpreter's name: tailscaled is
/// tens of MB, and reading it whole was most of the agent's peak memory.
pub fn elf_interpreter(path: &Path) -> Result<Option<String>, String> {
    use goblin::container::Ctx;
    use goblin::elf::program_header::{PT_INTERP, ProgramHeader};
    use std::os::unix::fs::FileExt as _;

    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let read_at = |offset: u64, len: usize| -> Result<Vec<u8>, String> {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("cannot read it: {e}"))?;
        Ok(buf)
    };
    let not_elf =
        |e: &dyn std::fmt::Display| format!("it is neither an ELF binary nor a #! script: {e}");
    let mut head = [0; goblin::elf::header::header64::SIZEOF_EHDR];
    let got = file
        .read_at(&mut head, 0)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if head[..got].starts_with(b"#!") {
        return Ok(None);
    }
    let header = goblin::elf::Elf::parse_header(&head[..got]).map_err(|e| not_elf(&e))?;
    let container = header.container().map_err(|e| not_elf(&e))?;
    let endian = header.endianness().map_err(|e| not_elf(&e))?;
    let ctx = Ctx::new(container, endian);
    let count = usize::from(header.e_phnum);
    let table = read_at(header.e_phoff, count * usize::from(header.e_phentsize))
        .map_err(|e| not_elf(&e))?;
    let program_headers = ProgramHeader::parse(&table, 0, count, ctx).map_err(|e| not_elf(&e))?;
    let Some(interp) = program_headers.iter().find(|ph| ph.p_type == PT_INTERP) else {
        return Ok(None);
    };
    let len = usize::try_from(interp.p_filesz).map_err(|e| not_elf(&e))?;
    let name = read_at(interp.p_offset, len).map_err(|e| not_elf(&e))?;
    let name = name.split(|&b| b == 0).next().unwrap_or_default();
    Ok(Some(String::from_utf8_lossy(name).into_owned()))
}

/// A loader with the same file name as the missing interpreter: the standard location, then
/// the Nix store (the spike's `/nix/store/*glibc*/lib/ld-linux-*.so.*`).
fn find_loader(interpreter: &str, host: &preflight::Host) -> Option<PathBuf> {
    let wanted = Path::new(interpreter).file_name()?;
    preflight::nix_store_glibc_loaders(&host_path(host, "/nix/store"))
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.file_name() == Some(wanted))
}

fn host_path(host: &preflight::Host, absolute: &str) -> PathBuf {
    host.resolve(absolute)
}

/// Runs `tailscaled --version` and keeps its first line; a binary that cannot say it is
/// unusable. The caller runs it beside tailscaled's start, not before it (docs/benchmarks.md, B2).
pub async fn version_of(binary: &DaemonBinary) -> Result<String, ProvisionError> {
    version(binary)
        .await
        .map_err(|why| ProvisionError::Unusable {
            path: binary.path.clone(),
            why,
            because: Unusable::VersionFailed,
        })
}

async fn version(binary: &DaemonBinary) -> Result<String, String> {
    let mut cmd = binary.command();
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .map_err(|_| "`tailscaled --version` did not finish within 20s".to_owned())?
        .map_err(|e| format!("it failed to start: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "`tailscaled --version` failed ({}): {}",
            output.status,
            stderr.trim().lines().last().unwrap_or_default()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_is_dynamic_and_its_interpreter_is_reported() {
        let interp = elf_interpreter(Path::new("/bin/sh")).unwrap();
        assert!(interp.is_some_and(|i| i.contains("ld-")));
    }

    #[test]
    fn scripts_run_as_they_are_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("tailscaled");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(elf_interpreter(&script).unwrap(), None);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a program").unwrap();
        assert!(
            elf_interpreter(&junk)
                .unwrap_err()
                .contains("neither an ELF")
        );
    }

    /// A dynamically linked program whose interpreter does not exist (the tarball-binary-on-Nix
    /// case) runs through a glibc loader found in a (fake) Nix store.
    #[tokio::test]
    async fn a_missing_interpreter_is_replaced_by_a_nix_store_loader() {
        let system_loader = Path::new("/lib64/ld-linux-x86-64.so.2");
        let system_libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        assert!(
            system_loader.exists() && system_libc.exists(),
            "this test needs an x86_64 glibc machine (Debian)"
        );
        let dir = tempfile::tempdir().unwrap();
        // /bin/true with its PT_INTERP pointed at a directory that does not exist.
        let mut program = std::fs::read("/bin/true").unwrap();
        let wanted = b"/lib64/ld-linux-x86-64.so.2\0";
        let at = program
            .windows(wanted.len())
            .position(|w| w == wanted)
            .expect("/bin/true names the standard loader");
        program[at..at + wanted.len()].copy_from_slice(b"/nix64/ld-linux-x86-64.so.2\0");
        let binary = dir.path().join("tailscaled");
        std::fs::write(&binary, &program).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let direct = std::process::Command::new(&binary)
            .arg("--version")
            .output();
        assert!(direct.is_err(), "without a loader it cannot run");

        // A Nix store whose glibc is this machine's.
        let root = dir.path().join("root");
        let lib = root.join("nix/store/abc123-glibc-2.36/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::os::unix::fs::symlink(system_loader, lib.join("ld-linux-x86-64.so.2")).unwrap();
        std::os::unix::fs::symlink(system_libc, lib.join("libc.so.6")).unwrap();

        let config = DaemonConfig {
            tailscaled_path: binary.display().to_string(),
            ..Default::default()
        };
        let found = find(&config, None, &preflight::Host::with_root(&root))
            .await
            .unwrap();
        assert_eq!(found.source, DaemonSource::RequestPath);
        assert_eq!(found.loader, Some(lib.join("ld-linux-x86-64.so.2")));
        let version = version_of(&found).await.unwrap();
        assert!(version.contains("coreutils"), "{version}");
    }

    fn fake_tailscaled(dir: &Path, version: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("tailscaled");
        std::fs::write(&path, format!("#!/bin/sh\necho {version}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn request_path_then_path_then_pushed() {
        let dir = tempfile::tempdir().unwrap();
        let requested = fake_tailscaled(&dir.path().join("req"), "1.0.0-requested");
        let on_path = fake_tailscaled(&dir.path().join("bin"), "1.0.0-path");
        let pushed = fake_tailscaled(&dir.path().join("pushed"), "1.0.0-pushed");
        let path_var = format!("/nonexistent:{}", dir.path().join("bin").display());
        let host = preflight::Host::default();
        let all = DaemonConfig {
            tailscaled_path: requested.display().to_string(),
            pushed_tailscaled_path: pushed.display().to_string(),
            ..Default::default()
        };
        let found = find(&all, Some(&path_var), &host).await.unwrap();
        assert_eq!(
            (found.source, version_of(&found).await.unwrap().as_str()),
            (DaemonSource::RequestPath, "1.0.0-requested")
        );

        let no_request = DaemonConfig {
            tailscaled_path: String::new(),
            ..all.clone()
        };
        let found = find(&no_request, Some(&path_var), &host).await.unwrap();
        assert_eq!((found.source, found.path), (DaemonSource::Path, on_path));

        let found = find(&no_request, Some("/nonexistent"), &host)
            .await
            .unwrap();
        assert_eq!(
            (found.source, version_of(&found).await.unwrap().as_str()),
            (DaemonSource::Pushed, "1.0.0-pushed")
        );
        assert_eq!(found.loader, None);
    }

    #[tokio::test]
    async fn an_explicit_missing_path_is_an_error_not_a_fallthrough() {
        let config = DaemonConfig {
            tailscaled_path: "/nonexistent/tailscaled".into(),
            ..Default::default()
        };
        let err = find(&config, Some("/usr/bin"), &preflight::Host::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(
            matches!(
                err,
                ProvisionError::Unusable {
                    because: Unusable::Missing,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn each_unusable_binary_says_which_fix_it_needs() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let because = |err: ProvisionError| match err {
            ProvisionError::Unusable { because, .. } => because,
            other => panic!("not an unusable binary: {other:?}"),
        };
        let at = |name: &str, body: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            DaemonConfig {
                tailscaled_path: path.display().to_string(),
                ..Default::default()
            }
        };
        let host = preflight::Host::default();

        let config = at("plain-file", "#!/bin/sh\nexit 0\n", 0o644);
        let err = find(&config, None, &host).await.unwrap_err();
        assert_eq!(because(err), Unusable::NotExecutable);

        let config = at("not-a-program", "neither ELF nor script", 0o755);
        let err = find(&config, None, &host).await.unwrap_err();
        assert_eq!(because(err), Unusable::NotRunnable);

        let config = at("no-version", "#!/bin/sh\necho broken >&2\nexit 3\n", 0o755);
        let found = find(&config, None, &host).await.unwrap();
        let err = version_of(&found).await.unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
        assert_eq!(because(err), Unusable::VersionFailed);
    }

    #[tokio::test]
    async fn nothing_found_lists_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap().to_owned();
        let err = find(
            &DaemonConfig::default(),
            Some(&path),
            &preflight::Host::default(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains(&path), "{err}");
    }
}
