//! The machine's processes: which of a test's are still running ([`processes`]), and watching
//! every process for a secret in its argv or environment for as long as a test's scenario runs
//! ([`ProcessScanner`]).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A background thread reading every `/proc/<pid>/cmdline` and `environ`, repeatedly.
pub struct ProcessScanner {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<ScanReport>,
}

/// What the scanner saw.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// How many times every process was read.
    pub scans: usize,
    /// Every pid seen at least once (to prove the processes that held the secret were scanned).
    pub pids_seen: BTreeSet<u32>,
    /// Processes whose argv or environment held the secret, with that text (NULs as spaces).
    pub hits: Vec<(u32, String)>,
}

impl ProcessScanner {
    /// Starts scanning for `secret` every 20 ms.
    pub fn start(secret: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let secret = secret.as_bytes().to_vec();
        let thread = std::thread::spawn(move || {
            let mut report = ScanReport::default();
            while !flag.load(Ordering::Relaxed) {
                for (pid, text) in process_texts() {
                    report.pids_seen.insert(pid);
                    if contains(&text, &secret) {
                        let shown = String::from_utf8_lossy(&text).replace('\0', " ");
                        report.hits.push((pid, shown));
                    }
                }
                report.scans += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            report
        });
        Self { stop, thread }
    }

    /// Stops scanning and returns what was seen.
    pub fn stop(self) -> ScanReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| panic!("the process scanner panicked"))
    }
}

/// Every process's argv and environment, as raw bytes.
fn process_texts() -> Vec<(u32, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let mut text = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            text.extend(std::fs::read(entry.path().join("environ")).unwrap_or_default());
            Some((pid, text))
        })
        .collect()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// One live process, as /proc showed it when [`processes`] read it.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// The binary it runs (`/proc/<pid>/exe`), when readable.
    pub exe: Option<PathBuf>,
    /// Its arguments, `argv[0]` first.
    pub args: Vec<String>,
}

impl Process {
    /// The arguments joined by spaces, for searching and for messages.
    pub fn cmdline(&self) -> String {
        self.args.join(" ")
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), while the process lives.
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status.lines().find_map(|line| {
            line.strip_prefix(field)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
    }
}

/// Every live process on the machine except the caller: zombies (dead, not yet reaped) and
/// processes that end while being read are left out.
pub fn processes() -> Vec<Process> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // State and parent follow the command name, which is in parentheses and may hold
            // spaces.
            let mut fields = stat.rsplit_once(") ")?.1.split_whitespace();
            let state = fields.next()?;
            let ppid = fields.next()?.parse().ok()?;
            if pid == me || state == "Z" || state == "X" {
                return None;
            }
            let args = std::fs::read(entry.path().join("cmdline"))
                .map(|raw| {
                    raw.split(|&b| b == 0)
                        .filter(|arg| !arg.is_empty())
                        .map(|arg| String::from_utf8_lossy(arg).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            Some(Process {
                pid,
                ppid,
                exe: std::fs::read_link(entry.path().join("exe")).ok(),
                args,
            })
        })
        .collect()
}

/// Every live process that runs a binary under `dir` or names `dir` in its argv. A test that
/// puts the binaries it runs (the agent, tailscaled) and their files in a directory of its own
/// finds with this whatever of them is left, and only that: other tests' processes and the
/// lab's run from elsewhere.
pub fn processes_under(dir: &std::path::Path) -> Vec<Process> {
    let needle = dir.display().to_string();
    processes()
        .into_iter()
        .filter(|p| {
            p.exe.as_ref().is_some_and(|exe| exe.starts_with(dir))
                || p.args.iter().any(|a| a.contains(&needle))
        })
        .collect()
}
