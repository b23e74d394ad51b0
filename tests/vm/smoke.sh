#!/bin/bash
# Smoke test of the full-kernel test harness (as root):
#   tests/vm/smoke.sh
# Builds the guest if needed (cached), boots it with smoke/run.sh and checks the
# results on the host too. Last line: "N passed, M failed"; exit 1 on any failure.
# KEEP_SHARE=1 keeps the share directory (it is kept anyway when something fails).
set -uo pipefail
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$(date +%s.%N)
since() { awk -v s="$T0" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}'; }
passed=0 failed=0
ok()   { passed=$((passed + 1)); echo "ok - $*"; }
fail() { failed=$((failed + 1)); echo "FAIL - $*"; }

if ! "$HERE/build-guest.sh"; then
  fail "build the guest"
  echo "$passed passed, $failed failed"; exit 1
fi
ok "guest built or up to date ($(since)s)"

SHARE=$(mktemp -d /tmp/berth-vm-smoke.XXXXXX)
cleanup() {
  if [ "${KEEP_SHARE:-0}" = 1 ] || [ "$failed" -gt 0 ]; then
    echo "share directory kept: $SHARE" >&2
  else
    rm -rf "$SHARE"
  fi
}
trap cleanup EXIT
mkdir "$SHARE/bin"
cp /usr/bin/stat "$SHARE/bin/"        # a host-built, dynamically linked binary
cp "$HERE/smoke/run.sh" "$SHARE/run.sh"
chmod +x "$SHARE/run.sh"

T1=$(date +%s.%N)
"$HERE/run-in-guest.sh" "$SHARE" "${SMOKE_TIMEOUT:-240}"
rc=$?
guest_s=$(awk -v s="$T1" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')

# The guest's own checks: its last "N passed, M failed" line.
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$SHARE/out.log" 2>/dev/null | tail -n1)
if [ -n "$summary" ]; then
  gp=${summary%% passed*}; gf=${summary#*, }; gf=${gf%% failed}
  passed=$((passed + gp)); failed=$((failed + gf))
else
  fail "guest printed no summary line"
fi
[ "$rc" = 0 ] && ok "run.sh exit code 0 returned to the host" || fail "run.sh exit code $rc"
grep -q '^ok - host-built' "$SHARE/out.log" 2>/dev/null && ok "out.log saved in the share" || fail "out.log missing or incomplete"
if pgrep -f -- "path=$SHARE," >/dev/null; then fail "a qemu process survived"; else ok "no qemu process left"; fi
echo "guest run: ${guest_s}s, smoke total: $(since)s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
