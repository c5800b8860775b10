//! Facts about the sandbox, gathered before touching the network.
//!
//! This replaces the spike's `id; uname -a; cat /etc/os-release; ls /dev/net/tun; grep Cap…`
//! shell dump with typed evidence. Reading is separated from parsing so the parsers can be tested
//! on fixed inputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tailbox_proto::agent::v1::{
    CheckResult, CheckStatus, Layer, OsRelease, PreflightEvidence, ProcessCapabilities, Uname,
    Warning, check_result,
};

use crate::events::duration;

/// Bit of CAP_NET_ADMIN in the capability sets (linux/capability.h).
const CAP_NET_ADMIN_BIT: u32 = 12;

/// Where CA bundles live on the distributions we meet (Debian, Fedora/RHEL, Alpine, NixOS).
const CA_BUNDLE_CANDIDATES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/certs/ca-bundle.crt",
    "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
    "/run/current-system/sw/etc/ssl/certs/ca-bundle.crt",
];

/// Where the system root for the facts is; tests point this at a fixture tree.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
        }
    }
}

impl Host {
    /// Facts read relative to `root` instead of `/` (for tests).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `absolute` under this root.
    pub fn resolve(&self, absolute: &str) -> PathBuf {
        self.root.join(absolute.trim_start_matches('/'))
    }

    fn read(&self, absolute: &str) -> Option<String> {
        std::fs::read_to_string(self.resolve(absolute)).ok()
    }
}

/// Gathers the evidence. Never fails: a fact that cannot be read is left empty.
pub fn collect(host: &Host, ssl_cert_file: Option<&str>) -> PreflightEvidence {
    let uname = nix::sys::utsname::uname().ok().map(|u| Uname {
        sysname: u.sysname().to_string_lossy().into_owned(),
        nodename: u.nodename().to_string_lossy().into_owned(),
        release: u.release().to_string_lossy().into_owned(),
        version: u.version().to_string_lossy().into_owned(),
        machine: u.machine().to_string_lossy().into_owned(),
    });
    let os_release = host
        .read("/etc/os-release")
        .or_else(|| host.read("/usr/lib/os-release"))
        .map(|text| parse_os_release(&text));
    let capabilities = host
        .read("/proc/self/status")
        .map(|text| parse_proc_status(&text));
    let ca_bundle_path = find_ca_bundle(host, ssl_cert_file);
    let standard_loader = standard_glibc_loader(std::env::consts::ARCH)
        .filter(|p| host.resolve(p).exists())
        .unwrap_or_default();
    PreflightEvidence {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        uname,
        arch: std::env::consts::ARCH.to_owned(),
        os_release,
        dev_net_tun_present: host.resolve("/dev/net/tun").exists(),
        capabilities,
        ca_bundle_present: !ca_bundle_path.is_empty(),
        ca_bundle_path,
        glibc_loader_standard: standard_loader.to_owned(),
        glibc_loaders_nix: nix_store_glibc_loaders(&host.resolve("/nix/store")),
        gvisor: host.resolve("/proc/gvisor").exists(),
    }
}

/// Runs the preflight check: facts as evidence, plus warnings for facts that will hurt later.
pub fn check(host: &Host, ssl_cert_file: Option<&str>) -> (CheckResult, Vec<Warning>) {
    let started = Instant::now();
    let evidence = collect(host, ssl_cert_file);
    let mut warnings = Vec::new();
    if !evidence.ca_bundle_present {
        warnings.push(Warning {
            code: "no-ca-bundle".into(),
            message: "no CA bundle found; TLS to the control server and https targets will fail"
                .into(),
            layer: Layer::Sandbox as i32,
        });
    }
    let (status, detail, hint) = if warnings.is_empty() {
        (CheckStatus::Pass, summary(&evidence), String::new())
    } else {
        (
            CheckStatus::Warn,
            format!("{}; no CA bundle found", summary(&evidence)),
            "add a CA bundle to the image (e.g. the cacert package) or set SSL_CERT_FILE".into(),
        )
    };
    let result = CheckResult {
        name: "preflight".into(),
        target: String::new(),
        status: status as i32,
        failure_class: 0,
        layer: Layer::Sandbox as i32,
        detail,
        hint,
        duration: Some(duration(started.elapsed())),
        log_tail: Vec::new(),
        evidence: Some(check_result::Evidence::Preflight(evidence)),
    };
    (result, warnings)
}

fn summary(e: &PreflightEvidence) -> String {
    let os = e
        .os_release
        .as_ref()
        .map(|o| {
            if o.pretty_name.is_empty() {
                o.id.clone()
            } else {
                o.pretty_name.clone()
            }
        })
        .unwrap_or_else(|| "unknown OS".into());
    let kernel = e.uname.as_ref().map(|u| u.release.as_str()).unwrap_or("?");
    format!(
        "{os}, kernel {kernel}, {arch}, uid {uid}, /dev/net/tun {tun}",
        arch = e.arch,
        uid = e.uid,
        tun = if e.dev_net_tun_present {
            "present"
        } else {
            "absent"
        },
    )
}

/// Parses os-release(5): KEY=value lines, values optionally quoted.
pub fn parse_os_release(text: &str) -> OsRelease {
    let mut release = OsRelease::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        match key {
            "ID" => release.id = value,
            "VERSION_ID" => release.version_id = value,
            "PRETTY_NAME" => release.pretty_name = value,
            _ => {}
        }
    }
    release
}

fn unquote(value: &str) -> String {
    let stripped = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(value);
    stripped.replace("\\\"", "\"").replace("\\\\", "\\")
}

/// Parses the capability lines of /proc/<pid>/status.
pub fn parse_proc_status(text: &str) -> ProcessCapabilities {
    let mut caps = ProcessCapabilities::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "CapPrm" => caps.cap_prm = value.to_owned(),
            "CapEff" => caps.cap_eff = value.to_owned(),
            "CapBnd" => caps.cap_bnd = value.to_owned(),
            "NoNewPrivs" => caps.no_new_privs = value == "1",
            _ => {}
        }
    }
    caps.net_admin_effective = u64::from_str_radix(&caps.cap_eff, 16)
        .map(|bits| bits & (1 << CAP_NET_ADMIN_BIT) != 0)
        .unwrap_or(false);
    caps
}

fn find_ca_bundle(host: &Host, ssl_cert_file: Option<&str>) -> String {
    ssl_cert_file
        .into_iter()
        .chain(CA_BUNDLE_CANDIDATES.iter().copied())
        .find(|candidate| {
            std::fs::metadata(host.resolve(candidate))
                .map(|m| m.is_file() && m.len() > 0)
                .unwrap_or(false)
        })
        .map(str::to_owned)
        .unwrap_or_default()
}

/// The glibc dynamic loader path the toolchain bakes into binaries for `arch`.
pub fn standard_glibc_loader(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("/lib64/ld-linux-x86-64.so.2"),
        "aarch64" => Some("/lib/ld-linux-aarch64.so.1"),
        _ => None,
    }
}

/// glibc loaders in a Nix store: `<store>/*glibc*/lib/ld-linux-*.so.*`, sorted for stable output.
pub fn nix_store_glibc_loaders(store: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(store) else {
        return Vec::new();
    };
    let mut loaders = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().contains("glibc") {
            continue;
        }
        let Ok(libs) = std::fs::read_dir(entry.path().join("lib")) else {
            continue;
        };
        for lib in libs.flatten() {
            let name = lib.file_name().to_string_lossy().into_owned();
            if name.starts_with("ld-linux-") && name.contains(".so.") {
                loaders.push(lib.path().to_string_lossy().into_owned());
            }
        }
    }
    loaders.sort();
    loaders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_handles_quotes_and_ignores_noise() {
        let text = "NAME=\"NixOS\"\nID=nixos\nVERSION_ID=\"24.05\"\n# comment\nPRETTY_NAME='NixOS 24.05 (Uakari)'\nbogus\n";
        let release = parse_os_release(text);
        assert_eq!(release.id, "nixos");
        assert_eq!(release.version_id, "24.05");
        assert_eq!(release.pretty_name, "NixOS 24.05 (Uakari)");
    }

    #[test]
    fn proc_status_capabilities_and_net_admin_bit() {
        let text = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t0000000000001000\nCapBnd:\t000001ffffffffff\nNoNewPrivs:\t1\n";
        let caps = parse_proc_status(text);
        assert_eq!(caps.cap_prm, "000001ffffffffff");
        assert_eq!(caps.cap_eff, "0000000000001000");
        assert_eq!(caps.cap_bnd, "000001ffffffffff");
        assert!(caps.no_new_privs);
        assert!(caps.net_admin_effective);

        let without = parse_proc_status("CapEff:\t0000000000000fff\nNoNewPrivs:\t0\n");
        assert!(!without.net_admin_effective);
        assert!(!without.no_new_privs);
    }

    #[test]
    fn facts_come_from_the_given_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mk = |rel: &str, body: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        mk("etc/os-release", "ID=testos\nPRETTY_NAME=\"Test OS 1\"\n");
        mk("dev/net/tun", "");
        mk("etc/ssl/cert.pem", "-----BEGIN CERTIFICATE-----\n");
        mk(
            "nix/store/abc-glibc-2.39/lib/ld-linux-x86-64.so.2",
            "\x7fELF",
        );
        mk("nix/store/def-bash-5/lib/ld-linux-x86-64.so.2", "\x7fELF");
        let evidence = collect(&Host::with_root(root), None);
        assert_eq!(evidence.os_release.unwrap().id, "testos");
        assert!(evidence.dev_net_tun_present);
        assert_eq!(evidence.ca_bundle_path, "/etc/ssl/cert.pem");
        assert_eq!(evidence.glibc_loaders_nix.len(), 1);
        assert!(evidence.glibc_loaders_nix[0].ends_with("abc-glibc-2.39/lib/ld-linux-x86-64.so.2"));
        assert!(!evidence.gvisor);
    }

    #[test]
    fn missing_ca_bundle_is_a_warning_with_a_hint() {
        let root = tempfile::tempdir().unwrap();
        let (result, warnings) = check(&Host::with_root(root.path()), None);
        assert_eq!(result.status, CheckStatus::Warn as i32);
        assert!(!result.hint.is_empty());
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].code, "no-ca-bundle");
    }
}
