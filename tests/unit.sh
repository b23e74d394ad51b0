#!/bin/bash
# unit.sh: what `cargo test --locked` runs (unit, handler and binary tests,
# and the root suites' listing of their ignored tests), with the test
# binaries run UNIT_JOBS (default 3) at a time instead of one after another:
# most of their time is spent waiting (berth processes started and stopped,
# deadlines run out, fsync), not computing. Each binary's output is printed
# whole, in cargo's order, once all have ended; then the doc tests. Fails if
# any binary fails (its output says which tests), or prints nothing, or if
# cargo lists no test binary.
#   tests/unit.sh [test-binary-name...]   only these (e.g. handlers binary)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
JOBS=${UNIT_JOBS:-3}
OUT=$(mktemp -d /tmp/berth-unit.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

cargo test --locked --no-run --message-format=json-render-diagnostics > "$OUT/build.json"
# "name path" of every test executable, in cargo's order
python3 - "$OUT/build.json" "$@" > "$OUT/list" <<'PY'
import json, sys
want = set(sys.argv[2:])
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    kinds = m["target"]["kind"]
    name = m["target"]["name"] if "test" in kinds else "%s (%s)" % (m["target"]["name"], kinds[0])
    if want and m["target"]["name"] not in want:
        continue
    print(name.replace(" ", "_"), m["executable"])
PY
[ -s "$OUT/list" ] || { echo "unit.sh: cargo listed no test binary"; exit 1; }

# The longest first (CI's times: binary 55 s, the library's unit tests 36 s,
# copy_memory 30 s, handlers_snapshots 27 s), then the rest in cargo's order.
{ grep -E '^(binary|berth_\(lib\)|copy_memory|handlers_snapshots) ' "$OUT/list" || true
  grep -vE '^(binary|berth_\(lib\)|copy_memory|handlers_snapshots) ' "$OUT/list" || true; } > "$OUT/order"
i=0 running=0
while read -r name exe; do
  i=$((i + 1))
  ( t0=$SECONDS; rc=0; "$exe" > "$OUT/$i.log" 2>&1 || rc=$?
    echo "$rc $((SECONDS - t0))" > "$OUT/$i.rc" ) &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
done < "$OUT/order"
wait || true

failed=()
i=0
while read -r name exe; do
  i=$((i + 1))
  rc=1 secs=?
  read -r rc secs < "$OUT/$i.rc" || true
  echo "     Running $name ($exe, $secs s)"
  cat "$OUT/$i.log"
  if [ "$rc" != 0 ] || ! grep -q '^test result: ok\.' "$OUT/$i.log"; then
    failed+=("$name (exit $rc)")
  fi
done < "$OUT/order"
echo "   Doc-tests"
cargo test --locked --doc || failed+=("doc tests")
if [ ${#failed[@]} -gt 0 ]; then
  echo "unit.sh: FAILED: ${failed[*]}"
  exit 1
fi
echo "unit.sh: $(wc -l < "$OUT/order") test binaries and the doc tests passed"
