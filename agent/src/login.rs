//! Logging in through the LocalAPI, the way `tailscale up --authkey … --reset` does it, without the
//! CLI: the auth key goes only into the `start` body, never into any argv or environment.
//!
//! Sequence (tailscale.md §3): status → prefs → open the IPN bus *before* changing anything →
//! check-prefs → start {AuthKey, UpdatePrefs} → login-interactive when the node has no key yet →
//! read the bus until Running, an ErrMessage, or a BrowseToURL, under a deadline.

use std::time::{Duration, Instant};

use tailbox_proto::agent::v1::{FailureClass, Layer, LoginEvidence};

use crate::error_chain;
use crate::events::duration;
use crate::localapi::{LocalApi, LocalApiError, Notify, state};

/// IPN bus mask: NotifyInitialState, so the current state arrives first.
const BUS_MASK_INITIAL_STATE: u64 = 2;
/// How often to probe the control server while waiting.
const CONTROL_PROBE_EVERY: Duration = Duration::from_secs(4);

/// What to log in with.
#[derive(Clone)]
pub struct LoginParams {
    /// The auth key (secret).
    pub auth_key: String,
    /// Node hostname (already a valid DNS label).
    pub hostname: String,
    /// Control URL; `None` keeps tailscaled's default.
    pub control_url: Option<String>,
    /// Tags to advertise.
    pub advertise_tags: Vec<String>,
}

impl std::fmt::Debug for LoginParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginParams")
            .field("auth_key", &"****")
            .field("hostname", &self.hostname)
            .field("control_url", &self.control_url)
            .field("advertise_tags", &self.advertise_tags)
            .finish()
    }
}

/// A classified login failure.
#[derive(Debug, Clone)]
pub struct LoginFailure {
    /// Failure class.
    pub class: FailureClass,
    /// Layer that failed.
    pub layer: Layer,
    /// What happened.
    pub detail: String,
    /// What to do.
    pub hint: String,
}

/// Logs in and waits for Running.
pub async fn login(
    api: &LocalApi,
    params: &LoginParams,
    limit: Duration,
) -> Result<LoginEvidence, LoginFailure> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let status = api.status(false).await.map_err(daemon_failure)?;
    let mut prefs = api.prefs().await.map_err(daemon_failure)?;
    let mut bus = api
        .watch_ipn_bus(BUS_MASK_INITIAL_STATE)
        .await
        .map_err(daemon_failure)?;

    apply_prefs(&mut prefs, params);
    if let Some(complaint) = api.check_prefs(&prefs).await.map_err(daemon_failure)? {
        return Err(LoginFailure {
            class: FailureClass::InvalidInput,
            layer: Layer::Login,
            detail: format!("tailscaled rejected the login settings: {complaint}"),
            hint: "Check the hostname, control URL and tags.".into(),
        });
    }
    api.start(&params.auth_key, &prefs)
        .await
        .map_err(daemon_failure)?;
    if !status.have_node_key {
        api.login_interactive().await.map_err(daemon_failure)?;
    }
    let control_url = prefs
        .get("ControlURL")
        .and_then(|v| v.as_str())
        .unwrap_or("https://controlplane.tailscale.com")
        .to_owned();

    let mut last_state = 0;
    let mut probe = tokio::time::interval_at(
        tokio::time::Instant::now() + CONTROL_PROBE_EVERY,
        CONTROL_PROBE_EVERY,
    );
    let mut control_failures = 0;
    loop {
        tokio::select! {
            message = bus.next() => match message {
                Ok(Some(notify)) => {
                    if let Some(outcome) = judge(&notify) {
                        outcome?;
                        break;
                    }
                    if let Some(s) = notify.state {
                        last_state = s;
                    }
                }
                Ok(None) => return Err(LoginFailure {
                    class: FailureClass::DaemonFailed,
                    layer: Layer::Daemon,
                    detail: "tailscaled closed the IPN bus during login (did it exit?)".into(),
                    hint: "See tailscaled's log tail.".into(),
                }),
                Err(err) => return Err(daemon_failure(err)),
            },
            _ = probe.tick() => {
                // Plain network errors never reach the bus (control is retried silently), so
                // look for ourselves: two failed probes in a row mean control is unreachable.
                if let Some(why) = probe_control(&control_url).await {
                    control_failures += 1;
                    if control_failures >= 2 {
                        return Err(control_unreachable(&control_url, &why));
                    }
                } else {
                    control_failures = 0;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(timed_out(&control_url, last_state, limit).await);
            }
        }
    }

    let status = api.status(false).await.map_err(daemon_failure)?;
    Ok(LoginEvidence {
        backend_state: status.backend_state,
        self_ips: status.tailscale_ips.unwrap_or_default(),
        hostname: params.hostname.clone(),
        control_url: tailbox_proto::redact::redact_url(&control_url),
        time_to_running: Some(duration(started.elapsed())),
    })
}

/// Sets what `up --reset --accept-dns=false` would set, on top of the daemon's current prefs.
fn apply_prefs(prefs: &mut serde_json::Value, params: &LoginParams) {
    if !prefs.is_object() {
        *prefs = serde_json::json!({});
    }
    let Some(map) = prefs.as_object_mut() else {
        return;
    };
    // Persist is ignored by start and must not be echoed back with its (stripped) keys.
    map.remove("Config");
    if let Some(url) = &params.control_url {
        map.insert("ControlURL".into(), url.clone().into());
    }
    map.insert("WantRunning".into(), true.into());
    map.insert("LoggedOut".into(), false.into());
    map.insert("CorpDNS".into(), false.into());
    map.insert("RouteAll".into(), false.into());
    map.insert("Hostname".into(), params.hostname.clone().into());
    let tags: Vec<serde_json::Value> = params
        .advertise_tags
        .iter()
        .map(|t| {
            if t.starts_with("tag:") {
                t.clone()
            } else {
                format!("tag:{t}")
            }
            .into()
        })
        .collect();
    map.insert(
        "AdvertiseTags".into(),
        if tags.is_empty() {
            serde_json::Value::Null
        } else {
            tags.into()
        },
    );
}

/// Decides whether a bus message ends the wait: `Some(Ok)` for Running, `Some(Err)` for a failure.
fn judge(notify: &Notify) -> Option<Result<(), LoginFailure>> {
    if let Some(message) = notify.err_message.as_deref().filter(|m| !m.is_empty()) {
        return Some(Err(classify_err_message(message)));
    }
    if notify
        .browse_to_url
        .as_deref()
        .is_some_and(|u| !u.is_empty())
    {
        return Some(Err(LoginFailure {
            class: FailureClass::InteractiveLoginRequired,
            layer: Layer::Login,
            detail: "control asked for an interactive (browser) login, so the auth key was not accepted as a login".into(),
            hint: "Use a valid, pre-authorized auth key (tskey-auth-…); OAuth client secrets are not auth keys.".into(),
        }));
    }
    if notify.state == Some(state::RUNNING) {
        return Some(Ok(()));
    }
    None
}

/// Maps a backend ErrMessage (control's RegisterResponse.Error and friends) to a class.
pub fn classify_err_message(message: &str) -> LoginFailure {
    let lower = message.to_ascii_lowercase();
    if lower.contains("expired") {
        LoginFailure {
            class: FailureClass::AuthExpired,
            layer: Layer::Login,
            detail: format!("control refused the login: {message}"),
            hint: "Create a new auth key (ephemeral and pre-authorized) and set `TS_AUTHKEY`."
                .into(),
        }
    } else if lower.contains("key") || lower.contains("auth") {
        LoginFailure {
            class: FailureClass::AuthInvalid,
            layer: Layer::Login,
            detail: format!("control refused the login: {message}"),
            hint:
                "Check `TS_AUTHKEY`: it must be a valid auth key for this tailnet and control server."
                    .into(),
        }
    } else {
        LoginFailure {
            class: FailureClass::Internal,
            layer: Layer::Login,
            detail: format!("tailscaled reported an error during login: {message}"),
            hint: "See tailscaled's log tail; the message comes from tailscaled or control.".into(),
        }
    }
}

fn daemon_failure(err: LocalApiError) -> LoginFailure {
    LoginFailure {
        class: FailureClass::DaemonFailed,
        layer: Layer::Daemon,
        detail: format!("talking to tailscaled failed: {}", error_chain(&err)),
        hint: "See tailscaled's log tail.".into(),
    }
}

fn control_unreachable(control_url: &str, why: &str) -> LoginFailure {
    let shown = tailbox_proto::redact::redact_url(control_url);
    LoginFailure {
        class: FailureClass::ControlUnreachable,
        layer: Layer::Control,
        detail: format!("the control server {shown} cannot be reached: {why}"),
        hint: "Check the sandbox's egress to the control server (Modal `network_access` and CIDR allowlists block it silently), DNS, and the control URL.".into(),
    }
}

/// Classifies a login that ran out of time by where it got stuck.
async fn timed_out(control_url: &str, last_state: i32, limit: Duration) -> LoginFailure {
    if let Some(why) = probe_control(control_url).await {
        return control_unreachable(control_url, &why);
    }
    match last_state {
        state::STARTING => LoginFailure {
            class: FailureClass::DerpUnreachable,
            layer: Layer::Derp,
            detail: format!(
                "logged in, but no DERP relay or peer connection came up within {limit:?}"
            ),
            hint:
                "Outbound UDP 3478 and HTTPS to the DERP servers must be allowed from the sandbox."
                    .into(),
        },
        state::NEEDS_MACHINE_AUTH => LoginFailure {
            class: FailureClass::AuthInvalid,
            layer: Layer::Login,
            detail: "the node is waiting for an admin to approve it".into(),
            hint: "Use a pre-authorized auth key, or approve the machine in the admin console."
                .into(),
        },
        _ => LoginFailure {
            class: FailureClass::Deadline,
            layer: Layer::Login,
            detail: format!(
                "the node did not reach Running within {limit:?} although control answers"
            ),
            hint: "Raise `--login-timeout`, or run with `--verbose` to read tailscaled's log."
                .into(),
        },
    }
}

/// Tries a TCP connection to the control server; returns why it failed, if it did.
async fn probe_control(control_url: &str) -> Option<String> {
    let url = url::Url::parse(control_url).ok()?;
    let host = url.host_str()?.to_owned();
    let port = url.port_or_known_default()?;
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => None,
        Ok(Err(err)) => Some(err.to_string()),
        Err(_) => Some("no answer within 3s".into()),
    }
}

/// The default hostname: `modal-<first 8 characters of the sandbox id>`, as a valid DNS label.
pub fn default_hostname(sandbox_id: &str) -> String {
    let short: String = sandbox_id.chars().take(8).collect();
    if short.is_empty() {
        return format!("modal-{}", std::process::id());
    }
    sanitize_label(&format!("modal-{short}"))
}

/// Lower-cases, replaces anything but `[a-z0-9-]` with `-`, trims dashes and caps at 63 chars.
pub fn sanitize_label(name: &str) -> String {
    let mapped: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(63).collect();
    let trimmed = trimmed.trim_end_matches('-').to_owned();
    if trimmed.is_empty() {
        "tailbox".into()
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_dns_labels() {
        assert_eq!(default_hostname("sb-AbCdEf123456"), "modal-sb-abcde");
        assert_eq!(sanitize_label("__My Box!__"), "my-box");
        assert_eq!(sanitize_label(&"x".repeat(80)).len(), 63);
        assert_eq!(sanitize_label("---"), "tailbox");
        assert!(default_hostname("").starts_with("modal-"));
    }

    #[test]
    fn err_messages_are_classified() {
        assert_eq!(
            classify_err_message("invalid authkey").class,
            FailureClass::AuthInvalid
        );
        assert_eq!(
            classify_err_message("auth key expired").class,
            FailureClass::AuthExpired
        );
        assert_eq!(
            classify_err_message("tailnet requires logging to be enabled").class,
            FailureClass::Internal
        );
    }

    #[test]
    fn prefs_get_what_up_would_set_and_lose_persist() {
        let mut prefs = serde_json::json!({"ControlURL": "https://x", "Config": {"PrivateNodeKey": "k"}, "ShieldsUp": true});
        let params = LoginParams {
            auth_key: "k".into(),
            hostname: "box".into(),
            control_url: Some("http://127.0.0.1:9".into()),
            advertise_tags: vec!["ci".into(), "tag:x".into()],
        };
        apply_prefs(&mut prefs, &params);
        assert!(prefs.get("Config").is_none());
        assert_eq!(prefs["ControlURL"], "http://127.0.0.1:9");
        assert_eq!(prefs["WantRunning"], true);
        assert_eq!(prefs["CorpDNS"], false);
        assert_eq!(prefs["Hostname"], "box");
        assert_eq!(prefs["ShieldsUp"], true, "unrelated prefs survive");
        assert_eq!(
            prefs["AdvertiseTags"],
            serde_json::json!(["tag:ci", "tag:x"])
        );
        assert!(!format!("{params:?}").contains("auth_key: \"k\""));
    }
}
