//! Test support shared by tailbox's crates. Not part of the product; `publish = false`.
//!
//! - [`agent`]: the real `tailbox-agent` binary, built on demand.
//! - [`lab`]: a real tailnet on loopback (Tailscale's own testcontrol + DERP + STUN, a real
//!   tailscaled peer, a real HTTP server and a real `git http-backend`).
//! - [`chromium`]: rendering a page in headless Chromium, and counting what its screenshot shows.
//! - [`contract`]: validating JSON output against the committed JSON Schemas.
//! - [`fake_modal`]: Modal's control plane and Task Command Router on loopback, over real tonic,
//!   with sandboxes that are local process trees in network namespaces of their own.
//! - [`modal_descriptors`]: checks our Modal proto subset against Modal's published one.
//! - [`qemu`]: running another architecture's binaries (through qemu-user and binfmt_misc).
//! - [`scan`]: watching every process's argv and environment for a secret.

pub mod agent;
pub mod chromium;
pub mod contract;
pub mod fake_modal;
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
