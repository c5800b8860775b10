//! The controller's modules form a layered graph: each module uses only modules below it, so
//! no dependency runs both ways (for example, the Modal client never reaches up into the CLI's
//! error wording). The order is the module map in `src/lib.rs`.

use std::path::{Path, PathBuf};

/// Bottom first. A module may use itself and anything listed before it.
const LAYERS: &[&str] = &[
    "env",
    "secret",
    "process",
    "output",
    "modal",
    "transport",
    "backend",
    "session",
    "cli",
    "error",
    "plan",
    "progress",
    "render",
    "fleet",
    "pictures",
    "app",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("the source dir is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let module = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|m| m.trim_end_matches(".rs"))
            .expect("a module name");
        if matches!(module, "lib" | "main") {
            continue;
        }
        let rank = LAYERS
            .iter()
            .position(|l| *l == module)
            .unwrap_or_else(|| panic!("module {module} is not in LAYERS; place it in the order"));
        let text = std::fs::read_to_string(&file).expect("readable source");
        // Tests may reach anywhere, and comments may mention anything; the product code may not.
        let product: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for (at, _) in product.match_indices("crate::") {
            let used: String = product[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let Some(used_rank) = LAYERS.iter().position(|l| *l == used) else {
                continue; // an item of lib.rs, or not a module
            };
            checked += 1;
            if used_rank > rank {
                violations.push(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "the scan found only {checked} uses; is it broken?"
    );
    assert!(
        violations.is_empty(),
        "uses that run upwards:\n{}",
        violations.join("\n")
    );
}
