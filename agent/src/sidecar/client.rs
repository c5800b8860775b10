//! A gRPC client for the sidecar's unix socket: one HTTP/2 connection driven by hyper, wrapped as
//! the tower service tonic's generated clients take (tonic's own `Channel` would add a
//! load-balancing stack the agent does not need).

use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tailbox_proto::agent::v1::agent_client::AgentClient;
use tailbox_proto::agent::v1::sidecar_client::SidecarClient;
use tailbox_proto::agent::v1::{HelloRequest, HelloResponse};

/// Why the sidecar could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing accepts connections on the socket: no sidecar runs in this state directory.
    #[error("no sidecar answers on {}", socket.display())]
    NotRunning {
        /// The socket.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// Something accepted the connection but did not answer in time (a hung sidecar).
    #[error("the sidecar on {} did not answer within {after:?}", socket.display())]
    NoAnswer {
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// Something accepted the connection but did not speak gRPC.
    #[error("the sidecar on {} did not complete the handshake", socket.display())]
    Handshake {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One HTTP/2 connection to the sidecar, usable by any generated client.
#[derive(Clone, Debug)]
pub struct UnixChannel {
    sender: SendRequest<tonic::body::Body>,
}

impl tower::Service<http::Request<tonic::body::Body>> for UnixChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.sender.send_request(request))
    }
}

/// The origin generated clients put in their requests' URIs (HTTP/2 needs a scheme and an
/// authority; the socket path is what really addresses the sidecar).
const ORIGIN: &str = "http://tailbox-sidecar";

/// Clients for every service the sidecar serves, sharing one connection.
#[derive(Clone, Debug)]
pub struct Clients {
    /// `tailbox.agent.v1.Agent` (Hello).
    pub agent: AgentClient<UnixChannel>,
    /// `tailbox.agent.v1.Sidecar`.
    pub sidecar: SidecarClient<UnixChannel>,
}

/// Connects to the sidecar listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Clients, ConnectError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ConnectError::NotRunning {
            socket: socket.to_path_buf(),
            source,
        })?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake {
                socket: socket.to_path_buf(),
                source: source.into(),
            })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!("sidecar connection ended: {err}");
        }
    });
    let channel = UnixChannel { sender };
    let origin = http::Uri::from_static(ORIGIN);
    Ok(Clients {
        agent: AgentClient::with_origin(channel.clone(), origin.clone()),
        sidecar: SidecarClient::with_origin(channel, origin),
    })
}

/// How long a sidecar may take to answer `Hello`; one that takes longer is hung.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects and says hello: the sidecar is ready to serve once this succeeds.
pub async fn hello(socket: &Path) -> Result<(Clients, HelloResponse), ConnectError> {
    let exchange = async {
        let mut clients = connect(socket).await?;
        let hello = clients
            .agent
            .hello(HelloRequest {
                controller_version: format!("tailbox-agent {}", crate::AGENT_VERSION),
                proto_version: tailbox_proto::PROTO_VERSION,
            })
            .await
            .map_err(|status| ConnectError::Handshake {
                socket: socket.to_path_buf(),
                source: Box::new(status),
            })?
            .into_inner();
        Ok((clients, hello))
    };
    tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::NoAnswer {
                socket: socket.to_path_buf(),
                after: HELLO_TIMEOUT,
            })
        })
}
