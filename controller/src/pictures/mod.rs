//! Pictures of finished runs: `--timeline` (a waterfall on the terminal) and `--report-html`
//! (one self-contained page). Both draw from the reports alone, so what they show is what the
//! report says.
//!
//! Phases run one after another in a sandbox, so each phase's start is the end of the one before
//! it; a sandbox's first agent phase starts at its report's `started_at`, and the controller's
//! phases before it (sandbox, upload) are laid before that. Sandboxes of a fan-out share one time
//! axis, from the earliest start, so waiting for a slot shows as a late start.

pub mod html;
pub mod timeline;

use std::time::Duration;

use tailbox_proto::agent::v1::{CheckStatus, FleetReport, Phase, Report, SandboxInfo, Verdict};

use crate::render::phase_name;

/// One phase of one sandbox, placed on the shared time axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Which phase.
    pub phase: Phase,
    /// Whether it passed.
    pub status: CheckStatus,
    /// Since the earliest start of any sandbox.
    pub start: Duration,
    /// How long it took.
    pub duration: Duration,
}

impl Segment {
    /// When it ended, on the shared axis.
    pub fn end(&self) -> Duration {
        self.start + self.duration
    }

    /// The phase's name, as the live lines print it.
    pub fn name(&self) -> &'static str {
        phase_name(self.phase)
    }
}

/// One sandbox's phases.
#[derive(Debug, Clone, PartialEq)]
pub struct Lane {
    /// The sandbox id (or the node's hostname when the report has no sandbox).
    pub label: String,
    /// Its phases in order.
    pub segments: Vec<Segment>,
}

/// The waterfall of every sandbox on one axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Waterfall {
    /// One lane per report, in the reports' order.
    pub lanes: Vec<Lane>,
    /// From the earliest start to the latest end.
    pub span: Duration,
}

/// Phases the controller runs before the agent starts.
fn before_agent(phase: Phase) -> bool {
    matches!(phase, Phase::Sandbox | Phase::Upload)
}

fn to_duration(d: Option<&pbjson_types::Duration>) -> Duration {
    d.map_or(Duration::ZERO, |d| {
        Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        )
    })
}

/// Nanoseconds since the epoch.
fn to_nanos(t: &pbjson_types::Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// Places every report's phases on one axis.
pub fn waterfall<'a>(reports: impl IntoIterator<Item = &'a Report>) -> Waterfall {
    // Each lane first relative to its own first agent phase, with its absolute start if known.
    let mut raw: Vec<(Lane, Option<i128>, Duration)> = Vec::new();
    for report in reports {
        let label = report
            .sandbox
            .as_ref()
            .map(|s| s.sandbox_id.clone())
            .filter(|id| !id.is_empty())
            .or_else(|| report.tailnet.as_ref().map(|t| t.hostname.clone()))
            .unwrap_or_else(|| "sandbox".to_owned());
        let lead: Duration = report
            .phases
            .iter()
            .filter(|p| before_agent(Phase::try_from(p.phase).unwrap_or(Phase::Unspecified)))
            .map(|p| to_duration(p.duration.as_ref()))
            .sum();
        let mut at = Duration::ZERO;
        let segments = report
            .phases
            .iter()
            .map(|p| {
                let duration = to_duration(p.duration.as_ref());
                let segment = Segment {
                    phase: Phase::try_from(p.phase).unwrap_or(Phase::Unspecified),
                    status: CheckStatus::try_from(p.status).unwrap_or(CheckStatus::Unspecified),
                    start: at,
                    duration,
                };
                at += duration;
                segment
            })
            .collect();
        let started = report.started_at.as_ref().map(to_nanos);
        raw.push((Lane { label, segments }, started, lead));
    }
    // The lane's zero (its first phase) on the absolute clock: started_at minus the lead.
    let zeros: Vec<Option<i128>> = raw
        .iter()
        .map(|(_, started, lead)| started.map(|s| s - lead.as_nanos() as i128))
        .collect();
    let origin = zeros.iter().flatten().min().copied();
    let mut lanes = Vec::new();
    let mut span = Duration::ZERO;
    for ((mut lane, _, _), zero) in raw.into_iter().zip(zeros) {
        let shift = match (zero, origin) {
            (Some(zero), Some(origin)) => {
                Duration::from_nanos(u64::try_from(zero - origin).unwrap_or(0))
            }
            _ => Duration::ZERO,
        };
        for segment in &mut lane.segments {
            segment.start += shift;
            span = span.max(segment.end());
        }
        lanes.push(lane);
    }
    Waterfall { lanes, span }
}

/// One report per sandbox of a fan-out, to draw: each with its sandbox named and the
/// controller's phases leading its own; a sandbox that ended without a report (its creation
/// failed, say) gets a stand-in holding its controller phases, and its error as the verdict.
pub fn fleet_reports(fleet: &FleetReport) -> Vec<Report> {
    fleet
        .sandboxes
        .iter()
        .map(|sandbox| {
            let label = name_of(&sandbox.sandbox_id, &sandbox.hostname, sandbox.slot);
            let mut report = sandbox.report.clone().unwrap_or_else(|| {
                let lead: Duration = sandbox
                    .controller_phases
                    .iter()
                    .map(|p| to_duration(p.duration.as_ref()))
                    .sum();
                Report {
                    verdict: Some(Verdict {
                        ok: false,
                        summary: sandbox.error.clone(),
                        hint: sandbox.hint.clone(),
                        first_failed_layer: sandbox.layer,
                        failure_class: sandbox.failure_class,
                        ..Default::default()
                    }),
                    // The agent would have started after the controller's phases.
                    started_at: sandbox.started_at.map(|t| {
                        let at = to_nanos(&t) + lead.as_nanos() as i128;
                        pbjson_types::Timestamp {
                            seconds: i64::try_from(at.div_euclid(1_000_000_000)).unwrap_or(0),
                            nanos: i32::try_from(at.rem_euclid(1_000_000_000)).unwrap_or(0),
                        }
                    }),
                    ..Default::default()
                }
            });
            let info = report.sandbox.get_or_insert_with(SandboxInfo::default);
            if info.sandbox_id.is_empty() {
                info.sandbox_id = label;
            }
            let has_controller_phases = report
                .phases
                .iter()
                .any(|p| before_agent(Phase::try_from(p.phase).unwrap_or(Phase::Unspecified)));
            if !has_controller_phases {
                report
                    .phases
                    .splice(0..0, sandbox.controller_phases.iter().cloned());
            }
            report
        })
        .collect()
}

/// What a fan-out's sandbox is called: its id, else its hostname, else its slot.
pub fn name_of(sandbox_id: &str, hostname: &str, slot: u32) -> String {
    [sandbox_id, hostname]
        .into_iter()
        .find(|s| !s.is_empty())
        .map_or_else(|| format!("sandbox {slot}"), str::to_owned)
}

/// Compact duration text (`850µs`, `12ms`, `3.4s`), as the results table writes it.
pub fn duration_text(d: Duration) -> String {
    crate::render::format_duration(&tailbox_proto::convert::duration(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailbox_proto::agent::v1::{PhaseTiming, SandboxInfo};

    pub(crate) fn report(id: &str, started_ms: i64, phases: &[(Phase, u64)]) -> Report {
        Report {
            sandbox: Some(SandboxInfo {
                sandbox_id: id.to_owned(),
                ..Default::default()
            }),
            started_at: Some(pbjson_types::Timestamp {
                seconds: 1_000 + started_ms / 1_000,
                nanos: i32::try_from((started_ms % 1_000) * 1_000_000).unwrap(),
            }),
            phases: phases
                .iter()
                .map(|(phase, ms)| PhaseTiming {
                    phase: *phase as i32,
                    status: CheckStatus::Pass as i32,
                    duration: Some(tailbox_proto::convert::duration(Duration::from_millis(*ms))),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn phases_follow_each_other_and_sandboxes_share_one_axis() {
        let first = report(
            "sb-1",
            100,
            &[
                (Phase::Sandbox, 100),
                (Phase::Preflight, 10),
                (Phase::Daemon, 50),
            ],
        );
        // Created 200 ms later (its agent started at 400 after a 200 ms create).
        let second = report(
            "sb-2",
            400,
            &[(Phase::Sandbox, 200), (Phase::Preflight, 20)],
        );
        let w = waterfall([&first, &second]);
        assert_eq!(w.lanes[0].label, "sb-1");
        let starts: Vec<u64> = w.lanes[0]
            .segments
            .iter()
            .map(|s| s.start.as_millis() as u64)
            .collect();
        assert_eq!(starts, [0, 100, 110]);
        assert_eq!(w.lanes[1].segments[0].start, Duration::from_millis(200));
        assert_eq!(w.lanes[1].segments[1].start, Duration::from_millis(400));
        assert_eq!(w.span, Duration::from_millis(420));
    }
}
