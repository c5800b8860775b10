//! Secrets that cannot be printed by accident.

use std::fmt;

/// A secret string whose `Debug` and `Display` print `****`. Read it with [`Secret::expose`], only
/// at the point where it goes on the wire.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// Removes userinfo (`user:password@`) from every URL in a text: the workspace's one redactor.
pub use tailbox_proto::redact::redact_urls;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret::new("tskey-auth-abc123");
        assert_eq!(format!("{s}"), "****");
        assert_eq!(format!("{s:?}"), "Secret(****)");
        assert_eq!(s.expose(), "tskey-auth-abc123");
    }
}
