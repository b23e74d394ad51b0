#!/bin/bash
# Local volumes held to their size by project quotas, in the test guest (as
# root; this host's kernel has no quotas):
#   tests/vm/quota.sh
# Builds on the host what the guest needs (the release berth for csi-sanity
# and the bench; the root_quota integration test binary, in the dev profile
# that `cargo test` has built already; csi-sanity comes from
# tests/install-deps.sh), builds the guest if needed (cached), boots it once
# with quota/run.sh: the integration tests on xfs and ext4, csi-sanity in
# local mode on a prjquota root, start-up log and metric, and the lifecycle
# bench with quotas against without. Prints the guest's summary; exits
# non-zero on any failure.
# Env: CARGO_TARGET_DIR, CSI_SANITY (default target/tools/bin/csi-sanity),
# QUOTA_VM_TIMEOUT (default 1200 s), QUOTA_BENCH_CYCLES (default 10),
# KEEP_SHARE=1 keeps the share directory (kept anyway on failure).
set -uo pipefail
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
T0=$(date +%s.%N)
since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}'; }
die() { echo "quota.sh: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
CSI_SANITY=${CSI_SANITY:-$ROOT/target/tools/bin/csi-sanity}
[ -x "$CSI_SANITY" ] || die "no csi-sanity at $CSI_SANITY (run tests/install-deps.sh)"

"$HERE/build-guest.sh" || die "building the guest failed"
echo "quota.sh: guest ready ($(since "$T0") s)"

T1=$(date +%s.%N)
cargo build --release --locked --bin berth || die "cargo build failed"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BERTH=$TARGET/release/berth
TEST_EXE=$(cargo test --locked --no-run --test root_quota 2>&1 |
  sed -n 's/.*Executable tests\/root_quota\.rs (\(.*\))$/\1/p' | tail -n1)
[ -n "$TEST_EXE" ] && [ -x "$TEST_EXE" ] || die "building the root_quota test binary failed"
echo "quota.sh: binaries built ($(since "$T1") s)"

SHARE=$(mktemp -d /tmp/berth-vm-quota.XXXXXX)
rc=1
cleanup() {
  if [ "${KEEP_SHARE:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "quota.sh: share directory kept: $SHARE" >&2
  else
    rm -rf "$SHARE"
  fi
}
trap cleanup EXIT
mkdir -p "$SHARE/bin" "$SHARE/csi-sanity"
cp "$BERTH" "$SHARE/bin/berth"
cp "$CSI_SANITY" "$SHARE/bin/csi-sanity"
cp "$TEST_EXE" "$SHARE/bin/root_quota"
install -m 0755 "$ROOT/csi-sanity/run.sh" "$SHARE/csi-sanity/run.sh"
install -m 0644 "$ROOT/csi-sanity/local.yaml" "$SHARE/csi-sanity/local.yaml"
install -m 0755 "$HERE/quota/run.sh" "$SHARE/run.sh"
[ -n "${QUOTA_BENCH_CYCLES:-}" ] && sed -i "s/^CYCLES=.*/CYCLES=$QUOTA_BENCH_CYCLES/" "$SHARE/run.sh"

T2=$(date +%s.%N)
"$HERE/run-in-guest.sh" "$SHARE" "${QUOTA_VM_TIMEOUT:-1200}"
grc=$?
echo
echo "=== quota guest summary (guest run $(since "$T2") s, total $(since "$T0") s)"
grep -E '^(ok|FAIL) - |^csi-sanity|^test result|^Skipped specs|^(xfs|ext4): |^  ' "$SHARE/out.log" 2>/dev/null |
  grep -vE '^  (at |[0-9]+:)' || true
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$SHARE/out.log" 2>/dev/null | tail -n1)
if [ -z "$summary" ]; then
  echo "quota.sh: the guest printed no summary (run-in-guest exit $grc)"
  echo "0 passed, 1 failed"
  exit 1
fi
echo "$summary"
failed=${summary#*, }; failed=${failed%% failed}
[ "$grc" = 0 ] && [ "$failed" = 0 ] && rc=0
exit "$rc"
