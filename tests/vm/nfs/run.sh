#!/bin/bash
# NFS volumes against a real kernel NFS server; runs INSIDE the test guest
# (tests/vm/nfs.sh boots it). On an ext4 loop disk exported as /export over
# 127.0.0.1, with a canary file at the share root:
#   1. csi-sanity against berth in NFS mode (berth's default options: NFSv4.1),
#      snapshot and cloning specs included
#   2. the integration tests (tests/root_nfs.rs): publish/unpublish/readonly
#      over NFSv3 (nolock) and v4.2, onDelete delete/retain/archive, delete
#      without a record, republish after a server restart and after a stale
#      handle, a dead server (connections refused) and a hung one (every
#      packet dropped), snapshots of a volume in use restored and cloned
#      (modes, owners, links, xattrs, sparse files; NFSv4.2 server-side
#      copy), after the source is deleted and after a lost state
#   3. `berth bench lifecycle` against berth in NFS mode (an endpoint that
#      advertises neither attach nor staging): every cycle must succeed; the
#      numbers are printed, never asserted (software-emulated guest); then
#      `berth bench snapshot` (snapshot and restore of 4 MiB in 32 files
#      beside tar), which must succeed, its numbers printed only
#   4. the canary survived, nothing is left on the share, no NFS mount and no
#      mount process is left.
# Last line: "N passed, M failed".
. /share/guest-lib.sh
set -u
export BERTH_NFS_EXPORT=/export

use_local_bin
berth_check "binaries copied to RAM" command -v berth csi-sanity root_nfs berth-nfs-ctl >/dev/null

nfs_mounts() { awk '$3 == "nfs" || $3 == "nfs4" {print $2}' /proc/mounts; }
mount_procs() { ps -eo pid=,stat=,comm=,args= | awk '$3 ~ /^u?mount(\.nfs4?)?$/'; }

berth_check "ext4 loop disk on /export" make_ext4_disk /export 256M
echo "canary $(date +%s%N)" > /export/canary
CANARY=$(sha256sum < /export/canary)
berth_check "NFS server started" start_nfs_server /export || nfs_server_logs

sanity() {
  local t0=$SECONDS rc
  BERTH=$(command -v berth) CSI_SANITY=$(command -v csi-sanity) \
    NFS_SERVER=127.0.0.1 NFS_SHARE=/export bash /share/csi-sanity/run.sh nfs; rc=$?
  berth_log "csi-sanity took $((SECONDS - t0)) s"
  return $rc
}
berth_check "csi-sanity in NFS mode (NFSv4.1), 0 failed" sanity
berth_check "no NFS mount left after csi-sanity" eval '[ -z "$(nfs_mounts)" ]' || nfs_mounts

integration() {
  local t0=$SECONDS rc
  BERTH_NFS_SERVER=127.0.0.1 BERTH_NFS_SHARE=/export BERTH_NFS_CTL=berth-nfs-ctl \
    RUST_BACKTRACE=1 root_nfs --ignored --test-threads=1 --nocapture 2>&1; rc=$?
  berth_log "integration tests took $((SECONDS - t0)) s"
  return $rc
}
berth_check "integration tests (tests/root_nfs.rs)" integration

bench() {
  local d=/tmp/berth-bench-nfs rc pid
  mkdir -p "$d"
  berth --data-dir "$d" --endpoint "unix://$d/csi.sock" --node-id guest --kinds nfs \
    --log-level warn 2>"$d/berth.log" &
  pid=$!
  for _ in $(seq 500); do [ -S "$d/csi.sock" ] && break; sleep 0.02; done
  berth bench --endpoint "unix://$d/csi.sock" lifecycle -n 100 -c 4 --size 1048576 \
    --param kind=nfs --param server=127.0.0.1 --param share=/export \
    --work-dir "$d/work" --pid "$pid" 2>&1; rc=$?
  kill "$pid"; wait "$pid"
  [ "$rc" = 0 ] || cat "$d/berth.log"
  rm -rf "$d"
  return $rc
}
berth_check "berth bench lifecycle in NFS mode (100 cycles, 4 in flight), 0 failed" bench
berth_check "no NFS mount left after the bench" eval '[ -z "$(nfs_mounts)" ]' || nfs_mounts

bench_snapshot() {
  local d=/tmp/berth-bench-snap rc pid
  mkdir -p "$d"
  berth --data-dir "$d" --endpoint "unix://$d/csi.sock" --node-id guest --kinds nfs \
    --log-level warn 2>"$d/berth.log" &
  pid=$!
  for _ in $(seq 500); do [ -S "$d/csi.sock" ] && break; sleep 0.02; done
  berth bench --endpoint "unix://$d/csi.sock" snapshot --size 1048576 \
    --data $((4 << 20)) --files 32 \
    --param kind=nfs --param server=127.0.0.1 --param share=/export \
    --work-dir "$d/work" 2>&1; rc=$?
  kill "$pid"; wait "$pid"
  [ "$rc" = 0 ] || cat "$d/berth.log"
  rm -rf "$d"
  return $rc
}
berth_check "berth bench snapshot in NFS mode (4 MiB in 32 files; numbers not asserted)" bench_snapshot
berth_check "no NFS mount left after the snapshot bench" eval '[ -z "$(nfs_mounts)" ]' || nfs_mounts

berth_check "canary at the share root intact" eval '[ "$(sha256sum < /export/canary)" = "$CANARY" ]'
# An empty snapshot area may stay (Berth keeps it); nothing in it may. The
# share's marker (.berth-share, written by the first CreateVolume) stays too,
# as a small regular file of its own, checked below.
leftovers() {
  ls -A /export | grep -vxE 'canary|lost\+found|\.berth-snapshots|\.berth-share'
  ls -A /export/.berth-snapshots 2>/dev/null | sed 's|^|.berth-snapshots/|'
}
# What a leftover holds (a silly-renamed .nfs* file, data), to tell why.
leftover_contents() {
  local n
  leftovers | while read -r n; do
    find "/export/$n" -maxdepth 2 -printf '%p %y %s bytes\n' 2>&1 | head -20
  done
}
berth_check "the share's marker is a small regular file at the share root" eval '[ -f /export/.berth-share ] && [ ! -L /export/.berth-share ] && [ "$(stat -c %s /export/.berth-share)" -lt 4096 ]'
berth_check "nothing left on the share" eval '[ -z "$(leftovers)" ]' || leftover_contents
berth_check "no NFS mount left" eval '[ -z "$(nfs_mounts)" ]' || nfs_mounts
berth_check "no mount process left" eval '[ -z "$(mount_procs)" ]' || mount_procs

stop_nfs_server
remove_all_disks
berth_summary
