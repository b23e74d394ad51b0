#!/bin/bash
# Snapshots and restores of a local directory and of a block volume (on
# this machine's filesystem, then on xfs with reflink), against what
# tar-based drivers do with the same data (`berth bench snapshot`); the last
# part of bench/run.sh, and runnable alone. As root, in a private mount
# namespace, everything under one temp dir that is removed.
#   bench/snapshots.sh [--quick]
# --quick: small volumes, so CI only shows the mode works. Full: 10,000
# files; a 10 GiB block volume holding 1 GiB.
set -euo pipefail
. "$(dirname "$0")/lib.sh" snapshots "$@"
QUICK=${1:-}
echo
echo "## snapshots and restores, against tar (numbers include the flush to disk)"
# --quick: small volumes, so CI only shows the mode works.
if [ "$QUICK" = --quick ]; then
  FILES=1000; DATA=$((16 << 20)); BSIZE=$((256 << 20)); BDATA=$((32 << 20)); XFS=$((2 << 30))
else
  FILES=10000; DATA=$((40 << 20)); BSIZE=$((10 << 30)); BDATA=$((1 << 30)); XFS=$((24 << 30))
fi
start "$W/snap" --kinds local,block
echo "### local directory, $FILES files"
"$B" bench --endpoint "unix://$W/snap/csi.sock" snapshot --size $((DATA * 2)) --data "$DATA" --files "$FILES" --work-dir "$W/work-snap-local"
echo "### block volume of $BSIZE bytes with $BDATA bytes of data, block root on $(findmnt -no FSTYPE -T "$W")"
"$B" bench --endpoint "unix://$W/snap/csi.sock" snapshot --param kind=block --block --size "$BSIZE" --data "$BDATA" --work-dir "$W/work-snap-block"
kill "$P"; wait "$P" 2>/dev/null || true
# The same on a block root that clones files: xfs with reflink on a loop
# device (detached at the end).
truncate -s "$XFS" "$W/xfs.img"
mkfs.xfs -q -m reflink=1 "$W/xfs.img"
mkdir "$W/xfs"
XDEV=$(losetup --find --show "$W/xfs.img")
if mount -t xfs "$XDEV" "$W/xfs"; then
  start "$W/snapx" --kinds block --block-root "$W/xfs/block"
  echo "### block volume of $BSIZE bytes with $BDATA bytes of data, block root on xfs with reflink"
  "$B" bench --endpoint "unix://$W/snapx/csi.sock" snapshot --param kind=block --block --size "$BSIZE" --data "$BDATA" --work-dir "$W/work-snap-xfs"
  echo "### the same, snapshotted while in use (one clone)"
  "$B" bench --endpoint "unix://$W/snapx/csi.sock" snapshot --param kind=block --block --in-use --size "$BSIZE" --data "$BDATA" --work-dir "$W/work-snap-xfs2"
  kill "$P"; wait "$P" 2>/dev/null || true
  umount "$W/xfs"
fi
losetup -d "$XDEV"

