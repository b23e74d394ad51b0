#!/bin/bash
# Smoke test of the full-kernel guest; runs INSIDE the guest (see ../smoke.sh).
# Checks: a host-built binary runs, kernel NFS server on an ext4 loop disk,
# NFS v3 and v4.2 mounts with writes read back, a mount to a dead server is
# stopped by timeout(1) and leaves no process, plus XFS, quota and LVM thin.
. /share/guest-lib.sh
set -u

# --- a host-built, dynamically linked binary runs in the guest -------------------
check_host_binary() {
  [ "$(command -v stat)" = /share/bin/stat ] || { echo "stat resolves to $(command -v stat)"; return 1; }
  ldd /share/bin/stat | grep -q libc.so.6 || { echo "not dynamically linked?"; return 1; }
  [ "$(stat -c %s /share/run.sh)" = "$(wc -c < /share/run.sh)" ]
}
berth_check "host-built dynamically linked binary (/share/bin/stat) runs" check_host_binary

# --- NFS server on an ext4 loop disk ----------------------------------------------
berth_check "ext4 loop disk on /export" make_ext4_disk /export 64M
berth_check "NFS server started" start_nfs_server /export || nfs_server_logs
mkdir -p /mnt/v3 /mnt/v4

# mount_and_rw VERS MNT: mounts, checks the negotiated version, writes through the
# mount, reads it back through the mount and on the server side.
mount_and_rw() {
  local vers=$1 mnt=$2 opts=$3 data="written via NFS v$1 $RANDOM$RANDOM"
  mount -t nfs -o "$opts" 127.0.0.1:/export "$mnt" || return 1
  grep -q " $mnt nfs4\? .*vers=${vers}," /proc/mounts || { echo "wrong version:"; grep " $mnt " /proc/mounts; return 1; }
  echo "$data" > "$mnt/file-v$vers" || return 1
  sync -f "$mnt/file-v$vers" || return 1
  [ "$(cat "$mnt/file-v$vers")" = "$data" ] || { echo "read back through the mount differs"; return 1; }
  [ "$(cat "/export/file-v$vers")" = "$data" ] || { echo "server-side file differs"; return 1; }
  dd if=/dev/urandom of="$mnt/big-v$vers" bs=1M count=4 status=none && sync -f "$mnt/big-v$vers" &&
    cmp "$mnt/big-v$vers" "/export/big-v$vers"
}
berth_check "NFS v3 (nolock) mount, write, read back" mount_and_rw 3 /mnt/v3 vers=3,nolock
berth_check "NFS v4.2 mount, write, read back" mount_and_rw 4.2 /mnt/v4 vers=4.2
berth_check "v3 write visible through v4.2" cmp /mnt/v3/file-v3 /mnt/v4/file-v3
berth_check "v4.2 write visible through v3" cmp /mnt/v4/big-v4.2 /mnt/v3/big-v4.2
berth_check "unmount v3" umount /mnt/v3
berth_check "unmount v4.2" umount /mnt/v4

# --- dead server: timeout(1) stops the mount, nothing survives ----------------------
stop_nfs_server
dead_mount() {
  local vers=$1 t0 t1 rc
  t0=$(date +%s%N)
  timeout -k 2 10 mount -t nfs -o "vers=$vers${2:+,$2}" 127.0.0.1:/export /mnt/v4; rc=$?
  t1=$(date +%s%N)
  echo "  mount vers=$vers to dead server: exit $rc after $(( (t1 - t0) / 1000000 )) ms"
  [ $rc -ne 0 ] || { umount /mnt/v4; return 1; }
  [ $(( (t1 - t0) / 1000000 )) -le 12500 ] || return 1
  sleep 0.5
  if ps -eo pid=,stat=,comm=,args= | awk '$3 ~ /^mount(\.nfs4?)?$/ {print "  survivor:", $0; n++} END {exit !n}'; then
    return 1
  fi
  ! grep -q ' /mnt/v4 ' /proc/mounts
}
berth_check "v4.2 mount to dead server fails within timeout, no mount process left" dead_mount 4.2
berth_check "v3 mount to dead server fails within timeout, no mount process left" dead_mount 3 nolock
berth_check "NFS server restarts after stop" start_nfs_server /export
berth_check "v4.2 mount after restart sees old data" \
  eval 'mount -t nfs -o vers=4.2 127.0.0.1:/export /mnt/v4 && cmp /mnt/v4/big-v3 /export/big-v3 && umount /mnt/v4'
stop_nfs_server

# --- other things this host's kernel cannot do -------------------------------------
xfs_project_quota() {
  DISK_MOUNT_OPTS=prjquota make_xfs_disk /xfs 320M || return 1
  mkdir /xfs/vol1
  xfs_quota -x -c 'project -s -p /xfs/vol1 42' -c 'limit -p bhard=2m 42' /xfs >/dev/null || return 1
  if dd if=/dev/zero of=/xfs/vol1/f bs=1M count=4 status=none 2>/dev/null; then
    echo "  wrote 4 MiB into a 2 MiB project"; return 1
  fi
  df -k /xfs/vol1 | awk 'NR==2 && $2 == 2048 {ok=1} END {exit !ok}' || { df -k /xfs/vol1; return 1; }
  remove_disk /xfs
}
berth_check "XFS project quota limits a directory (df shows the limit)" xfs_project_quota

ext4_user_quota() {
  DISK_MOUNT_OPTS=usrquota make_ext4_disk /q 32M -O quota || return 1
  quotaon -p /q | grep -q 'user quota on /q .* is on' || { quotaon -p /q; return 1; }
  setquota -u 1000 0 1024 0 0 /q || return 1
  chmod 1777 /q
  if setpriv --reuid=1000 --regid=1000 --clear-groups dd if=/dev/zero of=/q/f bs=1M count=2 status=none 2>/dev/null; then
    echo "  uid 1000 wrote 2 MiB over a 1 MiB quota"; return 1
  fi
  repquota -u /q | grep -q '^#1000 ' || return 1
  remove_disk /q
}
berth_check "ext4 user quota enforced" ext4_user_quota

lvm_thin() {
  local img=/var/tmp/lvm.img dev rc=0
  truncate -s 128M $img && dev=$(losetup -f --show $img) || return 1
  { pvcreate -q "$dev" && vgcreate -q berthvg "$dev" &&
    lvcreate -q -L 64M -T berthvg/pool && lvcreate -q -V 256M -T berthvg/pool -n thin1 &&
    mkfs.ext4 -q /dev/berthvg/thin1 && mkdir -p /thin && mount /dev/berthvg/thin1 /thin &&
    echo data > /thin/f && umount /thin; } >/dev/null 2>/tmp/lvm.err || { rc=1; cat /tmp/lvm.err; }
  vgremove -q -f berthvg >/dev/null 2>&1 || rc=1
  losetup -d "$dev"; rm -f $img
  return $rc
}
berth_check "LVM thin pool and thin volume (device-mapper)" lvm_thin

remove_all_disks
berth_check "no loop devices left" eval '[ -z "$(losetup -n -l)" ]'
berth_summary
