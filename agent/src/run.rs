//! One run: from the request to the final report.

use std::time::{Duration, Instant, SystemTime};

use tailbox_proto::agent::v1::{
    AgentInfo, CheckResult, CheckStatus, Layer, Phase, Report, RunRequest, event,
};
use tailbox_proto::{PROTO_VERSION, REPORT_SCHEMA_VERSION};

use crate::events::{EventSink, duration, timestamp};
use crate::preflight;
use crate::redact::redact_url;

/// What the run needs from its surroundings, passed in so tests can control it.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// sha256 of the agent binary, for the report.
    pub agent_sha256: String,
    /// Root for preflight facts.
    pub host: preflight::Host,
    /// SSL_CERT_FILE of the sandbox, a preflight fact.
    pub ssl_cert_file: Option<String>,
}

/// Executes the run, emitting events as it goes, and always finishing with the report event.
pub async fn execute(request: RunRequest, sink: EventSink, ctx: RunContext) {
    let started_at = SystemTime::now();

    run_phase(&sink, Phase::Preflight, async {
        let (result, warnings) = preflight::check(&ctx.host, ctx.ssl_cert_file.as_deref());
        for warning in warnings {
            sink.warning(warning).await;
        }
        sink.check(result).await;
    })
    .await;

    run_phase(&sink, Phase::Checks, async {
        for result in skipped_tailnet_checks(&request) {
            sink.check(result).await;
        }
    })
    .await;

    let record = sink.record().await;
    let report = Report {
        schema_version: REPORT_SCHEMA_VERSION,
        run_id: request.run_id.clone(),
        agent: Some(AgentInfo {
            version: crate::AGENT_VERSION.into(),
            sha256: ctx.agent_sha256.clone(),
            proto_version: PROTO_VERSION,
        }),
        verdict: Some(crate::verdict::verdict(&record.checks)),
        checks: record.checks,
        phases: record.phases,
        warnings: record.warnings,
        started_at: Some(timestamp(started_at)),
        finished_at: Some(timestamp(SystemTime::now())),
        tailnet: None,
        teardown: None,
        sandbox: None,
    };
    sink.emit(event::Kind::Report(report)).await;
}

/// Runs one phase between its started and finished events; the phase fails if any check that
/// finished during it failed.
async fn run_phase(sink: &EventSink, phase: Phase, body: impl Future<Output = ()>) {
    let before = sink.record().await.checks.len();
    let started = Instant::now();
    sink.phase_started(phase).await;
    body.await;
    let record = sink.record().await;
    let failed = record.checks[before..]
        .iter()
        .any(|c| c.status == CheckStatus::Fail as i32);
    let status = if failed {
        CheckStatus::Fail
    } else {
        CheckStatus::Pass
    };
    sink.phase_finished(phase, status, started.elapsed()).await;
}

/// Until the agent drives tailscaled, each requested tailnet check reports skip with the reason.
fn skipped_tailnet_checks(request: &RunRequest) -> Vec<CheckResult> {
    let reason = if request
        .tailnet
        .as_ref()
        .is_none_or(|t| t.auth_key.is_empty())
    {
        "no auth key was given, so the sandbox did not join the tailnet"
    } else {
        "this agent cannot join a tailnet yet"
    };
    let hint = "set TS_AUTHKEY (an ephemeral, pre-authorized key) to join the tailnet";
    let skip = |name: &str, target: String, layer: Layer| CheckResult {
        name: name.into(),
        target,
        status: CheckStatus::Skip as i32,
        layer: layer as i32,
        detail: reason.into(),
        hint: hint.into(),
        duration: Some(duration(Duration::ZERO)),
        ..Default::default()
    };
    let mut results = Vec::new();
    for target in &request.ping_targets {
        results.push(skip("ping", target.address.clone(), Layer::Ping));
    }
    for target in &request.http_targets {
        results.push(skip("http", redact_url(&target.url), Layer::Http));
    }
    for target in &request.git_targets {
        results.push(skip("git", redact_url(&target.url), Layer::Git));
    }
    results
}
