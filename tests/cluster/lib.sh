# Shared settings of the cluster harness (sourced by up.sh, down.sh, run.sh,
# build.sh and the suites). Everything built is cached under $CACHE, keyed by
# version, so a second run only starts the cluster; everything a running
# cluster owns lives under $RUN and is removed by down.sh.

# Kubernetes: v1.36.1, whose client libraries (v0.36.1) external-provisioner
# and node-driver-registrar also build with.
K8S_VERSION=${K8S_VERSION:-v1.36.1}
# The sidecars at the versions deploy/ names (tests/manifests/validate.sh
# checks that deploy/ names exactly these).
PROVISIONER_VERSION=v6.4.0
ATTACHER_VERSION=v4.13.0
RESIZER_VERSION=v2.3.0
REGISTRAR_VERSION=v2.17.0
LIVENESSPROBE_VERSION=v2.19.0
# external-snapshotter: the csi-snapshotter sidecar, and the cluster add-ons
# it needs (the snapshot-controller and the VolumeSnapshot CRDs), all from
# the same release.
SNAPSHOTTER_VERSION=v8.7.0
# Debian bookworm packages, unpacked (dpkg -x) into the cache, never installed.
DEBS="containerd runc etcd-server etcd-client containernetworking-plugins busybox-static
  iptables conntrack libip4tc2 libip6tc2 libnetfilter-conntrack3 libnfnetlink0 libxtables12
  libnftnl11 libnetfilter-cthelper0 libnetfilter-queue1 libmnl0"

CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$CLUSTER_DIR/../.." && pwd)
THIRD_PARTY=${THIRD_PARTY:-$(cd "$ROOT/.." && pwd)/shared/third_party}
[ -d "$THIRD_PARTY" ] || THIRD_PARTY=/work/shared/third_party

CACHE=${BERTH_K8S_CACHE:-/var/cache/berth-k8s}
K8S_BIN=$CACHE/kubernetes-$K8S_VERSION/bin
CSI_BIN=$CACHE/sidecars/bin
DEBROOT=$CACHE/debian/root
IMAGES=$CACHE/images
# Runtime state of a running cluster; down.sh removes it.
RUN=${BERTH_CLUSTER_RUN:-/run/berth-cluster}
PKI=$RUN/pki
LOGS=$RUN/logs
KUBECONFIG_FILE=$PKI/admin.kubeconfig
KUBELET_ROOT=${KUBELET_ROOT:-/var/lib/kubelet}
# The other kubelet root directory the suite runs with (as k0s has it).
ALT_KUBELET_ROOT=/var/lib/k0s/kubelet
# The CNI bridge and pod network of this cluster.
BRIDGE=berthk8s0
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/12

export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOPATH=$CACHE/go/path
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local CGO_ENABLED=0
export PATH=$K8S_BIN:$DEBROOT/usr/bin:$DEBROOT/usr/sbin:$DEBROOT/sbin:/usr/local/go/bin:$PATH
export XTABLES_LIBDIR=$DEBROOT/usr/lib/x86_64-linux-gnu/xtables

# Only the unpacked Debian binaries need the unpacked libraries.
debenv() { LD_LIBRARY_PATH=$DEBROOT/usr/lib/x86_64-linux-gnu "$@"; }
say() { echo "[cluster $(date +%T)] $*"; }
die() { echo "[cluster $(date +%T)] error: $*" >&2; exit 1; }
kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
ctr_() { debenv "$DEBROOT/usr/bin/ctr" --address "$RUN/containerd/containerd.sock" -n k8s.io "$@"; }
