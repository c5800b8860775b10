//! Fan-out's aggregate: what each sandbox of a `tailbox check --count N` run did, folded into
//! one [`FleetReport`] (counts, percentiles, the path mix, the slowest sandbox), the exit-code
//! policy for mixed outcomes, and the summary people read on stdout.
//!
//! Pure: the app records each sandbox as a [`SlotRecord`] while the run goes, and this module
//! only computes and formats.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use tailbox_proto::REPORT_SCHEMA_VERSION;
use tailbox_proto::agent::v1::{
    CheckStatus, FailureClass, FleetDistribution, FleetFailureClassCount, FleetLayerCount,
    FleetPathMix, FleetReport, FleetSandbox, FleetSandboxRef, FleetSandboxStatus, FleetStatusCount,
    Layer, PhaseTiming, PingPath, Report, check_result,
};
use tailbox_proto::convert::{duration as proto_duration, timestamp, to_std_duration};

use crate::error::ExitStatus;
use crate::progress::cut;
use crate::render::format_duration;
use crate::secret::redact_urls;

/// How one sandbox's work ended.
#[derive(Debug, Clone, Default)]
pub enum SlotOutcome {
    /// It never ended (the run was stopped first), or never began.
    #[default]
    Unfinished,
    /// The agent's report (its verdict says whether the run was interrupted).
    Report(Box<Report>),
    /// No report: the controller's error.
    Error {
        /// The `error:` line and its causes, joined by ": ".
        error: String,
        /// What to do about it.
        hint: String,
    },
}

/// What the run learned about one sandbox, filled in as its events pass.
#[derive(Debug, Clone, Default)]
pub struct SlotRecord {
    /// 1 to N.
    pub slot: u32,
    /// Its id, once known.
    pub sandbox_id: String,
    /// The hostname asked for, when the controller chose it.
    pub hostname: String,
    /// When its work began.
    pub started_at: Option<SystemTime>,
    /// When its work ended.
    pub finished_at: Option<SystemTime>,
    /// The controller's phases (sandbox, upload) as they finished.
    pub controller_phases: Vec<PhaseTiming>,
    /// From its start until the login check passed.
    pub time_to_running: Option<Duration>,
    /// How it ended.
    pub outcome: SlotOutcome,
}

/// What the whole run was.
#[derive(Debug, Clone)]
pub struct RunFacts {
    /// The run's id.
    pub run_id: String,
    /// `local` or `modal`.
    pub backend: String,
    /// How many sandboxes were asked for.
    pub requested: u32,
    /// `--parallel`.
    pub parallel: u32,
    /// When the run started.
    pub started_at: SystemTime,
    /// Whether the run was stopped before its end.
    pub interrupted: bool,
}

/// One sandbox's part of the report.
pub fn sandbox_entry(record: &SlotRecord, run_interrupted: bool) -> FleetSandbox {
    let mut entry = FleetSandbox {
        slot: record.slot,
        sandbox_id: record.sandbox_id.clone(),
        hostname: record.hostname.clone(),
        started_at: record.started_at.map(timestamp),
        finished_at: record.finished_at.map(timestamp),
        controller_phases: record.controller_phases.clone(),
        create_time: phase_time(record, tailbox_proto::agent::v1::Phase::Sandbox),
        upload_time: phase_time(record, tailbox_proto::agent::v1::Phase::Upload),
        time_to_running: record.time_to_running.map(proto_duration),
        wall_time: match (record.started_at, record.finished_at) {
            (Some(start), Some(end)) => end.duration_since(start).ok().map(proto_duration),
            _ => None,
        },
        ..Default::default()
    };
    let status = match &record.outcome {
        SlotOutcome::Report(report) => {
            let verdict = report.verdict.clone().unwrap_or_default();
            if let Some(hostname) = report.tailnet.as_ref().map(|t| &t.hostname)
                && !hostname.is_empty()
            {
                entry.hostname.clone_from(hostname);
            }
            if entry.sandbox_id.is_empty()
                && let Some(sandbox) = &report.sandbox
            {
                entry.sandbox_id.clone_from(&sandbox.sandbox_id);
            }
            entry.layer = verdict.first_failed_layer;
            entry.failure_class = verdict.failure_class;
            entry.report = Some((**report).clone());
            if verdict.interrupted {
                FleetSandboxStatus::Interrupted
            } else if verdict.ok {
                FleetSandboxStatus::Passed
            } else {
                FleetSandboxStatus::Failed
            }
        }
        SlotOutcome::Error { error, hint } => {
            entry.error = redact_urls(error);
            entry.hint.clone_from(hint);
            entry.layer = Layer::Sandbox as i32;
            if run_interrupted {
                FleetSandboxStatus::Interrupted
            } else {
                FleetSandboxStatus::Error
            }
        }
        SlotOutcome::Unfinished => FleetSandboxStatus::Interrupted,
    };
    entry.status = status as i32;
    entry
}

fn phase_time(
    record: &SlotRecord,
    phase: tailbox_proto::agent::v1::Phase,
) -> Option<pbjson_types::Duration> {
    record
        .controller_phases
        .iter()
        .find(|p| p.phase == phase as i32)
        .and_then(|p| p.duration)
}

/// The aggregated report of a run.
pub fn aggregate(facts: &RunFacts, records: &[SlotRecord]) -> FleetReport {
    let finished_at = SystemTime::now();
    let sandboxes: Vec<FleetSandbox> = records
        .iter()
        .map(|r| sandbox_entry(r, facts.interrupted))
        .collect();

    let mut by_status: BTreeMap<i32, u32> = BTreeMap::new();
    let mut by_class: BTreeMap<i32, u32> = BTreeMap::new();
    let mut by_layer: BTreeMap<i32, u32> = BTreeMap::new();
    for sandbox in &sandboxes {
        *by_status.entry(sandbox.status).or_default() += 1;
        let failed = [FleetSandboxStatus::Failed, FleetSandboxStatus::Error]
            .iter()
            .any(|s| *s as i32 == sandbox.status);
        if failed {
            *by_class.entry(sandbox.failure_class).or_default() += 1;
            *by_layer.entry(sandbox.layer).or_default() += 1;
        }
    }

    let mut create = Samples::default();
    let mut running = Samples::default();
    let mut ping = Samples::default();
    let mut ttfb = Samples::default();
    let mut git = Samples::default();
    let mut paths = FleetPathMix::default();
    for sandbox in &sandboxes {
        let who = sandbox_ref(sandbox);
        create.add(sandbox.create_time.as_ref(), &who);
        running.add(sandbox.time_to_running.as_ref(), &who);
        let Some(report) = &sandbox.report else {
            continue;
        };
        for check in &report.checks {
            let ok = check.status == CheckStatus::Pass as i32
                || check.status == CheckStatus::Warn as i32;
            match &check.evidence {
                Some(check_result::Evidence::Ping(evidence)) => {
                    match PingPath::try_from(evidence.path).unwrap_or(PingPath::Unspecified) {
                        PingPath::Direct if ok => paths.direct += 1,
                        PingPath::Derp if ok => paths.derp += 1,
                        PingPath::PeerRelay if ok => paths.peer_relay += 1,
                        _ => paths.none += 1,
                    }
                    if ok {
                        ping.add(evidence.latency.as_ref(), &who);
                    }
                }
                Some(check_result::Evidence::Http(evidence)) if evidence.status_code != 0 => {
                    ttfb.add(evidence.time_to_first_byte.as_ref(), &who);
                }
                Some(check_result::Evidence::Git(_)) if ok => {
                    git.add(check.duration.as_ref(), &who);
                }
                _ => {}
            }
        }
    }

    let slowest = sandboxes
        .iter()
        .filter_map(|s| Some((to_std_duration(s.wall_time.as_ref())?, s)))
        .max_by_key(|(wall, _)| *wall)
        .map(|(_, s)| sandbox_ref(s));

    let mut report = FleetReport {
        schema_version: REPORT_SCHEMA_VERSION,
        run_id: facts.run_id.clone(),
        backend: facts.backend.clone(),
        requested: facts.requested,
        parallel: facts.parallel,
        ok: false,
        interrupted: facts.interrupted,
        exit_code: 0,
        started_at: Some(timestamp(facts.started_at)),
        finished_at: Some(timestamp(finished_at)),
        wall_time: finished_at
            .duration_since(facts.started_at)
            .ok()
            .map(proto_duration),
        by_status: by_status
            .into_iter()
            .map(|(status, count)| FleetStatusCount { status, count })
            .collect(),
        by_failure_class: by_class
            .into_iter()
            .map(|(failure_class, count)| FleetFailureClassCount {
                failure_class,
                count,
            })
            .collect(),
        by_layer: by_layer
            .into_iter()
            .map(|(layer, count)| FleetLayerCount { layer, count })
            .collect(),
        create_time: Some(create.distribution()),
        time_to_running: Some(running.distribution()),
        ping_latency: Some(ping.distribution()),
        http_time_to_first_byte: Some(ttfb.distribution()),
        git_time: Some(git.distribution()),
        path_mix: Some(paths),
        slowest,
        sandboxes,
    };
    let exit = exit_status(&report);
    report.exit_code = u32::from(exit.code());
    report.ok = exit == ExitStatus::Passed;
    report
}

/// The exit status of a run of many sandboxes: interrupted (130) wins; then any sandbox whose
/// checks failed (1), since the tailnet path is what is checked; then any sandbox that had an
/// error and no report (3); 0 only when every sandbox passed.
pub fn exit_status(report: &FleetReport) -> ExitStatus {
    let count = |status: FleetSandboxStatus| {
        report
            .sandboxes
            .iter()
            .filter(|s| s.status == status as i32)
            .count()
    };
    if report.interrupted || count(FleetSandboxStatus::Interrupted) > 0 {
        ExitStatus::Interrupted
    } else if count(FleetSandboxStatus::Failed) > 0 {
        ExitStatus::CheckFailed
    } else if count(FleetSandboxStatus::Error) > 0 || report.sandboxes.is_empty() {
        ExitStatus::Infrastructure
    } else {
        ExitStatus::Passed
    }
}

fn sandbox_ref(sandbox: &FleetSandbox) -> FleetSandboxRef {
    FleetSandboxRef {
        slot: sandbox.slot,
        sandbox_id: sandbox.sandbox_id.clone(),
        hostname: sandbox.hostname.clone(),
        value: sandbox.wall_time,
    }
}

/// Durations and who measured them.
#[derive(Default)]
struct Samples(Vec<(Duration, FleetSandboxRef)>);

impl Samples {
    fn add(&mut self, value: Option<&pbjson_types::Duration>, who: &FleetSandboxRef) {
        if let Some(value) = to_std_duration(value) {
            self.0.push((value, who.clone()));
        }
    }

    fn distribution(mut self) -> FleetDistribution {
        self.0.sort_by_key(|(d, _)| *d);
        let values: Vec<Duration> = self.0.iter().map(|(d, _)| *d).collect();
        let Some((max, who)) = self.0.last() else {
            return FleetDistribution::default();
        };
        FleetDistribution {
            count: u32::try_from(values.len()).unwrap_or(u32::MAX),
            p50: percentile(&values, 50).map(proto_duration),
            p95: percentile(&values, 95).map(proto_duration),
            max: Some(proto_duration(*max)),
            max_sandbox: Some(FleetSandboxRef {
                value: Some(proto_duration(*max)),
                ..who.clone()
            }),
        }
    }
}

/// The nearest-rank percentile `p` (1 to 100) of sorted `values`.
pub fn percentile(values: &[Duration], p: usize) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let rank = (p * values.len()).div_ceil(100).max(1);
    values.get(rank - 1).copied()
}

/// Lower-case name of a sandbox's status, as the summary shows it.
pub fn status_name(status: i32) -> &'static str {
    match FleetSandboxStatus::try_from(status).unwrap_or(FleetSandboxStatus::Unspecified) {
        FleetSandboxStatus::Passed => "pass",
        FleetSandboxStatus::Failed => "FAIL",
        FleetSandboxStatus::Error => "ERROR",
        FleetSandboxStatus::Interrupted => "interrupted",
        FleetSandboxStatus::Unspecified => "?",
    }
}

/// `#3 sb-123 (modal-sb-123)`: how a sandbox is named to people.
pub fn sandbox_label(slot: u32, sandbox_id: &str, hostname: &str) -> String {
    let mut label = format!("#{slot}");
    if !sandbox_id.is_empty() {
        let _ = write!(label, " {sandbox_id}");
    }
    if !hostname.is_empty() && hostname != sandbox_id {
        let _ = write!(label, " ({hostname})");
    }
    label
}

/// One sandbox's outcome in a line: its verdict, or its error.
pub fn outcome_text(sandbox: &FleetSandbox) -> String {
    if let Some(verdict) = sandbox.report.as_ref().and_then(|r| r.verdict.as_ref()) {
        return redact_urls(&verdict.summary);
    }
    if !sandbox.error.is_empty() {
        return sandbox.error.clone();
    }
    "not finished: the run was interrupted".into()
}

/// The summary for people: a row per sandbox, the counts, the percentiles, the path mix, the
/// slowest sandbox, the verdict and the hints. With a `width` (a terminal), rows are cut to it.
pub fn summary(report: &FleetReport, width: Option<usize>) -> String {
    let headers = ["SANDBOX", "STATUS", "CREATE", "RUNNING", "WALL", "DETAIL"].map(str::to_owned);
    let time = |d: Option<&pbjson_types::Duration>| d.map_or_else(|| "-".into(), format_duration);
    let rows: Vec<[String; 6]> = report
        .sandboxes
        .iter()
        .map(|s| {
            [
                sandbox_label(s.slot, &s.sandbox_id, &s.hostname),
                status_name(s.status).to_owned(),
                time(s.create_time.as_ref()),
                time(s.time_to_running.as_ref()),
                time(s.wall_time.as_ref()),
                outcome_text(s),
            ]
        })
        .collect();
    let mut widths = headers.clone().map(|h| console::measure_text_width(&h));
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(console::measure_text_width(cell));
        }
    }
    let line = |cells: &[String; 6]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            text.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i].saturating_sub(console::measure_text_width(cell));
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        let text = text.trim_end().to_owned();
        match width {
            Some(limit) => cut(&text, limit) + "\n",
            None => text + "\n",
        }
    };
    let mut out = line(&headers);
    for row in &rows {
        out.push_str(&line(row));
    }

    let count = |status: FleetSandboxStatus| {
        report
            .by_status
            .iter()
            .find(|c| c.status == status as i32)
            .map_or(0, |c| c.count)
    };
    let _ = writeln!(
        out,
        "\nsandboxes: {} passed, {} failed, {} errors, {} interrupted (of {}; up to {} at once)",
        count(FleetSandboxStatus::Passed),
        count(FleetSandboxStatus::Failed),
        count(FleetSandboxStatus::Error),
        count(FleetSandboxStatus::Interrupted),
        report.requested,
        report.parallel
    );
    if !report.by_failure_class.is_empty() {
        let classes: Vec<String> = report
            .by_failure_class
            .iter()
            .map(|c| format!("{} {}", class_name(c.failure_class), c.count))
            .collect();
        let layers: Vec<String> = report
            .by_layer
            .iter()
            .map(|c| format!("{} {}", layer_name(c.layer), c.count))
            .collect();
        let _ = writeln!(
            out,
            "failures by class: {}; by layer: {}",
            classes.join(", "),
            layers.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\n{:<18}{:>8}{:>8}{:>8}{:>6}",
        "", "p50", "p95", "max", "n"
    );
    for (name, dist) in [
        ("create", &report.create_time),
        ("time to Running", &report.time_to_running),
        ("ping latency", &report.ping_latency),
        ("HTTP first byte", &report.http_time_to_first_byte),
        ("git", &report.git_time),
    ] {
        let dist = dist.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{name:<18}{:>8}{:>8}{:>8}{:>6}",
            time(dist.p50.as_ref()),
            time(dist.p95.as_ref()),
            time(dist.max.as_ref()),
            dist.count
        );
    }
    let paths = report.path_mix.unwrap_or_default();
    let _ = writeln!(
        out,
        "\npaths: {} direct, {} DERP, {} peer relay, {} none",
        paths.direct, paths.derp, paths.peer_relay, paths.none
    );
    if let Some(slowest) = &report.slowest {
        let _ = writeln!(
            out,
            "slowest: {} in {}",
            sandbox_label(slowest.slot, &slowest.sandbox_id, &slowest.hostname),
            time(slowest.value.as_ref())
        );
    }
    let total = report.sandboxes.len();
    let passed = count(FleetSandboxStatus::Passed);
    let _ = writeln!(
        out,
        "\n{}",
        if report.interrupted {
            format!("verdict: interrupted ({passed} of {total} sandboxes passed before the stop)")
        } else if report.ok {
            format!("verdict: ok ({passed} of {total} sandboxes passed)")
        } else {
            format!(
                "verdict: FAILED: {} of {total} sandboxes did not pass",
                total - passed as usize
            )
        }
    );
    for sandbox in &report.sandboxes {
        let label = sandbox_label(sandbox.slot, &sandbox.sandbox_id, "");
        let hint = sandbox
            .report
            .as_ref()
            .and_then(|r| r.verdict.as_ref())
            .map_or(sandbox.hint.as_str(), |v| v.hint.as_str());
        if !hint.is_empty() && sandbox.status != FleetSandboxStatus::Passed as i32 {
            let _ = writeln!(out, "hint ({label}): {}", redact_urls(hint));
        }
    }
    out
}

/// `peer_offline`, from `FAILURE_CLASS_PEER_OFFLINE`.
fn class_name(class: i32) -> String {
    FailureClass::try_from(class).map_or_else(
        |_| "unknown".into(),
        |c| {
            c.as_str_name()
                .trim_start_matches("FAILURE_CLASS_")
                .to_ascii_lowercase()
        },
    )
}

/// `peer_visible`, from `LAYER_PEER_VISIBLE`.
fn layer_name(layer: i32) -> String {
    Layer::try_from(layer).map_or_else(
        |_| "unknown".into(),
        |l| {
            l.as_str_name()
                .trim_start_matches("LAYER_")
                .to_ascii_lowercase()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailbox_proto::agent::v1::{CheckResult, PingEvidence, Verdict};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=20).map(ms).collect();
        assert_eq!(percentile(&values, 50), Some(ms(10)));
        assert_eq!(percentile(&values, 95), Some(ms(19)));
        assert_eq!(percentile(&values, 100), Some(ms(20)));
        assert_eq!(percentile(&[ms(7)], 95), Some(ms(7)));
        assert_eq!(percentile(&[], 50), None);
    }

    fn passed(slot: u32, wall: u64, path: PingPath, latency: u64) -> SlotRecord {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        SlotRecord {
            slot,
            sandbox_id: format!("sb-{slot}"),
            started_at: Some(start),
            finished_at: Some(start + ms(wall)),
            outcome: SlotOutcome::Report(Box::new(Report {
                verdict: Some(Verdict {
                    ok: true,
                    ..Default::default()
                }),
                checks: vec![CheckResult {
                    name: "ping".into(),
                    status: CheckStatus::Pass as i32,
                    evidence: Some(check_result::Evidence::Ping(PingEvidence {
                        latency: Some(proto_duration(ms(latency))),
                        path: path as i32,
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn facts(interrupted: bool) -> RunFacts {
        RunFacts {
            run_id: "run".into(),
            backend: "modal".into(),
            requested: 3,
            parallel: 3,
            started_at: SystemTime::now(),
            interrupted,
        }
    }

    #[test]
    fn mixed_outcomes_are_counted_and_a_failure_decides_the_exit_code() {
        let error = SlotRecord {
            slot: 3,
            outcome: SlotOutcome::Error {
                error: "Failed to create the Modal sandbox: unavailable".into(),
                hint: "Try again.".into(),
            },
            ..Default::default()
        };
        let mut records = vec![
            passed(1, 300, PingPath::Direct, 2),
            passed(2, 900, PingPath::Derp, 40),
            error,
        ];
        let report = aggregate(&facts(false), &records);
        assert!(!report.ok);
        assert_eq!(report.exit_code, 3, "an error and no failed check: 3");
        assert_eq!(report.by_layer.len(), 1);
        assert_eq!(report.by_layer[0].layer, Layer::Sandbox as i32);
        let paths = report.path_mix.unwrap();
        assert_eq!((paths.direct, paths.derp, paths.none), (1, 1, 0));
        let ping = report.ping_latency.clone().unwrap();
        assert_eq!(ping.count, 2);
        assert_eq!(ping.max, Some(proto_duration(ms(40))));
        assert_eq!(ping.max_sandbox.unwrap().sandbox_id, "sb-2");
        let slowest = report.slowest.clone().unwrap();
        assert_eq!(slowest.sandbox_id, "sb-2");
        let text = summary(&report, None);
        assert!(
            text.contains("verdict: FAILED: 1 of 3 sandboxes did not pass"),
            "{text}"
        );
        assert!(text.contains("hint (#3): Try again."), "{text}");

        // A failed check outranks an error.
        if let SlotOutcome::Report(report) = &mut records[1].outcome {
            report.verdict = Some(Verdict::default());
        }
        assert_eq!(aggregate(&facts(false), &records).exit_code, 1);
        // An interrupted run outranks everything.
        assert_eq!(aggregate(&facts(true), &records).exit_code, 130);
    }
}
