#!/bin/bash
# Installs everything the test suite needs on a fresh Debian machine (as
# root): Debian packages with apt-get, csi-sanity with `go install` at a
# pinned version (into target/tools/bin), Rust crates come through cargo.
# Idempotent and quick when everything is already there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CSI_SANITY_VERSION=v5.6.0
TOOLS=$ROOT/target/tools
mkdir -p "$TOOLS/bin"

# Debian packages: util-linux (mount, unshare, losetup), e2fsprogs and
# xfsprogs (block volumes), procps (pgrep in tests), python3-venv (manifest
# validation); for the cluster suite (tests/cluster/): buildah and
# mmdebstrap (images), openssl (certificates), curl, iproute2.
PKGS=(util-linux mount e2fsprogs xfsprogs procps python3-venv ca-certificates
  buildah mmdebstrap openssl curl iproute2)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v go >/dev/null || missing+=(golang-go)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "install-deps: cargo (Rust toolchain) is required" >&2; exit 1; }

# csi-sanity, pinned; the stamp records which version is in target/tools.
STAMP=$TOOLS/csi-sanity.version
if [ ! -x "$TOOLS/bin/csi-sanity" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$CSI_SANITY_VERSION" ]; then
  echo "install-deps: go install csi-sanity@$CSI_SANITY_VERSION"
  GOBIN=$TOOLS/bin go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
  echo "$CSI_SANITY_VERSION" >"$STAMP"
fi
echo "install-deps: ok"
