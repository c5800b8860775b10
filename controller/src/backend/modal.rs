//! The Modal backend: the agent runs in a Modal sandbox, uploaded through fs-tools and spoken to
//! over its exec's stdin/stdout.
//!
//! **Which agent.** Before uploading, the sandbox's CPU architecture is learned with no tool in
//! the image: images need not have `uname`, a shell or anything else, so tailbox asks the one
//! program every Modal sandbox has and that it already needs for uploads, Modal's own
//! `modal-sandbox-fs-tools`. Its `ReadFile` of `/proc/self/exe` reads the helper's own
//! executable, a native ELF for the CPU the sandbox runs on, and the header's `e_machine` names
//! that CPU; only the first 20 bytes are read ([`fs::read_prefix`]). Other sources were weighed
//! and left: `/proc/sys/kernel/arch` is missing from older kernels and gVisor, `/proc/cpuinfo`
//! differs per architecture and runtime, and the image's platform is not known when attaching
//! to an existing sandbox. The agent for that architecture comes from the [`AgentSet`]; a
//! tailscale tarball's binaries must be for it too. Both are checked before anything is pushed.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use sha2::{Digest, Sha256};
use tailbox_proto::agent::v1::SandboxInfo;
use tailbox_proto::arch::{Arch, ELF_MACHINE_PREFIX_LEN};

use super::agents::AgentSet;
use super::{
    AgentProcess, Backend, Installed, Interrupt, ProcessExit, Released, Sandbox, SandboxError,
};
use crate::modal::client::ModalClient;
use crate::modal::config::ModalConfig;
use crate::modal::fs;
use crate::modal::router::Router;
use crate::modal::stdio::{ExecReader, ExecWriter, Fd};
use crate::modal::{ModalError, RpcStatus};

/// Where tailbox keeps its binaries in the sandbox, each at a content-addressed name.
pub const SANDBOX_BIN_DIR: &str = "/tmp/tailbox/bin";
/// The tag every sandbox tailbox creates carries (what `tailbox sandbox sweep` looks for).
pub const CREATED_BY_TAG: (&str, &str) = ("created-by", "tailbox");
/// The tag naming the run that created a sandbox (to find it after an interrupted create).
pub const RUN_TAG: &str = "tailbox-run";
/// The file whose ELF header names the sandbox's CPU: the fs-tools process's own executable.
const SELF_EXE: &str = "/proc/self/exe";

/// A local binary to push: its bytes and their sha256.
#[derive(Clone)]
pub struct LocalBinary {
    /// Its content.
    pub bytes: Bytes,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
}

impl LocalBinary {
    /// Wraps `bytes`, hashing them.
    pub fn new(bytes: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Self {
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
    pub path: PathBuf,
    /// The architecture both are built for (from their ELF headers).
    pub arch: Arch,
    /// `tailscaled`.
    pub tailscaled: LocalBinary,
    /// `tailscale` (the CLI), when the tarball has it.
    pub tailscale: Option<LocalBinary>,
}

/// Unpacks `tailscaled` and `tailscale` from a release tarball.
pub fn unpack_tailscale_tarball(path: &Path) -> Result<TailscaleBinaries, SandboxError> {
    let failed = |source: std::io::Error| SandboxError::Tarball {
        path: path.to_path_buf(),
        source,
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
            found.insert(name, LocalBinary::new(bytes));
        }
    }
    let tailscaled =
        found
            .remove("tailscaled")
            .ok_or_else(|| SandboxError::TarballWithoutTailscaled {
                path: path.to_path_buf(),
            })?;
    let tailscale = found.remove("tailscale");
    let arch_of = |name: &'static str, binary: &LocalBinary| {
        Arch::from_elf_header(&binary.bytes).map_err(|problem| SandboxError::TarballNotElf {
            path: path.to_path_buf(),
            name,
            problem,
        })
    };
    let arch = arch_of("tailscaled", &tailscaled)?;
    if let Some(cli) = &tailscale {
        let cli_arch = arch_of("tailscale", cli)?;
        if cli_arch != arch {
            return Err(SandboxError::TarballMixed {
                path: path.to_path_buf(),
                tailscaled: arch,
                tailscale: cli_arch,
            });
        }
    }
    Ok(TailscaleBinaries {
        path: path.to_path_buf(),
        arch,
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

/// Sandbox lifetime beyond the run's timeout (image pull, upload): Modal reaps the sandbox after
/// it even if tailbox dies without cleaning up.
const SANDBOX_LIFETIME_MARGIN: Duration = Duration::from_secs(10 * 60);
/// Lifetime of a sandbox kept with `--keep`.
const KEPT_SANDBOX_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// How a run uses Modal.
#[derive(Debug, Clone)]
pub struct ModalOptions {
    /// Modal app of the sandboxes.
    pub app_name: String,
    /// Registry image of the sandboxes.
    pub image: String,
    /// The run's whole budget; a created sandbox lives a margin longer.
    pub run_timeout: Duration,
    /// Leave created sandboxes running.
    pub keep: bool,
    /// This run's id, tagged on what it creates.
    pub run_id: String,
    /// The agents to choose from (files or directories); empty: the static builds next to
    /// `tailbox`.
    pub agents: Vec<PathBuf>,
    /// A tailscale release tarball whose binaries are pushed too.
    pub tailscale_tarball: Option<PathBuf>,
    /// How long a created sandbox lives, when the run's own budget does not decide it (`up`:
    /// the sandbox outlives tailbox).
    pub lifetime: Option<Duration>,
}

impl ModalOptions {
    /// What each created sandbox looks like.
    fn spec(&self) -> SandboxSpec {
        let lifetime = if let Some(lifetime) = self.lifetime {
            lifetime
        } else if self.keep {
            KEPT_SANDBOX_LIFETIME.max(self.run_timeout + SANDBOX_LIFETIME_MARGIN)
        } else {
            self.run_timeout + SANDBOX_LIFETIME_MARGIN
        };
        SandboxSpec {
            app_name: self.app_name.clone(),
            image: self.image.clone(),
            timeout: lifetime,
            tags: vec![
                (CREATED_BY_TAG.0.to_owned(), CREATED_BY_TAG.1.to_owned()),
                (RUN_TAG.to_owned(), self.run_id.clone()),
            ],
            env: HashMap::from([
                ("HOME".to_owned(), "/root".to_owned()),
                ("TERM".to_owned(), "xterm-256color".to_owned()),
            ]),
        }
    }
}

/// Runs agents in Modal sandboxes.
pub struct ModalBackend {
    client: ModalClient,
    options: ModalOptions,
    spec: SandboxSpec,
    payload: Arc<Payload>,
    tracked: Mutex<Tracked>,
}

/// What is uploaded into every sandbox: the agent for its architecture, and tailscale.
struct Payload {
    agents: AgentSet,
    tailscale: Option<TailscaleBinaries>,
}

/// What this backend created or attached to, recorded as it happens so that release works even
/// when the work was dropped mid-flight (Ctrl-C).
#[derive(Debug, Default, Clone)]
struct Tracked {
    /// Creates sent: a sandbox may exist even if its id never came back.
    creates: usize,
    /// Sandboxes created (ids known).
    created: Vec<String>,
    /// Existing sandboxes attached to (never terminated: they are not ours).
    attached: Vec<String>,
}

impl ModalBackend {
    /// Checks the local binaries first (a dynamic agent or a bad tarball is found before
    /// anything is created), then makes a client.
    pub fn new(config: ModalConfig, options: ModalOptions) -> Result<Self, SandboxError> {
        let agents = if options.agents.is_empty() {
            AgentSet::find_in(&super::default_agent_dirs())?
        } else {
            AgentSet::load(&options.agents)?
        };
        let tailscale = options
            .tailscale_tarball
            .as_deref()
            .map(unpack_tailscale_tarball)
            .transpose()?;
        let client = ModalClient::new(config)?;
        Ok(Self {
            client,
            spec: options.spec(),
            options,
            payload: Arc::new(Payload { agents, tailscale }),
            tracked: Mutex::default(),
        })
    }

    fn track(&self, change: impl FnOnce(&mut Tracked)) {
        match self.tracked.lock() {
            Ok(mut tracked) => change(&mut tracked),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }

    fn tracked(&self) -> Tracked {
        match self.tracked.lock() {
            Ok(tracked) => tracked.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Sandboxes of this run, found by its tag (after creates whose ids never came back).
    async fn find_by_run_tag(&self) -> Vec<String> {
        let Ok(Some(app_id)) = self.client.app_lookup(&self.spec.app_name).await else {
            return Vec::new();
        };
        let tags = [(RUN_TAG.to_owned(), self.options.run_id.clone())];
        match self.client.sandbox_list(&app_id, &tags).await {
            Ok(found) => found.into_iter().map(|s| s.id).collect(),
            Err(err) => {
                tracing::warn!("listing this run's sandboxes failed: {err}");
                Vec::new()
            }
        }
    }

    async fn create(&self) -> Result<ModalSandbox, ModalError> {
        let client = &self.client;
        let spec = &self.spec;
        let app_id = client.app_get_or_create(&spec.app_name).await?;
        let builder_version = client.image_builder_version().await?;
        let image_id = client
            .image_from_registry(&app_id, &spec.image, &builder_version)
            .await?;
        let secret_id = client.ephemeral_secret(&spec.env).await?;
        self.track(|t| t.creates += 1);
        let id = client
            .sandbox_create(
                &app_id,
                &image_id,
                vec![secret_id],
                spec.timeout,
                &spec.tags,
            )
            .await?;
        // Recorded before anything else can fail, so release always finds it.
        self.track(|t| t.created.push(id.clone()));
        self.connect(id, spec.image.clone(), self.options.keep)
            .await
    }

    async fn connect(
        &self,
        id: String,
        image: String,
        kept: bool,
    ) -> Result<ModalSandbox, ModalError> {
        let task_id = self.client.sandbox_task_id(&id).await?;
        let router = Router::connect(self.client.clone(), task_id).await?;
        Ok(ModalSandbox {
            id,
            image,
            kept,
            router,
            payload: Arc::clone(&self.payload),
            uploaded_bytes: 0,
            agent: None,
        })
    }
}

#[async_trait::async_trait]
impl Backend for ModalBackend {
    fn kind(&self) -> &'static str {
        "modal"
    }

    async fn open(&self, existing: Option<&str>) -> Result<Box<dyn Sandbox>, SandboxError> {
        let sandbox = match existing {
            Some(id) => {
                self.track(|t| t.attached.push(id.to_owned()));
                self.connect(id.to_owned(), String::new(), true).await?
            }
            None => self.create().await?,
        };
        Ok(Box::new(sandbox))
    }

    async fn terminate_created(&self, id: &str) -> Option<Released> {
        let tags = [(CREATED_BY_TAG.0.to_owned(), CREATED_BY_TAG.1.to_owned())];
        let ours = match self.client.app_lookup(&self.spec.app_name).await {
            Ok(Some(app_id)) => match self.client.sandbox_list(&app_id, &tags).await {
                Ok(found) => found.iter().any(|s| s.id == id),
                Err(err) => return Some(Released::Failed(id.to_owned(), err)),
            },
            Ok(None) => false,
            Err(err) => return Some(Released::Failed(id.to_owned(), err)),
        };
        if !ours {
            return Some(Released::NotOurs(id.to_owned()));
        }
        Some(match self.client.sandbox_terminate(id).await {
            Ok(_) => Released::Terminated(id.to_owned()),
            Err(err) => Released::Failed(id.to_owned(), err),
        })
    }

    fn interrupt(&self) -> Interrupt {
        // Terminating the sandbox stops everything in it, well within the 3 s promised.
        Interrupt::Abandon
    }

    async fn release(&self, budget: Duration) -> Vec<Released> {
        let tracked = self.tracked();
        let mut released: Vec<Released> = tracked
            .attached
            .iter()
            .cloned()
            .map(Released::NotOurs)
            .collect();
        let work = async {
            let mut ids = tracked.created.clone();
            if tracked.creates > tracked.created.len() {
                // Interrupted while a create was in flight: find the rest by this run's tag.
                for id in self.find_by_run_tag().await {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            if self.options.keep {
                return ids.into_iter().map(Released::Kept).collect();
            }
            // All at once: many sandboxes must all go within the budget.
            futures::future::join_all(ids.into_iter().map(|id| async move {
                match self.client.sandbox_terminate(&id).await {
                    Ok(_) => Released::Terminated(id),
                    Err(err) => Released::Failed(id, err),
                }
            }))
            .await
        };
        match tokio::time::timeout(budget, work).await {
            Ok(outcomes) => released.extend(outcomes),
            Err(_) => {
                let ids = tracked.created;
                if ids.is_empty() {
                    released.push(Released::TimedOut(None));
                }
                released.extend(ids.into_iter().map(|id| Released::TimedOut(Some(id))));
            }
        }
        released
    }
}

/// A Modal sandbox, created or attached to, with a router connection to its task.
pub struct ModalSandbox {
    id: String,
    image: String,
    kept: bool,
    router: Router,
    payload: Arc<Payload>,
    uploaded_bytes: u64,
    /// The installed agent: its sandbox path and sha256.
    agent: Option<(String, String)>,
}

impl ModalSandbox {
    /// Pushes `binary` as `<name>-<sha256>` (skipped when already there); returns its path.
    async fn push(&mut self, binary: &LocalBinary, name: &str) -> Result<String, ModalError> {
        let path = binary.sandbox_path(name);
        self.uploaded_bytes +=
            fs::push_executable(&self.router, &path, binary.bytes.clone()).await?;
        Ok(path)
    }

    /// The sandbox's CPU architecture, learned with no tool in the image (see the module docs).
    async fn arch(&self) -> Result<Arch, SandboxError> {
        let header = fs::read_prefix(&self.router, SELF_EXE, ELF_MACHINE_PREFIX_LEN).await?;
        Arch::from_elf_header(&header).map_err(|problem| SandboxError::SandboxArch {
            file: SELF_EXE,
            problem,
        })
    }
}

#[async_trait::async_trait]
impl Sandbox for ModalSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn info(&self) -> SandboxInfo {
        SandboxInfo {
            backend: "modal".into(),
            sandbox_id: self.id.clone(),
            image: self.image.clone(),
            kept: self.kept,
            uploaded_bytes: self.uploaded_bytes,
        }
    }

    fn default_hostname(&self) -> Option<String> {
        None
    }

    fn remote(&self) -> bool {
        true
    }

    async fn install(&mut self) -> Result<Installed, SandboxError> {
        let payload = Arc::clone(&self.payload);
        // Everything is checked against the sandbox's architecture before anything is pushed.
        let arch = self.arch().await?;
        let agent = payload.agents.for_arch(arch)?;
        if let Some(tailscale) = &payload.tailscale
            && tailscale.arch != arch
        {
            return Err(SandboxError::TarballArch {
                path: tailscale.path.clone(),
                found: tailscale.arch,
                sandbox: arch,
            });
        }
        let agent_path = self.push(&agent.binary, "tailbox-agent").await?;
        self.agent = Some((agent_path, agent.binary.sha256.clone()));
        let pushed_tailscaled = match &payload.tailscale {
            Some(binaries) => {
                let tailscaled = self.push(&binaries.tailscaled, "tailscaled").await?;
                if let Some(cli) = &binaries.tailscale {
                    self.push(cli, "tailscale").await?;
                }
                Some(tailscaled)
            }
            None => None,
        };
        Ok(Installed {
            uploaded_bytes: self.uploaded_bytes,
            pushed_tailscaled,
            arch: Some(arch),
        })
    }

    async fn exec_agent(&self, args: &[&str]) -> Result<AgentProcess, SandboxError> {
        let (agent_path, agent_sha256) = self.agent.clone().ok_or(SandboxError::NotInstalled)?;
        let exec_id = uuid::Uuid::new_v4().to_string();
        let argv = std::iter::once(agent_path.as_str())
            .chain(args.iter().copied())
            .map(str::to_owned)
            .collect();
        self.router
            .exec_start(&exec_id, argv, HashMap::new())
            .await
            .map_err(|s| {
                self.router
                    .failed("TaskExecStart", "start the agent in the sandbox", s)
            })?;
        let stdout = ExecReader::new(self.router.clone(), exec_id.clone(), Fd::Stdout);
        let stdin = ExecWriter::new(self.router.clone(), exec_id.clone());
        let stderr = ExecReader::new(self.router.clone(), exec_id.clone(), Fd::Stderr);
        let router = self.router.clone();
        let exit = async move {
            match router.wait(&exec_id).await {
                Ok(exit) => exit,
                Err(status) => ProcessExit::Unknown(RpcStatus(status).to_string()),
            }
        }
        .boxed();
        Ok(AgentProcess {
            io: Box::new(tokio::io::join(stdout, stdin)),
            stderr: Box::pin(stderr),
            exit,
            expected_sha256: Some(agent_sha256),
        })
    }
}
