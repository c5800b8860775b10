//! The sidecar's commands for people and scripts in the sandbox: `sidecar` (the starter),
//! `attach`, `status`, `env` and `down`. Data goes to stdout through [`crate::output`]; notes,
//! warnings and errors go to stderr in the voice of STYLE.md. Exit codes: [`sidecar::exit`].

use std::fmt::Write as _;
use std::time::Duration;

use tailbox_proto::agent::v1::{
    DownRequest, EnvRequest, SidecarState, SidecarStatus, StatusRequest, WatchRequest, watch_event,
};

use crate::events::duration;
use crate::output;
use crate::sidecar::client::{self, Clients, ConnectError};
use crate::sidecar::start::{self, Serving, StartError, StartOptions};
use crate::sidecar::{StateDir, exit};
use crate::stdio::{self, Wire};
use tailbox_proto::describe::{human_status, humanize, or_none, state_name};

/// How long `down` waits for the sidecar process to exit after the node is down.
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// How often `status --wait` tries again to reach a sidecar that does not answer yet.
const RETRY: Duration = Duration::from_millis(100);
/// How long `status` and `env` wait for an answer; a sidecar that takes longer is hung.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed command, rendered as `error:`, `Caused by:` lines, context, and `hint:`.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: String,
    causes: Vec<String>,
    context: Vec<String>,
    hint: Option<String>,
}

impl Failure {
    /// A failure whose `error:` line is `err` and whose causes are its sources.
    pub fn new(code: u8, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut causes = Vec::new();
        let mut source = err.source();
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        Self {
            code,
            error: err.to_string(),
            causes,
            context: Vec::new(),
            hint: None,
        }
    }

    /// A failure with a plain `error:` line and one cause.
    pub fn plain(code: u8, error: impl Into<String>, cause: impl Into<String>) -> Self {
        Self {
            code,
            error: error.into(),
            causes: vec![cause.into()],
            context: Vec::new(),
            hint: None,
        }
    }

    /// Adds the `hint:` line.
    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds indented context after the causes (a log tail).
    #[must_use]
    pub fn context(mut self, lines: &[String]) -> Self {
        self.context.extend(lines.iter().cloned());
        self
    }

    /// Writes the failure to stderr and returns its exit code.
    pub fn report(&self) -> u8 {
        let mut text = format!("error: {}\n", self.error);
        for cause in &self.causes {
            let _ = writeln!(text, "  Caused by: {cause}");
        }
        for line in &self.context {
            let _ = writeln!(text, "    {line}");
        }
        if let Some(hint) = &self.hint {
            let _ = writeln!(text, "hint: {hint}");
        }
        eprint!("{text}");
        self.code
    }
}

/// A note for people on stderr (a lowercase fragment).
fn note(text: &str) {
    eprintln!("{text}");
}

/// The failure for "no sidecar answers".
fn no_sidecar(state_dir: &StateDir, err: &ConnectError) -> Failure {
    let mut failure = Failure::new(exit::NO_SIDECAR, err);
    failure.error = format!("No sidecar is running in {}", state_dir.dir().display());
    failure.causes.insert(0, err.to_string());
    failure.hint(
        "Start one with `tailbox-agent sidecar`, or pass the `--state-dir` it was started with.",
    )
}

async fn connect(state_dir: &StateDir) -> Result<Clients, Failure> {
    client::connect(&state_dir.socket())
        .await
        .map_err(|err| no_sidecar(state_dir, &err))
}

/// Waits up to `limit` for a call to the sidecar. A refusal becomes a failure with the
/// sidecar's message as its cause (`hint` may add a hint for it); no answer is a failure that
/// names the sidecar's log.
async fn answer<T>(
    state_dir: &StateDir,
    what: &str,
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    hint: impl FnOnce(&tonic::Status) -> Option<&'static str>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => {
            let failure = Failure::plain(exit::FAILED, what, status.message().to_owned());
            Err(match hint(&status) {
                Some(hint) => failure.hint(hint),
                None => failure,
            })
        }
        Err(_) => Err(Failure::plain(
            exit::FAILED,
            what,
            format!("the sidecar did not answer within {}", humanize(limit)),
        )
        .hint(format!(
            "See the sidecar's log, {}.",
            state_dir.log().display()
        ))),
    }
}

fn no_hint(_: &tonic::Status) -> Option<&'static str> {
    None
}

/// `tailbox-agent sidecar`: start (or reuse) the sidecar and return once it serves.
pub async fn sidecar(options: &StartOptions) -> Result<u8, Failure> {
    let socket = options.state_dir.socket();
    match start::start(options).await {
        Ok(Serving::Started { pid }) => {
            note(&format!(
                "sidecar pid {pid} serving on {}",
                socket.display()
            ));
            Ok(exit::OK)
        }
        Ok(Serving::Reused { pid }) => {
            note(&format!(
                "sidecar pid {pid} already serving on {} (same binary)",
                socket.display()
            ));
            Ok(exit::OK)
        }
        Err(err) => {
            let failure = Failure::new(err.exit_code(), &err).context(err.log_tail());
            Err(match err {
                StartError::OtherVersion { .. } => failure.hint(
                    "Run `tailbox-agent sidecar --replace` to take it down (its node logs out) and start this one, or use a binary of its version.",
                ),
                StartError::Exited { .. } | StartError::Timeout { .. } => failure.hint(format!(
                    "See the sidecar's log, {}.",
                    options.state_dir.log().display()
                )),
                _ => failure,
            })
        }
    }
}

/// `tailbox-agent status`: print the status; 0 when Running. With `wait`, wait up to that long
/// for Running (and for a sidecar to answer at all).
pub async fn status(
    state_dir: &StateDir,
    json: bool,
    wait: Option<Duration>,
) -> Result<u8, Failure> {
    let Some(wait) = wait else {
        let mut clients = connect(state_dir).await?;
        let status = answer(
            state_dir,
            "Failed to read the sidecar's status",
            ANSWER_TIMEOUT,
            clients.sidecar.status(StatusRequest {}),
            no_hint,
        )
        .await?;
        print_status(&status, json)?;
        return Ok(if is_running(&status) {
            exit::OK
        } else {
            exit::FAILED
        });
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut last: Option<SidecarStatus> = None;
    let mut unreachable = None;
    loop {
        match client::connect(&state_dir.socket()).await {
            Ok(mut clients) => {
                if let Some(status) = wait_running(&mut clients, deadline, &mut last).await {
                    print_status(&status, json)?;
                    return Ok(exit::OK);
                }
            }
            Err(err) => unreachable = Some(err),
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(
            RETRY.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
    }
    match (last, unreachable) {
        (Some(status), _) => {
            print_status(&status, json)?;
            note(&format!(
                "the node is not Running after {} (state {}, backend state {})",
                humanize(wait),
                state_name(status.state),
                or_none(&status.backend_state)
            ));
            Ok(exit::FAILED)
        }
        (None, Some(err)) => Err(no_sidecar(state_dir, &err)),
        (None, None) => Err(Failure::plain(
            exit::FAILED,
            "The sidecar did not report its status",
            format!("no status within {}", humanize(wait)),
        )),
    }
}

/// Follows Watch until the node is Running (its status), the deadline passes or the stream
/// ends (`None`); the last status seen is kept in `last`.
async fn wait_running(
    clients: &mut Clients,
    deadline: tokio::time::Instant,
    last: &mut Option<SidecarStatus>,
) -> Option<SidecarStatus> {
    let mut stream = clients
        .sidecar
        .watch(WatchRequest {
            include_logs: false,
        })
        .await
        .ok()?
        .into_inner();
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = tokio::time::sleep_until(deadline) => return None,
        };
        let Ok(Some(event)) = message else {
            return None;
        };
        if let Some(watch_event::Kind::Status(status)) = event.kind {
            if is_running(&status) {
                return Some(status);
            }
            *last = Some(status);
        }
    }
}

fn is_running(status: &SidecarStatus) -> bool {
    status.state == SidecarState::Running as i32
}

fn print_status(status: &SidecarStatus, json: bool) -> Result<(), Failure> {
    let text = if json {
        let line = serde_json::to_string(status).map_err(|err| {
            Failure::new(exit::FAILED, &err)
                .hint("This is a bug in tailbox; please report it with the output above.")
        })?;
        format!("{line}\n")
    } else {
        human_status(status)
    };
    write_data(&text)
}

fn write_data(text: &str) -> Result<(), Failure> {
    output::data(text).map_err(|err| Failure::new(exit::FAILED, &err))
}

/// `tailbox-agent env`: the proxy variables, as `export` lines or (`json`) one JSON object.
pub async fn env(state_dir: &StateDir, json: bool) -> Result<u8, Failure> {
    let mut clients = connect(state_dir).await?;
    let env = answer(
        state_dir,
        "The sidecar cannot hand out the proxy yet",
        ANSWER_TIMEOUT,
        clients.sidecar.env(EnvRequest {}),
        |status| {
            (status.code() == tonic::Code::FailedPrecondition)
                .then_some("Bring the node up first: `tailbox up` does it from the dev host.")
        },
    )
    .await?;
    let vars: std::collections::BTreeMap<_, _> = env.vars.into_iter().collect();
    let text = if json {
        let line = serde_json::to_string(&vars).map_err(|err| Failure::new(exit::FAILED, &err))?;
        format!("{line}\n")
    } else {
        vars.iter()
            .map(|(name, value)| format!("export {name}={}\n", shell_quote(value)))
            .collect()
    };
    write_data(&text)?;
    Ok(exit::OK)
}

/// Single-quotes `value` for a POSIX shell (`[::1]` would otherwise be a glob).
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `tailbox-agent down`: log the node out, stop tailscaled, and end the sidecar. Nothing running
/// is not an error: the sidecar is down either way.
pub async fn down(state_dir: &StateDir, grace: Duration) -> Result<u8, Failure> {
    let mut clients = match client::connect(&state_dir.socket()).await {
        Ok(clients) => clients,
        Err(ConnectError::NotRunning { .. }) => {
            note(&format!(
                "no sidecar is running in {}; nothing to take down",
                state_dir.dir().display()
            ));
            return Ok(exit::OK);
        }
        Err(err) => return Err(no_sidecar(state_dir, &err)),
    };
    let teardown = answer(
        state_dir,
        "Failed to take the sidecar down",
        grace + EXIT_WAIT,
        clients.sidecar.down(DownRequest {
            grace: Some(duration(grace)),
        }),
        no_hint,
    )
    .await?
    .teardown
    .unwrap_or_default();
    drop(clients);
    let deadline = tokio::time::Instant::now() + EXIT_WAIT;
    while start::lock_is_held(state_dir) {
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::plain(
                exit::FAILED,
                "The sidecar did not exit after taking the node down",
                format!(
                    "it still holds {} after {}",
                    state_dir.lock().display(),
                    humanize(EXIT_WAIT)
                ),
            )
            .hint(format!(
                "Its pid is in {}; see its log, {}.",
                state_dir.pidfile().display(),
                state_dir.log().display()
            )));
        }
        tokio::time::sleep(RETRY).await;
    }
    if teardown.logout_attempted && !teardown.logged_out {
        eprintln!(
            "warning: The node was not logged out ({})\nhint: An ephemeral node is removed when tailscaled stops; otherwise remove it in the admin console.",
            teardown.logout_error
        );
        return Ok(exit::FAILED);
    }
    if teardown.logout_attempted {
        note(&format!(
            "logged the node out, stopped tailscaled ({}) and the sidecar",
            teardown.daemon_stop
        ));
    } else {
        note("the node was not up; stopped the sidecar");
    }
    Ok(exit::OK)
}

/// `tailbox-agent attach`: bridge the taken stdin/stdout to the sidecar's socket, byte for byte,
/// until the sidecar closes the connection (or the controller closes stdin and the sidecar
/// then finishes).
pub async fn attach(state_dir: &StateDir, wire: Wire) -> Result<u8, Failure> {
    use tokio::io::AsyncWriteExt as _;
    let (mut input, mut output) =
        stdio::into_async(wire).map_err(|err| Failure::new(exit::FAILED, &err))?;
    let socket = state_dir.socket();
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|source| {
            no_sidecar(
                state_dir,
                &ConnectError::NotRunning {
                    socket: socket.clone(),
                    source,
                },
            )
        })?;
    let (mut from_sidecar, mut to_sidecar) = stream.into_split();
    let upstream = async {
        let copied = tokio::io::copy(&mut input, &mut to_sidecar).await;
        // The controller is done writing: pass the end on, keep reading the answers.
        let _ = to_sidecar.shutdown().await;
        copied
    };
    let downstream = async {
        let copied = tokio::io::copy(&mut from_sidecar, &mut output).await;
        let _ = output.shutdown().await;
        copied
    };
    tokio::pin!(upstream, downstream);
    let result = tokio::select! {
        down = &mut downstream => down.map(drop),
        up = &mut upstream => match up {
            Ok(_) => downstream.await.map(drop),
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(()) => Ok(exit::OK),
        // The controller went away: its choice, not our failure.
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(exit::OK),
        Err(err) => Err(Failure::plain(
            exit::FAILED,
            "The connection between the controller and the sidecar broke",
            err.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_for_the_shell() {
        assert_eq!(
            shell_quote("socks5h://[::1]:1055"),
            "'socks5h://[::1]:1055'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_human_status_names_every_fact() {
        let status = SidecarStatus {
            state: SidecarState::Running as i32,
            backend_state: "Running".into(),
            hostname: "modal-abc".into(),
            dns_name: "modal-abc.tail.ts.net".into(),
            tailnet_ips: vec!["100.64.0.2".into(), "fd7a::2".into()],
            proxy_url: "socks5h://127.0.0.1:1055".into(),
            http_proxy_url: "http://127.0.0.1:1055".into(),
            agent_sha256: "0123456789abcdef".into(),
            ..Default::default()
        };
        let text = human_status(&status);
        assert!(text.contains("state          running\n"), "{text}");
        assert!(text.contains("modal-abc (modal-abc.tail.ts.net)"), "{text}");
        assert!(text.contains("100.64.0.2, fd7a::2"), "{text}");
        assert!(text.contains("sha256 0123456789ab)"), "{text}");
        assert!(!text.contains("last error"), "{text}");
    }
}
