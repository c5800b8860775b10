//! tailscaled: finding it ([`provision`]), running it ([`supervisor`]), restart delays
//! ([`backoff`]), and the settings derived from a request.

pub mod backoff;
pub mod provision;
pub mod supervisor;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tailbox_proto::agent::v1::DaemonConfig;

/// Default listener for the SOCKS5 server and HTTP proxy (the port cook's scripts use).
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:1055";
/// Default `--state`: in memory, so the node is ephemeral and logs itself out on SIGTERM.
pub const DEFAULT_STATE: &str = "mem:";
/// Default restart budget.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
/// Uptime after which tailscaled's restart budget starts over: five crashes within minutes is a
/// crash loop worth giving up on, while a crash after this long is an isolated event (a
/// sidecar lives for hours, and must not run out of restarts after a few spread over a day).
pub const DEFAULT_HEALTHY_PERIOD: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Paths and listeners for tailscaled, with the request's overrides applied.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// LocalAPI socket.
    pub socket: PathBuf,
    /// `--state`.
    pub state: String,
    /// `--statedir`.
    pub state_dir: PathBuf,
    /// SOCKS5 + HTTP proxy listener.
    pub proxy_listen: SocketAddr,
    /// Restart budget.
    pub max_restarts: u32,
}

impl DaemonSettings {
    /// Applies `config` over defaults rooted at `run_dir` (a directory private to this run).
    pub fn resolve(config: &DaemonConfig, run_dir: &Path) -> Result<Self, String> {
        let proxy_text = if config.proxy_listen.is_empty() {
            DEFAULT_PROXY_LISTEN
        } else {
            config.proxy_listen.as_str()
        };
        let proxy_listen = proxy_text.parse::<SocketAddr>().map_err(|_| {
            format!("proxy listen address {proxy_text:?} is not host:port with an IP host")
        })?;
        Ok(Self {
            socket: non_empty(&config.socket_path)
                .map_or_else(|| run_dir.join("tailscaled.sock"), PathBuf::from),
            state: non_empty(&config.state).unwrap_or(DEFAULT_STATE).to_owned(),
            state_dir: non_empty(&config.state_dir)
                .map_or_else(|| run_dir.join("state"), PathBuf::from),
            proxy_listen,
            max_restarts: if config.max_restarts == 0 {
                DEFAULT_MAX_RESTARTS
            } else {
                config.max_restarts
            },
        })
    }
}

fn non_empty(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let run = Path::new("/tmp/tailbox/run-1");
        let d = DaemonSettings::resolve(&DaemonConfig::default(), run).unwrap();
        assert_eq!(d.socket, run.join("tailscaled.sock"));
        assert_eq!(d.state, "mem:");
        assert_eq!(d.proxy_listen.to_string(), "127.0.0.1:1055");
        assert_eq!(d.max_restarts, 5);

        let config = DaemonConfig {
            socket_path: "/tmp/ts.sock".into(),
            state: "/tmp/ts.state".into(),
            proxy_listen: "127.0.0.1:0".into(),
            max_restarts: 2,
            ..Default::default()
        };
        let d = DaemonSettings::resolve(&config, run).unwrap();
        assert_eq!(d.socket, Path::new("/tmp/ts.sock"));
        assert_eq!(d.state, "/tmp/ts.state");
        assert_eq!(d.proxy_listen.port(), 0);
        assert_eq!(d.max_restarts, 2);

        let bad = DaemonConfig {
            proxy_listen: "localhost:1055".into(),
            ..Default::default()
        };
        assert!(DaemonSettings::resolve(&bad, run).is_err());
    }
}
