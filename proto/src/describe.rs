//! Contract values in words, for the people reading both binaries' output: a sidecar's status
//! (`tailbox-agent status` in the sandbox and `tailbox status` on the dev host print the same
//! text) and durations.

use std::fmt::Write as _;
use std::time::Duration;

use crate::agent::v1::{SidecarState, SidecarStatus};
use crate::convert::to_std_duration;

/// A duration in the unit people read fastest: µs, ms with one decimal, or s with one decimal.
pub fn humanize(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{}µs", d.as_micros())
    } else if d < Duration::from_secs(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The status for people, one fact per line.
pub fn human_status(s: &SidecarStatus) -> String {
    let mut text = String::new();
    let uptime = to_std_duration(s.uptime.as_ref()).unwrap_or_default();
    let lines = [
        ("state", state_name(s.state).to_owned()),
        ("backend state", or_none(&s.backend_state).to_owned()),
        (
            "hostname",
            if s.dns_name.is_empty() {
                or_none(&s.hostname).to_owned()
            } else {
                format!("{} ({})", or_none(&s.hostname), s.dns_name)
            },
        ),
        ("tailnet IPs", or_none(&s.tailnet_ips.join(", ")).to_owned()),
        ("proxy", or_none(&s.proxy_url).to_owned()),
        ("HTTP proxy", or_none(&s.http_proxy_url).to_owned()),
        (
            "tailscaled",
            format!(
                "{}, pid {}, {} restart(s)",
                or_none(&s.tailscale_version),
                s.tailscaled_pid,
                s.daemon_restarts
            ),
        ),
        ("health", or_none(&s.health.join("; ")).to_owned()),
        (
            "sidecar",
            format!(
                "pid {}, up {}, agent {} (sha256 {})",
                s.pid,
                humanize(uptime),
                s.agent_version,
                s.agent_sha256.get(..12).unwrap_or(&s.agent_sha256)
            ),
        ),
    ];
    for (name, value) in lines {
        let _ = writeln!(text, "{name:<14} {value}");
    }
    if !s.last_error.is_empty() {
        let _ = writeln!(text, "{:<14} {}", "last error", s.last_error);
    }
    text
}

/// `-` for an empty value, so columns of facts stay readable.
pub fn or_none(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// The state as a lowercase word.
pub fn state_name(state: i32) -> &'static str {
    match SidecarState::try_from(state).unwrap_or_default() {
        SidecarState::Unspecified => "unknown",
        SidecarState::Idle => "idle",
        SidecarState::Starting => "starting",
        SidecarState::Running => "running",
        SidecarState::Degraded => "degraded",
        SidecarState::Failed => "failed",
        SidecarState::Stopping => "stopping",
    }
}
