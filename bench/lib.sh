# bench/lib.sh, sourced by bench/run.sh, snapshots.sh and compare.sh: re-runs the
# script in a private mount namespace, sets B (the berth binary), W (a temp
# dir for the run) and PIDS (drivers to stop), and on exit stops the
# drivers, unmounts everything under W, detaches loop devices on files under
# W (loop devices are not namespaced) and removes W.
#   . bench/lib.sh NAME "$@"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${BERTH:-$ROOT/target/release/berth}
if [ -z "${BERTH_IN_NS:-}" ]; then
  exec env BERTH_IN_NS=1 unshare --mount --propagation private -- "$0" "${@:2}"
fi
W=$(mktemp -d "/tmp/berth-$1.XXXXXX")
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  awk -v w="$W" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount 2>/dev/null
  for f in /sys/block/loop*/loop/backing_file; do
    [ -e "$f" ] && grep -q "^$W/" "$f" 2>/dev/null || continue
    d=${f#/sys/block/}; losetup -d "/dev/${d%%/*}"
  done
  rm -rf "$W"
}
trap cleanup EXIT

# start DIR [berth flags...]: a berth serving unix://DIR/csi.sock, its pid
# in P (stopped on exit)
P=
start() {
  local d=$1; shift
  "$B" --data-dir "$d" --endpoint "unix://$d/csi.sock" --node-id bench-node --log-level warn "$@" >/dev/null 2>"$d.log" &
  P=$!
  PIDS+=("$P")
  for _ in $(seq 200); do [ -S "$d/csi.sock" ] && break; sleep 0.01; done
}
