//! What a git server sends that the agent reads itself (libgit2 parses the pkt-lines): the start
//! of a 200 answer that is not git's smart protocol, and the text of an error it passes on. The
//! input's first line is the Content-Type.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let (content_type, body) = match bytes.iter().position(|&b| b == b'\n') {
        Some(at) => (&bytes[..at], &bytes[at + 1..]),
        None => (&b""[..], bytes),
    };
    let content_type = String::from_utf8_lossy(content_type);
    tailbox_agent::fuzzing::git_answer(&content_type, body);
});
