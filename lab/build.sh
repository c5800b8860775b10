#!/usr/bin/env bash
# Builds the tailnet lab's binaries, or reuses them from the cache:
#   tailscaled, tailscale  - real Tailscale, at the version lab/go.mod pins (the one source of truth)
#   tailbox-lab            - our control/DERP/STUN and dev-host program (this directory)
#   containerboot          - Tailscale's container entrypoint, from the same pin: the baseline of
#                            `cargo xtask bench` (B5), run in userspace mode against the lab
#   linux-amd64/, linux-arm64/
#                          - tailscaled and tailscale for each architecture with an agent build,
#                            from the same pin: the host's are links to the ones above, the other
#                            is cross-built (GOARCH) for the tests that run it under qemu-user
#
# Usage: lab/build.sh [--check]
#   --check  do not build; succeed only if the binaries for the current inputs are cached
#
# The last line on stdout is the bin dir. Everything else goes to stderr. A cold build takes
# minutes; a cached run only hashes the inputs. Cache root: $TAILBOX_CACHE_DIR, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/tailbox.
set -euo pipefail

lab_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${TAILBOX_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?set HOME, XDG_CACHE_HOME or TAILBOX_CACHE_DIR}/.cache}/tailbox}
check_only=false
case "${1:-}" in
  "") ;;
  --check) check_only=true ;;
  *) echo "usage: lab/build.sh [--check]" >&2; exit 2 ;;
esac

say() { echo "lab/build.sh: $*" >&2; }

if ! command -v go >/dev/null; then
  say "go is not on PATH; install Go (see the go line in $lab_dir/go.mod for the minimum version)"
  exit 1
fi

cd "$lab_dir"
# Pin everything that could make two builds differ, and keep the user's GOFLAGS out of it.
export CGO_ENABLED=0 GOFLAGS=-mod=readonly
go_id="$(go env GOVERSION) $(go env GOOS)/$(go env GOARCH) CGO_ENABLED=$CGO_ENABLED"

# The key covers the pin (go.mod, go.sum), our sources, this script (it holds the flags) and the
# toolchain. Names are hashed along with contents so a rename also counts.
key=$(
  {
    echo "$go_id"
    find . -name '*.go' -type f | LC_ALL=C sort | while read -r f; do
      echo "== $f"
      cat "$f"
    done
    for f in go.mod go.sum build.sh; do
      echo "== $f"
      cat "$f"
    done
  } | sha256sum | cut -c1-20
)
out="$cache_root/lab/$key"

goarches=(amd64 arm64)
cached() {
  [[ -f "$out/complete" && -x "$out/bin/tailscaled" && -x "$out/bin/tailscale" && -x "$out/bin/tailbox-lab" && -x "$out/bin/containerboot" ]] || return 1
  for goarch in "${goarches[@]}"; do
    [[ -x "$out/bin/linux-$goarch/tailscaled" && -x "$out/bin/linux-$goarch/tailscale" ]] || return 1
  done
}

if cached; then
  echo "$out/bin"
  exit 0
fi
if $check_only; then
  say "no cached build for the current inputs (key $key under $cache_root/lab); run lab/build.sh"
  exit 3
fi

mkdir -p "$cache_root/lab"
# Parallel test processes may all ask for a build; let one do it and the rest reuse it.
exec 9>"$cache_root/lab/.lock"
if command -v flock >/dev/null; then
  flock 9
fi
if cached; then
  echo "$out/bin"
  exit 0
fi

ts_version=$(go list -m -f '{{.Version}}' tailscale.com)
ts_version=${ts_version#v}
say "building tailscale $ts_version and tailbox-lab with $go_id (first run takes minutes)"
start=$(date +%s)
tmp=$(mktemp -d "$cache_root/lab/.build-$key-XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT

# Stamp the version the way Tailscale's release builds do; a plain `go build` of a dependency
# would report "<version>-ERR-BuildInfo".
build_tailscale() { # OUT_DIR [env...]
  local dir=$1
  shift
  env "$@" go build -trimpath -buildvcs=false \
    -ldflags "-X tailscale.com/version.longStamp=$ts_version -X tailscale.com/version.shortStamp=$ts_version" \
    -o "$dir/" tailscale.com/cmd/tailscaled tailscale.com/cmd/tailscale
}
build_tailscale "$tmp/bin"
go build -trimpath -buildvcs=false -o "$tmp/bin/" tailscale.com/cmd/containerboot
go build -trimpath -buildvcs=false -o "$tmp/bin/tailbox-lab" .
for goarch in "${goarches[@]}"; do
  mkdir -p "$tmp/bin/linux-$goarch"
  if [[ $goarch == "$(go env GOARCH)" ]]; then
    ln -s ../tailscaled ../tailscale "$tmp/bin/linux-$goarch/"
  else
    build_tailscale "$tmp/bin/linux-$goarch" GOOS=linux GOARCH="$goarch"
  fi
done

"$tmp/bin/tailscaled" --version >&2
cat >"$tmp/complete" <<EOF
key=$key
tailscale=$ts_version
go=$go_id
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
# A leftover without the complete marker is garbage; replace it.
rm -rf "$out"
mv -T "$tmp" "$out"
trap - EXIT
say "built in $(($(date +%s) - start))s into $out"
echo "$out/bin"
