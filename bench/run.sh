#!/bin/bash
# Reproduces the README's performance table with `berth bench` (as root, in a
# private mount namespace, everything under one temp dir that is removed).
#   bench/run.sh [--quick]
# Prints each measurement; never asserts timings (numbers depend on the
# machine).
set -euo pipefail
. "$(dirname "$0")/lib.sh" bench "$@"
QUICK=${1:-}
N=2000; SCALE=10000
[ "$QUICK" = --quick ] && { N=200; SCALE=1000; }


echo "## this machine's floor (no driver; the ratios below are against it)"
"$B" bench floor -n "$N" --work-dir "$W/floor"
echo
echo "## directory-volume lifecycle, $N cycles, 16 in flight"
start "$W/life"
"$B" bench --endpoint "unix://$W/life/csi.sock" lifecycle -n "$N" -c 16 --work-dir "$W/work" --pid "$P" | tee "$W/l16.txt"
echo
echo "## one at a time, as Kubernetes drives it with attachRequired: false (no ControllerPublish),"
echo "## in blocks interleaved with as many cycles of the floor (the ratio per block, and its median)"
"$B" bench --endpoint "unix://$W/life/csi.sock" lifecycle -n "$((N / 4))" -c 1 --attach never --work-dir "$W/work1" --pid "$P" \
  --floor --floor-block "$((N / 40))" | tee "$W/l1.txt"
grep -q '^ratio to the floor, per block: median ' "$W/l1.txt" || { echo "run.sh: --floor printed no ratio to the floor"; exit 1; }
# Which RPCs ran is not a timing: berth advertises attach, so the default
# cycle publishes on the controller side and --attach never does not.
grep -q '^ControllerPublishVolume ' "$W/l16.txt" || { echo "run.sh: the default cycle did not call ControllerPublishVolume"; exit 1; }
if grep -q '^Controller' "$W/l1.txt"; then echo "run.sh: --attach never still called ControllerPublish/Unpublish"; exit 1; fi
kill "$P"; wait "$P" 2>/dev/null || true

echo
echo "## scale: $SCALE volumes"
start "$W/scale"
"$B" bench --endpoint "unix://$W/scale/csi.sock" scale --volumes "$SCALE" --sample 100 --keep
kill "$P"; wait "$P" 2>/dev/null || true
echo
echo "## start-up to first Probe with $SCALE volumes in state"
"$B" bench --endpoint "unix://$W/scale/csi2.sock" startup -- --data-dir "$W/scale" --node-id bench-node --log-level warn

echo
echo "## idle RSS with 1000 volumes"
start "$W/rss"
"$B" bench --endpoint "unix://$W/rss/csi.sock" scale --volumes 1000 --sample 100 --keep >/dev/null
sleep 12  # idle blocking threads exit after 10 s
echo "RSS of the berth that created them, idle: $(awk '/VmRSS/{printf "%.2f MiB", $2/1024}' /proc/$P/status)"
kill "$P"; wait "$P" 2>/dev/null || true
"$B" bench --endpoint "unix://$W/rss/csi2.sock" startup --settle-ms 3000 -- --data-dir "$W/rss" --node-id bench-node --log-level warn

echo
echo "## block volumes, 4 in flight (loop devices; the filesystem modes format in NodeStage)"
start "$W/block" --kinds local,block
for mode in "raw 16777216 --block" "ext4 67108864 --param fsType=ext4" "xfs 314572800 --param fsType=xfs"; do
  set -- $mode
  echo "### $1"
  "$B" bench --endpoint "unix://$W/block/csi.sock" lifecycle -n "$((N / 10))" -c 4 \
    --param kind=block --size "$2" "${@:3}" --work-dir "$W/work-$1" --pid "$P"
done
kill "$P"; wait "$P" 2>/dev/null || true

echo
"$ROOT/bench/snapshots.sh" $QUICK
