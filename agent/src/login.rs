//! Logging in through the LocalAPI, the way `tailscale up --authkey … --reset` does it, without the
//! CLI: the auth key goes only into the `start` body, never into any argv or environment.
//!
//! Sequence (tailscale.md §3): status → prefs → open the IPN bus *before* changing anything →
//! check-prefs → start {AuthKey, UpdatePrefs} → login-interactive when the node has no key yet →
//! read the bus until Running, an ErrMessage, or a BrowseToURL, under a deadline → then, briefly,
//! until control knows the node's home DERP region.
//!
//! Why the last step: a node is Running before control has its home DERP region, and until the
//! peers' netmaps carry it, a peer has no way to answer this node except a direct path it has
//! confirmed itself. A disco ping can give this node a direct path first; its first WireGuard
//! handshake then goes direct, the peer cannot send the response ("no UDP or DERP addr"), and
//! WireGuard tries again only after 5 s (docs/benchmarks.md, "A lost first handshake").

use std::time::{Duration, Instant};

use tailbox_proto::agent::v1::{FailureClass, Layer, LoginEvidence};

use crate::error_chain;
use crate::events::duration;
use crate::localapi::{BusWatcher, LocalApi, LocalApiError, Notify, state};

/// IPN bus mask: NotifyInitialState, so the current state arrives first.
const BUS_MASK_INITIAL_STATE: u64 = 2;
/// How long a Running node waits for control to know its home DERP region (on the lab: 2–30 ms
/// after Running). Past it, login goes on: the region is a safeguard, not a condition.
const HOME_DERP_WAIT: Duration = Duration::from_secs(2);
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
    let mut home_derp = None;
    loop {
        tokio::select! {
            message = bus.next() => match message {
                Ok(Some(notify)) => {
                    home_derp = home_derp.or_else(|| home_derp_of(&notify));
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

    let time_to_running = started.elapsed();
    let home_derp = match home_derp {
        Some(region) => Some(region),
        None => await_home_derp(&mut bus, deadline).await,
    };

    let status = api.status(false).await.map_err(daemon_failure)?;
    Ok(LoginEvidence {
        backend_state: status.backend_state,
        self_ips: status.tailscale_ips.unwrap_or_default(),
        hostname: params.hostname.clone(),
        control_url: tailbox_proto::redact::redact_url(&control_url),
        time_to_running: Some(duration(time_to_running)),
        home_derp_region: home_derp.unwrap_or_default(),
    })
}

/// The home DERP region control gives this node in a bus message, if it carries one.
fn home_derp_of(notify: &Notify) -> Option<i32> {
    notify.self_change.as_ref()?.home_derp_region()
}

/// Reads the bus of a node that just reached Running until control's netmap gives the node a home
/// DERP region, for at most [`HOME_DERP_WAIT`] and not past login's `deadline`. `None` when it
/// did not: login goes on regardless.
async fn await_home_derp(bus: &mut BusWatcher, deadline: tokio::time::Instant) -> Option<i32> {
    let started = Instant::now();
    let limit = HOME_DERP_WAIT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    let wait = async {
        loop {
            match bus.next().await {
                Ok(Some(notify)) => {
                    if let Some(region) = home_derp_of(&notify) {
                        return Ok(region);
                    }
                }
                Ok(None) => return Err("tailscaled closed the IPN bus".to_owned()),
                Err(err) => return Err(error_chain(&err)),
            }
        }
    };
    let outcome = tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| Err(format!("no netmap gave one within {limit:?}")));
    let waited = started.elapsed();
    match outcome {
        Ok(region) => {
            tracing::info!(
                region,
                ?waited,
                "control knows this node's home DERP region"
            );
            Some(region)
        }
        Err(why) => {
            tracing::warn!(
                ?waited,
                "control has no home DERP region for this node yet ({why}); a peer may not \
                 answer this node's first WireGuard handshake until it has"
            );
            None
        }
    }
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

    /// A tailscaled LocalAPI that logs any node in at once and whose IPN bus sends `bus` (one
    /// JSON message per line) and then stays open, as tailscaled's does. Only what login asks.
    fn fake_localapi(dir: &std::path::Path, bus: &'static [&'static str]) -> LocalApi {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = dir.join("ts.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let answer = |status: &str, body: &str| {
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let reply = if head.contains("/status") {
                        answer(
                            "200 OK",
                            r#"{"BackendState":"NeedsLogin","HaveNodeKey":true}"#,
                        )
                    } else if head.contains("prefs") {
                        // GET prefs and POST check-prefs: no prefs, no complaint.
                        answer("200 OK", "{}")
                    } else if head.contains("/start") {
                        answer("204 No Content", "")
                    } else if head.contains("/watch-ipn-bus") {
                        let mut stream =
                            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned();
                        for message in bus {
                            let line = format!("{message}\n");
                            stream += &format!("{:x}\r\n{line}\r\n", line.len());
                        }
                        let _ = conn.write_all(stream.as_bytes()).await;
                        // The bus stays open, as tailscaled's does while nothing happens.
                        let _ = conn.read(&mut byte).await;
                        return;
                    } else {
                        answer("404 Not Found", "")
                    };
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        LocalApi::new(&socket)
    }

    fn params() -> LoginParams {
        LoginParams {
            auth_key: "tskey-auth-test".into(),
            hostname: "node".into(),
            control_url: Some("http://127.0.0.1:9".into()),
            advertise_tags: Vec::new(),
        }
    }

    #[tokio::test]
    async fn login_waits_past_running_until_control_gives_the_home_derp_region() {
        let dir = tempfile::tempdir().unwrap();
        let api = fake_localapi(
            dir.path(),
            &[
                r#"{"State":5}"#,
                r#"{"State":6}"#,
                r#"{"SelfChange":{"Name":"node."}}"#,
                r#"{"SelfChange":{"Name":"node.","HomeDERP":4}}"#,
            ],
        );
        let evidence = login(&api, &params(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(evidence.home_derp_region, 4);
    }

    #[tokio::test]
    async fn a_home_derp_region_given_before_running_ends_the_wait_at_running() {
        let dir = tempfile::tempdir().unwrap();
        let api = fake_localapi(
            dir.path(),
            &[
                r#"{"SelfChange":{"DERP":"127.3.3.40:2"}}"#,
                r#"{"State":6}"#,
                r#"{"SelfChange":{"HomeDERP":9}}"#,
            ],
        );
        let evidence = login(&api, &params(), Duration::from_secs(10))
            .await
            .unwrap();
        // Region 9 came after Running: login did not read on for it.
        assert_eq!(evidence.home_derp_region, 2);
    }

    #[tokio::test]
    async fn login_goes_on_without_a_home_derp_region_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let api = fake_localapi(dir.path(), &[r#"{"State":6}"#]);
        let evidence = login(&api, &params(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(evidence.home_derp_region, 0, "0: control gave none");
    }

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
