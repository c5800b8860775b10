//! The server's first answer (its ref or capability advertisement), and protocol v2's `ls-refs`
//! translated into the v0 advertisement libgit2 understands: libgit2 speaks only v0/v1, so when
//! the server offers v2 the transport runs `ls-refs` itself and hands libgit2 the equivalent
//! v0 lines (first ref with the capabilities, `symref=HEAD:<target>` among them, then the others).

use std::io::Read;

use super::pkt::{self, Pkt, PktError, PktReader};

/// First line of a smart-HTTP ref advertisement.
const SERVICE_BANNER: &[u8] = b"# service=git-upload-pack";

/// Why the server's answer could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdvertError {
    /// Framing failed or the stream broke.
    #[error(transparent)]
    Pkt(#[from] PktError),
    /// The server sent an `ERR` line.
    #[error("the server said: {0}")]
    Remote(String),
    /// Well-framed, but not the smart protocol.
    #[error("{0}")]
    Protocol(String),
}

/// What a v2 server offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// `agent=` value (the server's git version).
    pub agent: Option<String>,
    /// `object-format=` value (`sha1` or `sha256`).
    pub object_format: Option<String>,
    /// The `ls-refs` command with its features (e.g. `unborn`), when offered.
    pub ls_refs: Option<Vec<String>>,
}

/// The server's first answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Advertisement {
    /// A v0 or v1 ref advertisement: the raw ref lines (the first carries the capabilities).
    V0 { version: u32, refs: Vec<Vec<u8>> },
    /// A v2 capability advertisement.
    V2(Capabilities),
}

/// One ref from `ls-refs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LsRef {
    /// Object id; `None` for an unborn ref (HEAD of an empty repository).
    pub oid: Option<String>,
    pub name: String,
    pub symref_target: Option<String>,
    pub peeled: Option<String>,
}

/// Reads the answer to the ref-listing request: after the `# service=` banner and its flush for
/// a v0 answer over smart HTTP (`rpc`), right away otherwise.
pub(crate) fn read_advertisement<R: Read>(
    r: &mut PktReader<R>,
    rpc: bool,
) -> Result<Advertisement, AdvertError> {
    let mut first = r.read()?;
    // A v2 answer over HTTP starts right away with "version 2" (git http-backend prints the
    // banner only for v0); a v0 answer must carry it.
    if rpc && first.text() != Some(b"version 2") {
        match first.text() {
            Some(t) if t == SERVICE_BANNER => {}
            Some(t) => {
                remote_error(t)?;
                return Err(AdvertError::Protocol(format!(
                    "expected the \"# service=git-upload-pack\" banner, got {:?}",
                    shorten(t)
                )));
            }
            None => {
                return Err(AdvertError::Protocol(
                    "expected the \"# service=git-upload-pack\" banner, got a special line".into(),
                ));
            }
        }
        first = r.read()?;
        // git http-backend follows the banner with a flush; some servers do not.
        if first == Pkt::Flush {
            first = r.read()?;
        }
    }
    match first {
        // An empty repository on an old server: no refs, not even capabilities^{}.
        Pkt::Flush => Ok(Advertisement::V0 {
            version: 0,
            refs: Vec::new(),
        }),
        Pkt::Data(line) => {
            let t = text(&line);
            remote_error(t)?;
            if t == b"version 2" {
                return read_capabilities(r).map(Advertisement::V2);
            }
            let (version, mut refs) = if t == b"version 1" {
                (1, Vec::new())
            } else {
                check_ref_line(t)?;
                (0, vec![line])
            };
            loop {
                match r.read()? {
                    Pkt::Flush => break,
                    Pkt::Data(line) => {
                        let t = text(&line);
                        remote_error(t)?;
                        check_ref_line(t)?;
                        refs.push(line);
                    }
                    other => {
                        return Err(AdvertError::Protocol(format!(
                            "unexpected {other:?} in a ref advertisement"
                        )));
                    }
                }
            }
            Ok(Advertisement::V0 { version, refs })
        }
        other => Err(AdvertError::Protocol(format!(
            "unexpected {other:?} where the advertisement should start"
        ))),
    }
}

fn read_capabilities<R: Read>(r: &mut PktReader<R>) -> Result<Capabilities, AdvertError> {
    let mut caps = Capabilities::default();
    loop {
        let pkt = r.read()?;
        let Some(t) = pkt.text() else {
            if pkt == Pkt::Flush {
                return Ok(caps);
            }
            return Err(AdvertError::Protocol(format!(
                "unexpected {pkt:?} in the v2 capability advertisement"
            )));
        };
        let t = String::from_utf8_lossy(t);
        let (key, value) = t.split_once('=').unwrap_or((&t, ""));
        match key {
            "agent" => caps.agent = Some(value.to_owned()),
            "object-format" => caps.object_format = Some(value.to_owned()),
            "ls-refs" => {
                caps.ls_refs = Some(value.split_whitespace().map(str::to_owned).collect());
            }
            _ => {}
        }
    }
}

/// The v2 `ls-refs` request: every ref, with symref targets and peeled tags.
pub(crate) fn ls_refs_request(caps: &Capabilities) -> Result<Vec<u8>, PktError> {
    let mut out = Vec::new();
    pkt::write_data(&mut out, b"command=ls-refs\n")?;
    // The spec lets a client send these only when the server advertised them.
    if caps.agent.is_some() {
        let agent = concat!("agent=tailbox-agent/", env!("CARGO_PKG_VERSION"), "\n");
        pkt::write_data(&mut out, agent.as_bytes())?;
    }
    if let Some(format) = &caps.object_format {
        pkt::write_data(&mut out, format!("object-format={format}\n").as_bytes())?;
    }
    pkt::write_delim(&mut out);
    pkt::write_data(&mut out, b"peel\n")?;
    pkt::write_data(&mut out, b"symrefs\n")?;
    if caps
        .ls_refs
        .as_ref()
        .is_some_and(|features| features.iter().any(|f| f == "unborn"))
    {
        pkt::write_data(&mut out, b"unborn\n")?;
    }
    pkt::write_flush(&mut out);
    Ok(out)
}

/// Reads an `ls-refs` response up to its flush.
pub(crate) fn read_ls_refs<R: Read>(r: &mut PktReader<R>) -> Result<Vec<LsRef>, AdvertError> {
    let mut refs = Vec::new();
    loop {
        let pkt = r.read()?;
        let Some(t) = pkt.text() else {
            if pkt == Pkt::Flush {
                return Ok(refs);
            }
            return Err(AdvertError::Protocol(format!(
                "unexpected {pkt:?} in the ls-refs response"
            )));
        };
        remote_error(t)?;
        let t = String::from_utf8_lossy(t);
        let mut words = t.split(' ');
        let (Some(oid), Some(name)) = (words.next(), words.next()) else {
            return Err(AdvertError::Protocol(format!(
                "malformed ls-refs line {:?}",
                shorten(t.as_bytes())
            )));
        };
        let oid = match oid {
            "unborn" => None,
            hex if is_oid(hex) => Some(hex.to_owned()),
            _ => {
                return Err(AdvertError::Protocol(format!(
                    "malformed object id in ls-refs line {:?}",
                    shorten(t.as_bytes())
                )));
            }
        };
        let mut entry = LsRef {
            oid,
            name: name.to_owned(),
            symref_target: None,
            peeled: None,
        };
        for attr in words {
            if let Some(target) = attr.strip_prefix("symref-target:") {
                entry.symref_target = Some(target.to_owned());
            } else if let Some(peeled) = attr.strip_prefix("peeled:") {
                entry.peeled = Some(peeled.to_owned());
            }
        }
        refs.push(entry);
    }
}

/// The v0 advertisement equivalent to an `ls-refs` answer, framed as the server would have sent
/// it (with the `# service=` banner and its flush for smart HTTP).
pub(crate) fn v0_from_ls_refs(
    refs: &[LsRef],
    caps: &Capabilities,
    rpc: bool,
) -> Result<Vec<u8>, PktError> {
    let mut capabilities: Vec<String> = refs
        .iter()
        .filter_map(|r| {
            r.symref_target
                .as_ref()
                .map(|t| format!("symref={}:{t}", r.name))
        })
        .collect();
    if let Some(format) = &caps.object_format {
        capabilities.push(format!("object-format={format}"));
    }
    if let Some(agent) = &caps.agent {
        capabilities.push(format!("agent={agent}"));
    }
    let capabilities = capabilities.join(" ");

    let mut lines: Vec<String> = Vec::new();
    for r in refs {
        // An unborn ref has no line in v0; its symref survives in the capabilities.
        let Some(oid) = &r.oid else { continue };
        lines.push(format!("{oid} {}", r.name));
        if let Some(peeled) = &r.peeled {
            lines.push(format!("{peeled} {}^{{}}", r.name));
        }
    }
    if lines.is_empty() {
        // What v0 sends for a repository without refs.
        let zero = match caps.object_format.as_deref() {
            Some("sha256") => "0".repeat(64),
            _ => "0".repeat(40),
        };
        lines.push(format!("{zero} capabilities^{{}}"));
    }

    let mut out = Vec::new();
    if rpc {
        pkt::write_data(&mut out, b"# service=git-upload-pack\n")?;
        pkt::write_flush(&mut out);
    }
    for (i, line) in lines.iter().enumerate() {
        let mut data = line.clone().into_bytes();
        if i == 0 {
            data.push(0);
            data.extend_from_slice(capabilities.as_bytes());
        }
        data.push(b'\n');
        pkt::write_data(&mut out, &data)?;
    }
    pkt::write_flush(&mut out);
    Ok(out)
}

/// Frames v0 ref lines as the server sent them, minus any `version 1` line (libgit2 would read
/// it as a ref).
pub(crate) fn encode_v0(refs: &[Vec<u8>], rpc: bool) -> Result<Vec<u8>, PktError> {
    let mut out = Vec::new();
    if rpc {
        pkt::write_data(&mut out, b"# service=git-upload-pack\n")?;
        pkt::write_flush(&mut out);
    }
    for line in refs {
        pkt::write_data(&mut out, line)?;
    }
    pkt::write_flush(&mut out);
    Ok(out)
}

/// The symref HEAD points to, when `ls-refs` reported HEAD as unborn (an empty repository).
pub(crate) fn unborn_head(refs: &[LsRef]) -> Option<String> {
    refs.iter()
        .find(|r| r.name == "HEAD" && r.oid.is_none())
        .and_then(|r| r.symref_target.clone())
}

fn text(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

fn remote_error(t: &[u8]) -> Result<(), AdvertError> {
    match t.strip_prefix(b"ERR ") {
        Some(msg) => Err(AdvertError::Remote(
            String::from_utf8_lossy(msg).trim().to_owned(),
        )),
        None => Ok(()),
    }
}

/// `<oid> <name>[\0capabilities]`.
fn check_ref_line(t: &[u8]) -> Result<(), AdvertError> {
    let before_caps = t.split(|&b| b == 0).next().unwrap_or(t);
    let line = String::from_utf8_lossy(before_caps);
    match line.split_once(' ') {
        Some((oid, name)) if is_oid(oid) && !name.is_empty() => Ok(()),
        _ => Err(AdvertError::Protocol(format!(
            "expected a ref line (\"<object id> <name>\"), got {:?}",
            shorten(t)
        ))),
    }
}

/// A full sha1 or sha256 object id in hex.
pub(crate) fn is_oid(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn shorten(t: &[u8]) -> String {
    let s = String::from_utf8_lossy(t);
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = "1111111111111111111111111111111111111111";
    const FEATURE: &str = "2222222222222222222222222222222222222222";
    const TAG: &str = "3333333333333333333333333333333333333333";

    fn pkts(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            match *l {
                "0000" => pkt::write_flush(&mut out),
                "0001" => pkt::write_delim(&mut out),
                l => pkt::write_data(&mut out, l.as_bytes()).unwrap(),
            }
        }
        out
    }

    fn read(bytes: &[u8], rpc: bool) -> Result<Advertisement, AdvertError> {
        read_advertisement(&mut PktReader::new(bytes), rpc)
    }

    /// What git http-backend (git 2.39) sends for `Git-Protocol: version=2`: no banner.
    fn v2_http_answer() -> Vec<u8> {
        pkts(&[
            "version 2\n",
            "agent=git/2.39.5\n",
            "ls-refs=unborn\n",
            "fetch=shallow wait-for-done\n",
            "server-option\n",
            "object-format=sha1\n",
            "object-info\n",
            "0000",
        ])
    }

    #[test]
    fn a_v2_capability_advertisement_is_recognised() {
        let caps = Capabilities {
            agent: Some("git/2.39.5".into()),
            object_format: Some("sha1".into()),
            ls_refs: Some(vec!["unborn".into()]),
        };
        assert_eq!(
            read(&v2_http_answer(), true).unwrap(),
            Advertisement::V2(caps.clone())
        );
        // The same over git://.
        assert_eq!(
            read(&v2_http_answer(), false).unwrap(),
            Advertisement::V2(caps.clone())
        );
        // A server that does send the banner before a v2 answer is fine too.
        let mut with_banner = pkts(&["# service=git-upload-pack\n", "0000"]);
        with_banner.extend_from_slice(&v2_http_answer());
        assert_eq!(read(&with_banner, true).unwrap(), Advertisement::V2(caps));
    }

    #[test]
    fn a_v0_advertisement_passes_through() {
        let first =
            format!("{MAIN} HEAD\0multi_ack symref=HEAD:refs/heads/main agent=git/2.39.5\n");
        let main = format!("{MAIN} refs/heads/main\n");
        let body = pkts(&["# service=git-upload-pack\n", "0000", &first, &main, "0000"]);
        let ad = read(&body, true).unwrap();
        let Advertisement::V0 { version, refs } = &ad else {
            panic!("{ad:?}")
        };
        assert_eq!(*version, 0);
        assert_eq!(refs.len(), 2);
        assert_eq!(encode_v0(refs, true).unwrap(), body);
    }

    #[test]
    fn a_version_1_line_is_dropped_for_libgit2() {
        let main = format!("{MAIN} refs/heads/main\0agent=x\n");
        let body = pkts(&["version 1\n", &main, "0000"]);
        let Advertisement::V0 { version, refs } = read(&body, false).unwrap() else {
            panic!()
        };
        assert_eq!(version, 1);
        assert_eq!(encode_v0(&refs, false).unwrap(), pkts(&[&main, "0000"]));
    }

    #[test]
    fn html_dumb_http_and_errors_are_told_apart() {
        // An HTML page is not even pkt-lines.
        assert!(matches!(
            read(b"<!DOCTYPE html>\n<html>", true),
            Err(AdvertError::Pkt(PktError::Malformed(_)))
        ));
        // A dumb-HTTP info/refs file is "<sha>\t<ref>" text.
        let dumb = format!("{MAIN}\trefs/heads/main\n");
        assert!(read(dumb.as_bytes(), true).is_err());
        // Pkt-lines but no banner.
        let no_banner = pkts(&[&format!("{MAIN} refs/heads/main\n"), "0000"]);
        assert!(matches!(
            read(&no_banner, true),
            Err(AdvertError::Protocol(_))
        ));
        // git daemon refusing a repository.
        let err = pkts(&["ERR access denied or repository not exported: /nope.git"]);
        match read(&err, false) {
            Err(AdvertError::Remote(msg)) => {
                assert_eq!(msg, "access denied or repository not exported: /nope.git")
            }
            other => panic!("{other:?}"),
        }
        // Garbage where a ref should be.
        let junk = pkts(&["hello world\n", "0000"]);
        assert!(matches!(read(&junk, false), Err(AdvertError::Protocol(_))));
    }

    #[test]
    fn the_ls_refs_request_asks_for_symrefs_peeled_tags_and_unborn() {
        let caps = Capabilities {
            agent: Some("git/2.39.5".into()),
            object_format: Some("sha1".into()),
            ls_refs: Some(vec!["unborn".into()]),
        };
        let agent = concat!("agent=tailbox-agent/", env!("CARGO_PKG_VERSION"), "\n");
        assert_eq!(
            ls_refs_request(&caps).unwrap(),
            pkts(&[
                "command=ls-refs\n",
                agent,
                "object-format=sha1\n",
                "0001",
                "peel\n",
                "symrefs\n",
                "unborn\n",
                "0000"
            ])
        );
        let bare = Capabilities {
            ls_refs: Some(Vec::new()),
            ..Capabilities::default()
        };
        assert_eq!(
            ls_refs_request(&bare).unwrap(),
            pkts(&["command=ls-refs\n", "0001", "peel\n", "symrefs\n", "0000"])
        );
    }

    #[test]
    fn ls_refs_translates_to_the_v0_advertisement_libgit2_reads() {
        let answer = pkts(&[
            &format!("{MAIN} HEAD symref-target:refs/heads/main\n"),
            &format!("{FEATURE} refs/heads/feature\n"),
            &format!("{MAIN} refs/heads/main\n"),
            &format!("{TAG} refs/tags/v0.1.0 peeled:{MAIN}\n"),
            "0000",
        ]);
        let refs = read_ls_refs(&mut PktReader::new(&answer[..])).unwrap();
        assert_eq!(refs.len(), 4);
        assert_eq!(refs[0].symref_target.as_deref(), Some("refs/heads/main"));
        assert_eq!(refs[3].peeled.as_deref(), Some(MAIN));
        let caps = Capabilities {
            agent: Some("git/2.39.5".into()),
            object_format: Some("sha1".into()),
            ls_refs: Some(vec!["unborn".into()]),
        };
        let v0 = v0_from_ls_refs(&refs, &caps, true).unwrap();
        let first = format!(
            "{MAIN} HEAD\0symref=HEAD:refs/heads/main object-format=sha1 agent=git/2.39.5\n"
        );
        assert_eq!(
            v0,
            pkts(&[
                "# service=git-upload-pack\n",
                "0000",
                &first,
                &format!("{FEATURE} refs/heads/feature\n"),
                &format!("{MAIN} refs/heads/main\n"),
                &format!("{TAG} refs/tags/v0.1.0\n"),
                &format!("{MAIN} refs/tags/v0.1.0^{{}}\n"),
                "0000",
            ])
        );
        // And it reads back as a valid v0 advertisement.
        assert!(matches!(
            read(&v0, true).unwrap(),
            Advertisement::V0 { version: 0, .. }
        ));
        // Stateful (git://) framing has no banner.
        let stateful = v0_from_ls_refs(&refs, &caps, false).unwrap();
        assert!(stateful.starts_with(format!("{:04x}{MAIN} HEAD\0", first.len() + 4).as_bytes()));
    }

    #[test]
    fn an_empty_repository_keeps_its_unborn_head() {
        let answer = pkts(&["unborn HEAD symref-target:refs/heads/main\n", "0000"]);
        let refs = read_ls_refs(&mut PktReader::new(&answer[..])).unwrap();
        assert_eq!(unborn_head(&refs).as_deref(), Some("refs/heads/main"));
        let v0 = v0_from_ls_refs(&refs, &Capabilities::default(), false).unwrap();
        let line = format!(
            "{} capabilities^{{}}\0symref=HEAD:refs/heads/main\n",
            "0".repeat(40)
        );
        assert_eq!(v0, pkts(&[&line, "0000"]));
    }

    #[test]
    fn malformed_ls_refs_lines_and_errors_are_reported() {
        for bad in ["justone\n", "xyz refs/heads/main\n"] {
            let answer = pkts(&[bad, "0000"]);
            assert!(matches!(
                read_ls_refs(&mut PktReader::new(&answer[..])),
                Err(AdvertError::Protocol(_))
            ));
        }
        let answer = pkts(&["ERR upload-pack: not our ref"]);
        assert!(matches!(
            read_ls_refs(&mut PktReader::new(&answer[..])),
            Err(AdvertError::Remote(_))
        ));
    }
}
