#!/bin/bash
# Builds Berth's release binaries the way the image ships them (see the
# Dockerfile): glibc linked statically (`-C target-feature=+crt-static`),
# which keeps about 1 MiB of shared-library pages out of the resident set
# and the dynamic loader's work out of start-up (README, "Performance").
# Installs them where the tests and benches look: target/release/berth and
# target/release/examples/ (under CARGO_TARGET_DIR when set). Extra arguments go to cargo build.
#   tests/build-release.sh [--bins --examples ...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# --target keeps the flag off build scripts and proc-macros (which cannot
# be linked statically); the output then goes under target/<triple>/.
triple=$(uname -m)-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$triple" "$@"
T=${CARGO_TARGET_DIR:-target}
out=$T/$triple/release
mkdir -p "$T/release/examples"
install -m 0755 "$out/berth" "$T/release/berth"
for e in "$out"/examples/*; do
  # example binaries only (no .d files, no hashed duplicates)
  [ -f "$e" ] && [ -x "$e" ] && [[ $(basename "$e") != *-* ]] && install -m 0755 "$e" "$T/release/examples/"
done
# statically linked: no shared library needed (readelf comes with the
# linker cargo uses)
if readelf -d "$T/release/berth" | grep -q '(NEEDED)'; then
  echo "build-release.sh: $T/release/berth needs shared libraries: not statically linked"; exit 1
fi
