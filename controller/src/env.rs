//! Every environment variable tailbox reads, in one place, and a seam to fake them in tests.

use std::collections::HashMap;

/// Tailscale auth key (secret). Never accepted as a flag, so it never lands in argv.
pub const TS_AUTHKEY: &str = "TS_AUTHKEY";
/// Tailnet hostname for the sandbox node.
pub const TS_HOSTNAME: &str = "TS_HOSTNAME";
/// tailscaled's LocalAPI socket path inside the sandbox (cook's name).
pub const TS_SOCKET_PATH: &str = "TS_SOCKET_PATH";
/// tailscaled's `--state` inside the sandbox (cook's name).
pub const TS_STATE_PATH: &str = "TS_STATE_PATH";
/// Control server URL (headscale, or a test control server).
pub const TS_CONTROL_URL: &str = "TS_CONTROL_URL";
/// Extra environment for the sandbox's tailscaled, as `K=V` pairs separated by spaces (lab use).
pub const TAILBOX_TAILSCALED_ENV: &str = "TAILBOX_TAILSCALED_ENV";
/// Tailnet IP of the dev host to ping.
pub const COOK_TAIL_IP: &str = "COOK_TAIL_IP";
/// URL to fetch over the tailnet.
pub const COOK_HTTP_URL: &str = "COOK_HTTP_URL";
/// git remote to list over the tailnet.
pub const COOK_GIT_URL: &str = "COOK_GIT_URL";
/// Leave the sandbox running at the end (`1`).
pub const KEEP_SANDBOX: &str = "KEEP_SANDBOX";
/// The tailbox-agent binaries to run or upload, or directories holding them, `:`-separated.
pub const TAILBOX_AGENT: &str = "TAILBOX_AGENT";
/// The sidecar's state directory in the sandbox (the agent reads the same name).
pub const TAILBOX_SIDECAR_DIR: &str = "TAILBOX_SIDECAR_DIR";
/// The user's home directory (for `~/.modal.toml`).
pub const HOME: &str = "HOME";
/// Any non-empty value turns colour off (<https://no-color.org>), unless `--color always`.
pub const NO_COLOR: &str = "NO_COLOR";
/// A value other than `0` turns colour on even without a terminal, unless `NO_COLOR` is set or
/// `--color never`.
pub const CLICOLOR_FORCE: &str = "CLICOLOR_FORCE";
/// Path of the tailscale release tarball to push into the sandbox (`--tailscale-tarball`).
pub const TAILBOX_TAILSCALE_TARBALL: &str = "TAILBOX_TAILSCALE_TARBALL";

// Modal, with the names and precedence of Modal's own SDKs: env > profile in the config file >
// built-in default, per key.

/// Modal token id (`ak-…`).
pub const MODAL_TOKEN_ID: &str = "MODAL_TOKEN_ID";
/// Modal token secret (`as-…`; secret).
pub const MODAL_TOKEN_SECRET: &str = "MODAL_TOKEN_SECRET";
/// Profile (table) of the config file to use; default: the first with `active = true`.
pub const MODAL_PROFILE: &str = "MODAL_PROFILE";
/// Config file; default `~/.modal.toml`.
pub const MODAL_CONFIG_PATH: &str = "MODAL_CONFIG_PATH";
/// Control-plane URL; default `https://api.modal.com:443`.
pub const MODAL_SERVER_URL: &str = "MODAL_SERVER_URL";
/// Modal environment; default: the workspace's default environment.
pub const MODAL_ENVIRONMENT: &str = "MODAL_ENVIRONMENT";
/// Image builder version; default: the environment's setting.
pub const MODAL_IMAGE_BUILDER_VERSION: &str = "MODAL_IMAGE_BUILDER_VERSION";
/// Longest total wait, in seconds, for server-directed (throttling) retries; default unlimited.
pub const MODAL_MAX_THROTTLE_WAIT: &str = "MODAL_MAX_THROTTLE_WAIT";
/// Modal app the sandboxes belong to; default `cook-sandbox` (cook's spike).
pub const MODAL_APP_NAME: &str = "MODAL_APP_NAME";
/// Registry image of the sandbox; default `ghcr.io/justinmoon/cook-sandbox:latest`.
pub const MODAL_IMAGE: &str = "MODAL_IMAGE";

/// Read access to environment variables.
pub trait Env: Send + Sync {
    /// The value of `name`, if set and valid UTF-8.
    fn var(&self, name: &str) -> Option<String>;

    /// The value of `name`, treating an empty value as unset.
    fn non_empty(&self, name: &str) -> Option<String> {
        self.var(name).filter(|v| !v.trim().is_empty())
    }

    /// Whether `name` is set to a truthy value (`1`, `true`, `yes`).
    fn flag(&self, name: &str) -> bool {
        matches!(
            self.var(name)
                .as_deref()
                .map(str::trim)
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("1" | "true" | "yes" | "on")
        )
    }
}

/// The real process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A fixed environment for tests.
#[derive(Debug, Default, Clone)]
pub struct MapEnv(pub HashMap<String, String>);

impl MapEnv {
    /// An environment holding exactly `pairs`.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}
