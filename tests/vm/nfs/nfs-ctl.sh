#!/bin/bash
# Stops or restarts the guest's NFS server (runs INSIDE the test guest; the
# NFS integration tests call it as BERTH_NFS_CTL).
#   berth-nfs-ctl stop|start
. /share/guest-lib.sh
case "${1:-}" in
  stop) stop_nfs_server ;;
  start) start_nfs_server "${BERTH_NFS_EXPORT:-/export}" ;;
  *) echo "usage: $0 stop|start" >&2; exit 2 ;;
esac
