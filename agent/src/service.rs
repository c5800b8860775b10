//! The `tailbox.agent.v1.Agent` service.

use std::sync::Arc;

use tailbox_proto::PROTO_VERSION;
use tailbox_proto::agent::v1::agent_server::Agent;
use tailbox_proto::agent::v1::{HelloRequest, HelloResponse, RunRequest, ServeMode};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::events::{EventItem, EventSink};
use crate::run::{self, RunContext};

/// Buffer between the run and the wire; small, so a slow reader applies backpressure.
const EVENT_BUFFER: usize = 64;

/// The service state shared by all calls on one connection.
#[derive(Clone)]
pub struct AgentService {
    context: RunContext,
    /// A one-shot stdio agent runs jobs; a sidecar only says hello (its node is checked with
    /// `Sidecar.Check`, and a second tailscaled would fight the sidecar's over the proxy port).
    mode: ServeMode,
    /// One run at a time: two runs would fight over tailscaled's socket and ports.
    run_slot: Arc<Semaphore>,
    /// Runs in flight, so shutdown can wait for their teardown.
    runs: TaskTracker,
}

impl AgentService {
    /// A service whose runs use `context`.
    pub fn new(context: RunContext) -> Self {
        Self::with_mode(context, ServeMode::Stdio)
    }

    /// The Agent service of a sidecar: `Hello` only.
    pub fn sidecar(context: RunContext) -> Self {
        Self::with_mode(context, ServeMode::Sidecar)
    }

    fn with_mode(context: RunContext, mode: ServeMode) -> Self {
        Self {
            context,
            mode,
            run_slot: Arc::new(Semaphore::new(1)),
            runs: TaskTracker::new(),
        }
    }

    /// Cancels runs in flight (they skip to teardown) and waits up to `grace` for them to end.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        self.context.cancel.cancel();
        self.runs.close();
        if tokio::time::timeout(grace, self.runs.wait()).await.is_err() {
            tracing::warn!("runs still tearing down after {grace:?}; exiting anyway");
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        let hello = request.into_inner();
        tracing::info!(
            controller_version = %hello.controller_version,
            controller_proto = hello.proto_version,
            "handshake"
        );
        Ok(Response::new(HelloResponse {
            agent_version: crate::AGENT_VERSION.into(),
            agent_sha256: self.context.agent_sha256.clone(),
            proto_version: PROTO_VERSION,
            features: crate::FEATURES.iter().map(|f| (*f).to_owned()).collect(),
            arch: std::env::consts::ARCH.into(),
            pid: std::process::id(),
            serve_mode: self.mode as i32,
        }))
    }

    type RunStream = ReceiverStream<EventItem>;

    async fn run(&self, request: Request<RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        if self.mode == ServeMode::Sidecar {
            return Err(Status::failed_precondition(
                "this agent is a sidecar, whose node stays up: call Sidecar.Check to check targets over it",
            ));
        }
        let permit = self.run_slot.clone().try_acquire_owned().map_err(|_| {
            Status::failed_precondition("a run is already in progress on this agent")
        })?;
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let sink = EventSink::new(tx);
        let context = self.context.clone();
        self.runs.spawn(async move {
            run::execute(request, sink, context).await;
            drop(permit);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Lower-case hex sha256 of the running executable, or a note explaining why it is unknown.
pub fn own_sha256() -> String {
    use sha2::{Digest, Sha256};
    match std::fs::File::open("/proc/self/exe") {
        Ok(mut file) => {
            let mut hasher = Sha256::new();
            match std::io::copy(&mut file, &mut hasher) {
                Ok(_) => hex::encode(hasher.finalize()),
                Err(err) => {
                    tracing::warn!("cannot hash /proc/self/exe: {err}");
                    String::new()
                }
            }
        }
        Err(err) => {
            tracing::warn!("cannot open /proc/self/exe: {err}");
            String::new()
        }
    }
}
