//! The Modal backend: the agent runs in a Modal sandbox, uploaded through fs-tools and spoken to
//! over its exec's stdin/stdout.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use sha2::{Digest, Sha256};
use tailbox_proto::agent::v1::SandboxInfo;

use super::{AgentExit, AgentProcess};
use crate::error::{CliError, CliResult, status_error};
use crate::modal::client::ModalClient;
use crate::modal::fs;
use crate::modal::router::{Router, router_error};
use crate::modal::stdio::{ExecReader, ExecWriter, Fd};

/// Where tailbox keeps its binaries in the sandbox, each at a content-addressed name.
pub const SANDBOX_BIN_DIR: &str = "/tmp/tailbox/bin";
/// The tag every sandbox tailbox creates carries (what `tailbox sandbox sweep` looks for).
pub const CREATED_BY_TAG: (&str, &str) = ("created-by", "tailbox");
/// The tag naming the run that created a sandbox (to find it after an interrupted create).
pub const RUN_TAG: &str = "tailbox-run";
/// The static build command, for hints.
pub const STATIC_BUILD: &str =
    "cargo build --release --target x86_64-unknown-linux-musl -p tailbox-agent";

/// A local binary to push: its bytes and their sha256.
#[derive(Clone)]
pub struct LocalBinary {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its content.
    pub bytes: Bytes,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
}

impl LocalBinary {
    fn new(path: PathBuf, bytes: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Self {
            path,
            bytes: Bytes::from(bytes),
            sha256,
        }
    }

    /// The content-addressed path for this binary under `name` in the sandbox.
    pub fn sandbox_path(&self, name: &str) -> String {
        format!("{SANDBOX_BIN_DIR}/{name}-{}", self.sha256)
    }
}

/// Reads the agent to upload and checks it can run in any Linux sandbox: a static x86_64 ELF
/// (no program interpreter), since images need not have a loader at all.
pub fn load_static_agent(path: &Path) -> CliResult<LocalBinary> {
    let hint = || {
        format!(
            "build the static agent with `{STATIC_BUILD}` and pass --agent target/x86_64-unknown-linux-musl/release/tailbox-agent (or set TAILBOX_AGENT)"
        )
    };
    let bytes = std::fs::read(path).map_err(|err| {
        CliError::usage(format!(
            "Failed to read the agent binary {}",
            path.display()
        ))
        .with_source(err)
        .with_hint(hint())
    })?;
    if let Err(why) = check_static_x86_64(&bytes) {
        return Err(CliError::usage(format!(
            "The agent {} cannot run in a Modal sandbox: {why}",
            path.display()
        ))
        .with_hint(hint()));
    }
    Ok(LocalBinary::new(path.to_path_buf(), bytes))
}

/// `Ok` for a static x86_64 ELF executable; otherwise why not.
pub fn check_static_x86_64(bytes: &[u8]) -> Result<(), String> {
    use goblin::elf::Elf;
    use goblin::elf::header::{EM_X86_64, ET_DYN, ET_EXEC};
    let elf = Elf::parse(bytes).map_err(|e| format!("it is not an ELF executable ({e})"))?;
    if elf.header.e_machine != EM_X86_64 || !elf.is_64 {
        return Err(format!(
            "it is built for machine {} (need x86_64)",
            goblin::elf::header::machine_to_str(elf.header.e_machine)
        ));
    }
    if !matches!(elf.header.e_type, ET_EXEC | ET_DYN) {
        return Err("it is not an executable".into());
    }
    if let Some(interp) = elf.interpreter {
        return Err(format!(
            "it is dynamically linked (program interpreter {interp}), and sandbox images need not have that loader"
        ));
    }
    Ok(())
}

/// The tailscale binaries from a release tarball (`tailscale_<ver>_<arch>.tgz`), unpacked here on
/// the host since the image may have no tar or gzip.
pub struct TailscaleBinaries {
    /// `tailscaled`.
    pub tailscaled: LocalBinary,
    /// `tailscale` (the CLI), when the tarball has it.
    pub tailscale: Option<LocalBinary>,
}

/// Unpacks `tailscaled` and `tailscale` from a release tarball.
pub fn unpack_tailscale_tarball(path: &Path) -> CliResult<TailscaleBinaries> {
    let failed = |err: std::io::Error| {
        CliError::usage(format!(
            "Failed to read the tailscale tarball {}",
            path.display()
        ))
        .with_source(err)
        .with_hint(
            "pass a release tarball such as tailscale_1.x.y_amd64.tgz from pkgs.tailscale.com",
        )
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut found: HashMap<String, LocalBinary> = HashMap::new();
    for entry in archive.entries().map_err(failed)? {
        let mut entry = entry.map_err(failed)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let entry_path = entry.path().map_err(failed)?.into_owned();
        let Some(name) = entry_path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name == "tailscaled" || name == "tailscale" {
            let name = name.to_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(failed)?;
            found.insert(name, LocalBinary::new(path.join(&entry_path), bytes));
        }
    }
    let tailscaled = found.remove("tailscaled").ok_or_else(|| {
        CliError::usage(format!("The tarball {} has no tailscaled", path.display())).with_hint(
            "pass a release tarball such as tailscale_1.x.y_amd64.tgz from pkgs.tailscale.com",
        )
    })?;
    Ok(TailscaleBinaries {
        tailscaled,
        tailscale: found.remove("tailscale"),
    })
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Modal app the sandbox belongs to.
    pub app_name: String,
    /// Registry image.
    pub image: String,
    /// Lifetime limit: Modal terminates the sandbox after this even if we cannot.
    pub timeout: Duration,
    /// Tags (ours: created-by and the run id).
    pub tags: Vec<(String, String)>,
    /// Environment of the sandbox.
    pub env: HashMap<String, String>,
}

/// A Modal sandbox, created or attached to, with a router connection to its task.
pub struct ModalSandbox {
    id: String,
    image: String,
    router: Router,
    uploaded_bytes: u64,
}

impl ModalSandbox {
    /// Creates a sandbox. `created` is told the id as soon as it exists, before anything else
    /// can fail, so the caller can always terminate it.
    pub async fn create(
        client: &ModalClient,
        spec: &SandboxSpec,
        created: impl FnOnce(&str),
    ) -> CliResult<Self> {
        let app_id = client.app_get_or_create(&spec.app_name).await?;
        let builder_version = client.image_builder_version().await?;
        let image_id = client
            .image_from_registry(&app_id, &spec.image, &builder_version)
            .await?;
        let secret_id = client.ephemeral_secret(&spec.env).await?;
        let id = client
            .sandbox_create(
                &app_id,
                &image_id,
                vec![secret_id],
                spec.timeout,
                &spec.tags,
            )
            .await?;
        created(&id);
        let task_id = client.sandbox_task_id(&id).await?;
        let router = Router::connect(client.clone(), task_id).await?;
        Ok(Self {
            id,
            image: spec.image.clone(),
            router,
            uploaded_bytes: 0,
        })
    }

    /// Attaches to a running sandbox by id.
    pub async fn attach(client: &ModalClient, sandbox_id: &str) -> CliResult<Self> {
        let task_id = client.sandbox_task_id(sandbox_id).await?;
        let router = Router::connect(client.clone(), task_id).await?;
        Ok(Self {
            id: sandbox_id.to_owned(),
            image: String::new(),
            router,
            uploaded_bytes: 0,
        })
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes uploaded so far.
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded_bytes
    }

    /// Pushes `binary` as `<name>-<sha256>` (skipped when already there); returns its path.
    pub async fn push(&mut self, binary: &LocalBinary, name: &str) -> CliResult<String> {
        let path = binary.sandbox_path(name);
        self.uploaded_bytes +=
            fs::push_executable(&self.router, &path, binary.bytes.clone()).await?;
        Ok(path)
    }

    /// Pushes the tailscale binaries; returns the sandbox path of tailscaled.
    pub async fn push_tailscale(&mut self, binaries: &TailscaleBinaries) -> CliResult<String> {
        let tailscaled = self.push(&binaries.tailscaled, "tailscaled").await?;
        if let Some(cli) = &binaries.tailscale {
            self.push(cli, "tailscale").await?;
        }
        Ok(tailscaled)
    }

    /// Runs `<agent_path> serve --stdio` and wires its stdio into an [`AgentProcess`].
    pub async fn launch_agent(
        &self,
        agent_path: &str,
        agent_sha256: &str,
        log_filter: &str,
    ) -> CliResult<AgentProcess> {
        let exec_id = uuid::Uuid::new_v4().to_string();
        let argv = [agent_path, "serve", "--stdio", "--log", log_filter]
            .map(str::to_owned)
            .to_vec();
        self.router
            .exec_start(&exec_id, argv, HashMap::new())
            .await
            .map_err(|s| router_error("Failed to start the agent in the sandbox", s))?;
        let stdout = ExecReader::new(self.router.clone(), exec_id.clone(), Fd::Stdout);
        let stdin = ExecWriter::new(self.router.clone(), exec_id.clone());
        let stderr = ExecReader::new(self.router.clone(), exec_id.clone(), Fd::Stderr);
        let router = self.router.clone();
        let exit = async move {
            match router.wait(&exec_id).await {
                Ok(exit) => exit,
                Err(status) => AgentExit::Unknown(status_error(&status).to_string()),
            }
        }
        .boxed();
        Ok(AgentProcess {
            io: Box::new(tokio::io::join(stdout, stdin)),
            stderr: Box::pin(stderr),
            exit,
            expected_sha256: Some(agent_sha256.to_owned()),
            pid: None,
        })
    }

    /// What the report says about this sandbox.
    pub fn info(&self, kept: bool) -> SandboxInfo {
        SandboxInfo {
            backend: "modal".into(),
            sandbox_id: self.id.clone(),
            image: self.image.clone(),
            kept,
            uploaded_bytes: self.uploaded_bytes,
        }
    }
}

/// The first *static* agent where [`super::default_agent_candidates`] looks, read for upload
/// (each candidate is read once): a dynamically linked agent next to `tailbox` (a plain
/// `cargo build`) is passed over in favour of the musl build.
pub fn default_static_agent() -> CliResult<LocalBinary> {
    super::default_agent_candidates()
        .into_iter()
        .find_map(|path| {
            let bytes = std::fs::read(&path).ok()?;
            check_static_x86_64(&bytes)
                .is_ok()
                .then(|| LocalBinary::new(path, bytes))
        })
        .ok_or_else(|| {
            CliError::usage("Failed to find a static tailbox-agent to upload next to tailbox")
                .with_hint(format!(
                    "build it with `cargo xtask static-agent` (or `{STATIC_BUILD}`), or pass --agent <PATH> (or set TAILBOX_AGENT)"
                ))
        })
}
