//! A bare client of the fake, for tests of the fake itself (and for poking at a sandbox a test
//! created another way): raw RPCs with the Go SDK's headers, no retries, no resumes.

use anyhow::{Context, Result};
use tailbox_proto::modal::client::modal_client_client::ModalClientClient;
use tailbox_proto::modal::client::{
    AppGetOrCreateRequest, GenericResult, ImageGetOrCreateRequest, ObjectCreationType, Sandbox,
    SandboxCreateRequest, SandboxGetTaskIdRequest, SandboxTerminateRequest, SandboxWaitRequest,
    TaskGetCommandRouterAccessRequest,
};
use tailbox_proto::modal::task_command_router::task_command_router_client::TaskCommandRouterClient;
use tailbox_proto::modal::task_command_router::task_exec_wait_response::ExitStatus;
use tailbox_proto::modal::task_command_router::{
    TaskExecPollRequest, TaskExecStartRequest, TaskExecStderrConfig, TaskExecStdinWriteRequest,
    TaskExecStdioFileDescriptor, TaskExecStdioReadRequest, TaskExecStdoutConfig,
    TaskExecWaitRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::{FakeModal, TOKEN_ID, TOKEN_SECRET};

/// One sandbox of the fake, driven over gRPC.
pub struct FakeClient {
    control: ModalClientClient<Channel>,
    router: TaskCommandRouterClient<Channel>,
    sandbox_id: String,
    task_id: String,
    jwt: String,
}

/// What an exec printed and how it ended.
#[derive(Debug)]
pub struct ExecOutput {
    /// Everything on stdout.
    pub stdout: Vec<u8>,
    /// Everything on stderr.
    pub stderr: Vec<u8>,
    /// `TaskExecWait`'s answer.
    pub exit: ExitStatus,
}

impl ExecOutput {
    /// stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

async fn channel(url: String) -> Result<Channel> {
    Ok(Endpoint::from_shared(url)?.connect().await?)
}

fn control_request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    for (key, value) in [
        ("x-modal-client-type", "9"),
        ("x-modal-client-version", "1.0.0"),
        ("x-modal-libmodal-version", "modal-go/0.10.1"),
        ("x-modal-token-id", TOKEN_ID),
        ("x-modal-token-secret", TOKEN_SECRET),
    ] {
        if let Ok(value) = value.parse() {
            request.metadata_mut().insert(key, value);
        }
    }
    request
}

impl FakeModal {
    /// Creates a sandbox (app, image, `SandboxCreate` with `entrypoint` and `timeout_secs`)
    /// and connects to its router.
    pub async fn new_sandbox(&self, entrypoint: &[&str], timeout_secs: u32) -> Result<FakeClient> {
        let mut control = ModalClientClient::new(channel(self.server_url()).await?);
        let app_id = control
            .app_get_or_create(control_request(AppGetOrCreateRequest {
                app_name: "fake-client".into(),
                environment_name: String::new(),
                object_creation_type: ObjectCreationType::CreateIfMissing as i32,
            }))
            .await?
            .into_inner()
            .app_id;
        let image_id = control
            .image_get_or_create(control_request(ImageGetOrCreateRequest {
                image: Some(tailbox_proto::modal::client::Image {
                    dockerfile_commands: vec!["FROM debian:bookworm".into()],
                }),
                app_id: app_id.clone(),
                builder_version: "2024.10".into(),
            }))
            .await?
            .into_inner()
            .image_id;
        let sandbox_id = control
            .sandbox_create(control_request(SandboxCreateRequest {
                app_id,
                definition: Some(Sandbox {
                    entrypoint_args: entrypoint.iter().map(|a| (*a).to_owned()).collect(),
                    image_id,
                    timeout_secs,
                    ..Default::default()
                }),
                tags: Vec::new(),
            }))
            .await?
            .into_inner()
            .sandbox_id;
        self.attach(&sandbox_id).await
    }

    /// Connects to the router of a running sandbox.
    pub async fn attach(&self, sandbox_id: &str) -> Result<FakeClient> {
        let mut control = ModalClientClient::new(channel(self.server_url()).await?);
        let task_id = control
            .sandbox_get_task_id(control_request(SandboxGetTaskIdRequest {
                sandbox_id: sandbox_id.to_owned(),
            }))
            .await?
            .into_inner()
            .task_id
            .context("the sandbox has no task")?;
        let access = control
            .task_get_command_router_access(control_request(TaskGetCommandRouterAccessRequest {
                task_id: task_id.clone(),
            }))
            .await?
            .into_inner();
        let router = TaskCommandRouterClient::new(channel(access.url).await?);
        Ok(FakeClient {
            control,
            router,
            sandbox_id: sandbox_id.to_owned(),
            task_id,
            jwt: access.jwt,
        })
    }
}

impl FakeClient {
    /// The sandbox's id.
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    fn router_request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = format!("Bearer {}", self.jwt).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// `TaskExecStart` with `request`'s options (`task_id` and `exec_id` are filled in, stdout
    /// and stderr default to PIPE); the exec's id.
    pub async fn start(
        &self,
        argv: &[&str],
        request: TaskExecStartRequest,
    ) -> Result<String, Status> {
        let exec_id = uuid::Uuid::new_v4().to_string();
        let request = TaskExecStartRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.clone(),
            command_args: argv.iter().map(|a| (*a).to_owned()).collect(),
            ..request
        };
        self.router
            .clone()
            .task_exec_start(self.router_request(request))
            .await?;
        Ok(exec_id)
    }

    /// Runs `argv` with stdout and stderr piped and no stdin, to the end.
    pub async fn exec(&self, argv: &[&str]) -> Result<ExecOutput, Status> {
        let exec_id = self.start(argv, piped()).await?;
        self.output(&exec_id).await
    }

    /// Everything an exec prints, then its exit.
    pub async fn output(&self, exec_id: &str) -> Result<ExecOutput, Status> {
        let (stdout, stderr) = tokio::try_join!(
            self.read(exec_id, TaskExecStdioFileDescriptor::Stdout),
            self.read(exec_id, TaskExecStdioFileDescriptor::Stderr),
        )?;
        let exit = self.wait(exec_id).await?;
        Ok(ExecOutput {
            stdout,
            stderr,
            exit,
        })
    }

    /// One output of an exec, to the clean end of its stream.
    pub async fn read(
        &self,
        exec_id: &str,
        fd: TaskExecStdioFileDescriptor,
    ) -> Result<Vec<u8>, Status> {
        let request = TaskExecStdioReadRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.to_owned(),
            offset: 0,
            file_descriptor: fd as i32,
        };
        let mut stream = self
            .router
            .clone()
            .task_exec_stdio_read(self.router_request(request))
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// `TaskExecWait`.
    pub async fn wait(&self, exec_id: &str) -> Result<ExitStatus, Status> {
        let request = TaskExecWaitRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.to_owned(),
        };
        self.router
            .clone()
            .task_exec_wait(self.router_request(request))
            .await?
            .into_inner()
            .exit_status
            .ok_or_else(|| Status::internal("TaskExecWait answered no exit status"))
    }

    /// `TaskExecPoll`: the exit code or signal, `None` while it runs.
    pub async fn poll(&self, exec_id: &str) -> Result<Option<ExitStatus>, Status> {
        use tailbox_proto::modal::task_command_router::task_exec_poll_response::ExitStatus as Poll;
        let request = TaskExecPollRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.to_owned(),
        };
        let status = self
            .router
            .clone()
            .task_exec_poll(self.router_request(request))
            .await?
            .into_inner()
            .exit_status;
        Ok(status.map(|s| match s {
            Poll::Code(code) => ExitStatus::Code(code),
            Poll::Signal(signal) => ExitStatus::Signal(signal),
        }))
    }

    /// `TaskExecStdinWrite` (`task_id` and `exec_id` are filled in).
    pub async fn write_stdin(
        &self,
        exec_id: &str,
        request: TaskExecStdinWriteRequest,
    ) -> Result<(), Status> {
        let request = TaskExecStdinWriteRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.to_owned(),
            ..request
        };
        self.router
            .clone()
            .task_exec_stdin_write(self.router_request(request))
            .await?;
        Ok(())
    }

    /// `SandboxWait` for up to `timeout` seconds: how the sandbox ended, `None` while it runs.
    pub async fn sandbox_result(&self, timeout: f32) -> Result<Option<GenericResult>, Status> {
        Ok(self
            .control
            .clone()
            .sandbox_wait(control_request(SandboxWaitRequest {
                sandbox_id: self.sandbox_id.clone(),
                timeout,
            }))
            .await?
            .into_inner()
            .result)
    }

    /// `SandboxTerminate`.
    pub async fn terminate(&self) -> Result<(), Status> {
        self.control
            .clone()
            .sandbox_terminate(control_request(SandboxTerminateRequest {
                sandbox_id: self.sandbox_id.clone(),
            }))
            .await?;
        Ok(())
    }
}

/// Exec options with stdout and stderr piped (what every SDK asks for by default).
pub fn piped() -> TaskExecStartRequest {
    TaskExecStartRequest {
        stdout_config: TaskExecStdoutConfig::Pipe as i32,
        stderr_config: TaskExecStderrConfig::Pipe as i32,
        ..Default::default()
    }
}
