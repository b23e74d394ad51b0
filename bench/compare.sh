#!/bin/bash
# bench/compare.sh: Berth and the reference driver, csi-driver-host-path
# v1.18.0, side by side with `berth bench`, on this machine, interleaved
# (berth, host-path, berth, host-path, ...), same client, plus this
# machine's floor (`berth bench floor`). Prints every measure of the
# README's comparison table for both drivers, with their ratio, and Berth's
# one-at-a-time lifecycle and NodePublish latency against the floor.
# As root, in a private mount namespace, everything under one temp dir that
# is removed. Never asserts timings: numbers depend on the machine, and
# ratios are what count.
#   bench/compare.sh [--quick]
# Env: BERTH (default target/release/berth), HOSTPATH (a hostpathplugin
# binary; default: built by bench/build-hostpath.sh), ROUNDS (default 3).
set -euo pipefail
. "$(dirname "$0")/lib.sh" compare "$@"
[ -x "$B" ] || { echo "compare.sh: no berth at $B (cargo build --release)"; exit 1; }
HP=${HOSTPATH:-}
[ -n "$HP" ] || HP=$("$ROOT/bench/build-hostpath.sh")
[ -x "$HP" ] || { echo "compare.sh: no hostpathplugin at $HP"; exit 1; }
QUICK=${1:-}
N=1000; SCALE=10000; ROUNDS=${ROUNDS:-3}
[ "$QUICK" = --quick ] && { N=100; SCALE=1000; ROUNDS=1; }

P=
# start berth|hostpath DIR: the driver serving unix://DIR/csi.sock; sets P
args_of() { # driver dir: the driver's own arguments, without the endpoint
  case $1 in
    berth) echo "--data-dir $2 --node-id bench-node --log-level warn" ;;
    hostpath) echo "--nodeid bench-node --drivername hostpath.csi.k8s.io --statedir $2 --v=0" ;;
  esac
}
bin_of() { case $1 in berth) echo "$B" ;; hostpath) echo "$HP" ;; esac; }
start() {
  local drv=$1 d=$2
  mkdir -p "$d"
  # shellcheck disable=SC2046
  "$(bin_of "$drv")" $(args_of "$drv" "$d") --endpoint "unix://$d/csi.sock" > /dev/null 2> "$d.log" &
  P=$!; PIDS+=("$P")
  for _ in $(seq 500); do [ -S "$d/csi.sock" ] && return 0; sleep 0.01; done
  echo "compare.sh: $drv did not open its socket; its log:"; tail -20 "$d.log"; exit 1
}
stop() { kill "$P" 2>/dev/null; wait "$P" 2>/dev/null || true; }
bench() { # dir mode args...: berth bench against the driver at dir
  local d=$1; shift
  "$B" bench --endpoint "unix://$d/csi.sock" "$@"
}
rss_mib() { awk '/VmRSS/{printf "%.2f", $2/1024}' "/proc/$1/status"; }
J=$W/results; mkdir -p "$J"
# record name driver value
record() { echo "$3" >> "$J/$1.$2"; }
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"d": d}))' "$@"; }

echo "## this machine's floor (no driver)"
"$B" bench floor -n $((N * 2)) --work-dir "$W/floor" --json > "$J/floor.json"
FLOOR_CPS=$(jget "$J/floor.json" 'round(d["lifecycle_floor_per_second"])')
BIND_P99=$(jget "$J/floor.json" 'round([o for o in d["operations"] if o["op"] == "bind + unmount"][0]["p99_ms"] * 1000, 1)')
# The same pair beside a busy CPU (not in the floor; `berth bench floor`
# says why); "-" on a single-CPU machine, where it is not measured.
BUSY_P99=$(jget "$J/floor.json" 'next((str(round(o["p99_ms"] * 1000, 1)) for o in d["operations"] if o["op"] == "bind + unmount, CPU busy"), "-")')
echo "lifecycle floor: $FLOOR_CPS cycles/s one at a time; bind + unmount pair p99 $BIND_P99 us ($BUSY_P99 us beside a busy CPU)"

for r in $(seq "$ROUNDS"); do
  for drv in berth hostpath; do
    echo "## round $r: $drv"
    d=$W/$drv-$r
    start "$drv" "$d/life"
    # Cycles as Kubernetes drives them with the shipped CSIDriver objects
    # (attachRequired: false: no ControllerPublish/Unpublish), the
    # lifecycle the floor counts; host-path does not advertise attach.
    bench "$d/life" lifecycle -n "$N" -c 16 --attach never --work-dir "$d/work16" --pid "$P" --json > "$J/l16.json"
    record l16 "$drv" "$(jget "$J/l16.json" 'round(d["cycles_per_second"])')"
    # One at a time, in blocks interleaved with as many cycles of the
    # floor (`lifecycle --floor`): each block's ratio sees the machine as
    # its floor block does (a floor measured minutes apart swung 2.5x).
    bench "$d/life" lifecycle -n "$((N / 2))" -c 1 --attach never --work-dir "$d/work1" --pid "$P" --floor --floor-block "$((N / 20))" --json > "$J/l1-$drv-$r.json"
    record l1 "$drv" "$(jget "$J/l1-$drv-$r.json" 'round(d["cycles_per_second"])')"
    for k in ratio_median ratio_min ratio_max p99_ratio p99_ratio_median bind_pair_p99_us; do
      record "l1$k" "$drv" "$(jget "$J/l1-$drv-$r.json" "round(d[\"floor\"][\"$k\"], 3)")"
    done
    record pub99 "$drv" "$(jget "$J/l1-$drv-$r.json" 'round([o for o in d["operations"] if o["op"] == "NodePublishVolume"][0]["p99_ms"] * 1000, 1)')"
    record probe50 "$drv" "$(jget "$J/l1-$drv-$r.json" 'round([o for o in d["operations"] if o["op"].startswith("Probe")][0]["p50_ms"] * 1000, 1)')"
    record probe99 "$drv" "$(jget "$J/l1-$drv-$r.json" 'round([o for o in d["operations"] if o["op"].startswith("Probe")][0]["p99_ms"] * 1000, 1)')"
    record info50 "$drv" "$(jget "$J/l1-$drv-$r.json" 'round([o for o in d["operations"] if o["op"].startswith("GetPluginInfo")][0]["p50_ms"] * 1000, 1)')"
    if [ "$drv" = berth ]; then
      # Berth advertises attach: the cycle with it too (8 RPCs), as a
      # CSIDriver with attachRequired: true would have it.
      bench "$d/life" lifecycle -n "$((N / 2))" -c 1 --work-dir "$d/work1a" --json > "$J/l1a.json"
      record l1attach berth "$(jget "$J/l1a.json" 'round(d["cycles_per_second"])')"
    fi
    stop
    # idle RSS of the process that made 1,000 volumes
    start "$drv" "$d/k1"
    bench "$d/k1" scale --volumes 1000 --sample 100 --keep --json > "$J/s1.json"
    sleep 12  # berth's idle blocking threads exit after 10 s
    record rss1k "$drv" "$(rss_mib "$P")"
    stop
    # 10,000 volumes: a fresh start's time to its first Probe and idle RSS
    start "$drv" "$d/k10"
    bench "$d/k10" scale --volumes "$SCALE" --sample 100 --keep --json > "$J/s10-$drv.json"
    stop
    # shellcheck disable=SC2046
    bench "$d/k10" startup --berth "$(bin_of "$drv")" --settle-ms 3000 --json -- $(args_of "$drv" "$d/k10") > "$J/st.json"
    record probe10k "$drv" "$(jget "$J/st.json" 'd["first_probe_ms"]')"
    record rss10k "$drv" "$(jget "$J/st.json" 'round(d["idle_rss_kib"] / 1024, 2)')"
    rm -rf "$d"
  done
done

echo
echo "## per-RPC breakdown, Berth, 1 in flight (last round; 'driver' = p50 minus the p50 of GetPluginInfo, the bare round trip)"
jget "$J/l1-berth-$ROUNDS.json" '(lambda ops, bare: "\n".join("%-28s p50 %8.1f us  p99 %8.1f us  driver %8.1f us" % (o["op"], o["p50_ms"] * 1000, o["p99_ms"] * 1000, (o["p50_ms"] - bare) * 1000) for o in ops))(d["operations"], [o for o in d["operations"] if o["op"].startswith("GetPluginInfo")][0]["p50_ms"])'
echo
for drv in berth hostpath; do
  echo "ListVolumes paging of $drv: $(jget "$J/s10-$drv.json" '"correct" if d["paging_ok"] else "WRONG: %d of the volumes never listed, %d pages over the size asked" % (d["list_missing"], d["list_overfull_pages"])')"
done
echo
echo "## Berth and host-path side by side (median of $ROUNDS rounds; host-path v1.18.0)"
SCALE=$SCALE ROUNDS=$ROUNDS python3 - "$J" "$FLOOR_CPS" "$BIND_P99" "$BUSY_P99" <<'PY'
import statistics, sys, os
j, floor, bind99, busy99 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def med(name, drv):
    with open(os.path.join(j, "%s.%s" % (name, drv))) as f:
        return statistics.median(float(x) for x in f.read().split())
rows = [("lifecycle cycles/s, 16 in flight", "l16", True),
        ("lifecycle cycles/s, 1 in flight", "l1", True),
        ("NodePublish p99 us, 1 in flight", "pub99", False),
        ("Probe round trip p50 us, 1 in flight", "probe50", False),
        ("Probe round trip p99 us, 1 in flight", "probe99", False),
        ("GetPluginInfo round trip p50 us (no work: the bare round trip)", "info50", False),
        ("idle RSS MiB after 1,000 volumes", "rss1k", False),
        ("idle RSS MiB, %s volumes, fresh start" % format(int(os.environ["SCALE"]), ","), "rss10k", False),
        ("start-up to first Probe ms, %s volumes" % format(int(os.environ["SCALE"]), ","), "probe10k", False)]
print("| measure | berth | host-path | berth / host-path |")
print("|---|---|---|---|")
for label, name, _ in rows:
    b, h = med(name, "berth"), med(name, "hostpath")
    print("| %s | %g | %g | %.2f |" % (label, b, h, b / h if h else float("nan")))
l1 = med("l1", "berth")
p99 = med("pub99", "berth")
print()
print("Berth, 1 in flight: %.0f cycles/s = %.2f of the floor measured before the rounds (%.0f cycles/s)" % (l1, l1 / floor, floor))
print("Berth, 1 in flight, against the floor measured in blocks between its own (median of rounds): per-block ratio median %.2f (lowest %.2f, highest %.2f); host-path %.2f" % (med("l1ratio_median", "berth"), med("l1ratio_min", "berth"), med("l1ratio_max", "berth"), med("l1ratio_median", "hostpath")))
print("Berth NodePublish p99 = %.2f x the bind + unmount pair's p99 measured in blocks between its cycles (pair p99 %.0f us; per-block median %.2f)" % (med("l1p99_ratio", "berth"), med("l1bind_pair_p99_us", "berth"), med("l1p99_ratio_median", "berth")))
print("Berth, 1 in flight with ControllerPublish/Unpublish (attachRequired: true): %.0f cycles/s" % med("l1attach", "berth"))
print("Berth NodePublish p99 %.0f us = %.2f x a bare bind + unmount pair's p99 measured before the rounds (%.0f us)" % (p99, p99 / bind99, bind99))
if busy99 != "-":
    print("  the same pair beside a busy CPU: p99 %s us (NodePublish p99 = %.2f x that)" % (busy99, p99 / float(busy99)))
bi50, hi50 = med("info50", "berth"), med("info50", "hostpath")
bp50 = med("probe50", "berth")
import json
with open(os.path.join(j, "l1-berth-%s.json" % os.environ["ROUNDS"])) as f:
    rpcs = sum(1 for o in json.load(f)["operations"] if not o["op"].endswith("(round trip)") and o["op"] != "cycle")
print("The bare gRPC round trip (GetPluginInfo, answered from memory), p50: berth %.0f us, host-path %.0f us; the %d RPCs of berth's cycle at that p50 = %.0f cycles/s at most, %.2f of the floor, before any work (berth's Probe, which writes and removes a file in its state directory: p50 %.0f us)" % (bi50, hi50, rpcs, 1e6 / (rpcs * bi50), 1e6 / (rpcs * bi50) / floor, bp50))
PY
