//! Modal's `modal-sandbox-fs-tools` output for `Stat`: its exit code (the first input byte: 0 or
//! 1), stdout (a FileInfo JSON) and stderr (an error JSON), split at the first NUL.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Some((&code, rest)) = bytes.split_first() else {
        return;
    };
    let (stdout, stderr) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &b""[..]),
    };
    tailbox::fuzzing::fs_tools_stat(i32::from(code % 2), stdout, stderr);
});
