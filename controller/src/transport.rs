//! gRPC to the agent over any byte stream: a child's pipes, Modal exec stdio, or memory in tests.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};

/// Opens a channel on `io`. The stream is single-use: if the connection drops, tonic's reconnect
/// attempt fails at once (there is no second agent to dial), so errors surface instead of hanging.
pub async fn connect<IO>(io: IO) -> Result<Channel, tonic::transport::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let slot = Arc::new(Mutex::new(Some(io)));
    // The URI only supplies the :authority header; nothing is resolved or dialled.
    Endpoint::from_static("http://tailbox-agent.stdio")
        // Pings notice an agent that hangs without closing its pipes.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let slot = Arc::clone(&slot);
            async move {
                let io = slot
                    .lock()
                    .map_err(|_| io::Error::other("connector lock poisoned"))?
                    .take()
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotConnected,
                            "the connection to the agent closed and cannot be reopened",
                        )
                    })?;
                Ok::<_, io::Error>(TokioIo::new(io))
            }
        }))
        .await
}
