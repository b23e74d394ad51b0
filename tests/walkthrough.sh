#!/bin/bash
# Runs the README's two commands (start berth with its embedded defaults
# under a data directory; the lifecycle walkthrough) in a private mount
# namespace and a temp dir, and checks the walkthrough completes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${BERTH_IN_NS:-}" ]; then
  exec env BERTH_IN_NS=1 unshare --mount --propagation private -- "$0" "$@"
fi
WORK=$(mktemp -d /tmp/berth-walk.XXXXXX)
BPID=
cleanup() {
  set +e
  [ -n "$BPID" ] && kill "$BPID" 2>/dev/null && wait "$BPID" 2>/dev/null
  awk -v w="$WORK" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
"$ROOT/target/release/berth" --data-dir ./berth-data >berth.log 2>&1 &
BPID=$!
for _ in $(seq 100); do [ -S berth-data/csi.sock ] && break; sleep 0.05; done
"$ROOT/target/release/examples/lifecycle" unix://./berth-data/csi.sock | tee walk.out
grep -q "^7. wrote and read back through the pod path: hello from berth" walk.out
grep -q "^9. unpublished, unstaged, detached and deleted" walk.out
[ -z "$(ls berth-data/local)" ] || { echo "volume directory left behind"; exit 1; }
echo "walkthrough: 1 passed, 0 failed"
