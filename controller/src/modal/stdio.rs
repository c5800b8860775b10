//! An exec's output as `AsyncRead` and its stdin as `AsyncWrite`, over the router's
//! offset-addressed stdio, so tonic can run gRPC to the agent on top.
//!
//! Reads count the bytes received and, after a cut (a transient error or a dropped stream),
//! re-open the stream at that offset: every byte arrives exactly once, in order. Only a clean end
//! of the stream means end of file. Writes go out one at a time at increasing offsets (retries
//! resend the same offset), so the order on the wire is the order written.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tailbox_proto::modal::task_command_router::{
    TaskExecStdioFileDescriptor, TaskExecStdioReadRequest,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;
use tokio_util::sync::PollSender;
use tonic::Code;

use super::error::RpcStatus;
use super::retry::{Attempts, Backoff};
use super::router::Router;

/// Largest single stdin write (bytes coalesced while the previous write is in flight).
const MAX_WRITE: usize = 1024 * 1024;
/// Chunks queued between the network and the reader or writer.
const QUEUED_CHUNKS: usize = 64;

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// Aborts the background task when the handle goes away.
struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resumable reader of one output fd of an exec.
pub struct ExecReader {
    inner: StreamReader<ReceiverStream<io::Result<Bytes>>, Bytes>,
    _task: TaskGuard,
}

impl ExecReader {
    /// Starts reading `fd` of `exec_id` from offset 0.
    pub fn new(router: Router, exec_id: String, fd: Fd) -> Self {
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let task = tokio::spawn(pump_output(router, exec_id, fd, tx));
        Self {
            inner: StreamReader::new(ReceiverStream::new(rx)),
            _task: TaskGuard(task),
        }
    }
}

impl AsyncRead for ExecReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

async fn pump_output(router: Router, exec_id: String, fd: Fd, tx: mpsc::Sender<io::Result<Bytes>>) {
    let file_descriptor = match fd {
        Fd::Stdout => TaskExecStdioFileDescriptor::Stdout,
        Fd::Stderr => TaskExecStdioFileDescriptor::Stderr,
    } as i32;
    let mut offset = 0u64;
    // Consecutive failures; every chunk that arrives starts the count afresh (as the SDKs do).
    let mut attempts = Attempts::new(Backoff::ROUTER).refreshing_auth();
    loop {
        let (request, mut client, generation) = router.authorized(TaskExecStdioReadRequest {
            task_id: router.task_id().to_owned(),
            exec_id: exec_id.clone(),
            offset,
            file_descriptor,
        });
        let status = match client.task_exec_stdio_read(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            if chunk.data.is_empty() {
                                continue;
                            }
                            offset += chunk.data.len() as u64;
                            attempts.progressed();
                            if tx.send(Ok(Bytes::from(chunk.data))).await.is_err() {
                                return; // The reader is gone.
                            }
                        }
                        // A clean end of the stream: the fd is finished.
                        Ok(None) => return,
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        tracing::debug!(?fd, offset, code = ?status.code(), "exec output stream cut");
        if let Err(status) = router
            .next_attempt(&mut attempts, "TaskExecStdioRead", generation, status)
            .await
        {
            let _ = tx.send(Err(io_error(&status))).await;
            return;
        }
    }
}

fn io_error(status: &tonic::Status) -> io::Error {
    let kind = match status.code() {
        Code::NotFound | Code::FailedPrecondition | Code::Aborted => io::ErrorKind::BrokenPipe,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, RpcStatus(status.clone()).to_string())
}

/// Ordered, offset-correct writer of an exec's stdin. Shutting it down or dropping it closes
/// stdin (EOF) after the queued bytes: the agent exits when its stdin closes.
pub struct ExecWriter {
    tx: PollSender<Bytes>,
    failure: Arc<Mutex<Option<String>>>,
}

impl ExecWriter {
    /// A writer for `exec_id`'s stdin, starting at offset 0.
    pub fn new(router: Router, exec_id: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let failure = Arc::new(Mutex::new(None));
        // Not aborted on drop: it ends by itself once it has delivered the queue and the EOF.
        tokio::spawn(pump_input(router, exec_id, rx, Arc::clone(&failure)));
        Self {
            tx: PollSender::new(tx),
            failure,
        }
    }

    fn broken(&self) -> io::Error {
        let why = self
            .failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "stdin of the exec is closed".into());
        io::Error::new(io::ErrorKind::BrokenPipe, why)
    }
}

impl AsyncWrite for ExecWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if ready!(this.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(this.broken()));
        }
        let len = buf.len().min(MAX_WRITE);
        match this.tx.send_item(Bytes::copy_from_slice(&buf[..len])) {
            Ok(()) => Poll::Ready(Ok(len)),
            Err(_) => Poll::Ready(Err(this.broken())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued bytes go out in order; there is nothing to flush to beyond that queue.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing the queue makes the pump send EOF after the queued bytes.
        self.get_mut().tx.close();
        Poll::Ready(Ok(()))
    }
}

async fn pump_input(
    router: Router,
    exec_id: String,
    mut rx: mpsc::Receiver<Bytes>,
    failure: Arc<Mutex<Option<String>>>,
) {
    let mut offset = 0u64;
    loop {
        let Some(first) = rx.recv().await else {
            // Writer shut down or dropped: close stdin after everything written.
            if let Err(status) = router
                .stdin_write(&exec_id, offset, Bytes::new(), true)
                .await
            {
                // Already closed or the process is gone: nothing left to deliver.
                tracing::debug!("closing the exec's stdin: {}", status.message());
            }
            return;
        };
        // Coalesce what queued up while the previous write was in flight. A lone chunk goes out
        // as it is, and a batch grows in place: neither is copied here.
        let mut batch = first;
        while batch.len() < MAX_WRITE {
            let Ok(more) = rx.try_recv() else { break };
            let mut grown = BytesMut::from(batch);
            grown.extend_from_slice(&more);
            batch = grown.freeze();
        }
        let len = batch.len() as u64;
        if let Err(status) = router.stdin_write(&exec_id, offset, batch, false).await {
            if let Ok(mut slot) = failure.lock() {
                *slot = Some(RpcStatus(status).to_string());
            }
            // Dropping the receiver fails every later write.
            return;
        }
        offset += len;
    }
}
