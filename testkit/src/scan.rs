//! Watching every process on the machine for a secret in its argv or environment, for as long
//! as a test's scenario runs.

use std::collections::BTreeSet;
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

/// Every live process that runs a binary under `dir` or names `dir` in its argv, as (pid,
/// argv with spaces for NULs). A test that puts the binaries it runs (the agent, tailscaled)
/// and their files in a directory of its own finds with this whatever of them is left, and only
/// that: other tests' processes and the lab's run from elsewhere. Zombies are dead and not
/// counted.
pub fn processes_under(dir: &std::path::Path) -> Vec<(u32, String)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The state follows the command name's closing parenthesis.
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next();
            if state == Some('Z') {
                return None;
            }
            let exe = std::fs::read_link(entry.path().join("exe")).unwrap_or_default();
            let argv = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            (exe.starts_with(dir) || contains(&argv, needle))
                .then(|| (pid, String::from_utf8_lossy(&argv).replace('\0', " ")))
        })
        .collect()
}
