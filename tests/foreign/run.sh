#!/bin/bash
# `berth bench` against a CSI driver that is not Berth: tests/foreign/
# mock_csi.py (Python grpcio; no attach, staging advertised; ids and paths of
# its own). Needs the release berth (cargo build --release). Checks:
#   1. a full run: every cycle OK, exactly the RPCs the driver advertises
#      (no ControllerPublish), nothing left behind (volumes, staged and
#      published paths, the work directory);
#   2. injected failures (every 7th NodePublish UNAVAILABLE): the bench exits
#      non-zero, reports the failed cycles and still leaves nothing behind;
#   3. SIGINT in the middle of a run: exits non-zero, cycles in flight clean
#      up, nothing left behind.
# Last line: "N passed, M failed".
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
B=${BERTH:-$TARGET/release/berth}
VENV=$ROOT/target/tools/venv-foreign
REQ=$ROOT/tests/foreign/requirements.txt
PASS=0 FAIL=0
ok() { echo "ok - $*"; PASS=$((PASS + 1)); }
bad() { echo "FAIL - $*"; FAIL=$((FAIL + 1)); }
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; exit; }

[ -x "$B" ] || { bad "no berth binary at $B (cargo build --release)"; finish; }
req_hash=$(sha256sum "$REQ" | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]]; then
  python3 -m venv --clear "$VENV" && "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ" &&
    echo "$req_hash" > "$VENV/.requirements.sha256" || { bad "setting up $VENV"; finish; }
fi
PY=$VENV/bin/python

W=$(mktemp -d /tmp/berth-foreign.XXXXXX)
MOCK=
cleanup() {
  [ -n "$MOCK" ] && kill "$MOCK" 2>/dev/null && wait "$MOCK" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT

start_mock() { # extra args
  rm -f "$W/mock.sock"
  "$PY" "$ROOT/tests/foreign/mock_csi.py" "$W/mock.sock" "$W/state.json" "$@" 2>"$W/mock.log" &
  MOCK=$!
  for _ in $(seq 300); do [ -S "$W/mock.sock" ] && return 0; sleep 0.05; done
  cat "$W/mock.log"; return 1
}
stop_mock() { kill "$MOCK"; wait "$MOCK" 2>/dev/null; MOCK=; }

# check <name> <bench exit code> <bench json> <python expression over r (report) and s (state)>
check() {
  local name=$1 rc=$2 json=$3 expr=$4
  if "$PY" - "$rc" "$json" "$W/state.json" "$W/work" "$expr" <<'PYEOF'
import json, os, sys
rc, rep, state, work, expr = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
r = json.load(open(rep)) if os.path.getsize(rep) else {}
s = json.load(open(state))
ops = {o["op"]: o["count"] for o in r.get("operations", [])}
left = not s["volumes"] and not s["staged"] and not s["published"] and not os.path.exists(work)
ok = eval("(" + expr + ")")
if not ok:
    print(json.dumps({"rc": rc, "ops": ops, "state": s, "work_exists": os.path.exists(work),
                      "cycles_ok": r.get("cycles_ok"), "cycles_failed": r.get("cycles_failed"),
                      "first_error": r.get("first_error")}, indent=1))
sys.exit(0 if ok else 1)
PYEOF
  then ok "$name"; else bad "$name"; fi
}

bench() { # out-json extra-args...
  local out=$1; shift
  "$B" bench --endpoint "unix://$W/mock.sock" lifecycle --work-dir "$W/work" --json "$@" >"$out" 2>"$W/bench.err"
}

# 1. full run
start_mock || { bad "mock driver started"; finish; }
bench "$W/r1.json" -n 300 -c 8; rc=$?
stop_mock
check "full run: 300 cycles OK, only advertised RPCs (and Probe, GetPluginInfo), nothing left behind" "$rc" "$W/r1.json" \
  'rc == 0 and r["cycles_ok"] == 300 and r["cycles_failed"] == 0 and left
   and sorted(ops) == ["CreateVolume", "DeleteVolume", "GetPluginInfo (round trip)", "NodePublishVolume", "NodeStageVolume", "NodeUnpublishVolume", "NodeUnstageVolume", "Probe (round trip)", "cycle"]
   and all(ops[k] == 300 for k in ops)
   and s["calls"].get("CreateVolume") == 300 and s["calls"].get("DeleteVolume") == 300'

"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("  (%d cycles, %.0f cycles/s against the Python driver; not asserted)" % (r["cycles_ok"], r["cycles_per_second"]))' "$W/r1.json" 2>/dev/null

# 2. injected failures
start_mock --fail-every 7 || { bad "mock driver started"; finish; }
bench "$W/r2.json" -n 140 -c 4; rc=$?
stop_mock
check "failed cycles are reported, the exit code says so, and they clean up" "$rc" "$W/r2.json" \
  'rc != 0 and r["cycles_failed"] == 20 and r["cycles_ok"] == 120 and left
   and "UNAVAILABLE" in (r.get("first_error") or "").upper()
   and s["calls"].get("DeleteVolume") == 140 and s["calls"].get("NodeUnstageVolume") == 140'

# 3. interrupted
start_mock || { bad "mock driver started"; finish; }
"$B" bench --endpoint "unix://$W/mock.sock" lifecycle --work-dir "$W/work" --json \
  -n 1000000 -c 8 >"$W/r3.json" 2>"$W/bench.err" &
BP=$!
# Interrupted once cycles run: the round trips timed before them take
# seconds on a slow machine (a fixed 2 s once interrupted them instead).
for _ in $(seq 600); do [ -n "$(ls -A "$W/work" 2>/dev/null)" ] && break; sleep 0.1; done
sleep 0.5
kill -INT "$BP"
wait "$BP"; rc=$?
stop_mock
check "SIGINT mid-run: non-zero exit, cycles in flight clean up, nothing left behind" "$rc" "$W/r3.json" \
  'rc != 0 and 0 < s["calls"].get("CreateVolume", 0) < 1000000 and left
   and s["calls"]["CreateVolume"] == s["calls"].get("DeleteVolume")'
finish
