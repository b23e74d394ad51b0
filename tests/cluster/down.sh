#!/bin/bash
# down.sh: removes the test cluster of up.sh and everything it left on the
# host: Berth volumes (deleted through Kubernetes while the cluster still
# runs), pods, processes, mounts, loop devices of Berth's files, network
# interfaces, iptables rules, the sysctls the CNI bridge changed and the host
# directories up.sh found missing. Logs are kept in $CACHE/logs/last-run.
# Exits non-zero when something could not be removed, naming it.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
[ -d "$RUN" ] || { say "no cluster ($RUN does not exist)"; exit 0; }
t0=$SECONDS
KUBELET_ROOT=$(cat "$RUN/kubelet-root" 2>/dev/null || echo "$KUBELET_ROOT")
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2> /dev/null; }
stop() { # name [tenths of a second to wait]: TERM, then KILL, only the recorded pid
  alive "$1" || { rm -f "$RUN/$1.pid"; return 0; }
  local p i
  p=$(cat "$RUN/$1.pid")
  kill "$p" 2> /dev/null
  for ((i = 0; i < ${2:-100}; i++)); do kill -0 "$p" 2> /dev/null || break; sleep 0.1; done
  kill -0 "$p" 2> /dev/null && { say "$1 did not stop, SIGKILL $p"; kill -9 "$p"; sleep 0.3; }
  rm -f "$RUN/$1.pid"
  say "stopped $1 in $((i / 10)).$((i % 10)) s"
}

# 1. while everything runs: workloads and their volumes go through kubelet
#    and Berth (unpublish, unstage, DeleteVolume), then Berth itself.
if alive kube-apiserver && alive kubelet; then
  ns=$(kubectl_ get ns -o name | sed 's|namespace/||' | grep -vxE 'kube-system|kube-public|kube-node-lease|berth-system|default')
  for n in default $ns; do
    kubectl_ -n "$n" delete pods,deployments,statefulsets,daemonsets,jobs,replicasets --all --wait=false > /dev/null 2>&1
  done
  kubectl_ delete pods -A --field-selector metadata.namespace!=berth-system --timeout=90s > "$LOGS/down-pods.log" 2>&1 \
    || { say "pods outside berth-system still terminating:"; cat "$LOGS/down-pods.log"; }
  # snapshots first, while Berth and the snapshot sidecars still run: their
  # copies are deleted through Berth (DeleteSnapshot)
  if kubectl_ get crd volumesnapshots.snapshot.storage.k8s.io > /dev/null 2>&1; then
    kubectl_ delete volumesnapshots -A --all --timeout=90s > /dev/null 2>&1 || say "VolumeSnapshots still there"
    kubectl_ delete volumesnapshotcontents --all --timeout=60s > /dev/null 2>&1 || say "VolumeSnapshotContents still there"
  fi
  kubectl_ delete pvc -A --all --timeout=90s > /dev/null 2>&1 || say "PVCs still there"
  # Retained PVs: delete them too (a Retain volume's data stays on disk and
  # is removed with Berth's data directory below, if up.sh created it).
  kubectl_ delete pv --all --timeout=60s > /dev/null 2>&1 || say "PVs still there"
  if kubectl_ get ns berth-system > /dev/null 2>&1; then
    if [ -f "$RUN/helm-release" ]; then
      "$CACHE/tools/helm" --kubeconfig "$KUBECONFIG_FILE" uninstall berth -n berth-system --wait --timeout 90s > /dev/null 2>&1
    elif [ -d "$RUN/install" ]; then
      kubectl_ delete -k "$RUN/install" --wait=true --timeout=90s > /dev/null 2>&1
    fi
    kubectl_ delete ns berth-system --timeout=90s > /dev/null 2>&1
  fi
  kubectl_ delete pods --all -A --grace-period=1 --timeout=60s > /dev/null 2>&1
fi
# Volumes and snapshots Berth still holds after every PVC, PV and snapshot is gone (the teardown test
# reads this list; down.sh removes Berth's data directory only if up.sh
# created it).
{
  find /var/lib/berth/local /var/lib/berth/block -mindepth 1 -maxdepth 1 ! -name '.*' 2> /dev/null
  find /var/lib/berth/local/.snapshots /var/lib/berth/block/.snapshots -mindepth 1 -maxdepth 1 2> /dev/null
} > "$LOGS/volumes-left"
[ -s "$LOGS/volumes-left" ] && { say "Berth volumes left:"; cat "$LOGS/volumes-left"; }

# 2. processes, in reverse start order
stop kube-proxy
env XTABLES_LIBDIR="$XTABLES_LIBDIR" LD_LIBRARY_PATH="$DEBROOT/usr/lib/x86_64-linux-gnu" \
  "$K8S_BIN/kube-proxy" --cleanup > "$LOGS/kube-proxy-cleanup.log" 2>&1
stop kubelet
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver 150
stop etcd
if alive containerd; then
  for t in $(ctr_ tasks ls -q 2> /dev/null); do ctr_ tasks kill -s SIGKILL "$t" > /dev/null 2>&1; done
  sleep 1
  for t in $(ctr_ tasks ls -q 2> /dev/null); do ctr_ tasks delete -f "$t" > /dev/null 2>&1; done
fi
stop containerd
# shims of our containerd (our socket on their command line) and anything
# else still running one of the cluster's binaries or a file under $RUN
for p in /proc/[0-9]*; do
  # the cluster's own binaries, or anything with a file under $RUN on its
  # command line (containerd's shims name its socket); never a build that
  # merely writes into the cache
  c=$( (tr '\0' ' ' < "$p/cmdline") 2> /dev/null) || continue
  e=$(readlink "$p/exe" 2> /dev/null)
  case "$e" in "$K8S_BIN/"* | "$DEBROOT/"*) ;; *) case $c in *"$RUN/"*) ;; *) continue ;; esac ;; esac
  [ "${p#/proc/}" = $$ ] && continue
  say "killing leftover process ${p#/proc/}: ${c:0:100}"
  kill -9 "${p#/proc/}" 2> /dev/null
done
sleep 0.5

# 3. mounts under our paths (deepest first), then loop devices of Berth's
#    block files
umount_under() {
  local m
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do printf '%b\n' "$m"; done \
    | awk -v b="$1" '$0 == b || index($0, b "/") == 1' | sort -r | uniq | while read -r m; do
    umount "$m" 2> /dev/null || umount -l "$m" 2> /dev/null || say "could not unmount $m"
  done
}
for i in 1 2 3; do
  umount_under "$KUBELET_ROOT"; umount_under /var/lib/kubelet; umount_under /var/lib/berth
  umount_under "$RUN"; umount_under /run/containerd
done
losetup -n -O NAME,BACK-FILE 2> /dev/null | while read -r dev file; do
  case $file in /var/lib/berth/*) say "detaching $dev ($file)"; losetup -d "$dev" ;; esac
done

# 4. network: the CNI bridge (veths went with their network namespaces);
#    iptables chains and rules that were not there before up.sh
ip link show "$BRIDGE" > /dev/null 2>&1 && ip link del "$BRIDGE"
ipt() { env XTABLES_LIBDIR="$XTABLES_LIBDIR" LD_LIBRARY_PATH="$DEBROOT/usr/lib/x86_64-linux-gnu" "$@"; }
for fam in iptables ip6tables; do
  for t in filter nat mangle raw; do
    # rules first (so that chains are unreferenced), then chains
    ipt "$fam-save" -t "$t" 2> /dev/null | grep -E '^-A ' | while read -r rule; do
      grep -qxF "$fam $t: $rule" "$RUN/host-before" && continue
      eval "ipt $fam -t $t ${rule/#-A/-D}" 2> /dev/null
    done
    ipt "$fam-save" -t "$t" 2> /dev/null | grep -E '^:' | sed 's/^:\([^ ]*\) .*/\1/' | while read -r chain; do
      grep -qxF "$fam $t chain: :$chain" "$RUN/host-before" && continue
      ipt "$fam" -t "$t" -F "$chain" 2> /dev/null; ipt "$fam" -t "$t" -X "$chain" 2> /dev/null
    done
  done
done

# 5. sysctls the CNI bridge plugin changed
while IFS== read -r k v; do
  [ "$(cat "/proc/sys/$k")" = "$v" ] || { echo "$v" > "/proc/sys/$k"; say "restored $k=$v"; }
done < "$RUN/sysctl-before"

# 6. directories up.sh found missing; Berth's data directory only if no
#    volume is left in it
left=$("$CLUSTER_DIR/hoststate.sh" | grep -E '^(mount|loop|process): ' | grep -v " $RUN/logs" || true)
if [ -n "$left" ]; then
  say "not removing host directories, still in use:"; echo "$left"
else
  while read -r d; do
    [ -n "$d" ] && [ -e "$d" ] && rm -rf "$d"
  done < "$RUN/created-dirs"
fi
mkdir -p "$CACHE/logs"
rm -rf "$CACHE/logs/last-run"
cp -a "$LOGS" "$CACHE/logs/last-run" 2> /dev/null
cp "$RUN/host-before" "$CACHE/logs/last-run/host-before" 2> /dev/null
[ -z "$left" ] && rm -rf "$RUN"
say "down in $((SECONDS - t0)) s"
[ -z "$left" ]
