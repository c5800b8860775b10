//! One conversation with a launched agent: handshake, `Run`, the event stream, and the agent's
//! death if it happens. Backend-agnostic: it only sees an [`AgentProcess`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tailbox_proto::PROTO_VERSION;
use tailbox_proto::agent::v1::agent_client::AgentClient;
use tailbox_proto::agent::v1::{HelloRequest, HelloResponse, Report, RunRequest, event};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backend::{AgentExit, AgentProcess};
use crate::error::{CliError, CliResult, status_error};
use crate::render::Renderer;
use crate::secret::redact_urls;

/// Lines of agent stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 40;
/// How long to wait for the handshake once the agent runs.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// After the agent exits, how long buffered events may still arrive.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long the agent gets to exit after we close its stdin.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// What a finished session produced.
#[derive(Debug)]
pub struct SessionOutcome {
    /// The handshake.
    pub hello: HelloResponse,
    /// The agent's final report.
    pub report: Report,
    /// How the agent exited afterwards.
    pub exit: Option<AgentExit>,
}

/// Runs the handshake and `request` on `agent`, rendering events as they arrive.
pub async fn run(
    agent: AgentProcess,
    request: RunRequest,
    renderer: &mut Renderer,
    deadline: Instant,
) -> CliResult<SessionOutcome> {
    let AgentProcess {
        io,
        stderr,
        exit,
        expected_sha256,
        pid: _,
    } = agent;
    let (stderr_lines_tx, mut stderr_lines) = mpsc::unbounded_channel();
    let mut watch = AgentWatch::start(exit, stderr, stderr_lines_tx);

    let channel = match crate::transport::connect(io).await {
        Ok(channel) => channel,
        Err(err) => {
            return Err(watch
                .failure("Failed to open a gRPC channel to the agent")
                .await
                .with_source(err)
                .with_hint("the agent may have exited at once; its stderr is above"));
        }
    };
    let mut client = AgentClient::new(channel);

    // Handshake, watching for the agent dying first.
    let reply = tokio::select! {
        reply = client.hello(HelloRequest {
            controller_version: env!("CARGO_PKG_VERSION").into(),
            proto_version: PROTO_VERSION,
        }) => reply,
        status = &mut watch.exit, if watch.exited.is_none() => {
            watch.exited = Some(status);
            return Err(watch.failure("The agent exited before answering the handshake").await
                .with_hint("the agent binary may not run in this sandbox; its stderr is above"));
        }
        () = tokio::time::sleep(HANDSHAKE_TIMEOUT) => {
            return Err(watch.failure(&format!("The agent did not answer the handshake within {}s", HANDSHAKE_TIMEOUT.as_secs())).await
                .with_hint("check that stdout of the agent is not being redirected or buffered"));
        }
    };
    let hello = match reply {
        Ok(reply) => reply.into_inner(),
        Err(status) => {
            return Err(watch
                .failure("The agent handshake failed")
                .await
                .with_source(status_error(&status))
                .with_hint("the agent may have exited at once; its stderr is above"));
        }
    };
    if let Some(expected) = expected_sha256
        && !expected.is_empty()
        && hello.agent_sha256 != expected
    {
        let message = format!(
            "The agent that answered is not the binary that was started (sha256 {} != {})",
            short(&hello.agent_sha256),
            short(&expected)
        );
        return Err(watch
            .failure(&message)
            .await
            .with_hint("the uploaded copy may be corrupt; run again to upload it afresh"));
    }
    renderer.event(&crate::render::controller_event(event::Kind::AgentHello(
        hello.clone(),
    )))?;

    let mut stream = match client.run(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return Err(watch
                .failure("The agent refused the run")
                .await
                .with_source(status_error(&status)));
        }
    };

    let mut drain_deadline: Option<Instant> = None;
    let report = loop {
        let effective_deadline = drain_deadline.map_or(deadline, |d| d.min(deadline));
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(event)) => {
                    if let Some(event::Kind::Report(report)) = event.kind {
                        break report;
                    }
                    renderer.event(&event)?;
                }
                Ok(None) => {
                    return Err(watch.failure("The agent ended the event stream without a report").await);
                }
                Err(status) => {
                    let what = if watch.wait_exit(Duration::from_millis(500)).await {
                        "The agent died in the middle of the run"
                    } else {
                        "The connection to the agent broke in the middle of the run"
                    };
                    return Err(watch.failure(what).await.with_source(status_error(&status))
                        .with_hint("this is a sandbox or agent problem, not a tailnet one; the agent's stderr is above"));
                }
            },
            Some(line) = stderr_lines.recv() => renderer.agent_stderr(&line),
            status = &mut watch.exit, if watch.exited.is_none() => {
                // Events written just before the exit may still be in flight: keep reading briefly.
                watch.exited = Some(status);
                drain_deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            () = tokio::time::sleep_until(effective_deadline) => {
                if drain_deadline.is_some() {
                    return Err(watch.failure("The agent died in the middle of the run").await
                        .with_hint("this is a sandbox or agent problem, not a tailnet one; the agent's stderr is above"));
                }
                return Err(watch.failure("The run exceeded its --timeout").await
                    .with_hint("raise --timeout, or run with --verbose to see where it stalls"));
            }
        }
    };

    // Closing our end tells the agent to exit.
    drop(stream);
    drop(client);
    if !watch.wait_exit(EXIT_GRACE).await {
        tracing::warn!("the agent did not exit within {EXIT_GRACE:?} of closing its stdin");
    }
    watch.wait_stderr(Duration::from_secs(1)).await;
    Ok(SessionOutcome {
        hello,
        report,
        exit: watch.exited,
    })
}

/// Watches the agent process: its exit and the tail of its stderr.
struct AgentWatch {
    exit: BoxFuture<'static, AgentExit>,
    exited: Option<AgentExit>,
    tail: StderrTail,
    stderr_done: watch::Receiver<bool>,
}

impl AgentWatch {
    fn start(
        exit: BoxFuture<'static, AgentExit>,
        stderr: impl AsyncRead + Send + Unpin + 'static,
        relay: mpsc::UnboundedSender<String>,
    ) -> Self {
        let tail = StderrTail::default();
        let (done_tx, stderr_done) = watch::channel(false);
        let collector = tail.clone();
        tokio::spawn(async move {
            collector.collect(stderr, relay).await;
            let _ = done_tx.send(true);
        });
        Self {
            exit,
            exited: None,
            tail,
            stderr_done,
        }
    }

    /// Waits up to `limit` for the agent to exit; true if it has.
    async fn wait_exit(&mut self, limit: Duration) -> bool {
        if self.exited.is_none() {
            self.exited = tokio::time::timeout(limit, &mut self.exit).await.ok();
        }
        self.exited.is_some()
    }

    /// Waits up to `limit` for stderr to reach EOF, so the tail is complete.
    async fn wait_stderr(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.stderr_done.wait_for(|done| *done)).await;
    }

    /// An infrastructure error carrying how the agent ended and its stderr tail.
    async fn failure(&mut self, message: &str) -> CliError {
        // The exit status and the last stderr lines explain most failures; give them a moment.
        if self.wait_exit(Duration::from_millis(500)).await {
            self.wait_stderr(Duration::from_millis(500)).await;
        }
        let mut err = CliError::infra(message);
        if let Some(exit) = &self.exited {
            err = err.with_detail(format!("the agent process ended: {exit}"));
        }
        err.with_detail(self.tail.render())
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The last lines the agent wrote to stderr.
#[derive(Clone, Default)]
struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl StderrTail {
    async fn collect(
        self,
        stderr: impl AsyncRead + Send + Unpin,
        relay: mpsc::UnboundedSender<String>,
    ) {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut tail) = self.lines.lock() {
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
            }
            let _ = relay.send(line);
        }
    }

    fn render(&self) -> String {
        let tail = self.lines.lock().map(|t| t.clone()).unwrap_or_default();
        if tail.is_empty() {
            return "agent stderr: (empty)".into();
        }
        let mut out = format!("agent stderr (last {} lines):\n", tail.len());
        for line in tail {
            out.push_str("  | ");
            out.push_str(&redact_urls(&line));
            out.push('\n');
        }
        out
    }
}
