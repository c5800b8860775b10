# Facts about the Cargo workspace that the flake builds from. Plain data (no nixpkgs), so a test
# can evaluate it offline: xtask/tests/nix_flake.rs compares every value with Cargo.toml,
# Cargo.lock and the architecture table in proto/src/arch.rs. Change them together.
{
  # [workspace.package] version in ../Cargo.toml.
  version = "0.1.0";

  # The workspace root and its lock file, relative to this directory.
  root = ../.;
  cargoLock = ../Cargo.lock;

  # Package (crate) and binary names.
  controller = {
    crate = "tailbox";
    bin = "tailbox";
  };
  agent = {
    crate = "tailbox-agent";
    bin = "tailbox-agent";
  };

  # The static Rust target per Nix system: the agent uploaded into a sandbox of that architecture.
  rustTargets = {
    x86_64-linux = "x86_64-unknown-linux-musl";
    aarch64-linux = "aarch64-unknown-linux-musl";
  };
}
