//! The Task Command Router (`modal.task_command_router`): exec with offset-addressed stdio on the
//! worker that runs the sandbox's task. Auth is `authorization: Bearer <jwt>` only; on
//! UNAUTHENTICATED the JWT is fetched afresh (once per failing generation) and the call retried.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tailbox_proto::modal::task_command_router::task_command_router_client::TaskCommandRouterClient;
use tailbox_proto::modal::task_command_router::task_exec_stdin_write_stream_request::Payload;
use tailbox_proto::modal::task_command_router::task_exec_wait_response::ExitStatus;
use tailbox_proto::modal::task_command_router::{
    TaskExecStartRequest, TaskExecStderrConfig, TaskExecStdinStatusRequest,
    TaskExecStdinWriteRequest, TaskExecStdinWriteStreamEnd, TaskExecStdinWriteStreamRequest,
    TaskExecStdinWriteStreamStart, TaskExecStdoutConfig, TaskExecWaitRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::client::ModalClient;
use super::error::{ModalError, Service};
use super::retry::{Attempts, Backoff, Next};
use crate::process::ProcessExit;
use crate::secret::Secret;

/// Size of each message of a streamed stdin write (what the SDKs use).
pub const UPLOAD_CHUNK: usize = 256 * 1024;
/// Per-call timeout of `TaskExecWait`, which is retried until the process exits.
const WAIT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-attempt timeout of other unary router calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one task's router. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    control: ModalClient,
    task_id: String,
    access: RwLock<Access>,
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Access {
    /// `Bearer <jwt>`, built once per JWT; `None` when the JWT is not valid ASCII (the router
    /// then answers UNAUTHENTICATED, and a fresh JWT is fetched).
    bearer: Option<MetadataValue<Ascii>>,
    url: String,
    client: TaskCommandRouterClient<Channel>,
    generation: u64,
}

/// What a streamed stdin write achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// Every byte arrived and stdin was closed.
    Complete,
    /// The process closed stdin or exited first (FAILED_PRECONDITION / ABORTED); its exit
    /// status tells why.
    ExitedEarly,
}

impl Router {
    /// Gets access to the router of `task_id` and connects (lazily).
    pub async fn connect(control: ModalClient, task_id: String) -> Result<Self, ModalError> {
        let (jwt, url) = control.command_router_access(&task_id).await.map_err(|s| {
            control.failed(
                "TaskGetCommandRouterAccess",
                "get access to the sandbox's command router",
                s,
            )
        })?;
        let client = router_client(&url, control.config().plaintext())?;
        Ok(Self {
            inner: Arc::new(Inner {
                control,
                task_id,
                access: RwLock::new(Access {
                    bearer: bearer(&jwt),
                    url,
                    client,
                    generation: 0,
                }),
                refresh: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The task this router runs execs in.
    pub fn task_id(&self) -> &str {
        &self.inner.task_id
    }

    fn access(&self) -> std::sync::RwLockReadGuard<'_, Access> {
        self.inner
            .access
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request carrying the bearer JWT, the client to send it with, and the JWT generation
    /// (for [`Router::refresh`]). Called for every stdio read and write: it only clones.
    pub(crate) fn authorized<T>(
        &self,
        message: T,
    ) -> (Request<T>, TaskCommandRouterClient<Channel>, u64) {
        let mut request = Request::new(message);
        let access = self.access();
        if let Some(bearer) = &access.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        (request, access.client.clone(), access.generation)
    }

    /// Fetches a fresh JWT, unless another caller already replaced generation `seen`.
    pub(crate) async fn refresh(&self, seen: u64) -> Result<(), Status> {
        let _one_at_a_time = self.inner.refresh.lock().await;
        if self.access().generation != seen {
            return Ok(());
        }
        let (jwt, url) = self
            .inner
            .control
            .command_router_access(&self.inner.task_id)
            .await?;
        let mut access = self.access().clone();
        if url != access.url {
            tracing::warn!("the command router moved to a new URL; reconnecting");
            access.client =
                router_client(&url, self.inner.control.config().plaintext()).map_err(|e| {
                    let why = std::error::Error::source(&e)
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    Status::unavailable(format!("{e}: {why}"))
                })?;
            access.url = url;
        }
        access.bearer = bearer(&jwt);
        access.generation = seen + 1;
        *self
            .inner
            .access
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = access;
        tracing::debug!("refreshed the command router JWT");
        Ok(())
    }

    /// One logical unary call with JWT refresh and transient retries.
    pub(crate) async fn unary<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        message: Req,
        timeout: Duration,
        backoff: Backoff,
        mut call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: FnMut(TaskCommandRouterClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let mut attempts = Attempts::new(backoff).refreshing_auth();
        loop {
            let (mut request, client, generation) = self.authorized(message.clone());
            request.set_timeout(timeout);
            let status = match call(client, request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            self.next_attempt(&mut attempts, rpc, generation, status)
                .await?;
        }
    }

    /// Acts on what follows a failed attempt: waits, or refreshes the JWT, or gives up with the
    /// status.
    pub(crate) async fn next_attempt(
        &self,
        attempts: &mut Attempts,
        rpc: &'static str,
        generation: u64,
        status: Status,
    ) -> Result<(), Status> {
        match attempts.after(&status) {
            Next::Retry(wait) => {
                tracing::debug!(rpc, ?wait, code = ?status.code(), "router call failed; retrying");
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Next::RefreshAuth => self.refresh(generation).await,
            Next::GiveUp => Err(status),
        }
    }

    /// The error for a failed router call.
    pub fn failed(
        &self,
        rpc: &'static str,
        action: impl Into<String>,
        status: Status,
    ) -> ModalError {
        self.inner
            .control
            .error(Service::Router, rpc, action, status)
    }

    /// Starts `argv` with stdout and stderr piped (never DEVNULL, the proto default).
    pub async fn exec_start(
        &self,
        exec_id: &str,
        argv: Vec<String>,
        env: HashMap<String, String>,
    ) -> Result<(), Status> {
        let request = TaskExecStartRequest {
            task_id: self.inner.task_id.clone(),
            exec_id: exec_id.to_owned(),
            command_args: argv,
            stdout_config: TaskExecStdoutConfig::Pipe as i32,
            stderr_config: TaskExecStderrConfig::Pipe as i32,
            timeout_secs: None,
            workdir: None,
            env,
            ..Default::default()
        };
        self.unary(
            "TaskExecStart",
            request,
            CALL_TIMEOUT,
            Backoff::ROUTER,
            |mut c, r| async move { c.task_exec_start(r).await },
        )
        .await
        .map(|_| ())
    }

    /// Writes `data` to stdin at `offset` (and closes it when `eof`). Retries resend the same
    /// offset, so the router can drop what it already has.
    pub async fn stdin_write(
        &self,
        exec_id: &str,
        offset: u64,
        data: Bytes,
        eof: bool,
    ) -> Result<(), Status> {
        let request = TaskExecStdinWriteRequest {
            task_id: self.inner.task_id.clone(),
            exec_id: exec_id.to_owned(),
            offset,
            // No copy when `data` is the only handle on its buffer (the stdin pump's batches).
            data: Vec::from(data),
            eof,
        };
        self.unary(
            "TaskExecStdinWrite",
            request,
            CALL_TIMEOUT,
            Backoff::ROUTER,
            |mut c, r| async move { c.task_exec_stdin_write(r).await },
        )
        .await
        .map(|_| ())
    }

    /// Streams all of `data` to stdin in 256 KiB messages and closes it; after a broken stream
    /// asks how much arrived (`TaskExecStdinStatus`) and resumes from there.
    pub async fn stdin_upload(&self, exec_id: &str, data: Bytes) -> Result<Upload, Status> {
        let total = data.len() as u64;
        let mut offset = 0u64;
        let mut attempts = Attempts::new(Backoff::UPLOAD_RESUME).refreshing_auth();
        loop {
            let start = usize::try_from(offset)
                .unwrap_or(data.len())
                .min(data.len());
            // Chunks are copied into messages as the stream is sent, not all up front.
            let chunks = {
                let data = data.clone();
                (start..data.len()).step_by(UPLOAD_CHUNK).map(move |at| {
                    let end = (at + UPLOAD_CHUNK).min(data.len());
                    Payload::Data(data[at..end].to_vec())
                })
            };
            let start = Payload::Start(TaskExecStdinWriteStreamStart {
                task_id: self.inner.task_id.clone(),
                exec_id: exec_id.to_owned(),
                offset,
            });
            let end = Payload::End(TaskExecStdinWriteStreamEnd {});
            let messages = std::iter::once(start)
                .chain(chunks)
                .chain(std::iter::once(end))
                .map(|payload| TaskExecStdinWriteStreamRequest {
                    payload: Some(payload),
                });
            let (request, mut client, generation) = self.authorized(tokio_stream::iter(messages));
            let status = match client.task_exec_stdin_write_stream(request).await {
                Ok(_) => return Ok(Upload::Complete),
                Err(status) => status,
            };
            if matches!(status.code(), Code::FailedPrecondition | Code::Aborted) {
                return Ok(Upload::ExitedEarly);
            }
            self.next_attempt(
                &mut attempts,
                "TaskExecStdinWriteStream",
                generation,
                status,
            )
            .await?;
            // Resume from what arrived.
            let (written, closed) = self.stdin_status(exec_id).await?;
            tracing::debug!(written, total, "streamed stdin write broke; resuming");
            if closed {
                return Ok(if written == total {
                    Upload::Complete
                } else {
                    Upload::ExitedEarly
                });
            }
            if written > offset {
                attempts.progressed();
            }
            offset = written.min(total);
        }
    }

    /// Bytes of stdin the process has received, and whether stdin is closed.
    async fn stdin_status(&self, exec_id: &str) -> Result<(u64, bool), Status> {
        let request = TaskExecStdinStatusRequest {
            task_id: self.inner.task_id.clone(),
            exec_id: exec_id.to_owned(),
        };
        let response = self
            .unary(
                "TaskExecStdinStatus",
                request,
                CALL_TIMEOUT,
                Backoff::ROUTER,
                |mut c, r| async move { c.task_exec_stdin_status(r).await },
            )
            .await?;
        Ok((response.num_bytes_written, response.closed))
    }

    /// Waits for the process to exit, for as long as it takes (transient failures are retried,
    /// as the SDKs do).
    pub async fn wait(&self, exec_id: &str) -> Result<ProcessExit, Status> {
        let request = TaskExecWaitRequest {
            task_id: self.inner.task_id.clone(),
            exec_id: exec_id.to_owned(),
        };
        let response = self
            .unary(
                "TaskExecWait",
                request,
                WAIT_CALL_TIMEOUT,
                Backoff::UNTIL_EXIT,
                |mut c, r| async move { c.task_exec_wait(r).await },
            )
            .await?;
        Ok(match response.exit_status {
            Some(ExitStatus::Code(code)) => ProcessExit::Code(code),
            Some(ExitStatus::Signal(signal)) => ProcessExit::Signal(signal),
            None => ProcessExit::Unknown("the router reported no exit status".into()),
        })
    }
}

fn bearer(jwt: &Secret) -> Option<MetadataValue<Ascii>> {
    super::sensitive_header("authorization", &format!("Bearer {}", jwt.expose()))
}

fn router_client(
    url: &str,
    plaintext_ok: bool,
) -> Result<TaskCommandRouterClient<Channel>, ModalError> {
    let channel = super::channel(url, plaintext_ok, true)?;
    Ok(TaskCommandRouterClient::new(channel)
        .max_decoding_message_size(super::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(super::MAX_MESSAGE_SIZE))
}
