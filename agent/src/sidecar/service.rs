//! The `tailbox.agent.v1.Sidecar` service: each RPC hands over to [`Node`].

use tailbox_proto::agent::v1::sidecar_server::{Sidecar, SidecarServer};
use tailbox_proto::agent::v1::{
    CheckRequest, DownRequest, DownResponse, EnvRequest, EnvResponse, SidecarStatus, StatusRequest,
    UpRequest, UpResponse, WatchEvent, WatchRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::node::{DEFAULT_DOWN_GRACE, Node};
use crate::events::{EventItem, to_std_duration};

/// The service's gRPC name, for the health service.
pub const SIDECAR_SERVICE_NAME: &str =
    <SidecarServer<SidecarService> as tonic::server::NamedService>::NAME;

/// Serves one [`Node`].
#[derive(Clone)]
pub struct SidecarService {
    node: Node,
}

impl SidecarService {
    /// The service for `node`.
    pub fn new(node: Node) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Sidecar for SidecarService {
    async fn up(&self, request: Request<UpRequest>) -> Result<Response<UpResponse>, Status> {
        self.node.up(request.into_inner()).await.map(Response::new)
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<SidecarStatus>, Status> {
        Ok(Response::new(self.node.status()))
    }

    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let events = self.node.watch(request.into_inner().include_logs);
        Ok(Response::new(ReceiverStream::new(events)))
    }

    type CheckStream = ReceiverStream<EventItem>;

    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<Self::CheckStream>, Status> {
        let events = self.node.check(request.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(events)))
    }

    async fn env(&self, _request: Request<EnvRequest>) -> Result<Response<EnvResponse>, Status> {
        self.node.env().await.map(Response::new)
    }

    async fn down(&self, request: Request<DownRequest>) -> Result<Response<DownResponse>, Status> {
        let grace =
            to_std_duration(request.into_inner().grace.as_ref()).unwrap_or(DEFAULT_DOWN_GRACE);
        let teardown = self.node.down(grace).await;
        Ok(Response::new(DownResponse {
            teardown: Some(teardown),
        }))
    }
}
