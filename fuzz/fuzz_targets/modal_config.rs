//! Modal's config file (`~/.modal.toml` or `MODAL_CONFIG_PATH`), resolved as tailbox resolves
//! it. An input whose first line starts with `#profile=` also sets `MODAL_PROFILE` to the rest
//! of that line.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let profile = text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("#profile="));
    tailbox::fuzzing::modal_config(text, profile);
});
