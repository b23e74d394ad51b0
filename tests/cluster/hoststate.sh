#!/bin/bash
# hoststate.sh: prints what the test cluster may change on this host, one
# "what: value" line each, sorted, so that two snapshots compare with diff:
# mounts, loop devices and files under the paths the cluster uses, network
# interfaces it makes, iptables rules, the sysctls kubelet, kube-proxy and the
# CNI plugins like to set, and processes running the cluster's binaries or
# anything under its runtime directory. up.sh takes one before it starts anything; down.sh
# and the teardown test compare against it. Other agents' mounts and loop
# devices are outside these paths and do not show.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
paths=("$RUN" /var/lib/kubelet /var/lib/berth /run/containerd /var/lib/cni /var/log/containers /var/log/pods "$ALT_KUBELET_ROOT")
{
  for p in "${paths[@]}"; do
    [ -e "$p" ] && echo "path: $p" || true
  done
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    m=$(printf '%b' "$m")
    for p in "${paths[@]}"; do
      case $m in "$p" | "$p"/*) echo "mount: $m" ;; esac
    done
  done
  # loop devices of files under these paths, and of files that do not exist
  # in this mount namespace (made inside a container); not those of tests
  # that run at the same time in private mount namespaces under /tmp
  # (tests/run-all.sh runs csi-sanity next to the cluster)
  losetup -n -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    case $file in /tmp/*) continue ;; esac
    [ -e "$file" ] || { echo "loop: $dev $file"; continue; }
    for p in "${paths[@]}"; do
      case $file in "$p"/*) echo "loop: $dev $file" ;; esac
    done
  done
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^($BRIDGE|veth|kube-|cni|flannel)" | sed 's/^/interface: /'
  for t in filter nat mangle raw; do
    debenv iptables-save -t "$t" 2>/dev/null | grep -vE '^#|^:.*\[|^COMMIT' | sed "s/^/iptables $t: /"
    debenv iptables-save -t "$t" 2>/dev/null | grep -E '^:' | sed 's/ .*//' | sed "s/^/iptables $t chain: /"
    debenv ip6tables-save -t "$t" 2>/dev/null | grep -vE '^#|^:.*\[|^COMMIT' | sed "s/^/ip6tables $t: /"
    debenv ip6tables-save -t "$t" 2>/dev/null | grep -E '^:' | sed 's/ .*//' | sed "s/^/ip6tables $t chain: /"
  done
  for k in net/ipv4/ip_forward net/ipv4/conf/all/route_localnet net/ipv4/conf/all/forwarding \
    net/ipv6/conf/all/forwarding net/bridge/bridge-nf-call-iptables net/bridge/bridge-nf-call-ip6tables \
    net/netfilter/nf_conntrack_max net/netfilter/nf_conntrack_tcp_timeout_established \
    net/netfilter/nf_conntrack_tcp_timeout_close_wait vm/overcommit_memory vm/panic_on_oom \
    kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes \
    fs/inotify/max_user_instances fs/inotify/max_user_watches; do
    [ -r "/proc/sys/$k" ] && echo "sysctl: $k=$(cat "/proc/sys/$k")"
  done
  for p in /proc/[0-9]*; do
    c=$( (tr '\0' ' ' < "$p/cmdline") 2> /dev/null) || continue
    e=$(readlink "$p/exe" 2> /dev/null)
    case "$e" in "$K8S_BIN/"* | "$DEBROOT/"*) echo "process: ${p#/proc/} ${c:0:120}"; continue ;; esac
    case $c in *"$RUN/"*) echo "process: ${p#/proc/} ${c:0:120}" ;; esac
  done
} | sort -u
