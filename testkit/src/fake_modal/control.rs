//! The fake control plane.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tailbox_proto::modal::client::generic_result::GenericStatus;
use tailbox_proto::modal::client::modal_client_server::ModalClient;
use tailbox_proto::modal::client::*;
use tonic::codegen::BoxStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::sandbox::{self, Sandbox};
use super::{State, TOKEN_ID, TOKEN_SECRET, lock, make_jwt};

pub(crate) struct ControlPlane {
    pub(crate) state: Arc<State>,
}

type Reply<T> = Result<Response<T>, Status>;

impl ControlPlane {
    /// Records the call, then enforces what the real server requires of every client call:
    /// credentials, an official client identity, and a valid auth token if one is sent.
    fn admit(&self, rpc: &str, metadata: &MetadataMap) -> Result<(), Status> {
        self.state.call("control", rpc, metadata)?;
        let header = |k: &str| metadata.get(k).and_then(|v| v.to_str().ok());
        if header("x-modal-token-id") != Some(TOKEN_ID)
            || header("x-modal-token-secret") != Some(TOKEN_SECRET)
        {
            return Err(self.state.refuse(
                rpc,
                Status::unauthenticated("missing or wrong x-modal-token-id / x-modal-token-secret"),
            ));
        }
        if let Err(why) = official_identity(
            header("x-modal-client-type"),
            header("x-modal-client-version"),
            header("x-modal-libmodal-version"),
        ) {
            return Err(self.state.refuse(rpc, Status::failed_precondition(why)));
        }
        // Python sends no auth token on V1 calls, the Go SDK one on every unary call: it is not
        // required here (the V2 RPCs that need it are out of scope), but one that is sent must
        // be valid.
        if let Some(token) = header("x-modal-auth-token") {
            let valid = lock(&self.state.world)
                .auth_tokens
                .get(token)
                .is_some_and(|exp| SystemTime::now() < *exp);
            if !valid {
                return Err(self.state.refuse(
                    rpc,
                    Status::unauthenticated("unknown or expired x-modal-auth-token"),
                ));
            }
        }
        Ok(())
    }

    fn sandbox(&self, id: &str) -> Result<Arc<Sandbox>, Status> {
        lock(&self.state.world)
            .sandboxes
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("sandbox {id} not found")))
    }
}

/// Accepts only a client identity an official SDK sends: the Python SDK (client type 1 and its
/// own version, no libmodal header), or the JS (8) or Go (9) SDK (version `1.0.0` and
/// `modal-js/X.Y.Z` or `modal-go/X.Y.Z`). Modal's actual rules are not public; refusing every
/// other value means no test passes by relying on Modal accepting a client it has never seen.
fn official_identity(
    client_type: Option<&str>,
    version: Option<&str>,
    libmodal: Option<&str>,
) -> Result<(), String> {
    let (Some(client_type), Some(version)) = (client_type, version) else {
        return Err("x-modal-client-type and x-modal-client-version are required".into());
    };
    let sdk = |prefix: &str| {
        version == "1.0.0"
            && libmodal
                .and_then(|l| l.strip_prefix(prefix))
                .is_some_and(is_release)
    };
    let official = match client_type {
        "1" => is_release(version) && libmodal.is_none(),
        "8" => sdk("modal-js/"),
        "9" => sdk("modal-go/"),
        _ => false,
    };
    if official {
        Ok(())
    } else {
        Err(format!(
            "client type {client_type:?}, version {version:?}, libmodal version {libmodal:?} is \
             not what an official Modal SDK sends"
        ))
    }
}

/// `X.Y.Z` with numeric parts (a suffix after Z, as in `1.6.4.dev1`, is allowed).
fn is_release(version: &str) -> bool {
    let mut parts = version.split('.');
    (0..3).all(|_| {
        parts
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

#[tonic::async_trait]
impl ModalClient for ControlPlane {
    async fn auth_token_get(
        &self,
        request: Request<AuthTokenGetRequest>,
    ) -> Reply<AuthTokenGetResponse> {
        self.admit("AuthTokenGet", request.metadata())?;
        self.state.latency("AuthTokenGet").await;
        let (token, exp) = make_jwt("fake-workspace", self.state.config.auth_token_ttl);
        lock(&self.state.world)
            .auth_tokens
            .insert(token.clone(), exp);
        self.state.update(|r| r.auth_tokens += 1);
        Ok(Response::new(AuthTokenGetResponse { token }))
    }

    async fn app_get_or_create(
        &self,
        request: Request<AppGetOrCreateRequest>,
    ) -> Reply<AppGetOrCreateResponse> {
        self.admit("AppGetOrCreate", request.metadata())?;
        self.state.latency("AppGetOrCreate").await;
        let req = request.into_inner();
        if req.app_name.is_empty() {
            return Err(Status::invalid_argument("app_name is required"));
        }
        let mut world = lock(&self.state.world);
        let key = (req.environment_name.clone(), req.app_name.clone());
        if let Some(id) = world.apps.get(&key) {
            return Ok(Response::new(AppGetOrCreateResponse { app_id: id.clone() }));
        }
        if req.object_creation_type != ObjectCreationType::CreateIfMissing as i32 {
            return Err(Status::not_found(format!(
                "App {:?} not found",
                req.app_name
            )));
        }
        let id = sandbox::short_id("ap");
        world.apps.insert(key, id.clone());
        Ok(Response::new(AppGetOrCreateResponse { app_id: id }))
    }

    async fn environment_get_or_create(
        &self,
        request: Request<EnvironmentGetOrCreateRequest>,
    ) -> Reply<EnvironmentGetOrCreateResponse> {
        self.admit("EnvironmentGetOrCreate", request.metadata())?;
        let req = request.into_inner();
        Ok(Response::new(EnvironmentGetOrCreateResponse {
            environment_id: "en-fake".into(),
            metadata: Some(EnvironmentMetadata {
                name: if req.deployment_name.is_empty() {
                    "main".into()
                } else {
                    req.deployment_name
                },
                settings: Some(EnvironmentSettings {
                    image_builder_version: "2024.10".into(),
                }),
            }),
        }))
    }

    async fn secret_get_or_create(
        &self,
        request: Request<SecretGetOrCreateRequest>,
    ) -> Reply<SecretGetOrCreateResponse> {
        self.admit("SecretGetOrCreate", request.metadata())?;
        let req = request.into_inner();
        let mut world = lock(&self.state.world);
        // Anonymous secrets only: EPHEMERAL (the Go SDK's) or owned by an app (Python's).
        let anonymous = match req.object_creation_type {
            t if t == ObjectCreationType::Ephemeral as i32 => true,
            t if t == ObjectCreationType::AnonymousOwnedByApp as i32 => {
                if !world.apps.values().any(|id| *id == req.app_id) {
                    return Err(Status::not_found(format!("app {:?} not found", req.app_id)));
                }
                true
            }
            _ => false,
        };
        if !anonymous || !req.deployment_name.is_empty() {
            return Err(Status::invalid_argument(
                "the fake only makes anonymous secrets (EPHEMERAL, or ANONYMOUS_OWNED_BY_APP)",
            ));
        }
        let id = sandbox::short_id("st");
        world.secrets.insert(id.clone(), req.env_dict);
        Ok(Response::new(SecretGetOrCreateResponse { secret_id: id }))
    }

    async fn image_get_or_create(
        &self,
        request: Request<ImageGetOrCreateRequest>,
    ) -> Reply<ImageGetOrCreateResponse> {
        self.admit("ImageGetOrCreate", request.metadata())?;
        self.state.latency("ImageGetOrCreate").await;
        let req = request.into_inner();
        let mut world = lock(&self.state.world);
        if !world.apps.values().any(|id| *id == req.app_id) {
            return Err(Status::not_found(format!("app {} not found", req.app_id)));
        }
        if req.builder_version.is_empty() {
            return Err(Status::invalid_argument("builder_version is required"));
        }
        let commands = req.image.map(|i| i.dockerfile_commands).unwrap_or_default();
        let Some(tag) = commands.first().and_then(|c| c.strip_prefix("FROM ")) else {
            return Err(Status::invalid_argument(
                "the image must start with FROM <tag>",
            ));
        };
        let id = world
            .images
            .iter()
            .find(|(_, t)| *t == tag)
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| sandbox::short_id("im"));
        world.images.insert(id.clone(), tag.to_owned());
        // Built before: answer with the result; else make the client join the build.
        let result = world.built_images.contains(&id).then(|| GenericResult {
            status: GenericStatus::Success as i32,
            ..Default::default()
        });
        Ok(Response::new(ImageGetOrCreateResponse {
            image_id: id,
            result,
        }))
    }

    async fn image_join_streaming(
        &self,
        request: Request<ImageJoinStreamingRequest>,
    ) -> Reply<BoxStream<ImageJoinStreamingResponse>> {
        self.admit("ImageJoinStreaming", request.metadata())?;
        let req = request.into_inner();
        let tag = {
            let mut world = lock(&self.state.world);
            let Some(tag) = world.images.get(&req.image_id).cloned() else {
                return Err(Status::not_found(format!(
                    "image {} not found",
                    req.image_id
                )));
            };
            world.built_images.insert(req.image_id.clone());
            tag
        };
        // First stream: a log line then a clean end (the client must re-open with the entry
        // id); second: the result.
        let items = if req.last_entry_id.is_empty() {
            vec![ImageJoinStreamingResponse {
                result: None,
                task_logs: vec![TaskLogs {
                    data: format!("pulling {tag}\n"),
                }],
                entry_id: "1-0".into(),
                eof: false,
            }]
        } else {
            vec![ImageJoinStreamingResponse {
                result: Some(GenericResult {
                    status: GenericStatus::Success as i32,
                    ..Default::default()
                }),
                task_logs: Vec::new(),
                entry_id: "2-0".into(),
                eof: true,
            }]
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(
            items.into_iter().map(Ok),
        ))))
    }

    async fn sandbox_create(
        &self,
        request: Request<SandboxCreateRequest>,
    ) -> Reply<SandboxCreateResponse> {
        self.admit("SandboxCreate", request.metadata())?;
        let req = request.into_inner();
        let definition = req.definition.unwrap_or_default();
        let env = {
            let world = lock(&self.state.world);
            if !world.apps.values().any(|id| *id == req.app_id) {
                return Err(Status::not_found(format!("app {} not found", req.app_id)));
            }
            if !world.images.contains_key(&definition.image_id) {
                return Err(Status::invalid_argument(format!(
                    "image {} not found",
                    definition.image_id
                )));
            }
            let mut env = std::collections::HashMap::new();
            for id in &definition.secret_ids {
                env.extend(world.secret(id)?.clone());
            }
            env
        };
        if definition.timeout_secs == 0 {
            return Err(Status::invalid_argument("timeout_secs must be set"));
        }
        let definition = sandbox::Definition {
            app_id: req.app_id,
            tags: req
                .tags
                .into_iter()
                .map(|t| (t.tag_name, t.tag_value))
                .collect(),
            env,
            timeout_secs: definition.timeout_secs,
            entrypoint: definition.entrypoint_args,
        };
        let id = sandbox::create(&self.state, definition).await?;
        // The sandbox exists now; a slow response is a lost-response scenario.
        self.state.latency("SandboxCreate").await;
        Ok(Response::new(SandboxCreateResponse { sandbox_id: id }))
    }

    async fn sandbox_get_task_id(
        &self,
        request: Request<SandboxGetTaskIdRequest>,
    ) -> Reply<SandboxGetTaskIdResponse> {
        self.admit("SandboxGetTaskId", request.metadata())?;
        self.state.latency("SandboxGetTaskId").await;
        let req = request.into_inner();
        let sandbox = self.sandbox(&req.sandbox_id)?;
        let finished = sandbox.result.borrow().clone();
        if let Some(result) = finished {
            return Ok(Response::new(SandboxGetTaskIdResponse {
                task_id: None,
                task_result: Some(result),
            }));
        }
        let wanted = self.state.faults().unscheduled_polls;
        let polls = {
            let mut world = lock(&self.state.world);
            let n = world.task_polls.entry(sandbox.id.clone()).or_default();
            *n += 1;
            *n
        };
        let task_id = (polls > wanted).then(|| sandbox.task_id.clone());
        Ok(Response::new(SandboxGetTaskIdResponse {
            task_id,
            task_result: None,
        }))
    }

    async fn sandbox_wait(
        &self,
        request: Request<SandboxWaitRequest>,
    ) -> Reply<SandboxWaitResponse> {
        self.admit("SandboxWait", request.metadata())?;
        let req = request.into_inner();
        let sandbox = self.sandbox(&req.sandbox_id)?;
        // A long poll: at most `timeout` seconds (0 answers at once), then "still running".
        let limit = Duration::try_from_secs_f32(req.timeout.max(0.0)).unwrap_or_default();
        let mut finished = sandbox.result.subscribe();
        let result = tokio::time::timeout(limit, finished.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|r| r.clone()));
        Ok(Response::new(SandboxWaitResponse { result }))
    }

    async fn sandbox_terminate(
        &self,
        request: Request<SandboxTerminateRequest>,
    ) -> Reply<SandboxTerminateResponse> {
        self.admit("SandboxTerminate", request.metadata())?;
        self.state.latency("SandboxTerminate").await;
        let sandbox = self.sandbox(&request.into_inner().sandbox_id)?;
        let existing = sandbox.result.borrow().clone();
        sandbox::terminate(&self.state, &sandbox);
        Ok(Response::new(SandboxTerminateResponse {
            existing_result: existing,
        }))
    }

    async fn sandbox_list(
        &self,
        request: Request<SandboxListRequest>,
    ) -> Reply<SandboxListResponse> {
        self.admit("SandboxList", request.metadata())?;
        let req = request.into_inner();
        let wanted: Vec<(String, String)> = req
            .tags
            .into_iter()
            .map(|t| (t.tag_name, t.tag_value))
            .collect();
        let mut found: Vec<Arc<Sandbox>> = lock(&self.state.world)
            .sandboxes
            .values()
            .filter(|s| req.app_id.is_empty() || s.app_id == req.app_id)
            .filter(|s| req.include_finished || !s.is_finished())
            .filter(|s| req.before_timestamp == 0.0 || s.created_at < req.before_timestamp)
            .filter(|s| wanted.iter().all(|w| s.tags.contains(w)))
            .cloned()
            .collect();
        found.sort_by(|a, b| b.created_at.total_cmp(&a.created_at));
        found.truncate(self.state.config.list_page_size.max(1));
        Ok(Response::new(SandboxListResponse {
            sandboxes: found
                .iter()
                .map(|s| SandboxInfo {
                    id: s.id.clone(),
                    created_at: s.created_at,
                    app_id: s.app_id.clone(),
                    tags: s
                        .tags
                        .iter()
                        .map(|(k, v)| SandboxTag {
                            tag_name: k.clone(),
                            tag_value: v.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn task_get_command_router_access(
        &self,
        request: Request<TaskGetCommandRouterAccessRequest>,
    ) -> Reply<TaskGetCommandRouterAccessResponse> {
        self.admit("TaskGetCommandRouterAccess", request.metadata())?;
        let task_id = request.into_inner().task_id;
        let sandbox_id = lock(&self.state.world).tasks.get(&task_id).cloned();
        let Some(sandbox_id) = sandbox_id else {
            return Err(Status::not_found(format!("task {task_id} not found")));
        };
        if self.sandbox(&sandbox_id)?.is_finished() {
            return Err(Status::not_found(format!("task {task_id} has finished")));
        }
        let ttl = self
            .state
            .faults()
            .router_jwt_ttl
            .unwrap_or(std::time::Duration::from_secs(3600));
        let (jwt, exp) = make_jwt(&task_id, ttl);
        lock(&self.state.world)
            .router_jwts
            .insert(jwt.clone(), (task_id, exp));
        self.state.update(|r| r.router_grants += 1);
        let url = lock(&self.state.router_url).clone();
        Ok(Response::new(TaskGetCommandRouterAccessResponse {
            jwt,
            url,
        }))
    }
}
