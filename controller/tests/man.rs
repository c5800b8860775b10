//! The committed man pages (`controller/man/`) are what `cargo xtask man` generates from the
//! clap definitions today, so they never drift from `--help`.

use std::collections::BTreeMap;
use std::path::Path;

fn pages(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a UTF-8 file name")
                .to_owned();
            let text = std::fs::read_to_string(&path).expect("a readable page");
            (name, text)
        })
        .collect()
}

#[test]
fn the_man_pages_are_fresh() {
    let fresh = tempfile::tempdir().expect("a temporary directory");
    let written = tailbox::write_man_pages(fresh.path()).expect("the man pages render");
    assert!(
        written.iter().any(|p| p.ends_with("tailbox-check.1")),
        "{written:?}"
    );
    let committed = pages(&Path::new(env!("CARGO_MANIFEST_DIR")).join("man"));
    let generated = pages(fresh.path());
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "controller/man/ holds other pages than the clap definitions make; run `cargo xtask man`"
    );
    for (name, text) in &generated {
        assert!(
            committed[name] == *text,
            "controller/man/{name} is stale; run `cargo xtask man` and commit the result"
        );
    }
    let main = &generated["tailbox.1"];
    assert!(main.contains("completions"), "{main}");
    assert!(generated["tailbox-check.1"].contains(".SH EXAMPLES"));
}
