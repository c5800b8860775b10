//! `--timeline`: a waterfall of the phases on the terminal (stderr), after the run.
//!
//! One sandbox: a row per phase, each bar starting where the one before ended. Several: a row per
//! sandbox on one time axis, each phase drawn in its own colour (its own letter without colour),
//! with a legend.

use std::time::Duration;

use console::Style;
use tailbox_proto::agent::v1::{CheckStatus, Phase};

use super::{Lane, Waterfall, duration_text};

/// The narrowest the bars get, whatever the terminal's width.
const MIN_BARS: usize = 20;
/// The width used without a terminal.
const DEFAULT_WIDTH: usize = 100;

/// The waterfall as text for stderr, fitted to `width` columns (`None`: no terminal).
pub fn render(waterfall: &Waterfall, width: Option<usize>, colour: bool) -> String {
    let width = width.unwrap_or(DEFAULT_WIDTH);
    let mut out = String::new();
    if waterfall.lanes.is_empty() {
        return out;
    }
    let single = waterfall.lanes.len() == 1;
    let rows: Vec<Row<'_>> = if single {
        let lane = &waterfall.lanes[0];
        lane.segments
            .iter()
            .map(|s| Row {
                label: s.name().to_owned(),
                segments: std::slice::from_ref(s),
                tail: format!(
                    "{}{}",
                    duration_text(s.duration),
                    if s.status == CheckStatus::Fail {
                        " FAIL"
                    } else {
                        ""
                    }
                ),
                glyph_per_phase: false,
            })
            .collect()
    } else {
        waterfall
            .lanes
            .iter()
            .map(|lane| Row {
                label: lane.label.clone(),
                segments: &lane.segments,
                tail: lane_tail(lane),
                glyph_per_phase: true,
            })
            .collect()
    };
    let label_width = rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    let tail_width = rows
        .iter()
        .map(|r| r.tail.chars().count())
        .max()
        .unwrap_or(0);
    // "  label  bars  tail"
    let bars = width
        .saturating_sub(2 + label_width + 2 + 2 + tail_width)
        .max(MIN_BARS);

    let heading = if single {
        format!("timeline of {}", waterfall.lanes[0].label)
    } else {
        format!("timeline of {} sandboxes", waterfall.lanes.len())
    };
    out.push_str(&format!(
        "{heading}: {} from the first phase to the last\n",
        duration_text(waterfall.span)
    ));
    out.push_str(&format!(
        "  {:label_width$}  {}\n",
        "",
        axis(waterfall.span, bars)
    ));
    for row in &rows {
        let mut line = format!("  {:label_width$}  ", row.label);
        line.push_str(&bar_line(row, waterfall.span, bars, colour));
        line.push_str("  ");
        line.push_str(&row.tail);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if !single {
        out.push_str(&legend(&waterfall.lanes, colour));
    }
    out
}

/// One row of bars.
struct Row<'a> {
    label: String,
    segments: &'a [super::Segment],
    tail: String,
    /// Several phases on one row: tell them apart by colour or letter.
    glyph_per_phase: bool,
}

/// A lane's total and whether any phase failed.
fn lane_tail(lane: &Lane) -> String {
    let start = lane.segments.first().map_or(Duration::ZERO, |s| s.start);
    let end = lane
        .segments
        .last()
        .map_or(Duration::ZERO, super::Segment::end);
    let failed = lane
        .segments
        .iter()
        .find(|s| s.status == CheckStatus::Fail)
        .map(|s| format!(" FAIL in {}", s.name()))
        .unwrap_or_default();
    format!("{}{failed}", duration_text(end.saturating_sub(start)))
}

/// The cells `[from, to)` a segment covers: at least one, so a 40µs phase still shows.
fn cells(start: Duration, end: Duration, span: Duration, bars: usize) -> (usize, usize) {
    if span.is_zero() {
        return (0, 1);
    }
    let scale = |d: Duration| d.as_secs_f64() / span.as_secs_f64() * bars as f64;
    let from = (scale(start).floor() as usize).min(bars - 1);
    let to = (scale(end).ceil() as usize).clamp(from + 1, bars);
    (from, to)
}

fn bar_line(row: &Row<'_>, span: Duration, bars: usize, colour: bool) -> String {
    let mut cells_of: Vec<Option<(Phase, CheckStatus)>> = vec![None; bars];
    for segment in row.segments {
        let (from, to) = cells(segment.start, segment.end(), span, bars);
        for cell in &mut cells_of[from..to] {
            // A later phase sharing a cell with a tiny earlier one keeps the cell.
            *cell = Some((segment.phase, segment.status));
        }
    }
    let mut out = String::new();
    for cell in cells_of {
        match cell {
            None => out.push(' '),
            Some((phase, status)) => {
                let glyph = if row.glyph_per_phase && !colour {
                    letter(phase)
                } else {
                    '█'
                };
                if colour {
                    let style = if status == CheckStatus::Fail {
                        Style::new().red().force_styling(true)
                    } else {
                        phase_style(phase)
                    };
                    out.push_str(&style.apply_to(glyph).to_string());
                } else {
                    out.push(glyph);
                }
            }
        }
    }
    out
}

/// `0` at the left, the span at the right, its half in the middle.
fn axis(span: Duration, bars: usize) -> String {
    let left = "0".to_owned();
    let middle = duration_text(span / 2);
    let right = duration_text(span);
    let mut line: Vec<char> = vec![' '; bars];
    let mut put = |at: usize, text: &str| {
        for (i, c) in text.chars().enumerate() {
            if let Some(cell) = line.get_mut(at + i) {
                *cell = c;
            }
        }
    };
    put(0, &left);
    put(
        (bars / 2).saturating_sub(middle.chars().count() / 2),
        &middle,
    );
    put(bars.saturating_sub(right.chars().count()), &right);
    line.into_iter().collect::<String>().trim_end().to_owned()
}

fn legend(lanes: &[Lane], colour: bool) -> String {
    let mut seen: Vec<Phase> = Vec::new();
    for segment in lanes.iter().flat_map(|l| &l.segments) {
        if !seen.contains(&segment.phase) {
            seen.push(segment.phase);
        }
    }
    let items: Vec<String> = seen
        .iter()
        .map(|phase| {
            let name = crate::render::phase_name(*phase);
            if colour {
                format!("{} {name}", phase_style(*phase).apply_to('█'))
            } else {
                format!("{} {name}", letter(*phase))
            }
        })
        .collect();
    let failed = if colour {
        format!(
            "  {} failed",
            Style::new().red().force_styling(true).apply_to('█')
        )
    } else {
        String::new()
    };
    format!("  {}{failed}\n", items.join("  "))
}

/// The letter a phase is drawn with when there is no colour.
fn letter(phase: Phase) -> char {
    match phase {
        Phase::Sandbox => 's',
        Phase::Upload => 'u',
        Phase::Preflight => 'p',
        Phase::Daemon => 'd',
        Phase::Login => 'l',
        Phase::Checks => 'c',
        Phase::Teardown => 't',
        Phase::Cleanup => 'x',
        Phase::Unspecified => '?',
    }
}

fn phase_style(phase: Phase) -> Style {
    let style = match phase {
        Phase::Sandbox => Style::new().color256(67),
        Phase::Upload => Style::new().color256(107),
        Phase::Preflight => Style::new().color256(180),
        Phase::Daemon => Style::new().color256(73),
        Phase::Login => Style::new().color256(209),
        Phase::Checks => Style::new().color256(176),
        Phase::Teardown => Style::new().color256(247),
        Phase::Cleanup => Style::new().color256(221),
        Phase::Unspecified => Style::new(),
    };
    style.force_styling(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pictures::tests::report;
    use crate::pictures::waterfall;

    #[test]
    fn one_sandbox_gets_a_row_per_phase_each_starting_where_the_last_ended() {
        let r = report(
            "local-7",
            0,
            &[
                (Phase::Preflight, 10),
                (Phase::Daemon, 50),
                (Phase::Login, 40),
            ],
        );
        let text = render(&waterfall([&r]), Some(60), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "timeline of local-7: 100ms from the first phase to the last"
        );
        // (first, last) cell of each bar, in characters.
        let bars: Vec<(usize, usize)> = lines[2..5]
            .iter()
            .map(|l| {
                let cells: Vec<char> = l.chars().collect();
                let first = cells.iter().position(|c| *c == '█').unwrap();
                let last = cells.iter().rposition(|c| *c == '█').unwrap();
                (first, last)
            })
            .collect();
        // Each bar starts where the one before ended (sharing at most that cell), and the last
        // ends at the right edge of the bars.
        for pair in bars.windows(2) {
            assert!(
                pair[1].0 > pair[0].0 && pair[1].0 + 1 >= pair[0].1,
                "{text}"
            );
        }
        assert_eq!(bars[2].1 + 1, lines[1].chars().count(), "{text}");
        assert!(lines[4].ends_with("40ms"), "{text}");
        assert!(text.lines().all(|l| l.chars().count() <= 60), "{text}");
    }

    #[test]
    fn several_sandboxes_get_a_row_each_with_letters_and_a_legend() {
        let a = report("sb-a", 100, &[(Phase::Sandbox, 100), (Phase::Login, 100)]);
        let b = report("sb-b", 300, &[(Phase::Sandbox, 100), (Phase::Login, 100)]);
        let text = render(&waterfall([&a, &b]), Some(80), false);
        assert!(text.starts_with("timeline of 2 sandboxes: 400ms"), "{text}");
        let a_row = text.lines().find(|l| l.contains("sb-a")).unwrap();
        let b_row = text.lines().find(|l| l.contains("sb-b")).unwrap();
        // sb-b starts when sb-a's login begins: its first letter is further right.
        let bars = |row: &str| row["  sb-a  ".len()..].to_owned();
        assert!(bars(a_row).find('s').unwrap() < bars(b_row).find('s').unwrap());
        assert!(
            b_row.find('l').unwrap() > a_row.find('l').unwrap(),
            "{text}"
        );
        assert!(text.contains("s sandbox  l login"), "{text}");
    }
}
