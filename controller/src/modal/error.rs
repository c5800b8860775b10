//! What can go wrong talking to Modal. Variants carry the facts a person needs (which call,
//! which sandbox, where the credentials came from); the CLI turns them into wording, hints and
//! exit codes in `crate::error`.

use std::fmt;

use tonic::Code;

/// A gRPC status as an error cause: its code and message, without the metadata `tonic::Status`
/// prints in its own `Display`.
#[derive(Debug, Clone)]
pub struct RpcStatus(pub tonic::Status);

impl RpcStatus {
    /// The status code.
    pub fn code(&self) -> Code {
        self.0.code()
    }
}

impl fmt::Display for RpcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gRPC status {:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for RpcStatus {}

impl From<tonic::Status> for RpcStatus {
    fn from(status: tonic::Status) -> Self {
        Self(status)
    }
}

/// Which Modal service a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The control plane (`modal.client.ModalClient`).
    ControlPlane,
    /// A sandbox's Task Command Router.
    Router,
}

/// A failure of the Modal client.
#[derive(Debug, thiserror::Error)]
pub enum ModalError {
    /// A call failed after its retries.
    #[error("Failed to {action}")]
    Rpc {
        /// What was being done, e.g. "create the Modal sandbox".
        action: String,
        /// The RPC, e.g. "SandboxCreate".
        rpc: &'static str,
        /// Which service answered.
        service: Service,
        /// The last status.
        #[source]
        status: RpcStatus,
        /// Where the credentials came from (for a hint on refused credentials).
        credentials: String,
        /// The control-plane URL (for a hint on an unreachable Modal).
        server_url: String,
    },
    /// A Modal URL tailbox cannot use.
    #[error("Failed to use the Modal endpoint {url}")]
    Endpoint {
        /// The URL, as given.
        url: String,
        /// Why.
        #[source]
        source: EndpointProblem,
        /// Whether the control plane handed it out (a router URL) rather than the user.
        handed_out: bool,
    },
    /// The environment does not say which image builder to use.
    #[error("The Modal environment has no image builder version")]
    NoImageBuilderVersion,
    /// The image could not be built.
    #[error("Failed to build the image {tag}")]
    ImageBuild {
        /// The registry image.
        tag: String,
        /// How the build ended.
        #[source]
        outcome: Finished,
        /// The last lines of the build log.
        log_tail: Vec<String>,
    },
    /// The sandbox to attach to has ended.
    #[error("The sandbox {sandbox_id} has already finished")]
    SandboxFinished {
        /// The sandbox.
        sandbox_id: String,
        /// How it ended.
        #[source]
        outcome: Finished,
    },
    /// The sandbox did not get a task in time.
    #[error("The sandbox {sandbox_id} was not scheduled within {seconds}s")]
    NotScheduled {
        /// The sandbox.
        sandbox_id: String,
        /// How long tailbox waited.
        seconds: u64,
    },
    /// A file operation in the sandbox failed.
    #[error("Failed to {action}")]
    Files {
        /// What was being done, e.g. "write /tmp/x in the sandbox".
        action: String,
        /// Why.
        #[source]
        source: FilesProblem,
    },
}

impl ModalError {
    /// The gRPC code of a failed call, if this is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ModalError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// Why an endpoint URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointProblem {
    /// Not a URL.
    #[error("it is not a URL: {0}")]
    Unparsable(String),
    /// Plain http to a remote host.
    #[error("plain http is only accepted when the control plane is on this machine")]
    Plaintext,
    /// Neither http nor https.
    #[error("the scheme {0:?} is not supported")]
    Scheme(String),
    /// TLS setup failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// How something on Modal's side ended (a sandbox, an image build).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}{}", if exception.is_empty() { String::new() } else { format!(": {exception}") })]
pub struct Finished {
    /// `GENERIC_STATUS_…` name.
    pub status: String,
    /// The first line of the server's explanation, if any.
    pub exception: String,
}

/// Why a file operation through `modal-sandbox-fs-tools` failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesProblem {
    /// Running fs-tools (or chmod) through the router failed.
    #[error(transparent)]
    Exec(#[from] RpcStatus),
    /// fs-tools reported an error.
    #[error("modal-sandbox-fs-tools ended with {exit}: {reason}")]
    Tool {
        /// How it exited.
        exit: String,
        /// What it printed.
        reason: String,
    },
    /// fs-tools printed something tailbox does not understand.
    #[error("modal-sandbox-fs-tools printed something that is not a FileInfo: {0}")]
    Garbled(String),
    /// The file is missing or short after writing.
    #[error("{arrived} of {expected} bytes arrived")]
    Short {
        /// Bytes found.
        arrived: u64,
        /// Bytes sent.
        expected: u64,
    },
    /// No way to set the execute bit.
    #[error("modal-sandbox-fs-tools cannot set file modes, and no chmod worked ({tried})")]
    NoChmod {
        /// What was tried and how each ended.
        tried: String,
    },
    /// chmod ran but the mode did not change.
    #[error("chmod succeeded but the mode has no execute bit")]
    NoExecuteBit,
}
