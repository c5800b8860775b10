//! Serving the gRPC service over one byte stream.
//!
//! tonic's `Server::serve_with_incoming` stops as soon as its incoming stream ends, which for a
//! single connection is at once, so the connection is served with hyper's HTTP/2 builder directly:
//! its future ends exactly when the connection does (the controller closed stdin).

use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tailbox_proto::agent::v1::agent_server::AgentServer;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::preflight::Host;
use crate::run::RunContext;
use crate::service::{AgentService, own_sha256};
use crate::stdio::{self, Wire};

/// Serves on the taken stdin/stdout until the controller closes its end.
pub async fn serve_stdio(wire: Wire) -> anyhow::Result<()> {
    let (reader, writer) =
        stdio::into_async(wire).context("cannot use stdin/stdout as the wire")?;
    let context = RunContext {
        agent_sha256: own_sha256(),
        host: Host::default(),
        ssl_cert_file: std::env::var("SSL_CERT_FILE").ok(),
        path_var: std::env::var("PATH").ok(),
        ..Default::default()
    };
    tracing::info!(
        version = crate::AGENT_VERSION,
        "serving tailbox.agent.v1 on stdio"
    );
    let service = AgentService::new(context);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let connection = serve_connection(tokio::io::join(reader, writer), service.clone());
    tokio::pin!(connection);
    let result = tokio::select! {
        result = &mut connection => {
            tracing::info!("controller closed the connection; finishing");
            // A run in flight still logs out and stops tailscaled.
            service.shutdown(SHUTDOWN_GRACE).await;
            result
        }
        _ = terminate.recv() => {
            // Cancel runs into their teardown but keep the connection up, so the controller (if
            // it is still there) receives the teardown and the report.
            tracing::info!("SIGTERM: tearing down");
            let shutdown = service.shutdown(SHUTDOWN_GRACE);
            tokio::pin!(shutdown);
            tokio::select! {
                () = &mut shutdown => {}
                result = &mut connection => {
                    shutdown.await;
                    return result;
                }
            }
            // The report may still be queued: keep the connection up until the controller
            // closes it after reading, or briefly if nobody is there.
            let _ = tokio::time::timeout(FLUSH_GRACE, &mut connection).await;
            Ok(())
        }
    };
    result
}

/// How long queued events get to reach a controller after a SIGTERM'd run ends.
const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// How long runs get to tear down (logout, stop tailscaled) when the session ends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves the agent service on any duplex byte stream (stdio in production, memory in tests).
pub async fn serve_connection<IO>(io: IO, service: AgentService) -> anyhow::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let routes = tonic::service::Routes::new(AgentServer::new(service)).prepare();
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // Notice a controller that vanished without closing the pipe.
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(routes));
    // Driving the connection on a worker rather than inside block_on keeps latency low.
    match tokio::spawn(connection)
        .await
        .context("the connection task panicked")?
    {
        Ok(()) => Ok(()),
        // The controller going away, even abruptly, is how a session ends: not an error.
        Err(err) if is_peer_gone(&err) => {
            tracing::info!("the controller went away: {err}");
            Ok(())
        }
        Err(err) => Err(anyhow::anyhow!("HTTP/2 connection error: {err}")),
    }
}

fn is_peer_gone(err: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
            );
        }
        source = cause.source();
    }
    err.is_incomplete_message()
}
