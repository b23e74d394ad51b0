#!/bin/bash
# Local volumes held to their size by project quotas; runs INSIDE the test
# guest (tests/vm/quota.sh boots it). Loop disks: xfs mounted with prjquota,
# ext4 made with -O project,quota and mounted with prjquota, and a plain xfs
# and ext4 (no quotas) for the comparison:
#   1. the integration tests (tests/root_quota.rs) on xfs, then on ext4:
#      writes stop at the size (as nobody: root's CAP_SYS_RESOURCE passes
#      ext4's limits), df in the pod shows the volume, stats before and
#      after, online expansion and writing more, a restart keeps the
#      limits, the inode limit, 1,000 volumes created and deleted without
#      leaking a project id
#   2. csi-sanity in local mode (expansion specs included) on the xfs and ext4
#      prjquota roots
#   3. the berth binary: start-up says whether sizes are enforced and the
#      metric berth_volume_sizes_enforced agrees, on each of the four roots;
#      then `berth bench lifecycle` there (CreateVolume/DeleteVolume latency
#      with quotas against without; numbers printed, never asserted: the
#      guest is software-emulated)
#   4. nothing is left mounted, no berth process is left.
# Last line: "N passed, M failed". QUOTA_BENCH_CYCLES (default 10: CI
# checks that the bench runs; the README's numbers come from 200) sets the
# cycles of each bench, one in flight (latency, not throughput).
. /share/guest-lib.sh
set -u
CYCLES=${QUOTA_BENCH_CYCLES:-10}

use_local_bin
berth_check "binaries copied to RAM, setpriv there" eval 'command -v berth csi-sanity root_quota setpriv >/dev/null'

DISK_MOUNT_OPTS=prjquota berth_check "xfs disk with prjquota on /q-xfs" make_xfs_disk /q-xfs 320M
DISK_MOUNT_OPTS=prjquota berth_check "ext4 disk (-O project,quota) with prjquota on /q-ext4" \
  make_ext4_disk /q-ext4 128M -O project,quota
berth_check "plain xfs disk on /plain-xfs" make_xfs_disk /plain-xfs 320M
berth_check "plain ext4 disk on /plain-ext4" make_ext4_disk /plain-ext4 128M
grep -E ' /(q|plain)-' /proc/mounts

# The two filesystems at once (two processes, each alone on its filesystem:
# project ids are per filesystem), each test of a run after the other.
integration() {
  local fs=$1 t0=$SECONDS rc
  mkdir -p "/q-$fs/it"
  BERTH_QUOTA_ROOT=/q-$fs/it BERTH_QUOTA_FS=$fs RUST_BACKTRACE=1 \
    root_quota --ignored --test-threads=1 --nocapture >"/tmp/it-$fs.log" 2>&1; rc=$?
  echo "integration tests on $fs took $((SECONDS - t0)) s" >>"/tmp/it-$fs.log"
  rm -rf "/q-$fs/it"
  echo "$rc" >"/tmp/it-$fs.rc"
}
t0=$SECONDS
integration xfs & integration ext4 & wait
berth_log "integration tests on xfs and ext4 took $((SECONDS - t0)) s together"
for fs in xfs ext4; do
  cat "/tmp/it-$fs.log"
  berth_check "$fs: integration tests (tests/root_quota.rs)" [ "$(cat "/tmp/it-$fs.rc")" = 0 ]
done

# sanity FS: csi-sanity in local mode on the FS prjquota root.
sanity() {
  local t0=$SECONDS rc
  BERTH=$(command -v berth) CSI_SANITY=$(command -v csi-sanity) LOCAL_ROOT=/q-$1/sanity \
    bash /share/csi-sanity/run.sh local; rc=$?
  berth_log "csi-sanity on $1 took $((SECONDS - t0)) s"
  rm -rf "/q-$1/sanity"
  return $rc
}
for fs in xfs ext4; do
  berth_check "csi-sanity in local mode on the $fs prjquota root (expansion specs on), 0 failed" sanity "$fs"
done

# metric PORT NAME: the value of a metric line (bash's /dev/tcp: no curl here).
metric() {
  local port=$1 name=$2
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  awk -v n="$name" '$1 == n {print $2}' <&3
  exec 3<&-
}

# bench ROOT ENFORCED(1|0): berth on ROOT, its start-up log and metric, then
# the lifecycle bench.
bench() {
  local root=$1 want=$2 d=/tmp/berth-bench pid rc got
  rm -rf "$d"; mkdir -p "$d"
  berth --data-dir "$d" --endpoint "unix://$d/csi.sock" --node-id guest --kinds local \
    --local-root "$root/bench" --metrics-address 127.0.0.1:29790 --log-level info 2>"$d/berth.log" &
  pid=$!
  for _ in $(seq 500); do [ -S "$d/csi.sock" ] && break; sleep 0.02; done
  if [ "$want" = 1 ]; then
    berth_check "$root: start-up says sizes are enforced" grep -q 'project quotas are enforced on the local root' "$d/berth.log"
  else
    berth_check "$root: start-up says once that sizes are not enforced, and names the fix" \
      eval '[ "$(grep -c "local volume sizes are not enforced.*prjquota" "$d/berth.log")" = 1 ]'
  fi
  got=$(metric 29790 'berth_volume_sizes_enforced{kind="local"}')
  berth_check "$root: metric berth_volume_sizes_enforced{kind=\"local\"} is $want (got '$got')" [ "$got" = "$want" ]
  berth bench --endpoint "unix://$d/csi.sock" lifecycle -n "$CYCLES" -c 1 --size 16777216 \
    --work-dir "$d/work" --pid "$pid" 2>&1; rc=$?
  kill "$pid"; wait "$pid"
  [ "$rc" = 0 ] || tail -20 "$d/berth.log"
  rm -rf "$d" "$root/bench"
  return $rc
}
for r in q-xfs:1 plain-xfs:0 q-ext4:1 plain-ext4:0; do
  root=/${r%:*}; want=${r#*:}
  berth_check "$root: berth bench lifecycle ($CYCLES cycles, 1 in flight), 0 failed" bench "$root" "$want"
done

left_mounts() { awk '$2 ~ "^/(q|plain)-[a-z0-9]+/" || $2 ~ "^/tmp/berth-bench" {print $2}' /proc/mounts; }
berth_check "nothing mounted inside the test roots" eval '[ -z "$(left_mounts)" ]' || left_mounts
berth_check "no berth process left" eval '! ps -eo comm= | grep -qx berth'

remove_all_disks
berth_summary
