#!/bin/bash
# Stops or restarts the guest's NFS server (runs INSIDE the test guest; the
# NFS integration tests call it as BERTH_NFS_CTL).
#   berth-nfs-ctl stop|start|v3only|hang|unhang
# stop: the server is dead (connections refused); v3only: restarted
# speaking NFSv3 only; start: (re)started with every version; hang: every
# packet on the loopback interface is dropped (a server that does not
# answer at all).
. /share/guest-lib.sh
# Waits (at most 60 s) until a mount with the given options works: after a
# restart, and after NFSv4 was off, the first v4 mounts can hang for a while.
mountable() {
  local d rc=1
  d=$(mktemp -d /tmp/nfs-ctl-probe.XXXXXX)
  for _ in $(seq 60); do
    if timeout 5 mount -t nfs -o "$1" 127.0.0.1:"${BERTH_NFS_EXPORT:-/export}" "$d" 2>/dev/null; then
      umount "$d"; rc=0; break
    fi
    sleep 1
  done
  rmdir "$d"
  [ "$rc" = 0 ] || echo "berth-nfs-ctl: no mount with $1 within 60 s" >&2
  return $rc
}
case "${1:-}" in
  stop) stop_nfs_server ;;
  start) stop_nfs_server; start_nfs_server "${BERTH_NFS_EXPORT:-/export}" && mountable nfsvers=4.1 ;;
  v3only) stop_nfs_server; NFSD_ARGS="-N 4" start_nfs_server "${BERTH_NFS_EXPORT:-/export}" &&
    mountable nfsvers=3,nolock ;;
  hang) tc qdisc add dev lo root netem loss 100% ;;
  unhang) tc qdisc del dev lo root 2>/dev/null; true ;;
  *) echo "usage: $0 stop|start|v3only|hang|unhang" >&2; exit 2 ;;
esac
