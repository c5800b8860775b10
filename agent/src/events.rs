//! The ordered event stream of one run, and the record its final report is built from.
//!
//! Every event gets the next sequence number and is sent while a lock is held, so sequence order
//! equals wire order even when checks run concurrently. If the controller goes away the run keeps
//! going (it still has to log out and stop tailscaled); events are then only recorded.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

// The time conversions live with the contract; re-exported for the checks.
pub use tailbox_proto::convert::{duration, timestamp, to_std_duration};

use tailbox_proto::agent::v1::{
    CheckResult, CheckStarted, CheckStatus, DaemonRestart, Event, LogLine, LogSource, Phase,
    PhaseFinished, PhaseStarted, PhaseTiming, Warning, event,
};
use tokio::sync::{Mutex, mpsc};
use tonic::Status;

/// Item type of the Run stream.
pub type EventItem = Result<Event, Status>;

/// Cloneable handle to the run's event stream.
#[derive(Clone)]
pub struct EventSink {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    tx: Option<mpsc::Sender<EventItem>>,
    next_seq: u64,
    record: RunRecord,
    /// Failed checks so far, so phases can tell whether they failed without copying the record.
    failed_checks: usize,
}

/// Everything the final report needs, gathered as events are emitted.
#[derive(Debug, Default, Clone)]
pub struct RunRecord {
    /// Checks in the order they finished.
    pub checks: Vec<CheckResult>,
    /// Phase timings in the order phases finished.
    pub phases: Vec<PhaseTiming>,
    /// Warnings in emission order.
    pub warnings: Vec<Warning>,
    /// Number of daemon restarts reported.
    pub daemon_restarts: u32,
}

impl EventSink {
    /// A sink that sends to `tx`.
    pub fn new(tx: mpsc::Sender<EventItem>) -> Self {
        Self::with_stream(Some(tx))
    }

    /// A sink that only records: its events reach no stream (the sidecar's `Up`, which answers
    /// with the recorded checks once it is done).
    pub fn recording() -> Self {
        Self::with_stream(None)
    }

    fn with_stream(tx: Option<mpsc::Sender<EventItem>>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                tx,
                next_seq: 1,
                record: RunRecord::default(),
                failed_checks: 0,
            })),
        }
    }

    /// Emits one event with the next sequence number.
    pub async fn emit(&self, kind: event::Kind) {
        let mut inner = self.inner.lock().await;
        match &kind {
            event::Kind::Check(check) => {
                if check.status == CheckStatus::Fail as i32 {
                    inner.failed_checks += 1;
                }
                inner.record.checks.push(check.clone());
            }
            event::Kind::Warning(warning) => inner.record.warnings.push(warning.clone()),
            event::Kind::PhaseFinished(finished) => inner.record.phases.push(PhaseTiming {
                phase: finished.phase,
                status: finished.status,
                duration: finished.duration,
            }),
            event::Kind::DaemonRestart(_) => inner.record.daemon_restarts += 1,
            _ => {}
        }
        let event = Event {
            seq: inner.next_seq,
            time: Some(timestamp(SystemTime::now())),
            kind: Some(kind),
        };
        inner.next_seq += 1;
        if let Some(tx) = &inner.tx
            && tx.send(Ok(event)).await.is_err()
        {
            tracing::warn!("the controller stopped reading events; continuing the run without it");
            inner.tx = None;
        }
    }

    /// Announces the start of a phase.
    pub async fn phase_started(&self, phase: Phase) {
        self.emit(event::Kind::PhaseStarted(PhaseStarted {
            phase: phase as i32,
        }))
        .await;
    }

    /// Announces the end of a phase.
    pub async fn phase_finished(&self, phase: Phase, status: CheckStatus, duration: Duration) {
        self.emit(event::Kind::PhaseFinished(PhaseFinished {
            phase: phase as i32,
            status: status as i32,
            duration: Some(self::duration(duration)),
        }))
        .await;
    }

    /// Announces a check that begins now, with the most it may take (for live progress).
    pub async fn check_started(&self, name: &str, target: impl Into<String>, budget: Duration) {
        self.emit(event::Kind::CheckStarted(CheckStarted {
            name: name.to_owned(),
            target: target.into(),
            budget: Some(self::duration(budget)),
        }))
        .await;
    }

    /// Reports one finished check.
    pub async fn check(&self, result: CheckResult) {
        self.emit(event::Kind::Check(result)).await;
    }

    /// Reports a warning.
    pub async fn warning(&self, warning: Warning) {
        self.emit(event::Kind::Warning(warning)).await;
    }

    /// Reports a daemon restart.
    pub async fn daemon_restart(&self, restart: DaemonRestart) {
        self.emit(event::Kind::DaemonRestart(restart)).await;
    }

    /// Forwards one log line; it is also written to our own stderr for the sandbox's logs.
    pub async fn log(&self, source: LogSource, line: impl Into<String>) {
        let line = line.into();
        match source {
            LogSource::Tailscaled => tracing::debug!(target: "tailscaled", "{line}"),
            _ => tracing::info!("{line}"),
        }
        self.emit(event::Kind::Log(LogLine {
            source: source as i32,
            line,
        }))
        .await;
    }

    /// How many checks have failed so far.
    pub async fn failed_checks(&self) -> usize {
        self.inner.lock().await.failed_checks
    }

    /// A copy of what has been recorded so far.
    pub async fn record(&self) -> RunRecord {
        self.inner.lock().await.record.clone()
    }

    /// Sends a stream-level error (a protocol failure, not a check failure) and closes the stream.
    pub async fn fail_stream(&self, status: Status) {
        let mut inner = self.inner.lock().await;
        if let Some(tx) = inner.tx.take() {
            let _ = tx.send(Err(status)).await;
        }
    }
}

/// Runs one phase between its started and finished events; the phase fails if any check that
/// finished during it failed.
pub async fn run_phase(sink: &EventSink, phase: Phase, body: impl Future<Output = ()>) {
    let failed_before = sink.failed_checks().await;
    let started = std::time::Instant::now();
    sink.phase_started(phase).await;
    body.await;
    let status = if sink.failed_checks().await > failed_before {
        CheckStatus::Fail
    } else {
        CheckStatus::Pass
    };
    sink.phase_finished(phase, status, started.elapsed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sequence_numbers_are_dense_and_ordered_across_tasks() {
        let (tx, mut rx) = mpsc::channel(1024);
        let sink = EventSink::new(tx);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                for j in 0..50 {
                    sink.log(LogSource::Agent, format!("task {i} line {j}"))
                        .await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        drop(sink);
        let mut expected = 1;
        while let Some(item) = rx.recv().await {
            assert_eq!(item.unwrap().seq, expected);
            expected += 1;
        }
        assert_eq!(expected, 401);
    }

    #[tokio::test]
    async fn a_gone_reader_does_not_stop_recording() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let sink = EventSink::new(tx);
        sink.check(CheckResult {
            name: "preflight".into(),
            ..Default::default()
        })
        .await;
        assert_eq!(sink.record().await.checks.len(), 1);
    }
}
