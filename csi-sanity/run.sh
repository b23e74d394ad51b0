#!/bin/bash
# Runs csi-sanity (pinned) against berth for one volume kind.
#   csi-sanity/run.sh [local|block-raw|block-ext4|block-xfs|nfs]
# nfs needs a reachable NFS export: NFS_SERVER and NFS_SHARE (tests/vm/nfs.sh
# runs it inside the test guest); berth mounts with its default options
# (nfsvers=4.1).
# Env: BERTH (binary, default target/release/berth), CSI_SANITY (binary,
# default: installed by tests/install-deps.sh into target/tools/bin),
# SANITY_ARGS (extra csi-sanity arguments, e.g. --ginkgo.focus=NodeExpand),
# LOCAL_ROOT (berth's --local-root, default inside the temp dir; tests/vm/quota.sh
# points it at a filesystem with project quotas; berth makes it, the caller
# removes it).
# Runs in a private mount namespace so nothing it mounts can leak to the host;
# everything it creates lives in one temp dir that is removed at the end.
# Prints the csi-sanity summary and a final line "N passed, M failed".
set -euo pipefail
MODE=${1:-local}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BERTH=${BERTH:-$ROOT/target/release/berth}
CSI_SANITY=${CSI_SANITY:-$ROOT/target/tools/bin/csi-sanity}

if [ -z "${BERTH_IN_NS:-}" ]; then
  exec env BERTH_IN_NS=1 unshare --mount --propagation private -- "$0" "$@"
fi

WORK=$(mktemp -d /tmp/berth-sanity.XXXXXX)
BPID=
cleanup() {
  set +e
  [ -n "$BPID" ] && kill "$BPID" 2>/dev/null && wait "$BPID" 2>/dev/null
  # Unmount anything left under the work dir, deepest first.
  awk -v w="$WORK" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  # Loop devices are not namespaced: detach any left on files of this run.
  for f in /sys/block/loop*/loop/backing_file; do
    [ -e "$f" ] && grep -q "^$WORK/" "$f" 2>/dev/null || continue
    d=${f#/sys/block/}; d=${d%%/*}
    echo "csi-sanity: detaching leftover /dev/$d ($(cat "$f"))" >&2
    losetup -d "/dev/$d"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

case "$MODE" in
  # Expansion raises a local volume's promise, and its project's limits
  # where the local root enforces project quotas.
  local) PARAMS=$ROOT/csi-sanity/local.yaml; KINDS=local; SIZE=1048576
    EXTRA=(--csi.testvolumeexpandsize=2097152) ;;
  # Block sizes are whole MiB (what the pool allocates exactly); xfs needs
  # at least 300 MiB. Expansion doubles the size.
  block-raw) PARAMS=$ROOT/csi-sanity/block-raw.yaml; KINDS=block; SIZE=$((16 << 20))
    EXTRA=(--csi.testvolumeaccesstype=block --csi.testvolumeexpandsize=$((32 << 20))) ;;
  block-ext4) PARAMS=$ROOT/csi-sanity/block-ext4.yaml; KINDS=block; SIZE=$((64 << 20))
    EXTRA=(--csi.testvolumeexpandsize=$((128 << 20))) ;;
  block-xfs) PARAMS=$ROOT/csi-sanity/block-xfs.yaml; KINDS=block; SIZE=$((320 << 20))
    EXTRA=(--csi.testvolumeexpandsize=$((640 << 20))) ;;
  nfs) : "${NFS_SERVER:?nfs mode needs NFS_SERVER}" "${NFS_SHARE:?nfs mode needs NFS_SHARE}"
    PARAMS=$WORK/nfs.yaml; KINDS=nfs; SIZE=1048576; EXTRA=()
    printf 'kind: nfs\nserver: "%s"\nshare: "%s"\n' "$NFS_SERVER" "$NFS_SHARE" >"$PARAMS" ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac

"$BERTH" --data-dir "$WORK/data" --endpoint "unix://$WORK/csi.sock" \
  --node-id sanity-node --kinds "$KINDS" ${LOCAL_ROOT:+--local-root "$LOCAL_ROOT"} \
  --max-volumes-per-node 8 --log-level "${BERTH_LOG_LEVEL:-warn}" \
  >"$WORK/berth.log" 2>&1 &
BPID=$!
for _ in $(seq 100); do [ -S "$WORK/csi.sock" ] && break; sleep 0.05; done
[ -S "$WORK/csi.sock" ] || { cat "$WORK/berth.log"; echo "berth did not start"; exit 1; }

set +e
"$CSI_SANITY" --csi.endpoint="$WORK/csi.sock" \
  --csi.mountdir="$WORK/mnt" --csi.stagingdir="$WORK/stage" \
  --csi.testvolumesize="$SIZE" --csi.testvolumeparameters="$PARAMS" \
  "${EXTRA[@]}" ${SANITY_ARGS:-} --csi.testnodevolumeattachlimit --ginkgo.no-color --ginkgo.v --ginkgo.timeout=10m >"$WORK/sanity.log" 2>&1
RC=$?
set -e
grep -E '^\s*\[FAIL\]' "$WORK/sanity.log" || true
echo "Skipped specs ($MODE):"
grep -E '^S \[SKIPPED\]' -A1 "$WORK/sanity.log" | grep -vE '^S \[SKIPPED\]|^--' | sed 's/^/  /' || true
SUMMARY=$(grep -E '[0-9]+ Passed \| [0-9]+ Failed' "$WORK/sanity.log" | tail -1)
echo "csi-sanity ($MODE): $SUMMARY"
if [ -z "$SUMMARY" ]; then tail -50 "$WORK/sanity.log"; tail -20 "$WORK/berth.log"; exit 1; fi
P=$(sed -E 's/.* ([0-9]+) Passed.*/\1/' <<<"$SUMMARY")
F=$(sed -E 's/.* ([0-9]+) Failed.*/\1/' <<<"$SUMMARY")
if [ "$RC" -ne 0 ] || [ "$F" -ne 0 ]; then
  grep -E '\[FAILED\]' -A4 "$WORK/sanity.log" | head -40
  tail -30 "$WORK/berth.log"
fi
echo "csi-sanity-$MODE: $P passed, $F failed"
[ "$RC" -eq 0 ] && [ "$F" -eq 0 ]
