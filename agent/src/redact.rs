//! Keeping secrets (the auth key, a target URL's credentials) out of events, logs and reports.
//! URLs lose their userinfo through the workspace's one redactor ([`tailbox_proto::redact`]);
//! known secrets are also scrubbed wherever they appear on their own, since a log line or an
//! error message may quote them.

use tailbox_proto::redact::{REDACTED, redact_urls};

/// Secrets to scrub from anything that leaves the agent.
#[derive(Debug, Default, Clone)]
pub struct Secrets(Vec<String>);

impl Secrets {
    /// These secrets (the auth key, say); empty ones are ignored.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut found: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        // Longest first, so a secret containing another is replaced whole.
        found.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self(found)
    }

    /// The user name and password of `url`, as written and percent-decoded.
    pub fn from_url(url: &str) -> Self {
        let Ok(parsed) = url::Url::parse(url.trim()) else {
            // Not a URL: nothing to take apart, and URL redaction still covers what looks like
            // one.
            return Self::default();
        };
        let mut found = Vec::new();
        for part in [parsed.username(), parsed.password().unwrap_or("")] {
            // Very short strings would scrub ordinary words; they are still kept out of URLs
            // by the URL redaction.
            if part.len() >= 3 {
                found.push(part.to_owned());
                let decoded = percent_encoding::percent_decode_str(part)
                    .decode_utf8_lossy()
                    .into_owned();
                if decoded != part {
                    found.push(decoded);
                }
            }
        }
        Self::new(found)
    }

    /// Redacts URLs in `text` and replaces every occurrence of a known secret.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = redact_urls(text);
        for secret in &self.0 {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_from_urls_and_free_text() {
        let s = Secrets::from_url("https://alice:s3cr%40t-pass@cook.example.com/git/a.git");
        let text = "error for url (https://alice:s3cr%40t-pass@cook.example.com/x): \
                    auth s3cr@t-pass rejected for alice";
        let out = s.scrub(text);
        assert!(!out.contains("s3cr"), "{out}");
        assert!(!out.contains("alice"), "{out}");
        assert!(out.contains("https://****@cook.example.com/x"), "{out}");
    }

    #[test]
    fn every_occurrence_of_a_secret_is_scrubbed() {
        let s = Secrets::new(["tskey-auth-abc".to_owned(), String::new()]);
        assert_eq!(
            s.scrub("key tskey-auth-abc and tskey-auth-abc again"),
            "key **** and **** again"
        );
        assert_eq!(s.scrub("nothing here"), "nothing here");
    }

    #[test]
    fn a_url_without_credentials_scrubs_nothing_else() {
        let s = Secrets::from_url("http://100.64.0.1:7420/health");
        assert_eq!(
            s.scrub("GET /health answered 200"),
            "GET /health answered 200"
        );
        assert_eq!(Secrets::from_url("not a url").scrub("x"), "x");
    }
}
