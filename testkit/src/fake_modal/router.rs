//! The fake Task Command Router.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tailbox_proto::modal::client::secret_source::Source;
use tailbox_proto::modal::task_command_router::task_command_router_server::TaskCommandRouter;
use tailbox_proto::modal::task_command_router::task_exec_poll_response::ExitStatus as PollStatus;
use tailbox_proto::modal::task_command_router::task_exec_stdin_write_stream_request::Payload;
use tailbox_proto::modal::task_command_router::task_exec_wait_response::ExitStatus;
use tailbox_proto::modal::task_command_router::*;
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::sandbox::{self, Exec, ExecSpec, Sandbox, StderrTo};
use super::{Exit, State, Way, lock, tools};

pub(crate) struct CommandRouter {
    pub(crate) state: Arc<State>,
}

type Reply<T> = Result<Response<T>, Status>;

/// Largest chunk one stdio read message carries.
const CHUNK: usize = 64 * 1024;

/// Most bytes an exec's arguments may total (2^16, as Modal's SDKs check it).
const ARGV_LIMIT: usize = 1 << 16;

impl CommandRouter {
    /// Records the call and checks the bearer JWT belongs to `task_id` and has not expired.
    fn admit(
        &self,
        rpc: &str,
        metadata: &MetadataMap,
        task_id: &str,
    ) -> Result<Arc<Sandbox>, Status> {
        self.state.call("router", rpc, metadata)?;
        let bearer = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(jwt) = bearer else {
            return Err(self.state.refuse(
                rpc,
                Status::unauthenticated("missing authorization: Bearer <jwt>"),
            ));
        };
        let grant = lock(&self.state.world).router_jwts.get(jwt).cloned();
        match grant {
            None => {
                return Err(self
                    .state
                    .refuse(rpc, Status::unauthenticated("unknown JWT")));
            }
            Some((task, _)) if task != task_id => {
                return Err(self.state.refuse(
                    rpc,
                    Status::permission_denied("the JWT is for another task"),
                ));
            }
            Some((_, exp)) if SystemTime::now() >= exp => {
                return Err(self
                    .state
                    .refuse(rpc, Status::unauthenticated("JWT expired")));
            }
            Some(_) => {}
        }
        let sandbox = {
            let world = lock(&self.state.world);
            world
                .tasks
                .get(task_id)
                .and_then(|id| world.sandboxes.get(id))
                .cloned()
        };
        match sandbox {
            Some(s) if !s.is_finished() => Ok(s),
            Some(_) => Err(Status::not_found(format!("task {task_id} has finished"))),
            None => Err(Status::not_found(format!("task {task_id} not found"))),
        }
    }

    /// What a `TaskExecStart` asks for, or why it is refused.
    fn exec_spec(&self, req: TaskExecStartRequest) -> Result<ExecSpec, Status> {
        if req.exec_id.is_empty() || req.command_args.is_empty() {
            return Err(Status::invalid_argument(
                "exec_id and command_args are required",
            ));
        }
        // The SDKs refuse more (Python `_validate_exec_args`, the Go SDK's ValidateExecArgs):
        // Linux's ARG_MAX for the command line Modal builds, less its own overhead.
        let argv_bytes: usize = req.command_args.iter().map(String::len).sum();
        if argv_bytes > ARGV_LIMIT {
            return Err(Status::invalid_argument(format!(
                "the command's arguments total {argv_bytes} bytes, over the {ARGV_LIMIT}-byte limit"
            )));
        }
        if let Some(workdir) = &req.workdir
            && !workdir.starts_with('/')
        {
            return Err(Status::invalid_argument(format!(
                "workdir must be absolute, got {workdir:?}"
            )));
        }
        let stderr = match TaskExecStderrConfig::try_from(req.stderr_config) {
            Ok(TaskExecStderrConfig::Devnull) => StderrTo::Devnull,
            Ok(TaskExecStderrConfig::Pipe) => StderrTo::Pipe,
            Ok(TaskExecStderrConfig::Stdout) => StderrTo::Stdout,
            Err(_) => return Err(Status::invalid_argument("unknown stderr_config")),
        };
        let stdout = match TaskExecStdoutConfig::try_from(req.stdout_config) {
            Ok(TaskExecStdoutConfig::Pipe) => true,
            Ok(TaskExecStdoutConfig::Devnull) => false,
            Err(_) => return Err(Status::invalid_argument("unknown stdout_config")),
        };
        // Secrets by id (Go), then the Python SDK's ordered sources, then the Go SDK's inline env.
        let mut env = std::collections::HashMap::new();
        {
            let world = lock(&self.state.world);
            for id in &req.secret_ids {
                env.extend(world.secret(id)?.clone());
            }
            for source in &req.secret_sources {
                match &source.source {
                    Some(Source::SecretId(id)) => env.extend(world.secret(id)?.clone()),
                    Some(Source::Env(map)) => env.extend(map.contents.clone()),
                    None => {}
                }
            }
        }
        env.extend(req.env);
        Ok(ExecSpec {
            argv: req.command_args,
            env,
            workdir: req.workdir,
            stdout,
            stderr,
            timeout: req.timeout_secs.map(|s| Duration::from_secs(s.into())),
        })
    }

    fn exec(sandbox: &Sandbox, exec_id: &str) -> Result<Arc<Exec>, Status> {
        lock(&sandbox.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("exec {exec_id} not found")))
    }
}

#[tonic::async_trait]
impl TaskCommandRouter for CommandRouter {
    async fn task_exec_start(
        &self,
        request: Request<TaskExecStartRequest>,
    ) -> Reply<TaskExecStartResponse> {
        self.state
            .round_trip(async move {
                let (metadata, _, req) = request.into_parts();
                let sandbox = self.admit("TaskExecStart", &metadata, &req.task_id)?;
                let spec = self
                    .exec_spec(req.clone())
                    .map_err(|status| self.state.refuse("TaskExecStart", status))?;
                if !tools::is_tool(&spec.argv) {
                    self.state.latency("TaskExecStart").await;
                }
                sandbox::start_exec(&self.state, &sandbox, &req.exec_id, spec)?;
                Ok(Response::new(TaskExecStartResponse {}))
            })
            .await
    }

    async fn task_exec_stdio_read(
        &self,
        request: Request<TaskExecStdioReadRequest>,
    ) -> Reply<BoxStream<TaskExecStdioReadResponse>> {
        self.state
            .round_trip(async move {
                let (metadata, _, req) = request.into_parts();
                let sandbox = self.admit("TaskExecStdioRead", &metadata, &req.task_id)?;
                let exec = Self::exec(&sandbox, &req.exec_id)?;
                let stderr = req.file_descriptor == TaskExecStdioFileDescriptor::Stderr as i32;
                let mut progress = if stderr {
                    exec.stderr.watch()
                } else {
                    exec.stdout.watch()
                };
                let produced = progress.borrow().0;
                let Ok(mut offset) = usize::try_from(req.offset) else {
                    return Err(Status::out_of_range("offset overflows"));
                };
                if offset > produced {
                    return Err(self.state.refuse(
                        "TaskExecStdioRead",
                        Status::out_of_range(format!(
                            "offset {offset} is beyond the {produced} bytes produced"
                        )),
                    ));
                }
                if !exec.tool {
                    self.state.latency("TaskExecStdioRead").await;
                }
                let cut = self.state.faults().cut_stdio_after;
                // The next planned cut of the agent's stdout past where this read starts.
                let cut_at = if stderr || exec.tool {
                    None
                } else {
                    let faults = self.state.faults();
                    faults
                        .cut_stdout_at
                        .iter()
                        .copied()
                        .filter(|&p| p > offset)
                        .min()
                };
                let state = Arc::clone(&self.state);
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    let output = if stderr { &exec.stderr } else { &exec.stdout };
                    let mut sent = 0usize;
                    loop {
                        let (len, done) = *progress.borrow_and_update();
                        if offset < len {
                            if cut_at == Some(offset) {
                                state.update(|r| r.stdio_cuts += 1);
                                let _ = tx
                                    .send(Err(Status::unavailable(
                                        "fake: stdout cut at a planned offset",
                                    )))
                                    .await;
                                return;
                            }
                            let mut max = CHUNK;
                            if let Some(at) = cut_at {
                                max = max.min(at - offset);
                            }
                            if let Some(cut) = cut {
                                if sent >= cut {
                                    state.update(|r| r.stdio_cuts += 1);
                                    let _ = tx
                                        .send(Err(Status::unavailable("fake: stdio stream cut")))
                                        .await;
                                    return;
                                }
                                max = max.min(cut - sent);
                            }
                            let data = output.slice(offset, max);
                            state.transmit(Way::Down, data.len()).await;
                            offset += data.len();
                            sent += data.len();
                            if tx
                                .send(Ok(TaskExecStdioReadResponse { data }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            continue;
                        }
                        // Everything delivered and the fd closed: a clean end of the stream.
                        if done || progress.changed().await.is_err() {
                            return;
                        }
                    }
                });
                let stream: BoxStream<TaskExecStdioReadResponse> =
                    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
                Ok(Response::new(stream))
            })
            .await
    }

    async fn task_exec_stdin_write(
        &self,
        request: Request<TaskExecStdinWriteRequest>,
    ) -> Reply<TaskExecStdinWriteResponse> {
        self.state
            .round_trip(async move {
                let (metadata, _, req) = request.into_parts();
                let sandbox = self.admit("TaskExecStdinWrite", &metadata, &req.task_id)?;
                let exec = Self::exec(&sandbox, &req.exec_id)?;
                self.state.latency("TaskExecStdinWrite").await;
                self.state.transmit(Way::Up, req.data.len()).await;
                sandbox::write_stdin(
                    &self.state,
                    "TaskExecStdinWrite",
                    &exec,
                    &req.exec_id,
                    req.offset,
                    &req.data,
                    req.eof,
                )
                .await?;
                Ok(Response::new(TaskExecStdinWriteResponse {}))
            })
            .await
    }

    async fn task_exec_stdin_write_stream(
        &self,
        request: Request<Streaming<TaskExecStdinWriteStreamRequest>>,
    ) -> Reply<TaskExecStdinWriteStreamResponse> {
        self.state
            .round_trip(async move {
                let (metadata, _, mut stream) = request.into_parts();
                let first = stream.message().await?;
                let Some(TaskExecStdinWriteStreamRequest {
                    payload: Some(Payload::Start(start)),
                }) = first
                else {
                    self.state
                        .call("router", "TaskExecStdinWriteStream", &metadata)?;
                    return Err(self.state.refuse(
                        "TaskExecStdinWriteStream",
                        Status::invalid_argument("the first message must be start"),
                    ));
                };
                let sandbox = self.admit("TaskExecStdinWriteStream", &metadata, &start.task_id)?;
                let exec = Self::exec(&sandbox, &start.exec_id)?;
                self.state.latency("TaskExecStdinWriteStream").await;
                let cut = self.state.faults().cut_stdin_stream_after;
                let mut offset = start.offset;
                let mut streamed = 0usize;
                while let Some(message) = stream.message().await? {
                    match message.payload {
                        Some(Payload::Data(data)) => {
                            let mut data = data.as_slice();
                            let mut cut_now = false;
                            if let Some(cut) = cut
                                && streamed + data.len() > cut
                            {
                                data = &data[..cut.saturating_sub(streamed)];
                                cut_now = true;
                            }
                            self.state.transmit(Way::Up, data.len()).await;
                            sandbox::write_stdin(
                                &self.state,
                                "TaskExecStdinWriteStream",
                                &exec,
                                &start.exec_id,
                                offset,
                                data,
                                false,
                            )
                            .await?;
                            offset += data.len() as u64;
                            streamed += data.len();
                            if cut_now {
                                return Err(Status::unavailable("fake: stdin stream cut"));
                            }
                        }
                        Some(Payload::End(_)) => {
                            sandbox::write_stdin(
                                &self.state,
                                "TaskExecStdinWriteStream",
                                &exec,
                                &start.exec_id,
                                offset,
                                &[],
                                true,
                            )
                            .await?;
                            break;
                        }
                        Some(Payload::Start(_)) | None => {
                            return Err(Status::invalid_argument("start may only come first"));
                        }
                    }
                }
                Ok(Response::new(TaskExecStdinWriteStreamResponse {}))
            })
            .await
    }

    async fn task_exec_stdin_status(
        &self,
        request: Request<TaskExecStdinStatusRequest>,
    ) -> Reply<TaskExecStdinStatusResponse> {
        self.state
            .round_trip(async move {
                let (metadata, _, req) = request.into_parts();
                let sandbox = self.admit("TaskExecStdinStatus", &metadata, &req.task_id)?;
                let exec = Self::exec(&sandbox, &req.exec_id)?;
                let stdin = exec.stdin.lock().await;
                Ok(Response::new(TaskExecStdinStatusResponse {
                    num_bytes_written: stdin.written,
                    closed: stdin.closed,
                }))
            })
            .await
    }

    async fn task_exec_wait(
        &self,
        request: Request<TaskExecWaitRequest>,
    ) -> Reply<TaskExecWaitResponse> {
        self.state
            .round_trip(async move {
                let (metadata, _, req) = request.into_parts();
                let sandbox = self.admit("TaskExecWait", &metadata, &req.task_id)?;
                let exec = Self::exec(&sandbox, &req.exec_id)?;
                let mut exit = exec.exit.subscribe();
                let status = loop {
                    if let Some(status) = *exit.borrow_and_update() {
                        break status;
                    }
                    if exit.changed().await.is_err() {
                        return Err(Status::unavailable("fake: the exec vanished"));
                    }
                };
                Ok(Response::new(TaskExecWaitResponse {
                    exit_status: Some(match status {
                        Exit::Code(code) => ExitStatus::Code(code),
                        Exit::Signal(signal) => ExitStatus::Signal(signal),
                    }),
                }))
            })
            .await
    }

    async fn task_exec_poll(
        &self,
        request: Request<TaskExecPollRequest>,
    ) -> Reply<TaskExecPollResponse> {
        self.state
            .round_trip(async move {
                let (metadata, _, req) = request.into_parts();
                let sandbox = self.admit("TaskExecPoll", &metadata, &req.task_id)?;
                let exec = Self::exec(&sandbox, &req.exec_id)?;
                let status = *exec.exit.borrow();
                Ok(Response::new(TaskExecPollResponse {
                    exit_status: status.map(|status| match status {
                        Exit::Code(code) => PollStatus::Code(code),
                        Exit::Signal(signal) => PollStatus::Signal(signal),
                    }),
                }))
            })
            .await
    }
}
