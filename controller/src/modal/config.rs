//! Modal credentials and settings, resolved the way Modal's SDKs do it.
//!
//! Per key: the environment variable, else the chosen profile of the config file, else the
//! built-in default. The config file is `$MODAL_CONFIG_PATH`, else `~/.modal.toml`: one TOML
//! table per profile with `token_id`, `token_secret`, `server_url`, `environment`,
//! `image_builder_version` and `active`. The profile is `$MODAL_PROFILE`, else the first table
//! with `active = true`, else a table named `default` (Python's fallback; Go and JS would use no
//! profile at all, which only differs when a lone `[default]` is not marked active).

use std::path::PathBuf;
use std::time::Duration;

use crate::env::{self, Env};
use crate::secret::Secret;

/// Why the Modal settings cannot be used. All of these are the user's to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One half of the token is configured.
    #[error("A Modal token {present} is configured ({source_name}) but no token {missing}")]
    HalfToken {
        /// "id" or "secret".
        present: &'static str,
        /// The other half.
        missing: &'static str,
        /// Where the present half came from.
        source_name: String,
    },
    /// `MODAL_SERVER_URL` (or the profile's `server_url`) is unusable.
    #[error("The Modal server URL {url:?} {problem}")]
    ServerUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `MODAL_MAX_THROTTLE_WAIT` is not a number of seconds.
    #[error(
        "`{}` {value:?} is not a number of seconds",
        env::MODAL_MAX_THROTTLE_WAIT
    )]
    ThrottleWait {
        /// The value as set.
        value: String,
    },
    /// The config file exists (or was named) but cannot be read.
    #[error("Failed to read the Modal config file {}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("Failed to parse the Modal config file {}", path.display())]
    Unparsable {
        /// The file.
        path: PathBuf,
        /// The parser's reason, without the quoted line (which may hold the secret).
        #[source]
        reason: TomlReason,
    },
    /// `MODAL_PROFILE` names a profile the file lacks.
    #[error("`MODAL_PROFILE` is {name:?}, but {} has no such profile", path.display())]
    NoSuchProfile {
        /// The profile asked for.
        name: String,
        /// The file.
        path: PathBuf,
    },
}

/// A TOML parse error's reason (position and message only).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TomlReason(pub(crate) String);

/// Modal's production control plane.
pub const DEFAULT_SERVER_URL: &str = "https://api.modal.com:443";

/// Resolved Modal settings. `Debug` never shows the token secret.
#[derive(Clone, Debug)]
pub struct ModalConfig {
    /// Token id (`ak-…`); not secret on its own, but only useful with the secret.
    pub token_id: String,
    /// Token secret (`as-…`).
    pub token_secret: Secret,
    /// Control-plane URL.
    pub server_url: String,
    /// Environment name; empty means the workspace default.
    pub environment: String,
    /// Image builder version, when configured (else asked from the environment).
    pub image_builder_version: Option<String>,
    /// Longest total wait for throttling retries; `None` is unlimited.
    pub max_throttle_wait: Option<Duration>,
    /// Where the credentials came from, for messages (never the values).
    pub source: String,
}

impl ModalConfig {
    /// Whether plaintext (http) is allowed, which only a local control plane (tests) may use;
    /// the router URLs it hands out may then be plaintext too.
    pub fn plaintext(&self) -> bool {
        self.server_url.starts_with("http://")
    }
}

/// Resolves the settings; `Ok(None)` when no credentials are configured anywhere.
pub fn resolve(env: &dyn Env) -> Result<Option<ModalConfig>, ConfigError> {
    resolve_over(env, ConfigFile::load(env)?)
}

/// Resolves the settings from `env` over the config file's text (as read from `path`).
#[cfg(feature = "fuzzing")]
pub(crate) fn resolve_text(
    env: &dyn Env,
    path: PathBuf,
    text: &str,
) -> Result<Option<ModalConfig>, ConfigError> {
    resolve_over(env, ConfigFile::parse(path, text)?)
}

fn resolve_over(env: &dyn Env, file: ConfigFile) -> Result<Option<ModalConfig>, ConfigError> {
    let profile = file.profile(env)?;
    let from_profile = |key: &str| -> Option<String> {
        profile
            .as_ref()
            .and_then(|(_, table)| table.get(key))
            .and_then(toml::Value::as_str)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let pick = |var: &str, key: &str| -> Option<(String, String)> {
        if let Some(value) = env.non_empty(var) {
            return Some((value.trim().to_owned(), var.to_owned()));
        }
        from_profile(key).map(|v| {
            let name = profile.as_ref().map(|(n, _)| n.as_str()).unwrap_or("");
            (v, format!("profile [{name}] of {}", file.path.display()))
        })
    };

    let token_id = pick(env::MODAL_TOKEN_ID, "token_id");
    let token_secret = pick(env::MODAL_TOKEN_SECRET, "token_secret");
    let (token_id, token_secret, source) = match (token_id, token_secret) {
        (None, None) => return Ok(None),
        (Some((id, id_src)), Some((secret, secret_src))) => {
            let source = if id_src == secret_src {
                id_src
            } else {
                format!("{id_src} and {secret_src}")
            };
            (id, Secret::new(secret), source)
        }
        (Some((_, src)), None) => {
            return Err(ConfigError::HalfToken {
                present: "id",
                missing: "secret",
                source_name: src,
            });
        }
        (None, Some((_, src))) => {
            return Err(ConfigError::HalfToken {
                present: "secret",
                missing: "id",
                source_name: src,
            });
        }
    };

    let server_url = pick(env::MODAL_SERVER_URL, "server_url")
        .map(|(v, _)| v)
        .unwrap_or_else(|| DEFAULT_SERVER_URL.to_owned());
    validate_server_url(&server_url)?;
    let environment = pick(env::MODAL_ENVIRONMENT, "environment")
        .map(|(v, _)| v)
        .unwrap_or_default();
    let image_builder_version =
        pick(env::MODAL_IMAGE_BUILDER_VERSION, "image_builder_version").map(|(v, _)| v);
    let max_throttle_wait = match env.non_empty(env::MODAL_MAX_THROTTLE_WAIT) {
        None => None,
        Some(raw) => match raw.trim().parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs >= 0.0 => Some(Duration::from_secs_f64(secs)),
            _ => return Err(ConfigError::ThrottleWait { value: raw }),
        },
    };
    Ok(Some(ModalConfig {
        token_id,
        token_secret,
        server_url,
        environment,
        image_builder_version,
        max_throttle_wait,
        source,
    }))
}

fn validate_server_url(raw: &str) -> Result<(), ConfigError> {
    let problem = |problem: String| ConfigError::ServerUrl {
        url: raw.to_owned(),
        problem,
    };
    let url = url::Url::parse(raw).map_err(|err| problem(format!("is not a URL: {err}")))?;
    match url.scheme() {
        "https" => Ok(()),
        // Plaintext is for a control plane on this machine (tests and the fake Modal).
        "http" if url.host_str().is_some_and(is_loopback_host) => Ok(()),
        "http" => Err(problem("is plain http on a non-local host".into())),
        other => Err(problem(format!("uses the unsupported scheme {other:?}"))),
    }
}

/// Whether `host` names this machine.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The parsed config file (empty when it does not exist).
struct ConfigFile {
    path: PathBuf,
    tables: Vec<(String, toml::Table)>,
}

impl ConfigFile {
    fn load(env: &dyn Env) -> Result<Self, ConfigError> {
        let (path, explicit) = match env.non_empty(env::MODAL_CONFIG_PATH) {
            Some(p) => (PathBuf::from(p), true),
            None => (
                PathBuf::from(env.non_empty(env::HOME).unwrap_or_default()).join(".modal.toml"),
                false,
            ),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self {
                    path,
                    tables: Vec::new(),
                });
            }
            Err(source) => return Err(ConfigError::Unreadable { path, source }),
        };
        Self::parse(path, &text)
    }

    /// The file's text, read from `path`.
    fn parse(path: PathBuf, text: &str) -> Result<Self, ConfigError> {
        // `toml::Table` sorts its keys, but "the first active profile" means file order.
        let doc: toml::Table = match text.parse() {
            Ok(doc) => doc,
            // The parse error quotes the offending line, which may hold the secret: keep only
            // its reason.
            Err(err) => {
                let err: toml::de::Error = err;
                return Err(ConfigError::Unparsable {
                    path,
                    reason: TomlReason(err.message().to_owned()),
                });
            }
        };
        let order = table_order(text);
        let mut tables: Vec<(String, toml::Table)> = doc
            .into_iter()
            .filter_map(|(name, value)| match value {
                toml::Value::Table(t) => Some((name, t)),
                _ => None,
            })
            .collect();
        tables.sort_by_key(|(name, _)| order.iter().position(|n| n == name));
        Ok(Self { path, tables })
    }

    fn profile(&self, env: &dyn Env) -> Result<Option<(String, toml::Table)>, ConfigError> {
        if let Some(name) = env.non_empty(env::MODAL_PROFILE) {
            let name = name.trim().to_owned();
            return match self.tables.iter().find(|(n, _)| *n == name) {
                Some((n, t)) => Ok(Some((n.clone(), t.clone()))),
                None => Err(ConfigError::NoSuchProfile {
                    name,
                    path: self.path.clone(),
                }),
            };
        }
        let active = self.tables.iter().find(|(_, t)| {
            t.get("active")
                .and_then(toml::Value::as_bool)
                .unwrap_or(false)
        });
        Ok(active
            .or_else(|| self.tables.iter().find(|(n, _)| n == "default"))
            .cloned())
    }
}

/// Names of the top-level tables in the order they appear (`[name]` headers).
fn table_order(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let inner = line.strip_prefix('[')?.split(']').next()?;
            (!line.starts_with("[[")).then(|| inner.trim().trim_matches('"').to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    fn write(dir: &tempfile::TempDir, text: &str) -> String {
        let path = dir.path().join("modal.toml");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    const FILE: &str = r#"
[first]
token_id = "ak-first"
token_secret = "as-first"

[work]
token_id = "ak-work"
token_secret = "as-work"
server_url = "http://127.0.0.1:1234"
environment = "staging"
active = true

[other]
token_id = "ak-other"
token_secret = "as-other"
active = true
"#;

    #[test]
    fn env_over_profile_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, FILE);

        // The first active profile.
        let c = resolve(&MapEnv::from_pairs([("MODAL_CONFIG_PATH", path.as_str())]))
            .unwrap()
            .unwrap();
        assert_eq!(c.token_id, "ak-work");
        assert_eq!(c.token_secret.expose(), "as-work");
        assert_eq!(c.server_url, "http://127.0.0.1:1234");
        assert_eq!(c.environment, "staging");
        assert!(c.source.contains("profile [work]"), "{}", c.source);

        // MODAL_PROFILE picks another; its missing keys fall back to the defaults.
        let c = resolve(&MapEnv::from_pairs([
            ("MODAL_CONFIG_PATH", path.as_str()),
            ("MODAL_PROFILE", "first"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.token_id, "ak-first");
        assert_eq!(c.server_url, DEFAULT_SERVER_URL);
        assert_eq!(c.environment, "");

        // Env beats the profile, key by key.
        let c = resolve(&MapEnv::from_pairs([
            ("MODAL_CONFIG_PATH", path.as_str()),
            ("MODAL_TOKEN_ID", "ak-env"),
            ("MODAL_TOKEN_SECRET", "as-env"),
            ("MODAL_ENVIRONMENT", "prod"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.token_id, "ak-env");
        assert_eq!(c.token_secret.expose(), "as-env");
        assert_eq!(c.environment, "prod");
        assert_eq!(c.server_url, "http://127.0.0.1:1234");
        assert_eq!(c.source, "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET");
    }

    #[test]
    fn home_modal_toml_and_the_default_profile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(".modal.toml"),
            "[default]\ntoken_id = \"ak-d\"\ntoken_secret = \"as-d\"\n",
        )
        .unwrap();
        let home = dir.path().display().to_string();
        let c = resolve(&MapEnv::from_pairs([("HOME", home.as_str())]))
            .unwrap()
            .unwrap();
        assert_eq!(c.token_id, "ak-d");
    }

    #[test]
    fn nothing_configured_is_none_and_half_a_token_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().display().to_string();
        assert!(
            resolve(&MapEnv::from_pairs([("HOME", home.as_str())]))
                .unwrap()
                .is_none()
        );
        let err = resolve(&MapEnv::from_pairs([
            ("HOME", home.as_str()),
            ("MODAL_TOKEN_ID", "ak-x"),
        ]))
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::HalfToken {
                    missing: "secret",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn bad_config_is_refused_without_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[p]\ntoken_secret = \"as-hunter2\nactive = true\n");
        let err = resolve(&MapEnv::from_pairs([("MODAL_CONFIG_PATH", path.as_str())])).unwrap_err();
        assert!(matches!(err, ConfigError::Unparsable { .. }), "{err:?}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");

        let err = resolve(&MapEnv::from_pairs([
            ("MODAL_TOKEN_ID", "ak"),
            ("MODAL_TOKEN_SECRET", "as"),
            ("MODAL_SERVER_URL", "http://api.example.com"),
        ]))
        .unwrap_err();
        assert!(matches!(err, ConfigError::ServerUrl { .. }), "{err:?}");

        let path = write(&dir, FILE);
        let err = resolve(&MapEnv::from_pairs([
            ("MODAL_CONFIG_PATH", path.as_str()),
            ("MODAL_PROFILE", "nope"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("no such profile"));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = resolve(&MapEnv::from_pairs([
            ("MODAL_TOKEN_ID", "ak-1"),
            ("MODAL_TOKEN_SECRET", "as-hunter2"),
        ]))
        .unwrap()
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
