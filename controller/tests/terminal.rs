//! What a person sees: the real `tailbox` binary in a real pseudo-terminal 80 columns wide
//! (tmux, from Debian, installed by `scripts/setup`), against the lab's real tailnet. The live
//! line names the pending check with its target, elapsed time and budget; every line fits the
//! terminal; a real Ctrl-C ends in `verdict: interrupted`. Without a terminal nothing is cut,
//! and a reader closing stdout (`| head -1`) ends the run quietly with nothing left running.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tailbox_testkit::agent::agent_binary;
use tailbox_testkit::lab::{Binaries, Lab};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Generous bound for one whole test; the lab needs a few seconds, a run well under ten.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// The terminal's width.
const COLUMNS: usize = 80;
/// What the script in the terminal prints after tailbox, with its exit status.
const EXIT_MARK: &str = "[tailbox exited with ";

async fn lab() -> Lab {
    // Building the lab binaries can take minutes on a cold cache: do it outside the timeout.
    Binaries::locate().await.unwrap();
    Lab::start().await.unwrap()
}

/// `tailbox check --sandbox local` against the lab, for people (no --json), plus `extra`.
fn check_args(lab: &Lab, dir: &Path, agent: &Path, extra: &[String]) -> Vec<String> {
    let key = dir.join("authkey");
    std::fs::write(&key, lab.auth_key()).unwrap();
    let mut args: Vec<String> = [
        "check",
        "--sandbox",
        "local",
        "--agent",
        &agent.display().to_string(),
        "--tailscaled",
        &lab.bins().tailscaled().display().to_string(),
        "--control-url",
        lab.control_url(),
        "--auth-key-file",
        &key.display().to_string(),
        "--proxy-listen",
        "127.0.0.1:0",
        // A state directory of this test's own, so its tailscaled can be found by argv.
        "--tailscaled-statedir",
        &dir.join("tailscaled").display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend_from_slice(extra);
    args
}

/// The environment tailbox runs with: a clean one, as in a fresh shell.
fn env_for(lab: &Lab) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("HOME".into(), std::env::temp_dir().display().to_string()),
        (
            "TAILBOX_TAILSCALED_ENV".into(),
            serde_json::to_string(&lab.tailscaled_env()).unwrap(),
        ),
    ]
}

fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A detached tmux server of its own with one window `COLUMNS` wide, running one script.
struct Terminal {
    socket: String,
}

impl Terminal {
    /// Runs tailbox with `args` and `env` in the terminal; the script then prints its exit status.
    fn run(dir: &Path, env: &[(String, String)], args: &[String]) -> Self {
        let mut command = String::from("env -i");
        for (name, value) in env {
            command.push_str(&format!(" {name}={}", sh_quote(value)));
        }
        command.push_str(" TERM=\"$TERM\" ");
        command.push_str(&sh_quote(env!("CARGO_BIN_EXE_tailbox")));
        for arg in args {
            command.push(' ');
            command.push_str(&sh_quote(arg));
        }
        // A caught SIGINT is reset for tailbox, which gets Ctrl-C as usual; the script itself
        // survives it to print the exit status.
        let script =
            format!("trap 'true' INT\n{command}\necho \"{EXIT_MARK}$?]\"\nexec sleep 600\n");
        let path = dir.join("run.sh");
        std::fs::write(&path, script).unwrap();
        let socket = format!(
            "tailbox-test-{}-{}",
            std::process::id(),
            fastrand_suffix(dir)
        );
        let terminal = Self { socket };
        terminal.tmux(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            &COLUMNS.to_string(),
            "-y",
            "60",
            "sh",
            &path.display().to_string(),
        ]);
        terminal
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("tmux is needed (scripts/setup installs it): {err}"));
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Everything on the screen and in its history, wrapped lines joined back into the lines
    /// the program wrote (so a line wider than the terminal shows as one long line).
    fn text(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-J", "-S", "-"])
    }

    /// Waits until `found` holds for the screen, and returns that screen.
    async fn wait_for(&self, what: &str, found: impl Fn(&str) -> bool) -> String {
        loop {
            let text = self.text();
            if found(&text) {
                return text;
            }
            if text.contains(EXIT_MARK) {
                panic!("tailbox ended before {what}:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for tailbox to end; returns its exit status and the screen.
    async fn finished(&self) -> (i32, String) {
        let text = self
            .wait_for("its end", |text| {
                text.lines().any(|line| line.starts_with(EXIT_MARK))
            })
            .await;
        let code = text
            .lines()
            .find_map(|line| line.strip_prefix(EXIT_MARK))
            .and_then(|rest| rest.trim_end_matches(']').parse().ok())
            .unwrap();
        (code, text)
    }

    /// Ctrl-C, typed.
    fn ctrl_c(&self) {
        self.tmux(&["send-keys", "C-c"]);
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

/// Distinguishes the tmux servers of tests running at once.
fn fastrand_suffix(dir: &Path) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("x")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect()
}

/// Lines wider than the terminal, with their widths.
fn too_wide(text: &str) -> Vec<(usize, &str)> {
    text.lines()
        .map(|line| (console::measure_text_width(line), line))
        .filter(|(width, _)| *width > COLUMNS)
        .collect()
}

/// The results table: from its header to the blank line after it.
fn table(text: &str) -> Vec<&str> {
    text.lines()
        .skip_while(|line| !line.starts_with("CHECK "))
        .take_while(|line| !line.trim().is_empty())
        .collect()
}

/// This test's processes still running: a copy of the agent of its own, and a tailscaled with
/// its state directory in argv.
fn ours_running(agent: &Path, dir: &Path) -> Vec<String> {
    let statedir = dir.join("tailscaled").display().to_string();
    tailbox_testkit::scan::processes()
        .into_iter()
        .filter(|p| p.exe.as_deref() == Some(agent) || p.cmdline().contains(&statedir))
        .map(|p| format!("{}: {}", p.pid, p.cmdline()))
        .collect()
}

/// A copy of the agent binary under `dir`, so this test's agents can be told from others'.
fn own_agent(dir: &Path) -> PathBuf {
    let copy = dir.join("tailbox-agent");
    std::fs::copy(agent_binary(), &copy).unwrap();
    copy
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_line_names_the_pending_check_and_ctrl_c_ends_in_an_interrupted_verdict() {
    let lab = lab().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = own_agent(dir.path());
    tokio::time::timeout(TEST_TIMEOUT, async {
        let slow = format!("{}/slow?ms=60000", lab.http_base_url());
        let args = check_args(
            &lab,
            dir.path(),
            &agent,
            &[
                "--http".into(),
                slow.clone(),
                "--http-timeout".into(),
                "90s".into(),
            ],
        );
        let terminal = Terminal::run(dir.path(), &env_for(&lab), &args);

        // The pending check's own line: name, target, time waited and its budget.
        let pending_line = |text: &str| {
            text.lines()
                .find(|line| {
                    line.contains(&format!(" http {slow}  "))
                        && line.trim_end().ends_with(" of 1m30s")
                })
                .map(str::to_owned)
        };
        // Ctrl-C once the live lines have been redrawn since the last check's line (the HTTP
        // check starts beside the netmap check, whose line lands a millisecond later). The
        // terminal echoes `^C` where the cursor is, one row under what the progress drew last,
        // so the row above stays as drawn; had no redraw come since, that row would still be
        // the printed line's continuation, and the screen joins the two into one too wide.
        let screen = terminal
            .wait_for("the pending http line, redrawn after 200ms", |text| {
                pending_line(text).is_some_and(|line| {
                    let waited = line.trim_end().trim_end_matches(" of 1m30s");
                    let waited = waited.rsplit(' ').next().unwrap_or_default();
                    !waited.ends_with("ms")
                        || waited
                            .trim_end_matches("ms")
                            .parse::<u32>()
                            .is_ok_and(|ms| ms >= 200)
                })
            })
            .await;
        let line = pending_line(&screen).unwrap();
        let waited = line
            .trim_end()
            .trim_end_matches(" of 1m30s")
            .rsplit(' ')
            .next()
            .unwrap();
        assert!(
            waited.ends_with("ms") || waited.ends_with('s'),
            "no time waited in {line:?}"
        );
        assert!(screen.contains("checks"), "no phase line:\n{screen}");

        terminal.ctrl_c();
        let (code, text) = terminal.finished().await;
        assert_eq!(code, 130, "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("verdict: interrupted (")),
            "{text}"
        );
        assert!(!text.contains("verdict: ok"), "{text}");
        let rows = table(&text);
        let http = rows.iter().find(|r| r.starts_with("http ")).unwrap();
        assert!(http.contains(" skip "), "{http}");
        // The detail is cut to fit; its start says why.
        assert!(http.contains("not finished: "), "{http}");
        assert!(text.contains("error: Interrupted"), "{text}");
        assert_eq!(too_wide(&text), Vec::<(usize, &str)>::new(), "{text}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_line_and_the_results_table_fit_80_columns() {
    let lab = lab().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = own_agent(dir.path());
    tokio::time::timeout(TEST_TIMEOUT, async {
        let args = check_args(&lab, dir.path(), &agent, &lab.every_target_flags());
        let terminal = Terminal::run(dir.path(), &env_for(&lab), &args);
        let (code, text) = terminal.finished().await;
        assert_eq!(code, 0, "{text}");
        assert_eq!(too_wide(&text), Vec::<(usize, &str)>::new(), "{text}");

        let rows = table(&text);
        assert!(rows.len() >= 8, "{text}");
        // The columns still line up: STATUS starts at the same column in every row.
        let status_at = rows[0].find("STATUS").unwrap();
        for row in &rows[1..] {
            let status: String = row.chars().skip(status_at).take(4).collect();
            assert!(
                ["pass", "warn"].contains(&status.as_str()),
                "misaligned row {row:?} in\n{}",
                rows.join("\n")
            );
        }
        // The long git detail was cut with an ellipsis, not wrapped.
        let git = rows.iter().find(|r| r.starts_with("git ")).unwrap();
        assert!(git.ends_with('…'), "{git}");
        assert!(text.contains("verdict: ok ("), "{text}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_terminal_nothing_is_cut_and_each_step_gets_plain_lines() {
    let lab = lab().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = own_agent(dir.path());
    tokio::time::timeout(TEST_TIMEOUT, async {
        let main_sha = lab.git_ref("refs/heads/main").unwrap().to_owned();
        let args = check_args(
            &lab,
            dir.path(),
            &agent,
            &[
                "--git".into(),
                lab.git_url(),
                "--expect-ref".into(),
                format!("main={main_sha}"),
            ],
        );
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailbox"))
            .args(&args)
            .env_clear()
            .envs(env_for(&lab))
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        // The whole detail, however long.
        let git = table(&stdout)
            .into_iter()
            .find(|r| r.starts_with("git "))
            .unwrap()
            .to_owned();
        assert!(git.ends_with("1 expected refs match"), "{git}");
        assert!(!stdout.contains('…'), "{stdout}");
        // A plain line when each check starts (with its budget) and when it ends; no spinners.
        let git_url = lab.git_url();
        assert!(
            stderr.contains(&format!("  » git {git_url} (up to 1m)")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("  ✓ git {git_url}: listed")),
            "{stderr}"
        );
        assert!(
            !stderr.contains('\u{1b}'),
            "escape codes without a terminal:\n{stderr}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_closing_stdout_ends_the_run_quietly_with_nothing_left_running() {
    let lab = lab().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = own_agent(dir.path());
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut args = check_args(
            &lab,
            dir.path(),
            &agent,
            &["--ping".into(), lab.peer_ipv4().to_string()],
        );
        args.push("--json".into());
        // `tailbox check --json | head -1`, as a shell runs it.
        let mut pipeline = String::new();
        for arg in &args {
            pipeline.push_str(&sh_quote(arg));
            pipeline.push(' ');
        }
        let out = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{} {pipeline} | head -1; echo \"statuses ${{PIPESTATUS[*]}}\"",
                sh_quote(env!("CARGO_BIN_EXE_tailbox"))
            ))
            .env_clear()
            .envs(env_for(&lab))
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let mut lines = BufReader::new(out.stdout.as_slice()).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        let event: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert!(event.is_object(), "{first}");
        // 141 is what a shell reports for a writer a closed pipe stopped; head itself is fine.
        assert!(
            stdout.contains("statuses 141 0"),
            "{stdout}\nstderr:\n{stderr}"
        );
        // Not a word about it: no error, no broken pipe.
        assert!(stderr.trim().is_empty(), "stderr:\n{stderr}");
        // Cleanup ran before tailbox exited: no agent or tailscaled of this run is left.
        assert_eq!(ours_running(&agent, dir.path()), Vec::<String>::new());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn color_follows_the_flag_then_no_color_then_clicolor_force() {
    // No tailnet needed: without an auth key the run is preflight and skips, in colour or not.
    // (flags, environment, whether stderr is coloured)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], bool);
    let cases: [Case; 6] = [
        (&[], &[], false),
        (&[], &[("CLICOLOR_FORCE", "1")], true),
        (&[], &[("CLICOLOR_FORCE", "0")], false),
        (&[], &[("NO_COLOR", "1"), ("CLICOLOR_FORCE", "1")], false),
        (&["--color", "always"], &[("NO_COLOR", "1")], true),
        (&["--color", "never"], &[("CLICOLOR_FORCE", "1")], false),
    ];
    for (flags, env, coloured) in cases {
        let out =
            tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), std::env::temp_dir())
                .args(flags)
                .args(["check", "--sandbox", "local", "--agent"])
                .arg(agent_binary())
                .args(["--ping", "100.64.0.1"])
                .envs(env.iter().copied())
                .output()
                .await
                .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{flags:?} {env:?}: {stderr}");
        assert_eq!(
            stderr.contains("\u{1b}["),
            coloured,
            "{flags:?} {env:?}:\n{stderr}"
        );
        // The table is data: never coloured.
        assert!(!out.stdout.contains(&0x1b), "{flags:?} {env:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fan_out_keeps_one_line_per_sandbox_with_its_outcome() {
    let lab = lab().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = own_agent(dir.path());
    tokio::time::timeout(TEST_TIMEOUT, async {
        let extra = [
            "--ping".into(),
            lab.peer_ipv4().to_string(),
            "--count".into(),
            "3".into(),
        ];
        let mut args = check_args(&lab, dir.path(), &agent, &extra);
        // Three local agents cannot share one state directory: each gets its own.
        let at = args
            .iter()
            .position(|a| a == "--tailscaled-statedir")
            .unwrap();
        args.drain(at..at + 2);
        let terminal = Terminal::run(dir.path(), &env_for(&lab), &args);
        let (code, text) = terminal.finished().await;
        assert_eq!(code, 0, "{text}");
        // Each sandbox's live line stays, as its outcome, once it is done.
        for n in 1..=3 {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("✓ #{n} local-")) && l.contains("passed in ")),
                "no line for sandbox #{n}:\n{text}"
            );
        }
        assert_eq!(too_wide(&text), Vec::<(usize, &str)>::new(), "{text}");
        assert!(
            text.contains("verdict: ok (3 of 3 sandboxes passed)"),
            "{text}"
        );
    })
    .await
    .expect("test timed out");
}
