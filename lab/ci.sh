#!/usr/bin/env bash
# CI entry point for the tailnet lab, for a fresh Debian machine with Go already installed:
#   1. install the system tools the lab uses (only if missing; apt-get update first),
#   2. build the lab binaries with lab/build.sh, or reuse its cache,
#   3. run the lab tests against them.
# A missing or broken lab is a failure here, never a skip. Extra arguments go to `cargo test`
# (e.g. lab/ci.sh --locked).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
say() { echo "lab/ci.sh: $*" >&2; }

# git: the dev host's `git http-backend` and the tests' `git ls-remote`; curl: the SOCKS5 test;
# flock (util-linux): serialises concurrent builds; CA certificates: the Go module proxy.
missing=()
command -v git >/dev/null || missing+=(git)
command -v curl >/dev/null || missing+=(curl)
command -v flock >/dev/null || missing+=(util-linux)
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
if ((${#missing[@]})); then
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  say "installing ${missing[*]}"
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
if ! command -v go >/dev/null; then
  say "go is not installed; the lab builds tailscale from source and needs it"
  exit 1
fi

start=$(date +%s)
bin_dir=$(lab/build.sh | tail -n 1)
say "lab binaries in $bin_dir ($(($(date +%s) - start))s)"
export TAILBOX_TAILNET_BIN_DIR="$bin_dir"

cargo test -p tailbox-testkit --test lab "$@"
cargo test -p xtask "$@"
