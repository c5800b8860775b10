//! `cargo xtask lab up` against the real lab programs: what it prints and writes points at a
//! working tailnet, and it tears everything down on SIGTERM or when a lab process dies.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tailbox_testkit::describe_output;
use tailbox_testkit::lab::{Binaries, processes_mentioning};

/// Generous: once the binaries exist, a lab is up in well under ten seconds.
const DEADLINE: Duration = Duration::from_secs(120);

/// A running `cargo xtask lab up --env-file …`.
struct LabUp {
    child: Child,
    /// What it printed on stdout, up to the last line before it waits.
    stdout: Vec<String>,
    /// Collects its stderr until it exits.
    stderr: Option<JoinHandle<String>>,
    env_file: PathBuf,
}

impl LabUp {
    fn start(name: &str) -> Self {
        // On a cold cache this builds for minutes; do it before any deadline starts.
        Binaries::locate_blocking().expect("the tailnet lab binaries (see lab/README.md)");
        let env_file = std::env::temp_dir().join(format!(
            "tailbox-xtask-lab-up-{}-{name}.env",
            std::process::id()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["lab", "up", "--env-file"])
            .arg(&env_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start xtask lab up");
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let until = Instant::now() + DEADLINE;
        let mut stdout = Vec::new();
        loop {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let last = line.starts_with("#   peer CLI:");
                    stdout.push(line);
                    if last {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "lab up stopped short of its last line: {stdout:#?}\nstderr:\n{}",
                        stderr.join().unwrap()
                    );
                }
            }
        }
        Self {
            child,
            stdout,
            stderr: Some(stderr),
            env_file,
        }
    }

    /// The rest of the first stdout line that starts with `prefix`.
    fn after(&self, prefix: &str) -> &str {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}: {:#?}", self.stdout))
    }

    /// The lab's temp dir, from the `logs:` line.
    fn lab_dir(&self) -> PathBuf {
        let logs = Path::new(self.after("#   logs: "));
        assert!(logs.is_dir(), "{}", logs.display());
        logs.parent().unwrap().to_owned()
    }

    /// Waits for it to exit on its own; its exit status and stderr.
    fn wait(&mut self) -> (ExitStatus, String) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stderr_text());
            }
            if Instant::now() >= until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("lab up did not exit\nstderr:\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default()
    }
}

impl Drop for LabUp {
    fn drop(&mut self) {
        // Only reached with the child still running when a test fails part way.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.env_file);
    }
}

fn signal(pid: u32, sig: &str) {
    let out = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", sig, &pid.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kill -s {sig} {pid}: {}",
        describe_output(&out)
    );
}

/// The environment a shell has after `. <file>`, as a person would use the file.
fn sourced(file: &Path) -> BTreeMap<String, String> {
    let out = Command::new("sh")
        .args(["-c", ". \"$1\" && env -0", "sh"])
        .arg(file)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sourcing {}: {}",
        file.display(),
        describe_output(&out)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A command with the host's proxy and git settings removed.
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    tailbox_testkit::isolate_client(&mut cmd);
    cmd
}

#[test]
fn lab_up_prints_a_working_lab_and_tears_it_down_on_sigterm() {
    let mut up = LabUp::start("term");

    // The env file holds exactly the printed exports, and a shell can source it.
    let exports: String = up
        .stdout
        .iter()
        .filter(|l| l.starts_with("export "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(std::fs::read_to_string(&up.env_file).unwrap(), exports);
    let env = sourced(&up.env_file);
    let var = |name: &str| {
        env.get(name)
            .unwrap_or_else(|| panic!("{name} is not exported: {exports}"))
            .as_str()
    };
    assert!(var("TS_AUTHKEY").starts_with("tskey-auth-lab"));
    let tail_ip: Ipv4Addr = var("COOK_TAIL_IP").parse().unwrap();
    let http_url = var("COOK_HTTP_URL");
    let git_url = var("COOK_GIT_URL");
    assert!(
        http_url.starts_with(&format!("http://{tail_ip}:")) && http_url.ends_with("/health"),
        "{http_url}"
    );
    assert!(
        git_url.starts_with(&format!("http://{tail_ip}:")) && git_url.ends_with("/lab.git"),
        "{git_url}"
    );
    let control_url = var("TS_CONTROL_URL");
    let tailscaled_env: BTreeMap<String, String> =
        serde_json::from_str(var("TAILBOX_TAILSCALED_ENV")).unwrap();
    assert_eq!(
        tailscaled_env["TS_NETCHECK_GENERATE_204_URL"],
        format!("{control_url}/generate_204")
    );
    let bin_dir = Path::new(var("TAILBOX_TAILNET_BIN_DIR"));
    for bin in ["tailscaled", "tailscale", "tailbox-lab"] {
        assert!(bin_dir.join(bin).is_file(), "{}", bin_dir.display());
    }
    let control_addr = control_url.strip_prefix("http://").unwrap().to_owned();
    TcpStream::connect(&control_addr).expect("control listens");

    // The "try:" lines work: the URLs reach the dev host over the tailnet through the peer's
    // SOCKS5 proxy, and git lists the refs lab up printed.
    let socks = up
        .after("#   try: curl --socks5-hostname ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let curl = clean_command("curl")
        .args([
            "-fsS",
            "--max-time",
            "30",
            "--socks5-hostname",
            &socks,
            http_url,
        ])
        .output()
        .unwrap();
    assert!(curl.status.success(), "curl: {}", describe_output(&curl));
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "ok");
    let ls_remote = clean_command("git")
        .env("ALL_PROXY", format!("socks5h://{socks}"))
        .args(["ls-remote", git_url])
        .output()
        .unwrap();
    assert!(
        ls_remote.status.success(),
        "git ls-remote: {}",
        describe_output(&ls_remote)
    );
    let listed = String::from_utf8_lossy(&ls_remote.stdout).replace('\t', " ");
    let printed: Vec<&str> = up
        .stdout
        .iter()
        .filter_map(|l| l.strip_prefix("#   ref "))
        .collect();
    assert_eq!(printed.len(), 4, "HEAD, main, feature, v0.1.0: {printed:?}");
    for sha_and_name in printed {
        assert!(
            listed.lines().any(|l| l == sha_and_name),
            "{sha_and_name} not in\n{listed}"
        );
    }

    // SIGTERM (like Ctrl-C) tears down everything it started, and the env file with it.
    let lab_dir = up.lab_dir();
    signal(up.child.id(), "TERM");
    let (status, stderr) = up.wait();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(stderr.contains("tearing the lab down"), "{stderr}");
    assert!(
        !up.env_file.exists(),
        "{} is left behind",
        up.env_file.display()
    );
    assert!(!lab_dir.exists(), "{} is left behind", lab_dir.display());
    let lab_dir = lab_dir.to_string_lossy();
    assert_eq!(processes_mentioning(&lab_dir).unwrap(), vec![]);
    assert!(
        TcpStream::connect(&control_addr).is_err(),
        "control still listens at {control_addr}"
    );
}

#[test]
fn lab_up_names_a_lab_process_that_died_and_exits_non_zero() {
    let mut up = LabUp::start("death");
    let lab_dir = up.lab_dir();
    let devhost = processes_mentioning(&format!("devhost --dir={}", lab_dir.display())).unwrap();
    let [(pid, _)] = devhost[..] else {
        panic!("expected one dev host process: {devhost:?}");
    };

    signal(pid, "KILL");
    let (status, stderr) = up.wait();
    assert!(!status.success(), "{status}\n{stderr}");
    // It says which process died, with that process's last log lines.
    assert!(
        stderr.contains("devhost exited unexpectedly (killed by signal 9)"),
        "{stderr}"
    );
    assert!(stderr.contains("devhost serving http on"), "{stderr}");
    assert!(
        !up.env_file.exists(),
        "{} is left behind",
        up.env_file.display()
    );
    assert!(!lab_dir.exists(), "{} is left behind", lab_dir.display());
    let lab_dir = lab_dir.to_string_lossy();
    assert_eq!(processes_mentioning(&lab_dir).unwrap(), vec![]);
}
