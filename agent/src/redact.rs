//! Keeping secrets out of events, logs and reports.

/// Removes a password (and the user name) from a URL, so the result can be logged and reported.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => format!(
            "{}://****@{}{}",
            &url[..scheme_end],
            &authority[at + 1..],
            &rest[authority_end..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_removes_userinfo_only() {
        assert_eq!(
            redact_url("https://u:p@cook.example.com:8443/git/a.git?x=1"),
            "https://****@cook.example.com:8443/git/a.git?x=1"
        );
        assert_eq!(
            redact_url("http://100.64.0.1:7420/health"),
            "http://100.64.0.1:7420/health"
        );
        assert_eq!(redact_url("http://h/p@q"), "http://h/p@q");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
