//! The one URL redactor of the workspace: credentials in URLs (`user:password@`) never reach a
//! log, an error, an event or a report. It lives here because both binaries depend on this crate
//! and it needs nothing but `std`.

/// What replaces the userinfo of a URL.
pub const REDACTED: &str = "****";

/// Characters that end a URL quoted in free text (error messages put URLs in quotes, brackets
/// and backticks).
const URL_END: &str = "\"'<>()`";

/// Replaces the userinfo (`user:password@`) of one URL with `****@`; anything else is returned
/// unchanged, including text that is not a URL.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => format!(
            "{}://{REDACTED}@{}{}",
            &url[..scheme_end],
            &authority[at + 1..],
            &rest[authority_end..]
        ),
        None => url.to_owned(),
    }
}

/// Applies [`redact_url`] to every URL in a free text, leaving the rest of the text as it is.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme runs back to the first character a scheme cannot hold.
        let start = rest[..i]
            .char_indices()
            .rev()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "+.-".contains(c)))
            .map_or(0, |(p, c)| p + c.len_utf8());
        let end = rest[i + 3..]
            .find(|c: char| c.is_whitespace() || URL_END.contains(c))
            .map_or(rest.len(), |p| i + 3 + p);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_after_a_multibyte_character_is_redacted_without_a_panic() {
        // Found by the fs_tools_json fuzz target: the scheme's start was taken as one byte past
        // the character before it, inside a multibyte one.
        assert_eq!(
            redact_urls("\u{fffd}https://u:p@h/x and ü://y"),
            "\u{fffd}https://****@h/x and ü://y"
        );
    }

    #[test]
    fn one_url_loses_its_userinfo_and_nothing_else() {
        assert_eq!(
            redact_url("https://u:p@cook.example.com:8443/git/a.git?x=1"),
            "https://****@cook.example.com:8443/git/a.git?x=1"
        );
        assert_eq!(
            redact_url("http://100.64.0.1:7420/health"),
            "http://100.64.0.1:7420/health"
        );
        // An @ after the authority is part of the path.
        assert_eq!(redact_url("http://h/p@q"), "http://h/p@q");
        // A password with an unencoded @ still disappears whole.
        assert_eq!(redact_url("http://u:p@ss@h/x"), "http://****@h/x");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn every_url_in_a_text_is_redacted_and_the_text_kept() {
        assert_eq!(
            redact_urls("clone https://u:pw@h.example/git/r.git failed; see http://x/y"),
            "clone https://****@h.example/git/r.git failed; see http://x/y"
        );
        assert_eq!(
            redact_urls("a http://u:p@h:1/x b (git://h/y) c"),
            "a http://****@h:1/x b (git://h/y) c"
        );
        assert_eq!(redact_urls("\"http://a:b@c:1\""), "\"http://****@c:1\"");
        assert_eq!(
            redact_urls("`socks5h://u:p@127.0.0.1:1055`"),
            "`socks5h://****@127.0.0.1:1055`"
        );
        assert_eq!(redact_urls("no urls here"), "no urls here");
        assert_eq!(redact_urls("://odd"), "://odd");
    }
}
