#!/bin/bash
# suite.sh: the scenarios of Berth in the running test cluster (up.sh).
# Each test is a function t_<name>; a test fails when the behaviour it names
# does not happen (a wait that times out, a value that differs), and prints
# why with what the cluster showed. Prints "PASS name", "FAIL name: why" or
# "SKIP name: why" per test and "N passed, M failed[, K skipped]" last.
#   suite.sh [test-name...]     (default: every test)
#   suite.sh --install-checks   the tests that depend on how Berth was installed
set -uo pipefail
. "$(dirname "$0")/lib.sh"
export KUBECONFIG=$KUBECONFIG_FILE
K=$K8S_BIN/kubectl
NODE=$($K get nodes -o jsonpath='{.items[0].metadata.name}')
IMAGE=$(cat "$IMAGES/berth-image")
BUSYBOX=busybox:1.36
DATA=/var/lib/berth
TIMEOUT=${SUITE_TIMEOUT:-180}

fail() { echo "  $*" >&2; return 1; }
# wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
wait_for() {
  local s=$1 what=$2 t=$SECONDS; shift 2
  until "$@" > /dev/null 2>&1; do
    [ $((SECONDS - t)) -lt "$s" ] || fail "timed out after $s s waiting for: $what"  || return 1
    sleep 1
  done
}
jp() { # kind/name jsonpath [namespace]
  $K -n "${3:-$NS}" get "$1" -o jsonpath="$2" 2> /dev/null; }
phase_is() { [ "$(jp "$1" '{.status.phase}' "${3:-$NS}")" = "$2" ]; }
pod_ready() { [ "$(jp "pod/$1" '{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
gone() { ! $K -n "${2:-$NS}" get "$1" > /dev/null 2>&1; }
pv_of() { jp "pvc/$1" '{.spec.volumeName}'; }
handle_of() { $K get pv "$1" -o jsonpath='{.spec.csi.volumeHandle}'; }
# volume_path HANDLE: where Berth keeps the volume on this node
volume_path() {
  case $1 in
    local-*) echo "$DATA/local/$1" ;;
    block-*) echo "$DATA/block/$1.img" ;;
    *) echo "unknown-volume-kind-$1" ;;
  esac
}
berth_volumes() { # the number of volumes Berth holds on the node
  find "$DATA/local" "$DATA/block" -mindepth 1 -maxdepth 1 ! -name '.*' 2> /dev/null | wc -l; }
diag() { # what the cluster shows about the test namespace, for a failure
  {
    echo "  --- pods, PVCs, PVs"
    $K -n "$NS" get pods,pvc -o wide 2>&1 | sed 's/^/  /'
    $K get pv 2>&1 | sed 's/^/  /'
    echo "  --- events"
    $K -n "$NS" get events --sort-by=.lastTimestamp 2>&1 | tail -15 | sed 's/^/  /'
    echo "  --- berth pods"
    $K -n berth-system get pods -o wide 2>&1 | sed 's/^/  /'
    echo "  --- node $NODE: taints and conditions"
    $K describe node "$NODE" 2>&1 | sed -n '/^Taints:/,/^Addresses:/p' | sed 's/^/  /'
    echo "  --- PV events"
    $K get events -A --field-selector involvedObject.kind=PersistentVolume --sort-by=.lastTimestamp 2>&1 | tail -10 | sed 's/^/  /'
    # what Berth and its sidecars said last (a deletion or mount that
    # keeps failing says why only there)
    local p
    for p in $($K -n berth-system get pods -o name 2>/dev/null); do
      echo "  --- $p: last log lines of each container"
      $K -n berth-system logs "$p" --all-containers --prefix --tail=12 2>&1 | sed 's/^/  /'
    done
  } >&2
}
node_taints() { $K get node "$NODE" -o jsonpath='{range .spec.taints[*]}{.key}:{.effect} {end}'; }

# A PVC; access mode, volume mode and storage class as given.
pvc() { # name storageclass size [accessMode] [volumeMode]
  $K -n "$NS" apply -f - > /dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: $2
  accessModes: [${4:-ReadWriteOnce}]
  volumeMode: ${5:-Filesystem}
  resources: {requests: {storage: $3}}
YAML
}
# A pod running COMMAND with PVC mounted at /data (or as /dev/xvda when
# the fourth argument is "block"); restartPolicy Never.
pod() { # name pvc command [block]
  local vol
  if [ "${4:-}" = block ]; then
    vol="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
  else
    vol="volumeMounts: [{name: v, mountPath: /data}]"
  fi
  $K -n "$NS" apply -f - > /dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: $BUSYBOX
      command: ["sh", "-c", $(printf '%s' "$3" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      $vol
  volumes:
    - name: v
      persistentVolumeClaim: {claimName: $2}
YAML
}
logs() { $K -n "$NS" logs "$1" 2> /dev/null; }
# run_pod NAME PVC COMMAND [block]: runs to completion, prints its log
run_pod() {
  pod "$@" || return 1
  wait_for "$TIMEOUT" "pod $1 finished" sh -c "'$K' -n $NS get pod $1 -o jsonpath='{.status.phase}' | grep -qE 'Succeeded|Failed'" \
    || { logs "$1" >&2; return 1; }
  phase_is "pod/$1" Succeeded || { fail "pod $1 failed: $(logs "$1")"; return 1; }
  logs "$1"
  $K -n "$NS" delete pod "$1" --wait=true > /dev/null
}
storageclass() { # name kind reclaim [extra parameter lines]
  $K apply -f - > /dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: $1}
provisioner: local.berth.csi.io
parameters:
  kind: $2
$(printf '%s' "${4:-}")
reclaimPolicy: $3
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
YAML
}

# ---------------------------------------------------------------------------
# 1. Every Berth pod Ready; CSINode lists both drivers with their topology
#    key; a CSIStorageCapacity per node-local StorageClass with the capacity
#    Berth reports.
t_ready_csinode_capacity() {
  local n ready drivers key cap free
  n=$(jp pods '{range .items[*]}{.metadata.name}{"\n"}{end}' berth-system | grep -c .)
  ready=$(jp pods '{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' berth-system | grep -c True)
  [ "$n" -ge 1 ] && [ "$n" = "$ready" ] || fail "$ready of $n Berth pods Ready" || return 1
  # NFS is installed by deploy/kubernetes, and by the Helm chart only with
  # kinds.nfs=true: expect its driver where its node container runs.
  local want=local.berth.csi.io
  $K -n berth-system get daemonset berth-node -o jsonpath='{.spec.template.spec.containers[*].name}' | grep -qw berth-nfs-node \
    && want="$want nfs.berth.csi.io"
  for d in $want; do
    # install.sh waits for the registration; a node pod restarted by another
    # test registers again within seconds
    wait_for 60 "$d in CSINode $NODE" sh -c \
      "'$K' get csinode '$NODE' -o jsonpath='{.spec.drivers[*].name}' | grep -qw $d"
    drivers=$($K get csinode "$NODE" -o jsonpath='{range .spec.drivers[*]}{.name}{" "}{end}')
    [[ " $drivers " == *" $d "* ]] || fail "CSINode $NODE lists [$drivers], not $d" || return 1
  done
  key=$($K get csinode "$NODE" -o jsonpath='{.spec.drivers[?(@.name=="local.berth.csi.io")].topologyKeys[*]}')
  [ "$key" = topology.local.berth.csi.io/node ] || fail "local.berth.csi.io topology keys: '$key'" || return 1
  [ "$($K get node "$NODE" -o jsonpath='{.metadata.labels.topology\.local\.berth\.csi\.io/node}')" = "$NODE" ] \
    || fail "node label topology.local.berth.csi.io/node is not $NODE" || return 1
  # NFS volumes are reachable from every node: no topology.
  key=$($K get csinode "$NODE" -o jsonpath='{.spec.drivers[?(@.name=="nfs.berth.csi.io")].topologyKeys}')
  [ -z "$key" ] || [ "$key" = null ] || fail "nfs.berth.csi.io has topology keys $key" || return 1
  [[ $want == *nfs* ]] || echo "SKIPREASON-PARTIAL: NFS not installed (Helm's kinds.nfs is off without an NFS server): its driver not checked"
  for sc_kind in berth-local:local berth-block:block; do
    local sc=${sc_kind%:*} kind=${sc_kind#*:}
    wait_for 120 "CSIStorageCapacity for $sc" sh -c \
      "'$K' -n berth-system get csistoragecapacities -o jsonpath='{range .items[*]}{.storageClassName}{\"\\n\"}{end}' | grep -qx $sc" || return 1
    cap=$($K -n berth-system get csistoragecapacities -o json | python3 -c '
import json, sys
from decimal import Decimal
units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "": 1}
for o in json.load(sys.stdin)["items"]:
    if o["storageClassName"] == sys.argv[1]:
        q = o["capacity"]
        u = next(u for u in sorted(units, key=len, reverse=True) if q.endswith(u))
        print(int(Decimal(q[: len(q) - len(u)]) * units[u]))' "$sc")
    # what Berth reports: berth_pool_free_bytes of this kind on its metrics port
    # Berth's GetCapacity: the pool's free bytes, less what local volumes were
    # promised (berth_pool_free_bytes and berth_pool_allocated_bytes on its
    # metrics port)
    free=$(curl -sf http://127.0.0.1:29703/metrics | awk -v k="$kind" '
      $1 == "berth_pool_free_bytes{kind=\"" k "\"}" {f = $2}
      $1 == "berth_pool_allocated_bytes{kind=\"" k "\"}" {a = $2}
      END {if (f != "") printf "%.0f", (k == "local" ? f - a : f)}')
    [ -n "$cap" ] && [ -n "$free" ] || fail "$sc: capacity '$cap', Berth reports '$free'" || return 1
    # the two are read at different moments (the provisioner polls every
    # minute) of a disk other programs write to. Right after an install
    # external-provisioner may hold two objects for one class and node for
    # a while (seen once in the Helm round); each must agree with Berth.
    local c
    for c in $cap; do
      python3 -c 'import sys; c, f = int(sys.argv[1]), int(sys.argv[2]); sys.exit(abs(c - f) > 0.05 * f)' "$c" "$free" \
        || fail "$sc: CSIStorageCapacity $c bytes, Berth reports $free bytes free" || return 1
    done
  done
}

# The node plugin runs on a host whose mounts are private (/var/lib/berth
# included): it asks for no propagation on its data directory.
t_private_host_mounts() {
  local prop
  prop=$(findmnt -no PROPAGATION -T "$DATA")
  [ "$prop" = private ] || { echo "SKIPREASON: $DATA is on a $prop mount here, so this host cannot show it"; return 2; }
  node_pod_ready || fail "berth-node not Ready on a host where $DATA is on a private mount"
}

# kubectl logs of berth (its stderr is a pipe) has no terminal colour codes.
t_logs_without_colour_codes() {
  local p log
  p=$($K -n berth-system get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}')
  log=$($K -n berth-system logs "$p" -c berth-local)
  [ -n "$log" ] || fail "no log from berth-local" || return 1
  ! printf '%s' "$log" | grep -q $'\x1b' || fail "colour codes in kubectl logs: $(printf '%s' "$log" | grep -m1 $'\x1b' | cat -v)"
}

# Every program Berth runs is in its image and works there (a privileged pod
# of the image built from the Dockerfile).
t_image_has_every_tool() {
  local script out
  script='set -eu
for p in mount umount losetup blkid wipefs mkfs.ext4 mkfs.xfs e2fsck e2undo resize2fs xfs_growfs mount.nfs mount.nfs4; do
  command -v $p > /dev/null || { echo "missing: $p"; exit 1; }
done
berth --version
cd /tmp
truncate -s 320M vol.img
mkfs.ext4 -q -F -m 0 vol.img
blkid -p -o value -s TYPE vol.img | grep -qx ext4
truncate -s 400M vol.img
resize2fs vol.img > /dev/null 2>&1
wipefs -a vol.img > /dev/null
rc=0; blkid -p vol.img || rc=$?; [ $rc = 2 ]
mkfs.xfs -q vol.img
dev=$(losetup -f --show vol.img)
trap "umount /tmp/m 2> /dev/null || true; losetup -d $dev" EXIT
mkdir -p m
mount "$dev" m
echo hello > m/f
truncate -s 600M vol.img
losetup -c "$dev"
xfs_growfs m > /dev/null
df -k m | awk "NR == 2 && \$2 > 500000 {ok = 1} END {exit !ok}"
umount m
blkid -p -o value -s TYPE "$dev" | grep -qx xfs
trap - EXIT
losetup -d "$dev"
mount.nfs -V 2>&1 | grep -q mount.nfs
echo ALL-TOOLS-OK'
  $K -n "$NS" apply -f - > /dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: tools}
spec:
  restartPolicy: Never
  containers:
    - name: c
      image: $IMAGE
      command: ["/bin/sh", "-c", $(printf '%s' "$script" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      securityContext: {privileged: true}
YAML
  wait_for "$TIMEOUT" "tools pod finished" sh -c "'$K' -n $NS get pod tools -o jsonpath='{.status.phase}' | grep -qE 'Succeeded|Failed'" || return 1
  out=$(logs tools)
  phase_is pod/tools Succeeded && [[ $out == *ALL-TOOLS-OK* ]] || fail "in $IMAGE: $out"
}

# 2. WaitForFirstConsumer local volume; reclaim Delete and Retain.
t_wffc_local_volume() {
  local pv h sum1 sum2 aff
  pvc data berth-local 64Mi
  sleep 5
  phase_is pvc/data Pending || fail "PVC without a consumer is $(jp pvc/data '{.status.phase}')" || return 1
  [ -z "$(pv_of data)" ] || fail "PVC without a consumer got PV $(pv_of data)" || return 1
  $K -n "$NS" get events --field-selector involvedObject.name=data -o jsonpath='{.items[*].reason}' | grep -q WaitForFirstConsumer \
    || fail "no WaitForFirstConsumer event on the PVC" || return 1
  sum1=$(run_pod writer data 'head -c 1048576 /dev/urandom > /data/blob && sync && md5sum /data/blob | cut -d" " -f1') || return 1
  [ -n "$sum1" ] || fail "writer printed nothing" || return 1
  phase_is pvc/data Bound || fail "PVC not Bound after its pod ran" || return 1
  pv=$(pv_of data); h=$(handle_of "$pv")
  aff=$($K get pv "$pv" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].key}={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')
  [ "$aff" = "topology.local.berth.csi.io/node=$NODE" ] || fail "PV node affinity '$aff'" || return 1
  [ -f "$(volume_path "$h")/blob" ] || fail "$(volume_path "$h")/blob not on the node" || return 1
  sum2=$(run_pod reader data 'md5sum /data/blob | cut -d" " -f1') || return 1
  [ "$sum1" = "$sum2" ] || fail "a new pod read $sum2, the writer wrote $sum1" || return 1
  $K -n "$NS" delete pvc data --wait=true > /dev/null
  wait_for "$TIMEOUT" "PV $pv deleted" gone "pv/$pv" || return 1
  wait_for 30 "volume directory removed" sh -c "[ ! -e '$(volume_path "$h")' ]" || return 1

  storageclass "berth-t-retain-$SUFFIX" local Retain
  pvc kept "berth-t-retain-$SUFFIX" 64Mi
  sum1=$(run_pod keeper kept 'echo retained > /data/f && md5sum /data/f | cut -d" " -f1') || return 1
  pv=$(pv_of kept); h=$(handle_of "$pv")
  $K -n "$NS" delete pvc kept --wait=true > /dev/null
  wait_for 60 "PV $pv Released" sh -c "[ \"\$('$K' get pv $pv -o jsonpath='{.status.phase}')\" = Released ]" || return 1
  sleep 3
  [ "$(cat "$(volume_path "$h")/f" 2> /dev/null)" = retained ] || fail "data of the Released PV is gone" || return 1
  # Back to Delete: the provisioner deletes the volume through Berth.
  $K patch pv "$pv" -p '{"spec":{"persistentVolumeReclaimPolicy":"Delete"}}' > /dev/null
  wait_for "$TIMEOUT" "PV $pv deleted after reclaim Delete" gone "pv/$pv" || return 1
  wait_for 30 "volume directory removed" sh -c "[ ! -e '$(volume_path "$h")' ]" || return 1
  $K delete storageclass "berth-t-retain-$SUFFIX" > /dev/null
}

# 3. Block: ext4 and xfs on block, raw block, online xfs expansion.
# block_write_read ext4|xfs|raw: a pod writes, a new pod reads the same bytes
block_write_read() {
  local v=$1 sum1 sum2
  if [ "$v" = raw ]; then
    sum1=$(run_pod w-raw raw 'head -c 8388608 /dev/urandom > /tmp/p && dd if=/tmp/p of=/dev/xvda bs=1M conv=fsync 2> /dev/null && md5sum /tmp/p | cut -d" " -f1; [ -b /dev/xvda ] && echo blockdev' block) || return 1
    [ "$(echo "$sum1" | sed -n 2p)" = blockdev ] || fail "/dev/xvda is not a block device in the pod" || return 1
    sum2=$(run_pod r-raw raw 'dd if=/dev/xvda bs=1M count=8 2> /dev/null | md5sum | cut -d" " -f1' block) || return 1
  else
    sum1=$(run_pod "w-$v" "$v" 'head -c 4194304 /dev/urandom > /data/blob && sync && md5sum /data/blob | cut -d" " -f1; grep " /data " /proc/mounts | cut -d" " -f3') || return 1
    [ "$(echo "$sum1" | sed -n 2p)" = "$v" ] || fail "/data in the pod is '$(echo "$sum1" | sed -n 2p)', not $v" || return 1
    sum2=$(run_pod "r-$v" "$v" 'md5sum /data/blob | cut -d" " -f1') || return 1
  fi
  [ "$(echo "$sum1" | head -1)" = "$sum2" ] || fail "$v: read $sum2, wrote $(echo "$sum1" | head -1)" || return 1
}
t_block_volumes() {
  local pv h size
  storageclass "berth-t-xfs-$SUFFIX" block Delete '  csi.storage.k8s.io/fstype: xfs'
  pvc ext4 berth-block 64Mi
  pvc xfs "berth-t-xfs-$SUFFIX" 320Mi
  pvc raw berth-block 32Mi ReadWriteOnce Block
  # the three volumes are written and read at the same time, each by its
  # own pair of pods
  local pids=() v rc=0
  for v in ext4 xfs raw; do
    block_write_read "$v" 2> "$RESULTS/block-$v-$NS.err" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$RESULTS"/block-*-"$NS".err >&2
  [ $rc = 0 ] || return 1
  # online expansion of xfs in a running pod
  pod grow xfs 'while :; do df -k /data | awk "NR == 2 {print \$2}" > /tmp/size; sleep 1; done'
  wait_for "$TIMEOUT" "pod grow Running" pod_ready grow || return 1
  size=$($K -n "$NS" exec grow -- df -k /data | awk 'NR == 2 {print $2}')
  $K -n "$NS" patch pvc xfs -p '{"spec":{"resources":{"requests":{"storage":"640Mi"}}}}' > /dev/null
  wait_for "$TIMEOUT" "PVC xfs capacity 640Mi" sh -c "[ \"\$('$K' -n $NS get pvc xfs -o jsonpath='{.status.capacity.storage}')\" = 640Mi ]" || return 1
  wait_for 60 "the pod sees the grown filesystem" sh -c \
    "[ \"\$('$K' -n $NS exec grow -- df -k /data | awk 'NR == 2 {print \$2}')\" -gt $((size + 250000)) ]" || return 1
  [ "$(jp pod/grow '{.status.containerStatuses[0].restartCount}')" = 0 ] || fail "the pod restarted" || return 1
  pv=$(pv_of xfs); h=$(handle_of "$pv")
  [ "$(stat -c %s "$(volume_path "$h")")" = $((640 * 1024 * 1024)) ] || fail "backing file is $(stat -c %s "$(volume_path "$h")") bytes" || return 1
  $K -n "$NS" delete pod grow --wait=true > /dev/null
  $K -n "$NS" delete pvc ext4 xfs raw --wait=true > /dev/null
  wait_for "$TIMEOUT" "PV $pv deleted" gone "pv/$pv" || return 1
  wait_for 30 "backing file removed" sh -c "[ ! -e '$(volume_path "$h")' ]" || return 1
  $K delete storageclass "berth-t-xfs-$SUFFIX" > /dev/null
}

# 4. ReadWriteOncePod: a second pod stays Pending for that reason.
t_read_write_once_pod() {
  local msg
  pvc once berth-local 64Mi ReadWriteOncePod
  pod first once 'sleep 3600'
  wait_for "$TIMEOUT" "first pod Running" pod_ready first || return 1
  pod second once 'sleep 3600'
  sleep 10
  phase_is pod/second Pending || fail "second pod is $(jp pod/second '{.status.phase}')" || return 1
  msg=$(jp pod/second '{.status.conditions[?(@.type=="PodScheduled")].message}')
  [[ $msg == *ReadWriteOncePod* ]] || fail "second pod Pending because: '$msg'" || return 1
  $K -n "$NS" delete pod first second --wait=true > /dev/null
  $K -n "$NS" delete pvc once --wait=true > /dev/null
}

# 5. Capacity: a PVC larger than the node can hold is never provisioned:
#    the scheduler finds no node with enough capacity, so no node is ever
#    selected for it and no provisioner acts on it.
t_capacity_exceeded() {
  local msg
  pvc huge berth-local 1000Ti
  pod wants-huge huge 'true'
  wait_for 60 "pod unschedulable" sh -c "'$K' -n $NS get pod wants-huge -o jsonpath='{.status.conditions[?(@.type==\"PodScheduled\")].reason}' | grep -q Unschedulable" || return 1
  sleep 10
  msg=$(jp pod/wants-huge '{.status.conditions[?(@.type=="PodScheduled")].message}')
  [[ $msg == *"enough free storage"* ]] || fail "pod Pending because: '$msg'" || return 1
  phase_is pvc/huge Pending && [ -z "$(pv_of huge)" ] || fail "the PVC was provisioned" || return 1
  [ -z "$(jp pvc/huge '{.metadata.annotations.volume\.kubernetes\.io/selected-node}')" ] \
    || fail "a node was selected for the PVC" || return 1
  ! $K -n "$NS" get events --field-selector involvedObject.name=huge -o jsonpath='{.items[*].reason}' | grep -qw Provisioning \
    || fail "a provisioner started on the PVC" || return 1
  $K -n "$NS" delete pod wants-huge --wait=true > /dev/null
  $K -n "$NS" delete pvc huge --wait=true > /dev/null
}

node_pod() { $K -n berth-system get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}'; }
node_pod_ready() { local p; p=$(node_pod) && [ -n "$p" ] && [ "$(jp "pod/$p" '{.status.conditions[?(@.type=="Ready")].status}' berth-system)" = True ]; }

# 6. Disruption: the node pod deleted under a mounted volume and during a
#    provisioning.
t_node_pod_restart() {
  local old n1 n2 before pv h
  pvc busy berth-local 64Mi
  pod worker busy 'i=0; while :; do i=$((i + 1)); echo $i >> /data/count; sleep 0.2; done'
  wait_for "$TIMEOUT" "worker Running" pod_ready worker || return 1
  old=$(node_pod)
  $K -n berth-system delete pod "$old" --wait=false > /dev/null
  n1=$($K -n "$NS" exec worker -- wc -l /data/count | awk '{print $1}')
  sleep 2
  n2=$($K -n "$NS" exec worker -- wc -l /data/count | awk '{print $1}')
  [ "$n2" -gt "$n1" ] || fail "the workload stopped writing while berth-node was replaced ($n1 -> $n2)" || return 1
  $K -n "$NS" exec worker -- sh -c 'echo during > /data/during && cat /data/during' | grep -qx during \
    || fail "the workload cannot write a new file" || return 1
  wait_for "$TIMEOUT" "a new berth-node pod Ready" sh -c "p=\$('$K' -n berth-system get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}'); [ -n \"\$p\" ] && [ \"\$p\" != $old ] && [ \"\$('$K' -n berth-system get pod \$p -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}')\" = True ]" || return 1
  n1=$($K -n "$NS" exec worker -- wc -l /data/count | awk '{print $1}')
  sleep 2
  n2=$($K -n "$NS" exec worker -- wc -l /data/count | awk '{print $1}')
  [ "$n2" -gt "$n1" ] || fail "the workload stopped writing after berth-node came back" || return 1
  run_pod second-reader busy 'cat /data/during' | grep -qx during || fail "a new pod on the PVC did not read the data" || return 1
  pv=$(pv_of busy)
  $K -n "$NS" delete pod worker --wait=true > /dev/null
  $K -n "$NS" delete pvc busy --wait=true > /dev/null
  # busy's volume must be gone before Berth's volumes are counted below
  # (its DeleteVolume, retried until the detach, once landed in between)
  wait_for "$TIMEOUT" "PV $pv deleted" gone "pv/$pv" || return 1

  # berth-node deleted while a PVC is being provisioned
  before=$(berth_volumes)
  pvc racing berth-block 64Mi
  pod racer racing 'echo ok > /data/f && sleep 3600'
  wait_for 60 "PVC racing has a selected node" sh -c "[ -n \"\$('$K' -n $NS get pvc racing -o jsonpath='{.metadata.annotations.volume\\.kubernetes\\.io/selected-node}')\" ]" || return 1
  old=$(node_pod)
  $K -n berth-system delete pod "$old" --wait=false > /dev/null
  wait_for "$TIMEOUT" "racer Running" pod_ready racer || return 1
  [ "$(berth_volumes)" = $((before + 1)) ] || fail "Berth holds $(berth_volumes) volumes, $before before one PVC" || return 1
  [ "$($K get pv -o jsonpath='{range .items[*]}{.spec.claimRef.name}{"\n"}{end}' | grep -cx racing)" = 1 ] \
    || fail "not exactly one PV for PVC racing" || return 1
  pv=$(pv_of racing); h=$(handle_of "$pv")
  [ -e "$(volume_path "$h")" ] || fail "the PV's volume $h is not on the node" || return 1
  $K -n "$NS" delete pod racer --wait=true > /dev/null
  local t=$SECONDS
  $K -n "$NS" delete pvc racing --wait=true > /dev/null
  # twice the usual wait: after the node pod's restart the detach may come
  # late, and the provisioner retries the DeleteVolume that Berth refuses
  # while the volume is published, with doubling pauses (capped at 30 s by
  # --retry-interval-max since CI once waited 180 s here with the default
  # 5-minute cap)
  wait_for $((TIMEOUT * 2)) "PV $pv deleted" gone "pv/$pv" || return 1
  echo "  (PV $pv gone $((SECONDS - t)) s after its PVC's deletion began; not asserted)"
  wait_for "$TIMEOUT" "berth-node Ready" node_pod_ready
}

# 7. Generic ephemeral volumes live and die with their pod.
t_generic_ephemeral() {
  local pvc pv h
  $K -n "$NS" apply -f - > /dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: eph}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: $BUSYBOX
      command: ["sh", "-c", "echo scratch > /scratch/f && sleep 3600"]
      volumeMounts: [{name: scratch, mountPath: /scratch}]
  volumes:
    - name: scratch
      ephemeral:
        volumeClaimTemplate:
          spec:
            storageClassName: berth-local
            accessModes: [ReadWriteOnce]
            resources: {requests: {storage: 64Mi}}
YAML
  wait_for "$TIMEOUT" "pod eph Running" pod_ready eph || return 1
  pvc=eph-scratch
  phase_is "pvc/$pvc" Bound || fail "PVC $pvc is $(jp "pvc/$pvc" '{.status.phase}')" || return 1
  [ "$(jp "pvc/$pvc" '{.metadata.ownerReferences[0].name}')" = eph ] || fail "PVC $pvc not owned by the pod" || return 1
  pv=$(pv_of $pvc); h=$(handle_of "$pv")
  [ "$(cat "$(volume_path "$h")/f")" = scratch ] || fail "the pod's data is not in $(volume_path "$h")" || return 1
  $K -n "$NS" delete pod eph --wait=true > /dev/null
  wait_for "$TIMEOUT" "PVC $pvc removed with the pod" gone "pvc/$pvc" || return 1
  wait_for "$TIMEOUT" "PV $pv deleted" gone "pv/$pv" || return 1
  wait_for 30 "volume removed" sh -c "[ ! -e '$(volume_path "$h")' ]"
}

# The README's examples, applied unchanged.
t_examples_unchanged() {
  local f name
  for f in local block-filesystem block-raw; do
    $K -n "$NS" apply -f "$ROOT/examples/$f.yaml" > /dev/null || fail "apply examples/$f.yaml" || return 1
    name=$($K -n "$NS" apply -f "$ROOT/examples/$f.yaml" --dry-run=client -o jsonpath='{range .items[?(@.kind=="Pod")]}{.metadata.name}{end}')
    [ -n "$name" ] || name=$($K -n "$NS" get pods -o jsonpath='{.items[0].metadata.name}')
    wait_for "$TIMEOUT" "example pod $name Ready" pod_ready "$name" || return 1
    # (their pods sleep as PID 1, which ignores SIGTERM: no grace period)
    $K -n "$NS" delete -f "$ROOT/examples/$f.yaml" --grace-period=1 --wait=true > /dev/null \
      || fail "delete examples/$f.yaml" || return 1
  done
  echo "SKIPREASON-PARTIAL: examples/disk-pool.yaml needs --disk-pool disks and examples/nfs.yaml an NFS server (this host's kernel has no NFS); not run"
}

# Independent tests run three at a time, each in its own namespace; the
# node pod restart disturbs every volume of the node, so it runs alone, last.
# 9. Snapshots (the snapshot add-on of up.sh, the csi-snapshotter of each
#    node, Berth's VolumeSnapshotClasses): a VolumeSnapshot of a PVC in use
#    by a running pod; a PVC restored from it reads the data as it was when
#    the snapshot was taken (not as the pod changed it after); a PVC cloned
#    from a PVC reads the data as it is; the snapshot outlives its source
#    PVC; deleting the VolumeSnapshot removes Berth's copy from the node.
# volumesnapshot NAME PVC CLASS
volumesnapshot() {
  $K -n "$NS" apply -f - > /dev/null <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: $1}
spec:
  volumeSnapshotClassName: $3
  source: {persistentVolumeClaimName: $2}
YAML
}
snapshot_ready() { [ "$(jp "volumesnapshot/$1" '{.status.readyToUse}')" = true ]; }
# pvc_from NAME STORAGECLASS SIZE VolumeSnapshot|PersistentVolumeClaim SOURCE [volumeMode]
pvc_from() {
  local group=""
  [ "$4" = VolumeSnapshot ] && group="apiGroup: snapshot.storage.k8s.io, "
  $K -n "$NS" apply -f - > /dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: $2
  accessModes: [ReadWriteOnce]
  volumeMode: ${6:-Filesystem}
  resources: {requests: {storage: $3}}
  dataSource: {${group}kind: $4, name: $5}
YAML
}
# snapshot_path HANDLE: where Berth keeps the snapshot on this node
snapshot_path() {
  case $1 in
    local-snap-*) echo "$DATA/local/.snapshots/$1" ;;
    block-snap-*) echo "$DATA/block/.snapshots/$1.img" ;;
    *) echo "unknown-snapshot-kind-$1" ;;
  esac
}
# snapshot_round KIND STORAGECLASS SNAPSHOTCLASS SIZE BIGGER: the scenario
# above for one kind; the restore is made BIGGER than the source (it grows)
snapshot_round() {
  local kind=$1 sc=$2 vsc=$3 size=$4 bigger=$5 content h out node
  pvc src "$sc" "$size"
  pod app src 'echo v1 > /data/f && chmod 640 /data/f && ln -s f /data/l && mkdir /data/d && head -c 2097152 /dev/urandom > /data/d/blob && md5sum /data/d/blob | cut -d" " -f1 > /data/sum && sync && sleep 3600'
  wait_for "$TIMEOUT" "pod app Running" pod_ready app || return 1
  wait_for 30 "the pod wrote its data" $K -n "$NS" exec app -- test -s /data/sum || return 1
  volumesnapshot snap1 src "$vsc"
  wait_for "$TIMEOUT" "VolumeSnapshot snap1 readyToUse" snapshot_ready snap1 \
    || { $K -n "$NS" describe volumesnapshot snap1 >&2; return 1; }
  content=$(jp volumesnapshot/snap1 '{.status.boundVolumeSnapshotContentName}')
  h=$($K get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')
  [[ $h == $kind-snap-* ]] || fail "snapshot handle '$h' is not a $kind snapshot" || return 1
  [ -e "$(snapshot_path "$h")" ] || fail "$(snapshot_path "$h") not on the node" || return 1
  node=$($K get volumesnapshotcontent "$content" -o jsonpath='{.metadata.labels.snapshot\.storage\.kubernetes\.io/managed-by}')
  [ "$node" = "$NODE" ] || fail "VolumeSnapshotContent managed-by '$node', not $NODE (distributed snapshotting)" || return 1
  [ -n "$(jp volumesnapshot/snap1 '{.status.restoreSize}')" ] || fail "snapshot has no restoreSize" || return 1
  # the pod changes its data after the snapshot
  $K -n "$NS" exec app -- sh -c 'echo v2 > /data/f && rm /data/d/blob && sync' || fail "pod app could not write" || return 1

  pvc_from restored "$sc" "$bigger" VolumeSnapshot snap1
  out=$(run_pod r1 restored 'cat /data/f; stat -c %a /data/f; readlink /data/l; md5sum /data/d/blob | cut -d" " -f1; cat /data/sum; df -k /data | awk "NR == 2 {print \$2}"') || return 1
  [ "$(echo "$out" | sed -n 1p)" = v1 ] || fail "restored f is '$(echo "$out" | sed -n 1p)', not v1 (as at snapshot time)" || return 1
  [ "$(echo "$out" | sed -n 2p)" = 640 ] || fail "restored f has mode $(echo "$out" | sed -n 2p), not 640" || return 1
  [ "$(echo "$out" | sed -n 3p)" = f ] || fail "restored symlink l points to '$(echo "$out" | sed -n 3p)'" || return 1
  [ "$(echo "$out" | sed -n 4p)" = "$(echo "$out" | sed -n 5p)" ] || fail "restored blob's md5 $(echo "$out" | sed -n 4p) differs from the one written $(echo "$out" | sed -n 5p)" || return 1
  if [ "$kind" = block ]; then # the restored filesystem grew to the bigger size
    [ "$(echo "$out" | sed -n 6p)" -gt $(( $(numfmt --from=iec "${size%i}") / 1024 )) ] \
      || fail "restored filesystem is $(echo "$out" | sed -n 6p) KiB, not grown past $size" || return 1
  fi

  pvc_from cloned "$sc" "$size" PersistentVolumeClaim src
  out=$(run_pod r2 cloned 'cat /data/f; [ -e /data/d/blob ] && echo blob-present || echo blob-absent') || return 1
  [ "$out" = "v2
blob-absent" ] || fail "clone reads '$(echo "$out" | tr '\n' ' ')', not the source as it is now (v2, blob removed)" || return 1

  # the snapshot outlives its source
  $K -n "$NS" delete pod app --wait=true > /dev/null
  $K -n "$NS" delete pvc src --wait=true > /dev/null
  pvc_from again "$sc" "$size" VolumeSnapshot snap1
  out=$(run_pod r3 again 'cat /data/f') || return 1
  [ "$out" = v1 ] || fail "restore after the source PVC was deleted reads '$out', not v1" || return 1

  $K -n "$NS" delete volumesnapshot snap1 --wait=true > /dev/null
  wait_for 60 "VolumeSnapshotContent $content deleted" gone "volumesnapshotcontent/$content" || return 1
  wait_for 30 "snapshot copy removed from the node" sh -c "[ ! -e '$(snapshot_path "$h")' ]" || return 1
}
t_snapshots_local() { snapshot_round local berth-local berth-local 64Mi 128Mi; }
t_snapshots_block() { snapshot_round block berth-block berth-block 64Mi 128Mi; }

# Three at a time, in this order: the node's readiness first, then the
# longest first (CI's times: block_volumes about 90 s, the next five 27 to
# 36 s, the rest under 20 s), so that no long test starts last.
PARALLEL=(ready_csinode_capacity block_volumes wffc_local_volume examples_unchanged snapshots_local
  snapshots_block read_write_once_pod capacity_exceeded generic_ephemeral image_has_every_tool
  private_host_mounts logs_without_colour_codes)
SERIAL=(node_pod_restart)
# --install-checks: the tests whose outcome depends on how Berth was
# installed (kubelet directory, kustomize or Helm), for the second and third
# rounds of run.sh
if [ "${1:-}" = --install-checks ]; then
  PARALLEL=(ready_csinode_capacity block_volumes wffc_local_volume snapshots_local
    capacity_exceeded generic_ephemeral private_host_mounts)
  SERIAL=()
elif [ $# -gt 0 ]; then
  PARALLEL=(); SERIAL=("$@")
fi
SUFFIX=$(date +%s)
RESULTS=$LOGS/suite-$SUFFIX
mkdir -p "$RESULTS"
run_one() { # test: writes $RESULTS/<test>.{rc,out}
  local t=$1 t0=$SECONDS rc
  NS=berth-t-${t//_/-}
  $K create namespace "$NS" > /dev/null
  local taints; taints=$(node_taints)
  if [ -n "$taints" ]; then
    # no pod of this test could be scheduled: fail now, not after a timeout
    echo "  node $NODE is tainted ($taints): test not run" > "$RESULTS/$t.err"; rc=1
  else
    "t_$t" > "$RESULTS/$t.stdout" 2> "$RESULTS/$t.err"; rc=$?
  fi
  [ $rc = 0 ] || [ $rc = 2 ] || diag 2>> "$RESULTS/$t.err"
  $K delete namespace "$NS" --wait=true --timeout=120s > /dev/null 2>&1 \
    || echo "  (namespace $NS not deleted in 120 s)" >> "$RESULTS/$t.err"
  echo "$rc $((SECONDS - t0))" > "$RESULTS/$t.rc"
}
running=0
for t in "${PARALLEL[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  [ $running -lt 3 ] || { wait -n; running=$((running - 1)); }
done
wait
for t in "${SERIAL[@]}"; do run_one "$t"; done
PASSED=0 FAILED=0 SKIPPED=0
for t in "${PARALLEL[@]}" "${SERIAL[@]}"; do
  read -r rc secs < "$RESULTS/$t.rc"
  grep -v '^SKIPREASON' "$RESULTS/$t.stdout"
  case $rc in
    0) PASSED=$((PASSED + 1)); echo "PASS $t ($secs s)"
       sed -n 's/^SKIPREASON-PARTIAL: /  note: /p' "$RESULTS/$t.stdout" ;;
    2) SKIPPED=$((SKIPPED + 1)); echo "SKIP $t: $(sed -n 's/^SKIPREASON: //p' "$RESULTS/$t.stdout")" ;;
    *) FAILED=$((FAILED + 1)); echo "FAIL $t ($secs s):"; cat "$RESULTS/$t.err" ;;
  esac
done
echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" = 0 ]
