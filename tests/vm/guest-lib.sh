# Shell functions for scripts that run INSIDE Berth's test guest.
# run-in-guest.sh copies this file to SHAREDIR/guest-lib.sh; in run.sh:
#
#   #!/bin/bash
#   . /share/guest-lib.sh
#   make_ext4_disk /export 64M
#   start_nfs_server /export
#   berth_check "v4.2 mount" mount -t nfs -o vers=4.2 127.0.0.1:/export /mnt/v4
#   ...
#   berth_summary          # prints "N passed, M failed"; returns 1 on any failure
#
# Daemons started here get their own log files under $BERTH_NFS_DIR and never
# hold run.sh's stdout (the guest's init waits for that pipe to close).
# Works under bash; the functions avoid bashisms where it was cheap.

BERTH_NFS_DIR=${BERTH_NFS_DIR:-/run/berth-nfs}
BERTH_DISK_DIR=${BERTH_DISK_DIR:-/var/tmp/berth-disks}   # /var/tmp is on the scratch disk
BERTH_PASSED=${BERTH_PASSED:-0}
BERTH_FAILED=${BERTH_FAILED:-0}

berth_log() { echo "[$(cut -d' ' -f1 /proc/uptime)s] $*"; }

# use_local_bin: copies /share/bin/* into guest RAM (/usr/local/bin) and puts that
# first on PATH. Executing a big binary straight from the uncached 9p share pays
# page faults over 9p on every run (a 96 MB debug build: 0.4-3 s per start,
# against 0.25 s from RAM; the copy costs about 1.4 s).
use_local_bin() {
  mkdir -p /usr/local/bin && cp -a /share/bin/. /usr/local/bin/ || return 1
  PATH=/usr/local/bin:$PATH; export PATH; hash -r 2>/dev/null
}

# --- checks ---------------------------------------------------------------------

# berth_check DESCRIPTION COMMAND [ARGS...]: runs the command, counts and prints
# "ok - DESCRIPTION" or "FAIL - DESCRIPTION (exit N)". Returns the command's status.
berth_check() {
  local desc=$1 rc; shift
  "$@"; rc=$?
  if [ $rc -eq 0 ]; then
    BERTH_PASSED=$((BERTH_PASSED + 1)); echo "ok - $desc"
  else
    BERTH_FAILED=$((BERTH_FAILED + 1)); echo "FAIL - $desc (exit $rc)"
  fi
  return $rc
}
berth_pass() { BERTH_PASSED=$((BERTH_PASSED + 1)); echo "ok - $*"; }
berth_fail() { BERTH_FAILED=$((BERTH_FAILED + 1)); echo "FAIL - $*"; }

# berth_summary: prints exactly "N passed, M failed"; returns 1 if anything failed
# (or nothing ran).
berth_summary() {
  echo "$BERTH_PASSED passed, $BERTH_FAILED failed"
  [ "$BERTH_FAILED" -eq 0 ] && [ "$BERTH_PASSED" -gt 0 ]
}

# wait_for SECONDS COMMAND [ARGS...]: retries the command every 0.1 s until it
# succeeds (0) or SECONDS pass (1).
wait_for() {
  local limit=$1 i=0; shift
  while ! "$@" >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge $((limit * 10)) ] && return 1
    sleep 0.1
  done
}

# --- NFS server -----------------------------------------------------------------

_berth_pid_alive() { [ -f "$BERTH_NFS_DIR/$1.pid" ] && kill -0 "$(cat "$BERTH_NFS_DIR/$1.pid")" 2>/dev/null; }

# _berth_daemon NAME COMMAND...: starts a foreground-mode daemon in the background,
# output to $BERTH_NFS_DIR/NAME.log, pid to NAME.pid.
_berth_daemon() {
  local name=$1; shift
  "$@" </dev/null >>"$BERTH_NFS_DIR/$name.log" 2>&1 &
  echo $! > "$BERTH_NFS_DIR/$name.pid"
}

_berth_kill_daemon() {
  local name=$1 pid
  [ -f "$BERTH_NFS_DIR/$name.pid" ] || return 0
  pid=$(cat "$BERTH_NFS_DIR/$name.pid")
  kill -TERM "$pid" 2>/dev/null
  wait_for 5 eval "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null
  rm -f "$BERTH_NFS_DIR/$name.pid"
}

# start_nfs_server EXPORTDIR...: exports each directory to 127.0.0.1 with
# rw,sync,no_root_squash,no_subtree_check,insecure and a fixed fsid derived from
# its path (so tmpfs/overlay work and file handles stay valid across a
# stop/start), then starts rpcbind, rpc.statd, rpc.mountd and the kernel nfsd
# (NFS v3, v4.0, v4.1, v4.2) with a 10 s lease and grace time, and ends the v4
# grace period at once (lockd's v3 lock grace: 3 s). Callable again after stop_nfs_server (a "restart"); the
# export list is replaced by the new arguments.
# NFS_EXPORT_OPTS adds export options; NFSD_THREADS (default 4).
start_nfs_server() {
  [ $# -gt 0 ] || { echo "usage: start_nfs_server EXPORTDIR..." >&2; return 2; }
  local d fsid
  mkdir -p "$BERTH_NFS_DIR" /run/rpcbind /var/lib/nfs/v4recovery /var/lib/nfs/sm /var/lib/nfs/sm.bak
  modprobe -a nfsd lockd nfs nfsv3 nfsv4 || return 1
  mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd || return 1
  : > /etc/exports
  for d in "$@"; do
    [ -d "$d" ] || { echo "start_nfs_server: $d is not a directory" >&2; return 2; }
    fsid=$(( $(printf %s "$d" | cksum | cut -d' ' -f1) % 2000000000 + 1 ))
    echo "$d 127.0.0.1(rw,sync,no_root_squash,no_subtree_check,insecure,fsid=$fsid${NFS_EXPORT_OPTS:+,$NFS_EXPORT_OPTS})" >> /etc/exports
  done
  if ! _berth_pid_alive rpcbind; then
    _berth_daemon rpcbind rpcbind -f
    wait_for 10 rpcinfo -p 127.0.0.1 || { echo "start_nfs_server: rpcbind did not start" >&2; return 1; }
  fi
  _berth_pid_alive statd || _berth_daemon statd rpc.statd -F --no-notify
  exportfs -ra || return 1
  _berth_pid_alive mountd || _berth_daemon mountd rpc.mountd -F
  # What `rpc.nfsd --lease-time 10 --grace-time 10` does, except that lockd's
  # grace (NFSv3 locks; it also refuses new v4 locks while it lasts) is 3 s, not
  # 10: lockd's grace is nlm_grace_period rounded up to nlm_timeout.
  echo 10 > /proc/fs/nfsd/nfsv4leasetime 2>/dev/null      # EBUSY while nfsd runs
  echo 10 > /proc/fs/nfsd/nfsv4gracetime 2>/dev/null
  echo 3 > /proc/sys/fs/nfs/nlm_timeout
  echo 3 > /proc/sys/fs/nfs/nlm_grace_period
  # shellcheck disable=SC2086 # NFSD_ARGS: several options, e.g. "-N 4"
  rpc.nfsd ${NFSD_ARGS:-} "${NFSD_THREADS:-4}" || return 1
  echo Y > /proc/fs/nfsd/v4_end_grace 2>/dev/null || true   # no v4 grace wait
  wait_for 10 rpcinfo -u 127.0.0.1 mountd 3 || { echo "start_nfs_server: mountd not registered" >&2; return 1; }
  wait_for 10 rpcinfo -t 127.0.0.1 nfs 3 || { echo "start_nfs_server: nfsd not registered" >&2; return 1; }
  berth_log "nfs server up: $(cat /proc/fs/nfsd/versions), exports: $*"
}

# stop_nfs_server: makes the server dead: no nfsd threads (port 2049 refuses
# connections) and no mountd. rpcbind and statd keep running (client side needs).
# Existing hard mounts hang until the server is started again.
stop_nfs_server() {
  rpc.nfsd 0 2>/dev/null
  _berth_kill_daemon mountd
  berth_log "nfs server stopped"
}

# nfs_server_logs: prints the daemons' logs (for a failing test).
nfs_server_logs() {
  local f
  for f in "$BERTH_NFS_DIR"/*.log; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done
}

# --- loop-device disks ----------------------------------------------------------
# make_ext4_disk MOUNTPOINT SIZE [MKFS_ARGS...]
# make_xfs_disk  MOUNTPOINT SIZE [MKFS_ARGS...]     (XFS needs SIZE >= 300M)
# A sparse image in $BERTH_DISK_DIR (on the scratch disk, not in guest RAM)
# on a loop device, formatted and mounted at MOUNTPOINT (created if needed).
# DISK_MOUNT_OPTS: mount options (e.g. usrquota, prjquota). Sets DISK_DEV to the
# loop device. remove_disk MOUNTPOINT / remove_all_disks undo it.
make_ext4_disk() { _berth_make_disk ext4 "$@"; }
make_xfs_disk() { _berth_make_disk xfs "$@"; }

_berth_make_disk() {
  local fs=$1 mnt=$2 size=$3 img dev; shift 3
  [ -n "$mnt" ] && [ -n "$size" ] || { echo "usage: make_${fs}_disk MOUNTPOINT SIZE [MKFS_ARGS...]" >&2; return 2; }
  mkdir -p "$BERTH_DISK_DIR" "$mnt" || return 1
  img=$BERTH_DISK_DIR/$(printf %s "$mnt" | tr -c 'A-Za-z0-9._-' _).img
  rm -f "$img"; truncate -s "$size" "$img" || return 1
  dev=$(losetup -f --show "$img") || return 1
  case $fs in
    ext4) mkfs.ext4 -q -F "$@" "$dev" ;;
    xfs)  mkfs.xfs -q -f "$@" "$dev" ;;
  esac || { losetup -d "$dev"; return 1; }
  mount -t "$fs" ${DISK_MOUNT_OPTS:+-o "$DISK_MOUNT_OPTS"} "$dev" "$mnt" || { losetup -d "$dev"; return 1; }
  echo "$mnt $dev $img" >> "$BERTH_DISK_DIR/disks"
  DISK_DEV=$dev
  berth_log "disk $dev ($fs, $size) mounted on $mnt"
}

# remove_disk MOUNTPOINT: unmounts, detaches the loop device, deletes the image.
remove_disk() {
  local mnt dev img rc=0
  [ -f "$BERTH_DISK_DIR/disks" ] || return 0
  while read -r mnt dev img; do
    [ "$mnt" = "$1" ] || continue
    if mountpoint -q "$mnt"; then umount "$mnt" || rc=1; fi
    losetup -d "$dev" 2>/dev/null; rm -f "$img"
  done < "$BERTH_DISK_DIR/disks"
  grep -v "^$1 " "$BERTH_DISK_DIR/disks" > "$BERTH_DISK_DIR/disks.new"
  mv "$BERTH_DISK_DIR/disks.new" "$BERTH_DISK_DIR/disks"
  return $rc
}

remove_all_disks() {
  local mnt rest
  [ -f "$BERTH_DISK_DIR/disks" ] || return 0
  tac "$BERTH_DISK_DIR/disks" | while read -r mnt rest; do remove_disk "$mnt"; done
}
