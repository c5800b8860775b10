//! The Nix flake (`nix/`) states facts about the Cargo workspace; nixpkgs cannot be fetched here,
//! so nothing is built with Nix in CI. What can be checked offline is checked: the flake parses,
//! it takes its facts from `nix/workspace.nix`, those facts (evaluated by the real
//! `nix-instantiate`) match `cargo metadata` and the architecture table, and `flake.lock` pins a
//! nixpkgs revision with its hash.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tailbox_proto::arch::Arch;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `nix-instantiate` offline (no store, no daemon, no build users) and returns stdout.
fn nix_instantiate(args: &[&str]) -> String {
    let output = Command::new("nix-instantiate")
        .args(["--store", "dummy://"])
        .args(args)
        .current_dir(workspace_root().join("nix"))
        .env("NIX_CONFIG", "build-users-group =")
        .output()
        .unwrap_or_else(|e| {
            panic!("run nix-instantiate ({e}); it comes from Debian's nix-bin: run scripts/setup")
        });
    assert!(
        output.status.success(),
        "nix-instantiate {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `nix/workspace.nix` evaluated to JSON, with its paths as absolute strings.
fn flake_facts() -> Value {
    let json = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--expr",
        "let w = import ./workspace.nix; in w // { root = toString w.root; cargoLock = toString w.cargoLock; }",
    ]);
    serde_json::from_str(&json).unwrap()
}

fn cargo_metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--locked",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_flake_facts_match_the_cargo_workspace() {
    let facts = flake_facts();
    let metadata = cargo_metadata();

    let root = metadata["workspace_root"].as_str().unwrap();
    assert_eq!(
        Path::new(facts["root"].as_str().unwrap()),
        Path::new(root),
        "nix/workspace.nix `root` is not the workspace root"
    );
    let cargo_lock = Path::new(root).join("Cargo.lock");
    assert!(cargo_lock.is_file());
    assert_eq!(Path::new(facts["cargoLock"].as_str().unwrap()), cargo_lock);

    let packages = metadata["packages"].as_array().unwrap();
    for role in ["controller", "agent"] {
        let crate_name = facts[role]["crate"].as_str().unwrap();
        let package = packages
            .iter()
            .find(|p| p["name"] == crate_name)
            .unwrap_or_else(|| panic!("nix/workspace.nix names crate {crate_name:?}, which the workspace does not have"));
        assert_eq!(
            package["version"], facts["version"],
            "the flake's version is not {crate_name}'s"
        );
        let bins: Vec<&str> = package["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert!(
            bins.contains(&facts[role]["bin"].as_str().unwrap()),
            "{crate_name} has binaries {bins:?}, not {}",
            facts[role]["bin"]
        );
    }

    let targets: BTreeMap<String, String> =
        serde_json::from_value(facts["rustTargets"].clone()).unwrap();
    let expected: BTreeMap<String, String> = Arch::ALL
        .into_iter()
        .map(|a| (a.nix_system().to_owned(), a.rust_target().to_owned()))
        .collect();
    assert_eq!(
        targets, expected,
        "the flake's targets are not the agent's (proto/src/arch.rs)"
    );
}

#[test]
fn the_flake_parses_and_takes_its_facts_from_workspace_nix() {
    // `--parse` prints the expression back with resolved paths, one normal form to search.
    let parsed = nix_instantiate(&["--parse", "flake.nix"]);
    let workspace_nix = workspace_root().join("nix/workspace.nix");
    assert!(
        parsed.contains(&format!("(import {})", workspace_nix.display())),
        "flake.nix does not import workspace.nix:\n{parsed}"
    );
    for used in [
        "(workspace).cargoLock",
        "(workspace).controller",
        "(workspace).agent",
        "(workspace).rustTargets",
        "(workspace).version",
    ] {
        assert!(parsed.contains(used), "flake.nix does not use {used}");
    }
    for output in [
        "tailbox = ",
        "tailbox-agent = ",
        "sandbox-image = ",
        "devShells = ",
        "apps = ",
        "sidecar ? false",
    ] {
        assert!(parsed.contains(output), "flake.nix has no `{output}`");
    }
    // Facts live in one place: no version or target literal in flake.nix itself.
    let flake = std::fs::read_to_string(workspace_root().join("nix/flake.nix")).unwrap();
    for arch in Arch::ALL {
        assert!(
            !flake.contains(arch.rust_target()),
            "{}",
            arch.rust_target()
        );
    }
    assert!(
        !flake.contains("Cargo.lock\""),
        "Cargo.lock is named in workspace.nix"
    );
}

#[test]
fn the_flake_lock_pins_the_nixpkgs_input_with_its_hash() {
    let lock: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("nix/flake.lock")).unwrap(),
    )
    .unwrap();
    assert_eq!(lock["version"], 7);
    assert_eq!(lock["nodes"]["root"]["inputs"]["nixpkgs"], "nixpkgs");
    let node = &lock["nodes"]["nixpkgs"];
    let locked = &node["locked"];
    assert_eq!(locked["type"], "github");
    assert_eq!(locked["owner"], "NixOS");
    assert_eq!(locked["repo"], "nixpkgs");
    let rev = locked["rev"].as_str().unwrap();
    assert!(
        rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()),
        "{rev}"
    );
    // SRI sha256: 32 bytes in base64 is 44 characters ending in one `=`.
    let nar_hash = locked["narHash"].as_str().unwrap();
    let digest = nar_hash.strip_prefix("sha256-").unwrap();
    assert!(digest.len() == 44 && digest.ends_with('='), "{nar_hash}");
    assert!(locked["lastModified"].as_u64().unwrap() > 0);

    // The lock is for the input flake.nix declares.
    let parsed = nix_instantiate(&["--parse", "flake.nix"]);
    let original = &node["original"];
    let url = format!(
        "url = \"github:{}/{}/{}\"",
        original["owner"].as_str().unwrap(),
        original["repo"].as_str().unwrap(),
        original["ref"].as_str().unwrap()
    );
    assert!(parsed.contains(&url), "flake.nix has no input {url}");
}
