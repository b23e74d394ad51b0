#!/bin/bash
# Stops or restarts the guest's NFS server (runs INSIDE the test guest; the
# NFS integration tests call it as BERTH_NFS_CTL).
#   berth-nfs-ctl stop|start|hang|unhang
# stop: the server is dead (connections refused); hang: every packet on the
# loopback interface is dropped (a server that does not answer at all).
. /share/guest-lib.sh
case "${1:-}" in
  stop) stop_nfs_server ;;
  start) start_nfs_server "${BERTH_NFS_EXPORT:-/export}" ;;
  hang) tc qdisc add dev lo root netem loss 100% ;;
  unhang) tc qdisc del dev lo root 2>/dev/null; true ;;
  *) echo "usage: $0 stop|start|hang|unhang" >&2; exit 2 ;;
esac
