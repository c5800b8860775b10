//! Long-lived lab processes: each in its own process group, output teed to a log file, killed
//! and reaped on drop.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, PipeWriter, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::oneshot;

/// Which output stream a [`Watch`] looks at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// "Tell me about the first line on `stream` that contains `needle`."
pub(crate) struct Watch {
    stream: Stream,
    needle: &'static str,
    tx: oneshot::Sender<String>,
}

/// The receiving side of a [`Watch`].
pub(crate) struct Seen {
    what: &'static str,
    rx: oneshot::Receiver<String>,
}

pub(crate) fn watch(stream: Stream, needle: &'static str) -> (Watch, Seen) {
    let (tx, rx) = oneshot::channel();
    (Watch { stream, needle, tx }, Seen { what: needle, rx })
}

/// How to start a [`LabProcess`].
pub(crate) struct Spawn {
    pub name: String,
    pub command: Command,
    pub log_path: PathBuf,
    pub watches: Vec<Watch>,
    /// Keep a pipe on the child's stdin; our lab programs exit when it reaches EOF.
    pub hold_stdin: bool,
    /// Hand tailscaled a pipe as fd 3 with `TS_PARENT_DEATH_FD=3`: it exits once we are gone.
    pub parent_death_fd: bool,
}

/// A running child. Dropping it kills the child's whole process group and reaps the child.
pub(crate) struct LabProcess {
    name: String,
    pid: u32,
    child: Option<Child>,
    // Held only so they close when we do; closing either one tells the child to exit.
    _stdin: Option<ChildStdin>,
    _death_pipe: Option<PipeWriter>,
    log_path: PathBuf,
}

impl LabProcess {
    pub(crate) fn spawn(spec: Spawn) -> Result<Self> {
        let Spawn {
            name,
            mut command,
            log_path,
            watches,
            hold_stdin,
            parent_death_fd,
        } = spec;
        let log = File::create(&log_path)
            .with_context(|| format!("creating log file {}", log_path.display()))?;
        let log = Arc::new(Mutex::new(log));

        command
            .stdin(if hold_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own group, so teardown reaches anything the child starts (git http-backend, ...).
            .process_group(0);

        // Both ends are close-on-exec, so children spawned concurrently by other tests never
        // inherit them; only this child gets the read end, moved to fd 3 after fork.
        let mut death_pipe = None;
        let mut death_reader = None;
        if parent_death_fd {
            let (reader, writer) = std::io::pipe().context("creating the parent-death pipe")?;
            let fd = reader.as_raw_fd();
            // SAFETY: the closure runs between fork and exec and only calls dup2/fcntl, which
            // are async-signal-safe; it touches no memory shared with other threads.
            unsafe {
                command.pre_exec(move || move_fd_to_3(fd));
            }
            command.env("TS_PARENT_DEATH_FD", "3");
            death_pipe = Some(writer);
            death_reader = Some(reader);
        }

        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        // The child has its copy; ours would keep the pipe from ever reporting EOF.
        drop(death_reader);
        let pid = child.id();

        let mut out_watches = Vec::new();
        let mut err_watches = Vec::new();
        for w in watches {
            match w.stream {
                Stream::Stdout => out_watches.push(w),
                Stream::Stderr => err_watches.push(w),
            }
        }
        let stdout = child.stdout.take().context("child stdout")?;
        let stderr = child.stderr.take().context("child stderr")?;
        drain(&name, stdout, log.clone(), out_watches)?;
        drain(&name, stderr, log, err_watches)?;

        Ok(Self {
            name,
            pid,
            _stdin: child.stdin.take(),
            child: Some(child),
            _death_pipe: death_pipe,
            log_path,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits for a watched line, failing with the log's tail if the child exits first or the
    /// deadline passes.
    pub(crate) async fn wait_for(&mut self, seen: Seen, deadline: Duration) -> Result<String> {
        let what = seen.what;
        match tokio::time::timeout(deadline, seen.rx).await {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(_)) => {
                // The output closed without the line: the child is gone or going.
                let status = self.wait_exit(Duration::from_secs(5)).await;
                Err(anyhow!(
                    "{} exited ({status}) before printing {what:?}\n{}",
                    self.name,
                    self.log_tail()
                ))
            }
            Err(_) => Err(anyhow!(
                "{} did not print {what:?} within {deadline:?}\n{}",
                self.name,
                self.log_tail()
            )),
        }
    }

    async fn wait_exit(&mut self, limit: Duration) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => return status.to_string(),
                Some(Ok(None)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(Ok(None)) => return "still running".into(),
                Some(Err(e)) => return format!("wait failed: {e}"),
                None => return "already stopped".into(),
            }
        }
    }

    /// `Err` with the exit status and log tail if the child has exited. Looks without reaping
    /// (`WNOWAIT`), so the group id stays reserved for [`LabProcess::kill`].
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.child.is_none() {
            bail!("{} was stopped", self.name);
        }
        let pid = libc::id_t::from(self.pid);
        // SAFETY: an all-zero siginfo_t is valid; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid out-pointer.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc != 0 {
            bail!(
                "checking on {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: waitid filled `info` (or left it zeroed when nothing has happened).
        let (who, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if who == 0 {
            return Ok(());
        }
        let how = if code == libc::CLD_EXITED {
            format!("exit status {status}")
        } else {
            format!("killed by signal {status}")
        };
        bail!(
            "{} exited unexpectedly ({how})\n{}",
            self.name,
            self.log_tail()
        )
    }

    /// The last lines of this process's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.name, &self.log_path, 40)
    }

    /// Kills the process group and reaps the child. Idempotent.
    pub(crate) fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The group id is the child's pid (process_group(0)). It cannot have been reused: the
        // child is not reaped until the wait below.
        let pgid = i32::try_from(self.pid).unwrap_or(i32::MAX);
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = child.wait();
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a log file, headed by its name.
pub(crate) fn log_tail(name: &str, path: &Path, n: usize) -> String {
    let mut lines = VecDeque::with_capacity(n);
    if let Ok(f) = File::open(path) {
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if lines.len() == n {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }
    let mut out = format!(
        "--- last {} lines of {name} log ({}) ---",
        lines.len(),
        path.display()
    );
    for l in lines {
        out.push('\n');
        out.push_str(&l);
    }
    out
}

/// Copies a child's output into the shared log on a plain thread (so it keeps draining whatever
/// runtime the test uses) and fires watches as their lines go by.
fn drain(
    name: &str,
    stream: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<File>>,
    mut watches: Vec<Watch>,
) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("lab-log-{name}"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                if let Ok(mut f) = log.lock() {
                    let _ = writeln!(f, "{line}");
                }
                if !watches.is_empty() {
                    let (hits, rest): (Vec<_>, Vec<_>) =
                        watches.into_iter().partition(|w| line.contains(w.needle));
                    watches = rest;
                    for w in hits {
                        let _ = w.tx.send(line.to_owned());
                    }
                }
            }
        })
        .context("starting a log thread")?;
    Ok(())
}

/// Runs in the forked child: make `fd` the child's fd 3, open across exec.
fn move_fd_to_3(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain fd syscalls on descriptors this process owns.
    let rc = unsafe {
        if fd == 3 {
            // dup2 onto itself would keep close-on-exec set, so clear it instead.
            libc::fcntl(3, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, 3)
        }
    };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Every process whose command line contains `needle`, as (pid, command line with spaces for
/// NULs). For tests that a lab started what it should, and left nothing behind.
pub fn processes_mentioning(needle: &str) -> Result<Vec<(u32, String)>> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(needle) {
                hits.push((pid, cmdline));
            }
        }
    }
    Ok(hits)
}

/// Fails unless `path` is an executable file.
pub(crate) fn require_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => bail!("{} is not an executable file", path.display()),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}
