//! The layered verdict: which layer broke first, and what to do about it.

use tailbox_proto::agent::v1::{CheckResult, CheckStatus, FailureClass, Layer, Verdict};

/// Builds the verdict from every check of a run.
///
/// Layers are ordered from the sandbox up to git; the lowest failed layer is the one to fix first,
/// because every layer above it depends on it.
pub fn verdict(checks: &[CheckResult]) -> Verdict {
    let first_failure = checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail as i32)
        .min_by_key(|c| c.layer);
    let Some(failed) = first_failure else {
        let passed = checks
            .iter()
            .filter(|c| c.status == CheckStatus::Pass as i32)
            .count();
        let warned = checks
            .iter()
            .filter(|c| c.status == CheckStatus::Warn as i32)
            .count();
        let skipped = checks
            .iter()
            .filter(|c| c.status == CheckStatus::Skip as i32)
            .count();
        return Verdict {
            ok: true,
            first_failed_layer: Layer::Unspecified as i32,
            failure_class: FailureClass::Unspecified as i32,
            summary: format!("{passed} passed, {warned} warned, {skipped} skipped"),
            hint: String::new(),
            interrupted: false,
        };
    };
    let layer = Layer::try_from(failed.layer).unwrap_or(Layer::Unspecified);
    let class = FailureClass::try_from(failed.failure_class).unwrap_or(FailureClass::Unspecified);
    let target = if failed.target.is_empty() {
        String::new()
    } else {
        format!(" ({})", failed.target)
    };
    Verdict {
        ok: false,
        first_failed_layer: failed.layer,
        failure_class: failed.failure_class,
        summary: format!(
            "{name}{target} failed at the {layer} layer: {class}",
            name = failed.name,
            layer = layer_name(layer),
            class = class_name(class),
        ),
        hint: failed.hint.clone(),
        interrupted: false,
    }
}

/// Marks `verdict` as interrupted when the run was stopped before it finished: such a run is
/// never ok, whatever the checks that finished say.
pub fn interrupted_if(mut verdict: Verdict, interrupted: bool) -> Verdict {
    if interrupted {
        verdict.interrupted = true;
        verdict.ok = false;
    }
    verdict
}

/// Short lower-case name of a layer, for summaries.
pub fn layer_name(layer: Layer) -> &'static str {
    match layer {
        Layer::Unspecified => "unknown",
        Layer::Sandbox => "sandbox",
        Layer::Daemon => "daemon",
        Layer::Login => "login",
        Layer::Control => "control",
        Layer::Derp => "DERP",
        Layer::PeerVisible => "peer-visible",
        Layer::Ping => "ping",
        Layer::Tcp => "TCP",
        Layer::Http => "HTTP",
        Layer::Git => "git",
    }
}

/// Short lower-case name of a failure class, for summaries.
pub fn class_name(class: FailureClass) -> &'static str {
    // The proto names minus the prefix, lower-cased: stable and greppable.
    match class {
        FailureClass::Unspecified => "unspecified",
        FailureClass::AuthInvalid => "auth_invalid",
        FailureClass::AuthExpired => "auth_expired",
        FailureClass::InteractiveLoginRequired => "interactive_login_required",
        FailureClass::ControlUnreachable => "control_unreachable",
        FailureClass::DerpUnreachable => "derp_unreachable",
        FailureClass::PeerNotInNetmap => "peer_not_in_netmap",
        FailureClass::PeerOffline => "peer_offline",
        FailureClass::PingNoReply => "ping_no_reply",
        FailureClass::SocksRefused => "socks_refused",
        FailureClass::SocksTimeout => "socks_timeout",
        FailureClass::DnsFailed => "dns_failed",
        FailureClass::TcpRefused => "tcp_refused",
        FailureClass::HttpStatus => "http_status",
        FailureClass::GitAuth => "git_auth",
        FailureClass::GitNotFound => "git_not_found",
        FailureClass::GitProtocol => "git_protocol",
        FailureClass::GitRefMismatch => "git_ref_mismatch",
        FailureClass::Deadline => "deadline",
        FailureClass::DaemonNotFound => "daemon_not_found",
        FailureClass::DaemonFailed => "daemon_failed",
        FailureClass::InvalidInput => "invalid_input",
        FailureClass::Internal => "internal",
        FailureClass::DaemonUnresponsive => "daemon_unresponsive",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, status: CheckStatus, layer: Layer, class: FailureClass) -> CheckResult {
        CheckResult {
            name: name.into(),
            status: status as i32,
            layer: layer as i32,
            failure_class: class as i32,
            hint: format!("fix {name}"),
            ..Default::default()
        }
    }

    #[test]
    fn lowest_failed_layer_wins_regardless_of_order() {
        let checks = vec![
            check(
                "git",
                CheckStatus::Fail,
                Layer::Git,
                FailureClass::GitNotFound,
            ),
            check(
                "ping",
                CheckStatus::Fail,
                Layer::Ping,
                FailureClass::PingNoReply,
            ),
            check(
                "preflight",
                CheckStatus::Pass,
                Layer::Sandbox,
                FailureClass::Unspecified,
            ),
        ];
        let v = verdict(&checks);
        assert!(!v.ok);
        assert_eq!(v.first_failed_layer, Layer::Ping as i32);
        assert_eq!(v.failure_class, FailureClass::PingNoReply as i32);
        assert_eq!(v.hint, "fix ping");
        assert!(v.summary.contains("ping_no_reply"), "{}", v.summary);
    }

    #[test]
    fn warnings_and_skips_do_not_fail() {
        let checks = vec![
            check(
                "ping",
                CheckStatus::Warn,
                Layer::Ping,
                FailureClass::Unspecified,
            ),
            check(
                "http",
                CheckStatus::Skip,
                Layer::Http,
                FailureClass::Unspecified,
            ),
        ];
        let v = verdict(&checks);
        assert!(v.ok);
        assert_eq!(v.summary, "0 passed, 1 warned, 1 skipped");
    }
}
