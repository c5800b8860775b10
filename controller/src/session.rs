//! One conversation with a launched agent: handshake, `Run` (or a sidecar's `Check` and unary
//! calls), the event stream, and the agent's death if it happens. Backend-agnostic: it only sees an [`AgentProcess`], and shows what
//! happens through an [`Observer`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tailbox_proto::PROTO_VERSION;
use tailbox_proto::agent::v1::agent_client::AgentClient;
use tailbox_proto::agent::v1::sidecar_client::SidecarClient;
use tailbox_proto::agent::v1::{
    CheckRequest, Event, GitTarget, HelloRequest, HelloResponse, HttpTarget, PingTarget, Report,
    RunRequest, event,
};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::backend::{AgentProcess, ProcessExit};
use crate::modal::RpcStatus;
use crate::output::OutputError;

/// Whoever shows a session to people or tools.
pub trait Observer: Send {
    /// One event, from the agent or (seq 0) from the controller.
    fn event(&mut self, event: &Event) -> Result<(), OutputError>;
    /// One line the agent wrote to its stderr.
    fn agent_stderr(&mut self, line: &str);
}

/// What went wrong, and how the agent ended if it did.
#[derive(Debug, thiserror::Error)]
#[error("{failure}")]
pub struct SessionError {
    /// What went wrong.
    #[source]
    pub failure: SessionFailure,
    /// How the agent process ended, if it had.
    pub exit: Option<ProcessExit>,
    /// The last lines the agent wrote to stderr (secrets not yet redacted: the renderer does).
    pub stderr_tail: Vec<String>,
}

/// What went wrong in a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionFailure {
    /// The channel could not be opened.
    #[error("Failed to open a gRPC channel to the agent")]
    Connect(#[source] tonic::transport::Error),
    /// The agent died before the handshake.
    #[error("The agent exited before answering the handshake")]
    ExitedBeforeHello,
    /// No handshake in time.
    #[error("The agent did not answer the handshake within {0}s")]
    HelloTimeout(u64),
    /// The handshake failed.
    #[error("The agent handshake failed")]
    Hello(#[source] RpcStatus),
    /// Another binary answered.
    #[error(
        "The agent that answered is not the binary that was started (sha256 {got} != {expected})"
    )]
    WrongAgent {
        /// What answered (short).
        got: String,
        /// What was started (short).
        expected: String,
    },
    /// The agent lacks a capability the request needs.
    #[error("The agent (version {agent_version}) lacks {missing}, which this run needs")]
    Unsupported {
        /// The agent's version.
        agent_version: String,
        /// The missing feature names, comma-separated.
        missing: String,
    },
    /// `Run` was refused.
    #[error("The agent refused the run")]
    Refused(#[source] RpcStatus),
    /// The stream ended early.
    #[error("The agent ended the event stream without a report")]
    NoReport,
    /// The agent process died mid-run.
    #[error("The agent died in the middle of the run")]
    Died(#[source] Option<RpcStatus>),
    /// The link broke mid-run while the agent lived on.
    #[error("The connection to the agent broke in the middle of the run")]
    Broke(#[source] RpcStatus),
    /// The run took longer than `--timeout`.
    #[error("The run exceeded its `--timeout`")]
    Timeout,
    /// A sidecar call failed while the agent lived on.
    #[error("The sidecar's `{what}` failed")]
    Call {
        /// The RPC.
        what: &'static str,
        /// Its status.
        #[source]
        status: RpcStatus,
    },
    /// Showing an event failed (stdout closed or full).
    #[error(transparent)]
    Output(#[from] OutputError),
}

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
    pub exit: Option<ProcessExit>,
}

/// Runs the handshake and `request` on `agent`, rendering events as they arrive.
pub async fn run(
    agent: AgentProcess,
    request: RunRequest,
    observer: &mut dyn Observer,
    deadline: Instant,
) -> Result<SessionOutcome, SessionError> {
    let session = Session::open(agent, observer).await?;
    session.run(request, observer, deadline).await
}

/// An open conversation with one agent: the handshake is done, and the agent's death is watched
/// while any call is in flight. The same for `serve --stdio` and for a sidecar reached through
/// `attach`.
pub struct Session {
    channel: Channel,
    hello: HelloResponse,
    watch: AgentWatch,
    stderr_lines: mpsc::UnboundedReceiver<String>,
}

impl Session {
    /// Opens the wire to `agent` and shakes hands. When the backend knows which binary it
    /// started, the agent must report that sha256; an `attach` exec has no such expectation,
    /// since the sidecar it reaches may be another build (see [`Session::hello`]).
    pub async fn open(
        agent: AgentProcess,
        observer: &mut dyn Observer,
    ) -> Result<Self, SessionError> {
        let AgentProcess {
            io,
            stderr,
            exit,
            expected_sha256,
        } = agent;
        let (stderr_lines_tx, stderr_lines) = mpsc::unbounded_channel();
        let mut watch = AgentWatch::start(exit, stderr, stderr_lines_tx);

        let channel = match crate::transport::connect(io).await {
            Ok(channel) => channel,
            Err(err) => return Err(watch.failure(SessionFailure::Connect(err)).await),
        };
        let mut client = AgentClient::new(channel.clone());

        // Handshake, watching for the agent dying first.
        let reply = tokio::select! {
            reply = client.hello(HelloRequest {
                controller_version: env!("CARGO_PKG_VERSION").into(),
                proto_version: PROTO_VERSION,
            }) => reply,
            status = &mut watch.exit, if watch.exited.is_none() => {
                watch.exited = Some(status);
                return Err(watch.failure(SessionFailure::ExitedBeforeHello).await);
            }
            () = tokio::time::sleep(HANDSHAKE_TIMEOUT) => {
                return Err(watch.failure(SessionFailure::HelloTimeout(HANDSHAKE_TIMEOUT.as_secs())).await);
            }
        };
        let hello = match reply {
            Ok(reply) => reply.into_inner(),
            Err(status) => return Err(watch.failure(SessionFailure::Hello(status.into())).await),
        };
        if let Some(expected) = expected_sha256
            && !expected.is_empty()
            && hello.agent_sha256 != expected
        {
            let failure = SessionFailure::WrongAgent {
                got: short(&hello.agent_sha256).to_owned(),
                expected: short(&expected).to_owned(),
            };
            return Err(watch.failure(failure).await);
        }
        if let Err(err) = observer.event(&controller_event(event::Kind::AgentHello(hello.clone())))
        {
            return Err(watch.failure(err.into()).await);
        }
        Ok(Self {
            channel,
            hello,
            watch,
            stderr_lines,
        })
    }

    /// What the agent said in the handshake: its version, sha256, proto version, features and
    /// whether it is a sidecar.
    pub fn hello(&self) -> &HelloResponse {
        &self.hello
    }

    /// Runs `request` (the one-shot job) and drains its events to the report.
    pub async fn run(
        mut self,
        request: RunRequest,
        observer: &mut dyn Observer,
        deadline: Instant,
    ) -> Result<SessionOutcome, SessionError> {
        let mut client = AgentClient::new(self.channel.clone());
        let needs = RunRequest {
            tailnet: request.tailnet.clone(),
            ..targets_of(
                &request.ping_targets,
                &request.http_targets,
                &request.git_targets,
            )
        };
        let report = self
            .stream_to_report(&needs, client.run(request), observer, deadline)
            .await?;
        // While a client lives, closing the channel would leave the agent's stdin open, and the
        // agent would wait out the exit grace.
        drop(client);
        Ok(self.finish(report).await)
    }

    /// Runs the checks of `request` on the sidecar's running node and drains its events to the
    /// report.
    pub async fn check(
        mut self,
        request: CheckRequest,
        observer: &mut dyn Observer,
        deadline: Instant,
    ) -> Result<SessionOutcome, SessionError> {
        let mut client = self.sidecar();
        let needs = targets_of(
            &request.ping_targets,
            &request.http_targets,
            &request.git_targets,
        );
        let report = self
            .stream_to_report(&needs, client.check(request), observer, deadline)
            .await?;
        drop(client);
        Ok(self.finish(report).await)
    }

    /// Negotiates what `needs` asks of the agent, opens the event stream with `open`, and shows
    /// its events until the report.
    async fn stream_to_report(
        &mut self,
        needs: &RunRequest,
        open: impl Future<Output = Result<tonic::Response<tonic::Streaming<Event>>, tonic::Status>>,
        observer: &mut dyn Observer,
        deadline: Instant,
    ) -> Result<Report, SessionError> {
        if let Err(failure) = negotiate(&self.hello, needs) {
            return Err(self.watch.failure(failure).await);
        }
        let stream = match open.await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return Err(self
                    .watch
                    .failure(SessionFailure::Refused(status.into()))
                    .await);
            }
        };
        self.drain(stream, observer, deadline).await
    }

    /// A client of the sidecar service on this session's wire.
    pub fn sidecar(&self) -> SidecarClient<Channel> {
        SidecarClient::new(self.channel.clone())
    }

    /// Awaits one unary call, `what` (the RPC's name, for errors), while watching for the
    /// agent's death and for `deadline`.
    pub async fn call<T>(
        &mut self,
        what: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        deadline: Instant,
    ) -> Result<T, SessionError> {
        let mut pending = Pending::new(deadline);
        let relay = &mut |line: &str| tracing::debug!("agent: {line}");
        let reply = match self.watching(call, &mut pending, relay).await {
            Ok(reply) => reply,
            Err(failure) => return Err(self.watch.failure(failure).await),
        };
        match reply {
            Ok(reply) => Ok(reply.into_inner()),
            Err(status) => {
                let failure = if self.watch.wait_exit(Duration::from_millis(500)).await {
                    SessionFailure::Died(Some(status.into()))
                } else {
                    SessionFailure::Call {
                        what,
                        status: status.into(),
                    }
                };
                Err(self.watch.failure(failure).await)
            }
        }
    }

    /// Awaits `next` (a unary answer, or a stream's next event) while relaying the agent's
    /// stderr lines to `relay` and watching for its exit and `pending`'s deadline. An agent
    /// that has exited may still have an answer on the way (a sidecar that answers `Down` and
    /// exits, taking `attach` with it; events written just before an exit), so `next` then gets
    /// [`DRAIN_AFTER_EXIT`] more. Time running out is `Timeout`, or `Died(None)` after the exit.
    async fn watching<T>(
        &mut self,
        next: impl Future<Output = T>,
        pending: &mut Pending,
        relay: &mut (dyn FnMut(&str) + Send),
    ) -> Result<T, SessionFailure> {
        let mut next = std::pin::pin!(next);
        loop {
            tokio::select! {
                value = &mut next => return Ok(value),
                Some(line) = self.stderr_lines.recv() => relay(&line),
                status = &mut self.watch.exit, if self.watch.exited.is_none() => {
                    self.watch.exited = Some(status);
                    pending.after_exit = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                () = tokio::time::sleep_until(pending.gives_up_at()) => {
                    return Err(if pending.after_exit.is_some() {
                        SessionFailure::Died(None)
                    } else {
                        SessionFailure::Timeout
                    });
                }
            }
        }
    }

    /// Ends the conversation: closing our end tells the agent (or `attach`) to exit.
    pub async fn close(self) -> Option<ProcessExit> {
        let Self {
            channel, mut watch, ..
        } = self;
        drop(channel);
        if !watch.wait_exit(EXIT_GRACE).await {
            tracing::warn!("the agent did not exit within {EXIT_GRACE:?} of closing its stdin");
        }
        watch.wait_stderr(Duration::from_secs(1)).await;
        watch.exited
    }

    async fn finish(self, report: Report) -> SessionOutcome {
        let hello = self.hello.clone();
        let exit = self.close().await;
        SessionOutcome {
            hello,
            report,
            exit,
        }
    }

    /// Shows a stream's events until its report.
    async fn drain(
        &mut self,
        mut stream: tonic::Streaming<Event>,
        observer: &mut dyn Observer,
        deadline: Instant,
    ) -> Result<Report, SessionError> {
        let mut pending = Pending::new(deadline);
        loop {
            let relay = &mut |line: &str| observer.agent_stderr(line);
            let message = match self.watching(stream.message(), &mut pending, relay).await {
                Ok(message) => message,
                Err(failure) => return Err(self.watch.failure(failure).await),
            };
            let failure = match message {
                Ok(Some(event)) => {
                    if let Some(event::Kind::Report(report)) = event.kind {
                        return Ok(report);
                    }
                    match observer.event(&event) {
                        Ok(()) => continue,
                        Err(err) => err.into(),
                    }
                }
                Ok(None) => SessionFailure::NoReport,
                Err(status) => {
                    if self.watch.wait_exit(Duration::from_millis(500)).await {
                        SessionFailure::Died(Some(status.into()))
                    } else {
                        SessionFailure::Broke(status.into())
                    }
                }
            };
            return Err(self.watch.failure(failure).await);
        }
    }
}

/// How long a wait on the agent may last: the caller's deadline, cut short once the agent has
/// exited (see [`Session::watching`]).
struct Pending {
    deadline: Instant,
    after_exit: Option<Instant>,
}

impl Pending {
    fn new(deadline: Instant) -> Self {
        Self {
            deadline,
            after_exit: None,
        }
    }

    /// When the wait gives up.
    fn gives_up_at(&self) -> Instant {
        self.after_exit
            .map_or(self.deadline, |after| after.min(self.deadline))
    }
}

/// Watches the agent process: its exit and the tail of its stderr.
struct AgentWatch {
    exit: BoxFuture<'static, ProcessExit>,
    exited: Option<ProcessExit>,
    tail: StderrTail,
    stderr_done: watch::Receiver<bool>,
}

impl AgentWatch {
    fn start(
        exit: BoxFuture<'static, ProcessExit>,
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

    /// The error for `failure`, carrying how the agent ended and its stderr tail.
    async fn failure(&mut self, failure: SessionFailure) -> SessionError {
        // The exit status and the last stderr lines explain most failures; give them a moment.
        if self.wait_exit(Duration::from_millis(500)).await {
            self.wait_stderr(Duration::from_millis(500)).await;
        }
        SessionError {
            failure,
            exit: self.exited.clone(),
            stderr_tail: self.tail.lines(),
        }
    }
}

/// Checks that the agent can do what `request` asks. Features are names the agent announces;
/// an agent from before a feature existed simply lacks it, so a run that needs it is refused
/// with a clear message instead of failing in the middle.
pub fn negotiate(hello: &HelloResponse, request: &RunRequest) -> Result<(), SessionFailure> {
    let needs = [
        ("tailnet", request.tailnet.is_some()),
        ("ping", !request.ping_targets.is_empty()),
        ("http", !request.http_targets.is_empty()),
        ("git", !request.git_targets.is_empty()),
    ];
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(feature, needed)| *needed && !hello.features.iter().any(|f| f == feature))
        .map(|(feature, _)| *feature)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(SessionFailure::Unsupported {
        agent_version: hello.agent_version.clone(),
        missing: missing.join(", "),
    })
}

/// A request holding only these targets: what [`negotiate`] looks at.
fn targets_of(ping: &[PingTarget], http: &[HttpTarget], git: &[GitTarget]) -> RunRequest {
    RunRequest {
        ping_targets: ping.to_vec(),
        http_targets: http.to_vec(),
        git_targets: git.to_vec(),
        ..Default::default()
    }
}

/// An event the controller emits itself; seq 0 marks it as not from the agent.
pub fn controller_event(kind: event::Kind) -> Event {
    Event {
        seq: 0,
        time: Some(tailbox_proto::convert::timestamp(
            std::time::SystemTime::now(),
        )),
        kind: Some(kind),
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

    fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailbox_proto::agent::v1::{GitTarget, TailnetConfig};

    #[test]
    fn a_run_needing_a_feature_the_agent_lacks_is_refused_by_name() {
        let hello = HelloResponse {
            agent_version: "0.0.9".into(),
            features: vec!["preflight".into(), "tailnet".into(), "ping".into()],
            ..Default::default()
        };
        let plain = RunRequest {
            tailnet: Some(TailnetConfig::default()),
            ..Default::default()
        };
        assert!(negotiate(&hello, &plain).is_ok());
        let git = RunRequest {
            git_targets: vec![GitTarget::default()],
            ..plain
        };
        let err = negotiate(&hello, &git).unwrap_err();
        assert_eq!(
            err.to_string(),
            "The agent (version 0.0.9) lacks git, which this run needs"
        );
    }
}
