# The host side that the guest suites share (tests/vm/nfs.sh, quota.sh):
# builds what the guest needs (the guest image, cached; the release berth
# as the image ships it, tests/build-release.sh; the integration test
# binary TEST, in the dev profile `cargo test` has built already), fills a
# share directory for the guest (SHARE: bin/berth, bin/csi-sanity,
# bin/TEST, csi-sanity/run.sh; removed on success unless KEEP_SHARE=1),
# and `guest_run` boots the guest and prints its summary.
#   . "$(dirname "$0")/host-lib.sh" NAME TEST
# Env: CARGO_TARGET_DIR, CSI_SANITY (default target/tools/bin/csi-sanity),
# KEEP_SHARE=1.
set -uo pipefail
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
NAME=$1
TEST=$2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
T0=$(date +%s.%N)
since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}'; }
die() { echo "$NAME.sh: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
CSI_SANITY=${CSI_SANITY:-$ROOT/target/tools/bin/csi-sanity}
[ -x "$CSI_SANITY" ] || die "no csi-sanity at $CSI_SANITY (run tests/install-deps.sh)"

"$HERE/build-guest.sh" || die "building the guest failed"
echo "$NAME.sh: guest ready ($(since "$T0") s)"

T1=$(date +%s.%N)
"$ROOT/tests/build-release.sh" --bin berth || die "the release build failed"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BERTH=$TARGET/release/berth
TEST_EXE=$(cargo test --locked --no-run --test "$TEST" 2>&1 |
  sed -n "s/.*Executable tests\/$TEST\.rs (\(.*\))\$/\1/p" | tail -n1)
[ -n "$TEST_EXE" ] && [ -x "$TEST_EXE" ] || die "building the $TEST test binary failed"
echo "$NAME.sh: binaries built ($(since "$T1") s)"

SHARE=$(mktemp -d "/tmp/berth-vm-$NAME.XXXXXX")
rc=1
cleanup() {
  if [ "${KEEP_SHARE:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "$NAME.sh: share directory kept: $SHARE" >&2
  else
    rm -rf "$SHARE"
  fi
}
trap cleanup EXIT
mkdir -p "$SHARE/bin" "$SHARE/csi-sanity"
cp "$BERTH" "$SHARE/bin/berth"
cp "$CSI_SANITY" "$SHARE/bin/csi-sanity"
cp "$TEST_EXE" "$SHARE/bin/$TEST"
install -m 0755 "$ROOT/csi-sanity/run.sh" "$SHARE/csi-sanity/run.sh"

# guest_run TIMEOUT LABEL [PATTERN]: boots the guest on SHARE (its run.sh),
# prints the lines of its log that make the summary (and those matching
# PATTERN), and exits with the guest's verdict.
guest_run() {
  local t2 grc summary failed extra=${3:-}
  t2=$(date +%s.%N)
  "$HERE/run-in-guest.sh" "$SHARE" "$1"
  grc=$?
  echo
  echo "=== $2 guest summary (guest run $(since "$t2") s, total $(since "$T0") s)"
  grep -E "^(ok|FAIL) - |^csi-sanity|^test result|^Skipped specs|^  ${extra:+|$extra}" "$SHARE/out.log" 2>/dev/null |
    grep -vE '^  (at |[0-9]+:)' || true
  summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$SHARE/out.log" 2>/dev/null | tail -n1)
  if [ -z "$summary" ]; then
    echo "$NAME.sh: the guest printed no summary (run-in-guest exit $grc)"
    echo "0 passed, 1 failed"
    exit 1
  fi
  echo "$summary"
  failed=${summary#*, }; failed=${failed%% failed}
  [ "$grc" = 0 ] && [ "$failed" = 0 ] && rc=0
  exit "$rc"
}
