#!/bin/bash
# up.sh: a real single-node Kubernetes on this machine, with Berth installed
# as deploy/README-install.md tells users. Builds or reuses everything first
# (build.sh), then starts containerd, etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy, imports
# the images, installs Berth and waits until its pods are Ready. Prints
#   export KUBECONFIG=...
#   export PATH=...
# last; tests/cluster/down.sh removes everything again.
#
# usage: up.sh [--install kustomize|helm|none] [--no-build]
#   --no-build                      start with what is in the cache
#   KUBELET_ROOT=/var/lib/kubelet   kubelet's root directory; any other value
#                                   installs with the kustomize component
#                                   deploy/kubernetes/components/kubelet-dir
#                                   (or Helm's kubeletDir)
# The host keeps its sysctls: kubelet runs in its own mount namespace where
# the /proc/sys files it writes are bind-mounted files; kube-proxy is told
# not to touch conntrack and route_localnet; ip_forward, which the CNI bridge
# turns on, is put back by down.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
INSTALL=kustomize BUILD=1
while [ $# -gt 0 ]; do
  case $1 in
    --install) INSTALL=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) die "usage: up.sh [--install kustomize|helm|none] [--no-build]" ;;
  esac
done
case $INSTALL in kustomize | helm | none) ;; *) die "--install kustomize|helm|none" ;; esac
[ "$(id -u)" = 0 ] || die "up.sh must run as root"

[ $BUILD = 0 ] || "$CLUSTER_DIR/build.sh" debs tools kubernetes sidecars images

if [ -e "$RUN/host-before" ]; then
  for n in containerd etcd kube-apiserver kubelet; do
    [ -f "$RUN/$n.pid" ] && kill -0 "$(cat "$RUN/$n.pid")" 2> /dev/null \
      && die "a cluster is running ($n, pid $(cat "$RUN/$n.pid")); tests/cluster/down.sh stops it"
  done
  say "a cluster that was not torn down left $RUN: down.sh first"
  "$CLUSTER_DIR/down.sh" || die "down.sh could not clean up what the last cluster left"
fi
NODE=$(hostname | tr 'A-Z' 'a-z')
NODE_IP=$(ip -4 -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
[ -n "$NODE_IP" ] || NODE_IP=$(ip -4 -o addr show scope global | awk 'NR==1 {split($4, a, "/"); print a[1]}')
[ -n "$NODE_IP" ] || die "no IPv4 address for the node"
t_up=$SECONDS
before=$("$CLUSTER_DIR/hoststate.sh")
mkdir -p "$RUN" "$LOGS"
echo "$before" > "$RUN/host-before"
# Host directories that kubelet, containerd and the CNI plugins create
# whatever their configured roots are, and Berth's data directory: down.sh
# removes exactly those that did not exist before.
for d in /var/lib/kubelet "$KUBELET_ROOT" /var/lib/berth /var/lib/cni /run/containerd /var/log/containers /var/log/pods; do
  top=""
  while [ ! -e "$d" ]; do top=$d; d=$(dirname "$d"); done
  [ -z "$top" ] || echo "$top"
done | sort -u > "$RUN/created-dirs"
echo "$KUBELET_ROOT" > "$RUN/kubelet-root"
for k in net/ipv4/ip_forward net/ipv4/conf/all/route_localnet; do
  echo "$k=$(cat "/proc/sys/$k")"
done > "$RUN/sysctl-before"

"$CLUSTER_DIR/pki.sh" "$PKI" "$NODE" "$NODE_IP"
mkdir -p "$RUN/containerd" "$RUN/cni/net.d" "$RUN/cni/data" "$RUN/etcd" "$RUN/pod-logs" "$RUN/sysctl-mask" "$KUBELET_ROOT"
cat > "$RUN/containerd.toml" <<CONF
version = 2
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
oom_score = 0
[grpc]
  address = "$RUN/containerd/containerd.sock"
[ttrpc]
  address = "$RUN/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  # root here lacks CAP_SYS_RESOURCE: never ask for an oom_score_adj below containerd's own
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$DEBROOT/usr/sbin/runc"
        Root = "$RUN/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$DEBROOT/usr/lib/cni"
    conf_dir = "$RUN/cni/net.d"
    max_conf_num = 1
CONF
cat > "$RUN/cni/net.d/10-berth-test.conflist" <<CONF
{ "cniVersion": "0.4.0", "name": "berth-test", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$RUN/cni/data", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"} ] }
CONF
cat > "$RUN/kubelet.yaml" <<CONF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
# this host has cgroup v1 only
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$RUN/containerd/containerd.sock
imageServiceEndpoint: unix://$RUN/containerd/containerd.sock
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
podLogsDir: $RUN/pod-logs
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
protectKernelDefaults: false
serializeImagePulls: false
# Absolute floors, not percentages: on a large disk that CI's builds have
# nearly filled, "2%" is gigabytes, the node is tainted with DiskPressure and
# no test pod is ever scheduled. Every signal is listed: one left out gets
# kubelet's default (10-15%).
evictionHard: {memory.available: "100Mi", nodefs.available: "256Mi", imagefs.available: "256Mi", containerfs.available: "256Mi", nodefs.inodesFree: "1%", imagefs.inodesFree: "1%", containerfs.inodesFree: "1%"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
CONF

start() { # name command...: a session of its own, pid file, log
  local n=$1; shift
  setsid "$@" > "$LOGS/$n.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$n.pid"
}
waitfor() { # seconds what command...
  local s=$1 what=$2 t=$SECONDS; shift 2
  while [ $((SECONDS - t)) -lt "$s" ]; do
    "$@" > /dev/null 2>&1 && { say "$what ready after $((SECONDS - t)) s"; return 0; }
    sleep 0.5
  done
  die "$what not ready after $s s (logs in $LOGS)"
}

(cd "$RUN/containerd" && start containerd env LD_LIBRARY_PATH="$DEBROOT/usr/lib/x86_64-linux-gnu" \
  "$DEBROOT/usr/bin/containerd" --config "$RUN/containerd.toml")
waitfor 30 containerd ctr_ version
for f in "$IMAGES"/*.tar; do ctr_ images import "$f" > /dev/null; done
say "images imported"

start etcd "$DEBROOT/usr/bin/etcd" --name berth-test --data-dir "$RUN/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster berth-test=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
waitfor 30 etcd sh -c "curl -sf http://127.0.0.1:2379/health | grep -q true"

start kube-apiserver "$K8S_BIN/kube-apiserver" --advertise-address="$NODE_IP" --secure-port=6443 \
  --etcd-servers=http://127.0.0.1:2379 --client-ca-file="$PKI/ca.crt" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction --allow-privileged=true --profiling=false --v=1
waitfor 120 kube-apiserver sh -c "'$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_FILE' get --raw /readyz | grep -q ok"

start kube-controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig="$PKI/kcm.kubeconfig" \
  --authentication-kubeconfig="$PKI/kcm.kubeconfig" --authorization-kubeconfig="$PKI/kcm.kubeconfig" \
  --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --root-ca-file="$PKI/ca.crt" --service-account-private-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" --profiling=false --v=1
start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$PKI/scheduler.kubeconfig" \
  --authentication-kubeconfig="$PKI/scheduler.kubeconfig" --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --leader-elect=false --profiling=false --v=1

# kubelet's root must be a shared mount for mount propagation; kubelet makes
# it one itself, this does it first so that the mount namespace below (where
# kubelet runs) shares it with the host.
mountpoint -q "$KUBELET_ROOT" || mount --bind "$KUBELET_ROOT" "$KUBELET_ROOT"
mount --make-rshared "$KUBELET_ROOT"
mkdir -p /var/log/containers
# kubelet (protectKernelDefaults: false) sets vm.overcommit_memory,
# kernel.panic, kernel.panic_on_oops and the keys limits on the host; in its
# mount namespace those /proc/sys files are files holding the values it wants.
cat > "$RUN/kubelet-ns.sh" <<WRAP
#!/bin/sh
set -e
mount --make-rprivate /proc
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
  kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
  k=\${kv%=*}; f=$RUN/sysctl-mask/\$(echo \$k | tr / _)
  echo \${kv#*=} > \$f
  mount --bind \$f /proc/sys/\$k
done
exec "\$@"
WRAP
chmod +x "$RUN/kubelet-ns.sh"
start kubelet unshare -m --propagation unchanged -- "$RUN/kubelet-ns.sh" "$K8S_BIN/kubelet" \
  --config="$RUN/kubelet.yaml" --kubeconfig="$PKI/kubelet.kubeconfig" --root-dir="$KUBELET_ROOT" \
  --hostname-override="$NODE" --node-ip="$NODE_IP" --v=2
start kube-proxy env XTABLES_LIBDIR="$XTABLES_LIBDIR" LD_LIBRARY_PATH="$DEBROOT/usr/lib/x86_64-linux-gnu" \
  "$K8S_BIN/kube-proxy" --kubeconfig="$PKI/admin.kubeconfig" --hostname-override="$NODE" \
  --proxy-mode=iptables --cluster-cidr=10.244.0.0/16 --conntrack-max-per-core=0 \
  --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 \
  --iptables-localhost-nodeports=false --metrics-bind-address=127.0.0.1:10249 --v=1

waitfor 180 "node $NODE" sh -c "'$K8S_BIN/kubectl' --kubeconfig '$KUBECONFIG_FILE' get node '$NODE' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
waitfor 60 "default service account" kubectl_ -n default get serviceaccount default
# A taint (DiskPressure, MemoryPressure, ...) keeps every test pod Pending:
# fail here, saying why, instead of in every test after minutes of waiting.
untainted() { [ -z "$(kubectl_ get node "$NODE" -o jsonpath='{.spec.taints}')" ]; }
t=$SECONDS
until untainted; do
  if [ $((SECONDS - t)) -ge 60 ]; then
    kubectl_ describe node "$NODE" | sed -n '/^Taints:/,/^Addresses:/p' >&2
    df -h / "$KUBELET_ROOT" 2>/dev/null >&2
    die "node $NODE is still tainted after 60 s: no test pod could be scheduled"
  fi
  sleep 1
done
say "cluster up in $((SECONDS - t_up)) s (Kubernetes $K8S_VERSION, kubelet root $KUBELET_ROOT)"

# The VolumeSnapshot CRDs and the snapshot-controller: cluster add-ons that
# Berth's snapshots need, installed before Berth as a cluster admin would.
"$CLUSTER_DIR/snapshot-addon.sh"
if [ "$INSTALL" != none ]; then
  "$CLUSTER_DIR/install.sh" "$INSTALL"
fi
echo "export KUBECONFIG=$KUBECONFIG_FILE"
echo "export PATH=$K8S_BIN:\$PATH"
