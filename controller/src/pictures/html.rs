//! `--report-html FILE`: one self-contained page (inline CSS and SVG; no script, no network).
//!
//! It holds the waterfall of each sandbox's phases, a latency histogram per measure when several
//! sandboxes ran, the checks table with failures first, and every hint. Every text from a report
//! is escaped.

use std::fmt::Write as _;
use std::time::Duration;

use tailbox_proto::agent::v1::check_result::Evidence;
use tailbox_proto::agent::v1::{CheckResult, CheckStatus, FleetReport, Phase, Report};

use super::{Waterfall, duration_text, waterfall};
use crate::render::{phase_name, status_name};
use crate::secret::redact_urls;

/// Width of the drawings, in SVG user units (they scale to the page).
const SVG_WIDTH: f64 = 960.0;
/// Room for the row labels at the left of the waterfall.
const LABEL_WIDTH: f64 = 190.0;
/// Room for the durations at its right.
const TAIL_WIDTH: f64 = 90.0;
const ROW_HEIGHT: f64 = 22.0;
/// Each histogram's box: two side by side across the page.
const HISTOGRAM_WIDTH: f64 = 470.0;
const HISTOGRAM_HEIGHT: f64 = 170.0;
const HISTOGRAM_BINS: usize = 12;

const STYLE: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1000px;color:#1f2328;background:#fff;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.summary{color:#57606a;margin:0 0 8px}
.verdict{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;margin-right:6px}
.ok{background:#dafbe1;color:#116329}.failed{background:#ffebe9;color:#a40e26}.interrupted{background:#fff8c5;color:#7d4e00}
svg{width:100%;height:auto;display:block}
.histograms{display:grid;grid-template-columns:1fr 1fr;gap:8px 24px}
svg text{font:12px system-ui,sans-serif;fill:#1f2328}
svg .axis{stroke:#d0d7de}svg .muted{fill:#57606a}
svg rect.fail{stroke:#cf222e;stroke-width:2}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa}
td.status{font-weight:600}
tr.fail td.status{color:#cf222e}tr.warn td.status{color:#9a6700}tr.skip td.status{color:#57606a}tr.pass td.status{color:#1a7f37}
td.detail{word-break:break-word}
ul.hints li{margin:4px 0}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f6f8fa;padding:1px 4px;border-radius:4px}
";

/// The page for the reports of one run (one per sandbox).
pub fn render(reports: &[Report]) -> String {
    page(reports, None)
}

/// The page for a fan-out: its sandboxes' reports, with the aggregate's figures on top.
pub fn render_fleet(fleet: &FleetReport) -> String {
    page(&super::fleet_reports(fleet), Some(fleet))
}

fn page(reports: &[Report], fleet: Option<&FleetReport>) -> String {
    let mut page = String::new();
    let passed = reports
        .iter()
        .filter(|r| r.verdict.as_ref().is_some_and(|v| v.ok))
        .count();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>tailbox check: {passed} of {} sandbox(es) passed</title>\n<style>{STYLE}</style>\n</head>\n\
         <body data-sandboxes=\"{}\">\n",
        reports.len(),
        reports.len()
    );
    let _ = write!(
        page,
        "<h1>tailbox check</h1>\n<p class=\"summary\">{} sandbox(es): {passed} passed, {} did not.</p>\n",
        reports.len(),
        reports.len() - passed
    );
    if let Some(fleet) = fleet {
        page.push_str(&fleet_figures(fleet));
    }
    page.push_str(&verdicts(reports));

    let waterfall = waterfall(reports);
    page.push_str("<section id=\"waterfall\">\n<h2>Where the time went</h2>\n");
    page.push_str(&waterfall_svg(&waterfall));
    page.push_str(&legend(&waterfall));
    page.push_str("</section>\n");

    if reports.len() > 1 {
        page.push_str(
            "<section id=\"histograms\">\n<h2>Latency across sandboxes</h2>\n<div class=\"histograms\">\n",
        );
        for (metric, title, samples) in latencies(reports) {
            if !samples.is_empty() {
                page.push_str(&histogram_svg(metric, title, &samples));
            }
        }
        page.push_str("</div>\n</section>\n");
    }

    page.push_str(&checks_table(reports));
    page.push_str(&hints(reports));
    page.push_str("</body>\n</html>\n");
    page
}

/// Escapes text for HTML and SVG, in text and in quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn sandbox_label(report: &Report) -> String {
    report
        .sandbox
        .as_ref()
        .map(|s| s.sandbox_id.clone())
        .filter(|id| !id.is_empty())
        .or_else(|| report.tailnet.as_ref().map(|t| t.hostname.clone()))
        .unwrap_or_else(|| "sandbox".to_owned())
}

/// The aggregate's percentiles, path mix and slowest sandbox.
fn fleet_figures(fleet: &FleetReport) -> String {
    let mut out = String::from(
        "<section id=\"fleet\">\n<h2>Across sandboxes</h2>\n<table class=\"figures\">\n<thead><tr><th>Measure</th><th>Sandboxes</th><th>p50</th><th>p95</th><th>max</th><th>Slowest</th></tr></thead>\n<tbody>\n",
    );
    let text = |d: Option<&pbjson_types::Duration>| {
        d.map(crate::render::format_duration)
            .unwrap_or_else(|| "-".to_owned())
    };
    for (name, figure) in [
        ("sandbox create time", &fleet.create_time),
        ("time to Running", &fleet.time_to_running),
        ("ping latency", &fleet.ping_latency),
        ("HTTP time to first byte", &fleet.http_time_to_first_byte),
        ("git time", &fleet.git_time),
    ] {
        let Some(figure) = figure else { continue };
        let slowest = figure
            .max_sandbox
            .as_ref()
            .map(|s| super::name_of(&s.sandbox_id, &s.hostname, s.slot))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "<tr class=\"figure\"><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            figure.count,
            esc(&text(figure.p50.as_ref())),
            esc(&text(figure.p95.as_ref())),
            esc(&text(figure.max.as_ref())),
            esc(&slowest)
        );
    }
    out.push_str("</tbody>\n</table>\n");
    if let Some(mix) = &fleet.path_mix {
        let _ = writeln!(
            out,
            "<p class=\"summary\">Paths to the dev host: {} direct, {} over DERP, {} over a peer relay, {} without a ping.</p>",
            mix.direct, mix.derp, mix.peer_relay, mix.none
        );
    }
    if let Some(slowest) = &fleet.slowest {
        let name = super::name_of(&slowest.sandbox_id, &slowest.hostname, slowest.slot);
        let _ = writeln!(
            out,
            "<p class=\"summary\">Slowest sandbox: <code>{}</code> ({}).</p>",
            esc(&name),
            esc(&text(slowest.value.as_ref()))
        );
    }
    out.push_str("</section>\n");
    out
}

/// One line per sandbox: its verdict.
fn verdicts(reports: &[Report]) -> String {
    let mut out = String::from("<section id=\"verdicts\">\n");
    for report in reports {
        let (class, word, summary) = match &report.verdict {
            Some(v) if v.interrupted => ("interrupted", "interrupted", v.summary.as_str()),
            Some(v) if v.ok => ("ok", "ok", v.summary.as_str()),
            Some(v) => ("failed", "FAILED", v.summary.as_str()),
            None => ("failed", "no verdict", ""),
        };
        let _ = writeln!(
            out,
            "<p class=\"sandbox-verdict\" data-sandbox=\"{}\"><span class=\"verdict {class}\">{word}</span><code>{}</code> {}</p>",
            esc(&sandbox_label(report)),
            esc(&sandbox_label(report)),
            esc(&redact_urls(summary))
        );
    }
    out.push_str("</section>\n");
    out
}

/// The fill of a phase's bars.
fn phase_colour(phase: Phase) -> &'static str {
    match phase {
        Phase::Sandbox => "#5b7fa6",
        Phase::Upload => "#7fa650",
        Phase::Preflight => "#d2b48c",
        Phase::Daemon => "#4fa3a5",
        Phase::Login => "#e8845c",
        Phase::Checks => "#b573b5",
        Phase::Teardown => "#9e9e9e",
        Phase::Cleanup => "#e0b53c",
        Phase::Unspecified => "#cccccc",
    }
}

/// A row of the drawing: its label and the segments on it.
struct Row<'a> {
    label: String,
    sandbox: String,
    segments: Vec<&'a super::Segment>,
    tail: String,
}

fn waterfall_svg(waterfall: &Waterfall) -> String {
    // One sandbox: a row per phase. Several: a row per sandbox.
    let rows: Vec<Row<'_>> = if waterfall.lanes.len() == 1 {
        let lane = &waterfall.lanes[0];
        lane.segments
            .iter()
            .map(|s| Row {
                label: s.name().to_owned(),
                sandbox: lane.label.clone(),
                segments: vec![s],
                tail: duration_text(s.duration),
            })
            .collect()
    } else {
        waterfall
            .lanes
            .iter()
            .map(|lane| {
                let start = lane.segments.first().map_or(Duration::ZERO, |s| s.start);
                let end = lane
                    .segments
                    .last()
                    .map_or(Duration::ZERO, super::Segment::end);
                Row {
                    label: lane.label.clone(),
                    sandbox: lane.label.clone(),
                    segments: lane.segments.iter().collect(),
                    tail: duration_text(end.saturating_sub(start)),
                }
            })
            .collect()
    };
    let top = 24.0;
    let height = top + ROW_HEIGHT * rows.len() as f64 + 8.0;
    let bars = SVG_WIDTH - LABEL_WIDTH - TAIL_WIDTH;
    let span = waterfall.span.as_secs_f64().max(1e-9);
    let x_of = |d: Duration| LABEL_WIDTH + d.as_secs_f64() / span * bars;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg id=\"waterfall-svg\" viewBox=\"0 0 {SVG_WIDTH} {height}\" role=\"img\" aria-label=\"waterfall of the phases of {} sandbox(es)\" data-lanes=\"{}\">",
        waterfall.lanes.len(),
        waterfall.lanes.len()
    );
    // The time axis: five ticks.
    for i in 0..=4 {
        let at = waterfall.span.mul_f64(f64::from(i) / 4.0);
        let x = x_of(at);
        let anchor = match i {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = writeln!(
            svg,
            "<line class=\"axis\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"/><text class=\"muted\" x=\"{x:.1}\" y=\"14\" text-anchor=\"{anchor}\">{}</text>",
            top - 4.0,
            height - 4.0,
            if i == 0 {
                "0".to_owned()
            } else {
                esc(&duration_text(at))
            }
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let y = top + ROW_HEIGHT * i as f64;
        let _ = writeln!(
            svg,
            "<g class=\"lane\" data-sandbox=\"{}\"><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            esc(&row.sandbox),
            LABEL_WIDTH - 8.0,
            y + ROW_HEIGHT * 0.68,
            esc(&truncate(&row.label, 26))
        );
        for segment in &row.segments {
            let x = x_of(segment.start);
            let width = (x_of(segment.end()) - x).max(2.0);
            let failed = segment.status == CheckStatus::Fail;
            let _ = writeln!(
                svg,
                "<rect class=\"phase phase-{}{}\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{:.1}\" rx=\"2\" fill=\"{}\"><title>{}: {} {} ({})</title></rect>",
                segment.name(),
                if failed { " fail" } else { "" },
                y + 3.0,
                ROW_HEIGHT - 6.0,
                phase_colour(segment.phase),
                esc(&row.sandbox),
                segment.name(),
                esc(&duration_text(segment.duration)),
                status_name(segment.status as i32)
            );
        }
        let _ = writeln!(
            svg,
            "<text class=\"muted\" x=\"{:.1}\" y=\"{:.1}\">{}</text></g>",
            SVG_WIDTH - TAIL_WIDTH + 8.0,
            y + ROW_HEIGHT * 0.68,
            esc(&row.tail)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut out: String = text.chars().take(max - 1).collect();
        out.push('…');
        out
    }
}

fn legend(waterfall: &Waterfall) -> String {
    let mut seen: Vec<Phase> = Vec::new();
    for segment in waterfall.lanes.iter().flat_map(|l| &l.segments) {
        if !seen.contains(&segment.phase) {
            seen.push(segment.phase);
        }
    }
    let mut out = String::from("<p class=\"legend\">");
    for phase in seen {
        let _ = write!(
            out,
            "<span><i style=\"background:{}\"></i>{}</span>",
            phase_colour(phase),
            phase_name(phase)
        );
    }
    out.push_str("<span><i style=\"border:2px solid #cf222e\"></i>failed</span></p>\n");
    out
}

/// The measures drawn as histograms: (id, title, one sample per sandbox that has it).
fn latencies(reports: &[Report]) -> Vec<(&'static str, &'static str, Vec<Duration>)> {
    let from = |pick: &dyn Fn(&CheckResult) -> Option<Duration>| -> Vec<Duration> {
        reports
            .iter()
            .filter_map(|r| r.checks.iter().find_map(pick))
            .collect()
    };
    let as_duration = |d: Option<&pbjson_types::Duration>| super::to_duration(d);
    vec![
        (
            "sandbox_create",
            "Sandbox create time",
            reports
                .iter()
                .filter_map(|r| {
                    r.phases
                        .iter()
                        .find(|p| p.phase == Phase::Sandbox as i32)
                        .map(|p| as_duration(p.duration.as_ref()))
                })
                .collect(),
        ),
        (
            "time_to_running",
            "Login to Running",
            from(&|c| match &c.evidence {
                Some(Evidence::Login(e)) => Some(as_duration(e.time_to_running.as_ref())),
                _ => None,
            }),
        ),
        (
            "ping_latency",
            "Ping latency",
            from(&|c| match &c.evidence {
                Some(Evidence::Ping(e)) if c.status != CheckStatus::Fail as i32 => {
                    Some(as_duration(e.latency.as_ref()))
                }
                _ => None,
            }),
        ),
        (
            "http_ttfb",
            "HTTP time to first byte",
            from(&|c| match &c.evidence {
                Some(Evidence::Http(e)) if c.status != CheckStatus::Fail as i32 => {
                    Some(as_duration(e.time_to_first_byte.as_ref()))
                }
                _ => None,
            }),
        ),
        (
            "git_time",
            "git ref listing",
            from(&|c| {
                (c.name == "git" && c.status != CheckStatus::Fail as i32)
                    .then(|| as_duration(c.duration.as_ref()))
            }),
        ),
    ]
}

fn histogram_svg(metric: &str, title: &str, samples: &[Duration]) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    let bins = HISTOGRAM_BINS.min(samples.len().max(1));
    let width = max.saturating_sub(min).as_secs_f64();
    let mut counts = vec![0usize; bins];
    for sample in samples {
        let at = if width > 0.0 {
            ((sample.saturating_sub(min).as_secs_f64() / width) * bins as f64) as usize
        } else {
            0
        };
        counts[at.min(bins - 1)] += 1;
    }
    let most = counts.iter().max().copied().unwrap_or(1).max(1);
    let left = 12.0;
    let plot_width = HISTOGRAM_WIDTH - 2.0 * left;
    // Room above the bars for the title and the tallest bar's count, below for the axis.
    let plot_height = HISTOGRAM_HEIGHT - 64.0;
    let base = 42.0 + plot_height;
    let bar_width = plot_width / bins as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg class=\"histogram\" viewBox=\"0 0 {HISTOGRAM_WIDTH} {HISTOGRAM_HEIGHT}\" role=\"img\" aria-label=\"{}\" data-metric=\"{metric}\" data-samples=\"{}\">\n<text x=\"{left}\" y=\"16\" font-weight=\"600\">{} ({} sandboxes)</text>",
        esc(title),
        samples.len(),
        esc(title),
        samples.len()
    );
    for (i, count) in counts.iter().enumerate() {
        let h = plot_height * (*count as f64) / (most as f64);
        let x = left + bar_width * i as f64;
        let from = min + Duration::from_secs_f64(width * i as f64 / bins as f64);
        let to = min + Duration::from_secs_f64(width * (i + 1) as f64 / bins as f64);
        let _ = writeln!(
            svg,
            "<rect class=\"bin\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#4f7fbf\"><title>{count} in {}–{}</title></rect>",
            x + 1.0,
            base - h,
            (bar_width - 2.0).max(1.0),
            esc(&duration_text(from)),
            esc(&duration_text(to))
        );
        if *count > 0 {
            let _ = writeln!(
                svg,
                "<text class=\"muted\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{count}</text>",
                x + bar_width / 2.0,
                base - h - 4.0
            );
        }
    }
    let _ = writeln!(
        svg,
        "<line class=\"axis\" x1=\"{left}\" y1=\"{base}\" x2=\"{:.1}\" y2=\"{base}\"/><text class=\"muted\" x=\"{left}\" y=\"{:.1}\">{}</text><text class=\"muted\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n</svg>",
        left + plot_width,
        base + 16.0,
        esc(&duration_text(min)),
        left + plot_width,
        base + 16.0,
        esc(&duration_text(max))
    );
    svg
}

/// Failures first, then warnings, skips and passes; within each, in the reports' order.
fn status_rank(status: i32) -> u8 {
    match CheckStatus::try_from(status).unwrap_or(CheckStatus::Unspecified) {
        CheckStatus::Fail => 0,
        CheckStatus::Warn => 1,
        CheckStatus::Unspecified => 2,
        CheckStatus::Skip => 3,
        CheckStatus::Pass => 4,
    }
}

fn checks_table(reports: &[Report]) -> String {
    let mut rows: Vec<(&Report, &CheckResult)> = reports
        .iter()
        .flat_map(|r| r.checks.iter().map(move |c| (r, c)))
        .collect();
    rows.sort_by_key(|(_, c)| status_rank(c.status));
    let several = reports.len() > 1;
    let mut out = String::from("<section id=\"checks\">\n<h2>Checks</h2>\n<table>\n<thead><tr>");
    if several {
        out.push_str("<th>Sandbox</th>");
    }
    out.push_str("<th>Check</th><th>Target</th><th>Status</th><th>Class</th><th>Layer</th><th>Time</th><th>Detail</th></tr></thead>\n<tbody>\n");
    for (report, check) in rows {
        let status = status_name(check.status);
        let _ = write!(
            out,
            "<tr class=\"check {}\" data-sandbox=\"{}\">",
            status.to_ascii_lowercase(),
            esc(&sandbox_label(report))
        );
        if several {
            let _ = write!(out, "<td><code>{}</code></td>", esc(&sandbox_label(report)));
        }
        let class = if check.status == CheckStatus::Fail as i32 {
            failure_class_name(check.failure_class)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "<td>{}</td><td>{}</td><td class=\"status\">{status}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"detail\">{}</td></tr>",
            esc(&check.name),
            esc(&redact_urls(&check.target)),
            esc(&class),
            esc(&layer_name(check.layer)),
            esc(&check
                .duration
                .as_ref()
                .map(crate::render::format_duration)
                .unwrap_or_default()),
            esc(&redact_urls(&check.detail))
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
    out
}

/// `FAILURE_CLASS_PEER_OFFLINE` → `peer_offline`, as the README names the classes.
fn failure_class_name(value: i32) -> String {
    tailbox_proto::agent::v1::FailureClass::try_from(value)
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("FAILURE_CLASS_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn layer_name(value: i32) -> String {
    tailbox_proto::agent::v1::Layer::try_from(value)
        .map(|l| {
            l.as_str_name()
                .trim_start_matches("LAYER_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// Every hint: each verdict's, then each failed or warned check's, once each.
fn hints(reports: &[Report]) -> String {
    let mut items: Vec<(String, String)> = Vec::new();
    for report in reports {
        let sandbox = sandbox_label(report);
        if let Some(verdict) = &report.verdict
            && !verdict.hint.is_empty()
        {
            items.push((format!("{sandbox}: verdict"), verdict.hint.clone()));
        }
        for check in &report.checks {
            let noted = check.status == CheckStatus::Fail as i32
                || check.status == CheckStatus::Warn as i32;
            if noted && !check.hint.is_empty() {
                let target = if check.target.is_empty() {
                    String::new()
                } else {
                    format!(" {}", redact_urls(&check.target))
                };
                items.push((
                    format!("{sandbox}: {}{target}", check.name),
                    check.hint.clone(),
                ));
            }
        }
    }
    let mut out = String::from("<section id=\"hints\">\n<h2>Hints</h2>\n");
    if items.is_empty() {
        out.push_str("<p class=\"summary\">Nothing to fix: no check failed or warned.</p>\n");
    } else {
        out.push_str("<ul class=\"hints\">\n");
        let mut shown: Vec<&str> = Vec::new();
        for (about, hint) in &items {
            if shown.contains(&hint.as_str()) && reports.len() > 1 {
                continue;
            }
            shown.push(hint);
            let _ = writeln!(
                out,
                "<li class=\"hint\"><code>{}</code> {}</li>",
                esc(about),
                esc(hint)
            );
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</section>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pictures::tests::report;
    use tailbox_proto::agent::v1::{CheckResult, Verdict};

    #[test]
    fn everything_from_the_report_is_escaped() {
        let mut r = report("<sb&\"1'>", 0, &[(Phase::Login, 10)]);
        r.checks.push(CheckResult {
            name: "http".into(),
            target: "http://x/<script>alert(1)</script>".into(),
            status: CheckStatus::Fail as i32,
            detail: "<img src=x onerror=alert(1)>".into(),
            hint: "Fix <b>it</b> & retry.".into(),
            ..Default::default()
        });
        r.verdict = Some(Verdict {
            summary: "</p><script>".into(),
            ..Default::default()
        });
        let page = render(&[r]);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<b>it"), "{page}");
        assert!(page.contains("&lt;sb&amp;&quot;1&#39;&gt;"), "{page}");
        assert!(
            page.contains("Fix &lt;b&gt;it&lt;/b&gt; &amp; retry."),
            "{page}"
        );
    }

    #[test]
    fn failures_come_first_and_nothing_is_fetched() {
        let mut r = report("sb-1", 0, &[(Phase::Checks, 10)]);
        for (name, status) in [
            ("ping", CheckStatus::Pass),
            ("git", CheckStatus::Fail),
            ("http", CheckStatus::Warn),
        ] {
            r.checks.push(CheckResult {
                name: name.into(),
                status: status as i32,
                ..Default::default()
            });
        }
        let page = render(&[r.clone(), r]);
        let git = page.find("<td>git</td>").unwrap();
        let http = page.find("<td>http</td>").unwrap();
        let ping = page.find("<td>ping</td>").unwrap();
        assert!(git < http && http < ping);
        for external in ["src=", "href=", "@import", "url("] {
            assert!(!page.contains(external), "{external} in {page}");
        }
        assert!(page.contains("<section id=\"histograms\">"));
    }

    #[test]
    fn a_fan_out_page_shows_every_sandbox_even_one_without_a_report() {
        use tailbox_proto::agent::v1::{FleetDistribution, FleetSandbox, FleetSandboxRef};
        let passed = report("sb-ok", 300, &[(Phase::Preflight, 10), (Phase::Login, 30)]);
        let fleet = FleetReport {
            sandboxes: vec![
                FleetSandbox {
                    slot: 1,
                    sandbox_id: "sb-ok".into(),
                    report: Some(passed),
                    controller_phases: vec![tailbox_proto::agent::v1::PhaseTiming {
                        phase: Phase::Sandbox as i32,
                        status: CheckStatus::Pass as i32,
                        duration: Some(tailbox_proto::convert::duration(Duration::from_millis(
                            100,
                        ))),
                    }],
                    ..Default::default()
                },
                FleetSandbox {
                    slot: 2,
                    error: "Failed to create the <sandbox>".into(),
                    hint: "Raise `--timeout`.".into(),
                    ..Default::default()
                },
            ],
            time_to_running: Some(FleetDistribution {
                count: 1,
                p50: Some(tailbox_proto::convert::duration(Duration::from_millis(30))),
                max_sandbox: Some(FleetSandboxRef {
                    slot: 1,
                    sandbox_id: "sb-ok".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let page = render_fleet(&fleet);
        assert!(page.contains("data-sandboxes=\"2\""), "{page}");
        assert_eq!(page.matches("<g class=\"lane\"").count(), 2, "{page}");
        // The controller's phase leads the report's own.
        assert!(page.contains("phase-sandbox"), "{page}");
        assert!(
            page.contains("Failed to create the &lt;sandbox&gt;"),
            "{page}"
        );
        assert!(page.contains("sandbox 2"), "{page}");
        assert!(page.contains("Raise `--timeout`."), "{page}");
        assert!(
            page.contains("<td>time to Running</td><td>1</td><td>30ms</td>"),
            "{page}"
        );
    }
}
