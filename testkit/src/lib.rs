//! Test support shared by tailbox's crates. Not part of the product; `publish = false`.
//!
//! - [`agent`]: the real `tailbox-agent` binary, built on demand.
//! - [`lab`]: a real tailnet on loopback (Tailscale's own testcontrol + DERP + STUN, a real
//!   tailscaled peer, a real HTTP server and a real `git http-backend`).
//! - [`chromium`]: rendering a page in headless Chromium, and counting what its screenshot shows
//!   (feature `report`).
//! - [`contract`]: validating JSON output against the committed JSON Schemas (feature `report`).
//! - [`fake_modal`]: Modal's control plane and Task Command Router on loopback, over real tonic,
//!   with sandboxes that are local process trees in network namespaces of their own.
//! - [`modal_descriptors`]: checks our Modal proto subset against Modal's published one.
//! - [`qemu`]: running another architecture's binaries (through qemu-user and binfmt_misc).
//! - [`scan`]: the machine's processes (which of a test's are still running), and watching
//!   every process's argv and environment for a secret.
//! - [`fault_server`]: servers that misbehave on purpose (garbage, a reset mid-body, a git
//!   advertisement that is not pkt-lines), reached through the lab's tailnet.

pub mod agent;
#[cfg(feature = "report")]
pub mod chromium;
#[cfg(feature = "report")]
pub mod contract;
pub mod fake_modal;
pub mod fault_server;
pub mod lab;
pub mod modal_descriptors;
pub mod qemu;
pub mod scan;

/// Removes the host's proxy variables and git configuration from a client command (curl, git),
/// so what it measures is the lab (or the proxy a test hands it), not the developer's shell.
/// For tokio's `Command`, pass `as_std_mut()`.
pub fn isolate_client(command: &mut std::process::Command) -> &mut std::process::Command {
    for var in [
        "ALL_PROXY",
        "all_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        command.env_remove(var);
    }
    command
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
}

/// `tailbox` (at `binary`) as a test runs it: as a developer would, with a clean environment
/// (only `PATH`, and `HOME` at `home`, so no ~/.modal.toml of the machine's leaks in), no
/// stdin, stdout and stderr piped, and killed if the test drops it. Add the lab's or the fake
/// Modal's environment with `envs` ([`lab::Lab::tailbox_env`], [`lab::Lab::developer_env`]).
pub fn tailbox_command(
    binary: impl AsRef<std::ffi::OsStr>,
    home: impl AsRef<std::path::Path>,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.as_ref())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Writes `script` to `path` as an executable file (a stand-in tailscaled or agent).
pub fn write_executable(path: &std::path::Path, script: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, script).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot make {} executable: {e}", path.display()));
}

/// SIGKILLs the process whose pid `pidfile` holds, if there is one: a test's sidecar, left
/// running when the test fails before its `down`.
pub fn kill_by_pidfile(pidfile: &std::path::Path) {
    if let Ok(pid) = std::fs::read_to_string(pidfile)
        && let Ok(pid) = pid.trim().parse::<i32>()
    {
        // SAFETY: kill(2) with a pid read from the file and a constant signal; no memory is shared.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// A gRPC channel to the server on the unix socket at `socket` (a sidecar's).
pub async fn unix_channel(
    socket: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://sidecar")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// Reads a child's whole stderr in the background (so the child never blocks on a full pipe);
/// the task yields the text once the child closes it.
pub fn collect_stderr(child: &mut tokio::process::Child) -> tokio::task::JoinHandle<String> {
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        }
        text
    })
}

/// Whether `pid` is a live process (a zombie, dead but not yet reaped, is not).
pub fn process_is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// A finished command's exit, stdout and stderr, for an assertion's message.
pub fn describe_output(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last line of a command's stdout as JSON (`tailbox … --json` ends with its answer);
/// panics with the whole output if there is none.
pub fn last_json_line(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no stdout: {}", describe_output(out)));
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe_output(out)))
}

/// The report of a `--json` run: its last event's `report`. Panics, showing `stderr`, when
/// there is none.
pub fn report_of<'a>(events: &'a [serde_json::Value], stderr: &str) -> &'a serde_json::Value {
    let last = events
        .last()
        .unwrap_or_else(|| panic!("no events; stderr:\n{stderr}"));
    assert!(
        last["report"].is_object(),
        "the last event is not the report: {last}\nstderr:\n{stderr}"
    );
    &last["report"]
}

/// Panics unless `report` (a `--json` report) holds a ping, an HTTP and a git check, naming
/// the checks it does hold; returns their names.
pub fn assert_every_target_checked(report: &serde_json::Value) -> Vec<&str> {
    let names: Vec<&str> = report["checks"]
        .as_array()
        .map(|checks| checks.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    for name in ["ping", "http", "git"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    names
}

/// The seed of a seeded fault test: `TAILBOX_FAULT_SEED` to repeat a run, else a fresh one.
/// Printed first, so a failing test's captured output names it.
pub fn fault_seed() -> u64 {
    let seed = std::env::var("TAILBOX_FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("fault seed {seed} (rerun with TAILBOX_FAULT_SEED={seed})");
    seed
}
