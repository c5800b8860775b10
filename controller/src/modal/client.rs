//! The control-plane client (`modal.client.ModalClient`): headers, auth token, retries, and the
//! handful of calls tailbox makes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tailbox_proto::modal::client::generic_result::GenericStatus;
use tailbox_proto::modal::client::modal_client_client::ModalClientClient;
use tailbox_proto::modal::client::network_access::NetworkAccessType;
use tailbox_proto::modal::client::{
    AppGetOrCreateRequest, AuthTokenGetRequest, EnvironmentGetOrCreateRequest, GenericResult,
    Image, ImageGetOrCreateRequest, ImageJoinStreamingRequest, NetworkAccess, ObjectCreationType,
    Sandbox, SandboxCreateRequest, SandboxGetTaskIdRequest, SandboxInfo, SandboxListRequest,
    SandboxTag, SandboxTerminateRequest, SecretGetOrCreateRequest,
    TaskGetCommandRouterAccessRequest,
};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::config::ModalConfig;
use super::error::{Finished, ModalError, RpcStatus, Service};
use super::retry::{Attempts, Backoff, Next, is_transient};
use super::{channel, jwt};
use crate::secret::Secret;

/// `x-modal-client-type`: CLIENT_TYPE_LIBMODAL_GO. Modal knows no Rust client type; tailbox
/// speaks the protocol the way the Go SDK does, so it sends exactly the Go SDK's identity.
pub const CLIENT_TYPE: &str = "9";
/// `x-modal-client-version`: what the Go SDK sends (the Python SDK version it behaves like).
pub const CLIENT_VERSION: &str = "1.0.0";
/// `x-modal-libmodal-version`: the newest released Go SDK's value (`go/version.go` of
/// modal-labs/modal-client, 0.10.1 of 2026-09-10), never a name of our own, so a live run does
/// not depend on Modal accepting an SDK it has never seen. Move it with new Go SDK releases.
pub const LIBMODAL_VERSION: &str = "modal-go/0.10.1";
/// `user-agent`: the one place tailbox names itself, since a user agent is informational (the
/// Go SDK sends grpc-go's, the Python SDK its own). tonic appends `tonic/<version>`.
pub const USER_AGENT: &str = concat!("tailbox/", env!("CARGO_PKG_VERSION"));

/// Assumed lifetime of an auth token without an `exp` claim (as the Go SDK assumes).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(20 * 60);
/// Per-attempt timeout of ordinary unary calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often and how long to poll for a sandbox's task (Go: 500 ms × 600).
const TASK_POLL_INTERVAL: Duration = Duration::from_millis(500);
const TASK_POLL_LIMIT: Duration = Duration::from_secs(300);

/// A control-plane client. Cheap to clone.
#[derive(Clone)]
pub struct ModalClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: ModalConfig,
    client: ModalClientClient<Channel>,
    auth: tokio::sync::Mutex<Option<AuthToken>>,
}

struct AuthToken {
    token: Secret,
    refresh_at: SystemTime,
}

impl ModalClient {
    /// A client for `config`; it connects lazily on the first call.
    pub fn new(config: ModalConfig) -> Result<Self, ModalError> {
        let channel = channel(&config.server_url, config.plaintext(), false)?;
        let client = ModalClientClient::new(channel)
            .max_decoding_message_size(super::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(super::MAX_MESSAGE_SIZE);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                auth: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The settings this client uses.
    pub fn config(&self) -> &ModalConfig {
        &self.inner.config
    }

    /// One logical unary call: headers, auth token, retries under one idempotency key.
    pub(crate) async fn unary<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        message: Req,
        timeout: Duration,
        mut call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: FnMut(ModalClientClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let idempotency_key = uuid::Uuid::new_v4().to_string();
        let mut attempts = Attempts::new(Backoff::CONTROL_PLANE)
            .honouring_throttles(self.inner.config.max_throttle_wait);
        loop {
            let mut request = Request::new(message.clone());
            request.set_timeout(timeout);
            self.add_headers(&mut request, rpc != "AuthTokenGet")
                .await?;
            let metadata = request.metadata_mut();
            insert(metadata, "x-idempotency-key", &idempotency_key);
            insert(metadata, "x-retry-attempt", &attempts.retries().to_string());
            insert(
                metadata,
                "x-throttle-retry-attempt",
                &attempts.throttles().to_string(),
            );
            let delay = format!("{:.3}", attempts.elapsed().as_secs_f64());
            if attempts.retries() > 0 {
                insert(metadata, "x-retry-delay", &delay);
            }
            if attempts.throttles() > 0 {
                insert(metadata, "x-throttle-retry-delay", &delay);
            }
            let status = match call(self.inner.client.clone(), request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            match attempts.after(&status) {
                Next::Retry(wait) => {
                    tracing::debug!(rpc, ?wait, code = ?status.code(), "retrying");
                    tokio::time::sleep(wait).await;
                }
                Next::RefreshAuth | Next::GiveUp => return Err(status),
            }
        }
    }

    /// [`Self::unary`], with a failure turned into the error for `action`.
    async fn call<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        action: impl FnOnce() -> String,
        message: Req,
        timeout: Duration,
        call: F,
    ) -> Result<Resp, ModalError>
    where
        Req: Clone,
        F: FnMut(ModalClientClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.unary(rpc, message, timeout, call)
            .await
            .map_err(|status| self.failed(rpc, action(), status))
    }

    async fn add_headers<T>(
        &self,
        request: &mut Request<T>,
        with_auth: bool,
    ) -> Result<(), Status> {
        let auth = if with_auth {
            Some(self.auth_token().await?)
        } else {
            None
        };
        let config = &self.inner.config;
        let metadata = request.metadata_mut();
        insert(metadata, "x-modal-client-type", CLIENT_TYPE);
        insert(metadata, "x-modal-client-version", CLIENT_VERSION);
        insert(metadata, "x-modal-libmodal-version", LIBMODAL_VERSION);
        insert(metadata, "user-agent", USER_AGENT);
        insert(metadata, "x-modal-token-id", &config.token_id);
        insert_secret(metadata, "x-modal-token-secret", &config.token_secret);
        if let Some(token) = auth {
            insert_secret(metadata, "x-modal-auth-token", &token);
        }
        Ok(())
    }

    /// The cached auth token, fetched or refreshed once half its lifetime has passed.
    async fn auth_token(&self) -> Result<Secret, Status> {
        let mut slot = self.inner.auth.lock().await;
        if let Some(current) = slot.as_ref()
            && SystemTime::now() < current.refresh_at
        {
            return Ok(current.token.clone());
        }
        let response = Box::pin(self.unary(
            "AuthTokenGet",
            AuthTokenGetRequest {},
            Duration::from_secs(5),
            |mut c, r| async move { c.auth_token_get(r).await },
        ))
        .await;
        let token = match response {
            Ok(response) if !response.token.is_empty() => response.token,
            Ok(_) => return Err(Status::internal("AuthTokenGet returned an empty token")),
            // A token we cannot refresh is still good until it expires.
            Err(status) => match slot.as_ref() {
                Some(current) if is_transient(status.code()) => {
                    tracing::warn!(
                        "refreshing the Modal auth token failed: {}",
                        status.message()
                    );
                    return Ok(current.token.clone());
                }
                _ => return Err(status),
            },
        };
        let now = SystemTime::now();
        let expires = jwt::expiry(&token).unwrap_or(now + DEFAULT_TOKEN_LIFETIME);
        let lifetime = expires.duration_since(now).unwrap_or_default();
        let secret = Secret::new(token);
        *slot = Some(AuthToken {
            token: secret.clone(),
            refresh_at: now + lifetime / 2,
        });
        Ok(secret)
    }

    /// Looks up the app, creating it when missing.
    pub async fn app_get_or_create(&self, name: &str) -> Result<String, ModalError> {
        let request = AppGetOrCreateRequest {
            app_name: name.to_owned(),
            environment_name: self.inner.config.environment.clone(),
            object_creation_type: ObjectCreationType::CreateIfMissing as i32,
        };
        let response = self
            .call(
                "AppGetOrCreate",
                || format!("look up the Modal app {name:?}"),
                request,
                CALL_TIMEOUT,
                |mut c, r| async move { c.app_get_or_create(r).await },
            )
            .await?;
        Ok(response.app_id)
    }

    /// Looks up the app without creating it; `None` when there is none.
    pub async fn app_lookup(&self, name: &str) -> Result<Option<String>, ModalError> {
        let request = AppGetOrCreateRequest {
            app_name: name.to_owned(),
            environment_name: self.inner.config.environment.clone(),
            object_creation_type: ObjectCreationType::Unspecified as i32,
        };
        match self
            .unary(
                "AppGetOrCreate",
                request,
                CALL_TIMEOUT,
                |mut c, r| async move { c.app_get_or_create(r).await },
            )
            .await
        {
            Ok(response) => Ok(Some(response.app_id)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.failed(
                "AppGetOrCreate",
                format!("look up the Modal app {name:?}"),
                status,
            )),
        }
    }

    /// The image builder version: configured, or the environment's setting.
    pub async fn image_builder_version(&self) -> Result<String, ModalError> {
        if let Some(version) = &self.inner.config.image_builder_version {
            return Ok(version.clone());
        }
        let request = EnvironmentGetOrCreateRequest {
            deployment_name: self.inner.config.environment.clone(),
            object_creation_type: ObjectCreationType::Unspecified as i32,
        };
        let response = self
            .call(
                "EnvironmentGetOrCreate",
                || "look up the Modal environment".to_owned(),
                request,
                Duration::from_secs(30),
                |mut c, r| async move { c.environment_get_or_create(r).await },
            )
            .await?;
        response
            .metadata
            .and_then(|m| m.settings)
            .map(|s| s.image_builder_version)
            .filter(|v| !v.is_empty())
            .ok_or(ModalError::NoImageBuilderVersion)
    }

    /// Builds (or reuses the cached build of) a registry image, waiting for the build.
    pub async fn image_from_registry(
        &self,
        app_id: &str,
        tag: &str,
        builder_version: &str,
    ) -> Result<String, ModalError> {
        let action = || format!("build the image {tag}");
        let join_failed = |s| self.failed("ImageJoinStreaming", action(), s);
        let request = ImageGetOrCreateRequest {
            image: Some(Image {
                dockerfile_commands: vec![format!("FROM {tag}")],
            }),
            app_id: app_id.to_owned(),
            builder_version: builder_version.to_owned(),
        };
        let response = self
            .call(
                "ImageGetOrCreate",
                action,
                request,
                CALL_TIMEOUT,
                |mut c, r| async move { c.image_get_or_create(r).await },
            )
            .await?;
        let image_id = response.image_id;
        let mut result = response.result.filter(|r| r.status != 0);
        let mut last_entry_id = String::new();
        let mut logs: Vec<String> = Vec::new();
        while result.is_none() {
            let mut request = Request::new(ImageJoinStreamingRequest {
                image_id: image_id.clone(),
                timeout: 55.0,
                last_entry_id: last_entry_id.clone(),
            });
            self.add_headers(&mut request, true)
                .await
                .map_err(join_failed)?;
            // Streams are not retried on errors (as in the Go SDK); a clean end re-opens.
            let mut stream = self
                .inner
                .client
                .clone()
                .image_join_streaming(request)
                .await
                .map_err(join_failed)?
                .into_inner();
            while let Some(item) = stream.message().await.map_err(join_failed)? {
                if !item.entry_id.is_empty() {
                    last_entry_id = item.entry_id;
                }
                for log in item.task_logs {
                    logs.extend(log.data.lines().map(str::to_owned));
                }
                if logs.len() > 20 {
                    logs.drain(..logs.len() - 20);
                }
                if let Some(r) = item.result.filter(|r| r.status != 0) {
                    result = Some(r);
                    break;
                }
            }
        }
        let result = result.unwrap_or_default();
        match GenericStatus::try_from(result.status) {
            Ok(GenericStatus::Success) => Ok(image_id),
            _ => Err(ModalError::ImageBuild {
                tag: tag.to_owned(),
                outcome: finished(&result),
                log_tail: logs,
            }),
        }
    }

    /// An ephemeral secret holding `env` (how the Go SDK passes a sandbox's environment).
    pub async fn ephemeral_secret(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<String, ModalError> {
        let request = SecretGetOrCreateRequest {
            deployment_name: String::new(),
            environment_name: self.inner.config.environment.clone(),
            object_creation_type: ObjectCreationType::Ephemeral as i32,
            env_dict: env.clone(),
            ..Default::default()
        };
        let response = self
            .call(
                "SecretGetOrCreate",
                || "create the sandbox's environment secret".to_owned(),
                request,
                CALL_TIMEOUT,
                |mut c, r| async move { c.secret_get_or_create(r).await },
            )
            .await?;
        Ok(response.secret_id)
    }

    /// Creates a sandbox that runs no command of its own (we exec into it) until `timeout`.
    pub async fn sandbox_create(
        &self,
        app_id: &str,
        image_id: &str,
        secret_ids: Vec<String>,
        timeout: Duration,
        tags: &[(String, String)],
    ) -> Result<String, ModalError> {
        let request = SandboxCreateRequest {
            app_id: app_id.to_owned(),
            definition: Some(Sandbox {
                entrypoint_args: Vec::new(),
                image_id: image_id.to_owned(),
                secret_ids,
                timeout_secs: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1),
                network_access: Some(NetworkAccess {
                    network_access_type: NetworkAccessType::Open as i32,
                }),
            }),
            tags: sandbox_tags(tags),
        };
        let response = self
            .call(
                "SandboxCreate",
                || "create the Modal sandbox".to_owned(),
                request,
                CALL_TIMEOUT,
                |mut c, r| async move { c.sandbox_create(r).await },
            )
            .await?;
        Ok(response.sandbox_id)
    }

    /// Polls until the sandbox is scheduled and returns its task id.
    pub async fn sandbox_task_id(&self, sandbox_id: &str) -> Result<String, ModalError> {
        let started = Instant::now();
        loop {
            let request = SandboxGetTaskIdRequest {
                sandbox_id: sandbox_id.to_owned(),
            };
            let response = self
                .call(
                    "SandboxGetTaskId",
                    || format!("find the task of sandbox {sandbox_id}"),
                    request,
                    CALL_TIMEOUT,
                    |mut c, r| async move { c.sandbox_get_task_id(r).await },
                )
                .await?;
            if let Some(task_id) = response.task_id.filter(|t| !t.is_empty()) {
                return Ok(task_id);
            }
            if let Some(result) = response.task_result {
                return Err(ModalError::SandboxFinished {
                    sandbox_id: sandbox_id.to_owned(),
                    outcome: finished(&result),
                });
            }
            if started.elapsed() > TASK_POLL_LIMIT {
                return Err(ModalError::NotScheduled {
                    sandbox_id: sandbox_id.to_owned(),
                    seconds: TASK_POLL_LIMIT.as_secs(),
                });
            }
            tokio::time::sleep(TASK_POLL_INTERVAL).await;
        }
    }

    /// Terminates a sandbox; how it had already finished, if it had.
    pub async fn sandbox_terminate(
        &self,
        sandbox_id: &str,
    ) -> Result<Option<Finished>, ModalError> {
        let request = SandboxTerminateRequest {
            sandbox_id: sandbox_id.to_owned(),
        };
        let response = self
            .call(
                "SandboxTerminate",
                || format!("terminate the sandbox {sandbox_id}"),
                request,
                Duration::from_secs(10),
                |mut c, r| async move { c.sandbox_terminate(r).await },
            )
            .await?;
        Ok(response
            .existing_result
            .filter(|r| r.status != 0)
            .map(|r| finished(&r)))
    }

    /// Every running sandbox of `app_id` carrying all of `tags`, newest first (all pages).
    pub async fn sandbox_list(
        &self,
        app_id: &str,
        tags: &[(String, String)],
    ) -> Result<Vec<SandboxInfo>, ModalError> {
        let mut all: Vec<SandboxInfo> = Vec::new();
        let mut before = 0.0;
        loop {
            let request = SandboxListRequest {
                app_id: app_id.to_owned(),
                before_timestamp: before,
                environment_name: self.inner.config.environment.clone(),
                include_finished: false,
                tags: sandbox_tags(tags),
            };
            let page = self
                .call(
                    "SandboxList",
                    || "list Modal sandboxes".to_owned(),
                    request,
                    CALL_TIMEOUT,
                    |mut c, r| async move { c.sandbox_list(r).await },
                )
                .await?
                .sandboxes;
            let Some(last) = page.last() else {
                return Ok(all);
            };
            // Pages go back in time; a page that does not move back would loop forever.
            if before != 0.0 && last.created_at >= before {
                return Ok(all);
            }
            before = last.created_at;
            all.extend(page);
        }
    }

    /// A JWT and URL for the Task Command Router of `task_id`.
    pub async fn command_router_access(&self, task_id: &str) -> Result<(Secret, String), Status> {
        let request = TaskGetCommandRouterAccessRequest {
            task_id: task_id.to_owned(),
        };
        let response = self
            .unary(
                "TaskGetCommandRouterAccess",
                request,
                CALL_TIMEOUT,
                |mut c, r| async move { c.task_get_command_router_access(r).await },
            )
            .await?;
        Ok((Secret::new(response.jwt), response.url))
    }

    /// The error for a failed control-plane call.
    pub(crate) fn failed(
        &self,
        rpc: &'static str,
        action: impl Into<String>,
        status: Status,
    ) -> ModalError {
        self.error(Service::ControlPlane, rpc, action, status)
    }

    /// The error for a failed call to `service`, with what a hint needs.
    pub(crate) fn error(
        &self,
        service: Service,
        rpc: &'static str,
        action: impl Into<String>,
        status: Status,
    ) -> ModalError {
        ModalError::Rpc {
            action: action.into(),
            rpc,
            service,
            status: RpcStatus(status),
            credentials: self.inner.config.source.clone(),
            server_url: self.inner.config.server_url.clone(),
        }
    }
}

fn insert(metadata: &mut tonic::metadata::MetadataMap, key: &'static str, value: &str) {
    match MetadataValue::try_from(value) {
        Ok(v) => {
            metadata.insert(key, v);
        }
        Err(_) => tracing::warn!("header {key} has a value that is not valid ASCII; not sent"),
    }
}

fn insert_secret(metadata: &mut tonic::metadata::MetadataMap, key: &'static str, value: &Secret) {
    if let Some(value) = super::sensitive_header(key, value.expose()) {
        metadata.insert(key, value);
    }
}

/// `GENERIC_STATUS_…` name of a status number.
pub fn status_name(status: i32) -> String {
    GenericStatus::try_from(status)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("status {status}"))
}

/// How something ended, from its result.
fn finished(result: &GenericResult) -> Finished {
    Finished {
        status: status_name(result.status),
        exception: result
            .exception
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// Tags as Modal's wire type.
fn sandbox_tags(tags: &[(String, String)]) -> Vec<SandboxTag> {
    tags.iter()
        .map(|(k, v)| SandboxTag {
            tag_name: k.clone(),
            tag_value: v.clone(),
        })
        .collect()
}
