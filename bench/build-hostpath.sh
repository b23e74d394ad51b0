#!/bin/bash
# bench/build-hostpath.sh: builds csi-driver-host-path v1.18.0, the reference
# CSI driver, from its vendored upstream source in ../shared/third_party
# (the Go module proxy does not serve it), once; prints the binary's path.
# Cached under /var/cache/berth-bench (BERTH_BENCH_CACHE).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
V=v1.18.0
THIRD_PARTY=${THIRD_PARTY:-$(cd "$ROOT/.." && pwd)/shared/third_party}
[ -d "$THIRD_PARTY" ] || THIRD_PARTY=/work/shared/third_party
CACHE=${BERTH_BENCH_CACHE:-/var/cache/berth-bench}
OUT=$CACHE/hostpathplugin-$V
if [ ! -x "$OUT" ]; then
  command -v go > /dev/null || { echo "build-hostpath.sh: needs go" >&2; exit 1; }
  src=$(mktemp -d /tmp/berth-hostpath.XXXXXX)
  trap 'rm -rf "$src"' EXIT
  tar -xzf "$THIRD_PARTY/csi-driver-host-path-$V.tar.gz" -C "$src" --strip-components=1
  mkdir -p "$CACHE"
  t=$SECONDS
  (cd "$src" && CGO_ENABLED=0 go build -mod=vendor -ldflags "-X main.version=$V" -o "$OUT.tmp" ./cmd/hostpathplugin) >&2
  mv "$OUT.tmp" "$OUT"
  echo "build-hostpath.sh: csi-driver-host-path $V built in $((SECONDS - t)) s" >&2
fi
echo "$OUT"
