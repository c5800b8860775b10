//! B6: gRPC over stdio, the way the controller speaks to a one-shot agent (`serve --stdio` on a
//! child's stdin and stdout, HTTP/2 over the two pipes).
//!
//! - Unary: sequential `Hello` calls, p50 and p99, against the floor: the same number of bytes
//!   as one `Hello` request on the wire, echoed through the same kind of pipes by `cat` (a
//!   process that does nothing else), p50 and p99.
//! - Streamed events per second: a `Run` without an auth key and with many ping targets, which
//!   the agent skips one by one, streaming one `CheckResult` event each (then the report). It is
//!   the agent's real event path (the run's sink, its record, the encoder, HTTP/2 flow control),
//!   with no tailnet in the way.
//! - Each for the static musl agent (mimalloc) and a glibc build of the same profile (glibc's
//!   allocator).

use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tailbox_proto::PROTO_VERSION;
use tailbox_proto::agent::v1::agent_client::AgentClient;
use tailbox_proto::agent::v1::{HelloRequest, PingTarget, RunRequest, event};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use super::{STEP_TIMEOUT, Stats};

/// How much B6 does.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Sequential unary calls timed (after as many warm-up calls as a tenth of them).
    pub calls: usize,
    /// Ping targets per streamed run: about one event each.
    pub events: usize,
    /// Streamed runs timed.
    pub streams: usize,
}

/// B6 for one agent build.
pub struct AgentStdio {
    /// Each Hello's round trip, in microseconds.
    pub hello_us: Stats,
    /// Bytes one Hello puts on the wire, controller to agent and back (mean).
    pub hello_bytes: (u64, u64),
    /// Events per second of each streamed run.
    pub events_per_s: Stats,
    /// Events in each streamed run.
    pub events_per_stream: usize,
}

/// Unary calls and streamed events through `agent serve --stdio`.
pub async fn agent(agent: &Path, sizes: Sizes) -> Result<AgentStdio> {
    let (mut child, client, counters) = spawn(agent).await?;
    let result = measure(client, &counters, sizes).await;
    // Closing stdin (the client is gone) ends the agent.
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(Ok(_)) => {}
        _ => {
            let _ = child.kill().await;
            bail!("{} did not exit after its stdin closed", agent.display());
        }
    }
    result
}

async fn measure(
    mut client: AgentClient<Channel>,
    counters: &Counters,
    sizes: Sizes,
) -> Result<AgentStdio> {
    let hello = || HelloRequest {
        controller_version: "bench".into(),
        proto_version: PROTO_VERSION,
    };
    for _ in 0..(sizes.calls / 10).max(1) {
        client.hello(hello()).await.context("Hello (warm-up)")?;
    }
    let (up, down) = counters.read();
    let mut samples = Vec::with_capacity(sizes.calls);
    for _ in 0..sizes.calls {
        let started = Instant::now();
        client.hello(hello()).await.context("Hello")?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let (up_after, down_after) = counters.read();
    let calls = sizes.calls.max(1) as u64;
    let hello_bytes = ((up_after - up) / calls, (down_after - down) / calls);

    let mut rates = Vec::with_capacity(sizes.streams);
    let mut events_per_stream = 0;
    for round in 0..sizes.streams {
        let request = RunRequest {
            run_id: format!("bench-stream-{round}"),
            ping_targets: (0..sizes.events)
                .map(|i| PingTarget {
                    address: format!("100.64.{}.{}", i / 250, i % 250 + 1),
                })
                .collect(),
            ..Default::default()
        };
        let started = Instant::now();
        let mut stream = tokio::time::timeout(STEP_TIMEOUT, client.run(request))
            .await
            .context("Run did not answer")?
            .context("Run")?
            .into_inner();
        let mut events = 0usize;
        let mut reported = false;
        while let Some(event) = tokio::time::timeout(STEP_TIMEOUT, stream.message())
            .await
            .context("the event stream stalled")?
            .context("the event stream failed")?
        {
            events += 1;
            reported |= matches!(event.kind, Some(event::Kind::Report(_)));
        }
        let took = started.elapsed();
        if !reported {
            bail!("the streamed run ended without a report");
        }
        events_per_stream = events;
        rates.push(events as f64 / took.as_secs_f64());
    }
    Ok(AgentStdio {
        hello_us: Stats::of(samples),
        hello_bytes,
        events_per_s: Stats::of(rates),
        events_per_stream,
    })
}

async fn spawn(agent: &Path) -> Result<(Child, AgentClient<Channel>, Counters)> {
    let mut child = tailbox_testkit::agent::serve_stdio_command(agent)
        .args(["--log", "error"])
        .env_clear()
        .spawn()
        .with_context(|| format!("running {} serve --stdio", agent.display()))?;
    let stdin = child.stdin.take().context("the agent's stdin")?;
    let stdout = child.stdout.take().context("the agent's stdout")?;
    let counters = Counters::default();
    let io = Counted {
        inner: tokio::io::join(stdout, stdin),
        counters: counters.clone(),
    };
    let channel = tailbox_testkit::agent::try_channel_over(io)
        .await
        .with_context(|| format!("connecting to {} over its stdio", agent.display()))?;
    let client = AgentClient::new(channel).max_decoding_message_size(64 << 20);
    Ok((child, client, counters))
}

/// The floor of one unary call: `bytes` written to `cat` through a pipe and read back through
/// another, `calls` times; each round trip in microseconds.
pub async fn pipe_echo(bytes: usize, calls: usize) -> Result<Stats> {
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("running cat for the pipe echo")?;
    let mut stdin = cat.stdin.take().context("cat's stdin")?;
    let mut stdout = cat.stdout.take().context("cat's stdout")?;
    let message = vec![0x5a_u8; bytes.max(1)];
    let mut echoed = vec![0u8; message.len()];
    for _ in 0..(calls / 10).max(1) {
        stdin.write_all(&message).await.context("writing to cat")?;
        stdout
            .read_exact(&mut echoed)
            .await
            .context("reading cat")?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        stdin.write_all(&message).await.context("writing to cat")?;
        stdout
            .read_exact(&mut echoed)
            .await
            .context("reading cat")?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), cat.wait()).await;
    Ok(Stats::of(samples))
}

/// The p-th percentile (0–100) of sorted samples, nearest rank.
pub fn percentile(stats: &Stats, p: f64) -> f64 {
    let n = stats.samples.len();
    if n == 0 {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    stats.samples[rank.clamp(1, n) - 1]
}

/// Bytes through a stream, each way.
#[derive(Clone, Default)]
struct Counters {
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl Counters {
    /// (written to the agent, read from it) so far.
    fn read(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// A duplex stream that counts what crosses it.
struct Counted<IO> {
    inner: IO,
    counters: Counters,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters.down.fetch_add(read as u64, Ordering::Relaxed);
        poll
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.counters.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
