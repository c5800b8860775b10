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
use tailbox_proto::arch::Arch;

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
    /// Wraps `bytes` read from `path`.
    pub fn new(path: PathBuf, bytes: Vec<u8>) -> Self {
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

/// The tailscale binaries from a release tarball (`tailscale_<ver>_<arch>.tgz`), unpacked here on
/// the host since the image may have no tar or gzip.
pub struct TailscaleBinaries {
    /// The tarball they came from.
    pub tarball: PathBuf,
    /// What they are built for (both agree; checked against the sandbox before pushing).
    pub arch: Arch,
    /// `tailscaled`.
    pub tailscaled: LocalBinary,
    /// `tailscale` (the CLI), when the tarball has it.
    pub tailscale: Option<LocalBinary>,
}

/// Unpacks `tailscaled` and `tailscale` from a release tarball, and learns their architecture
/// from their ELF headers.
pub fn unpack_tailscale_tarball(path: &Path) -> CliResult<TailscaleBinaries> {
    let failed = |err: std::io::Error| {
        CliError::usage(format!(
            "Failed to read the tailscale tarball {}",
            path.display()
        ))
        .with_source(err)
        .with_hint(
            "pass a release tarball such as tailscale_1.x.y_amd64.tgz or tailscale_1.x.y_arm64.tgz from pkgs.tailscale.com",
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
            "pass a release tarball such as tailscale_1.x.y_amd64.tgz or tailscale_1.x.y_arm64.tgz from pkgs.tailscale.com",
        )
    })?;
    let tailscale = found.remove("tailscale");
    Ok(TailscaleBinaries {
        tarball: path.to_path_buf(),
        arch: crate::arch::tailscale_arch(path, &tailscaled, tailscale.as_ref())?,
        tailscaled,
        tailscale,
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

    /// The sandbox's CPU architecture, learned with no tool in the image ([`crate::arch`]).
    pub async fn arch(&self) -> CliResult<Arch> {
        crate::arch::sandbox_arch(&self.router).await
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

    /// Pushes the tailscale binaries, once their architecture is checked against the
    /// sandbox's; returns the sandbox path of tailscaled.
    pub async fn push_tailscale(
        &mut self,
        binaries: &TailscaleBinaries,
        sandbox_arch: Arch,
    ) -> CliResult<String> {
        crate::arch::check_tailscale_fits(&binaries.tarball, binaries.arch, sandbox_arch)?;
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
