#!/bin/bash
# Builds, or finds in the cache, everything the test cluster runs:
#   debs       Debian bookworm packages (containerd, runc, etcd, CNI plugins,
#              busybox-static, iptables, conntrack), `apt-get download` and
#              `dpkg -x`: nothing is installed on the host
#   kubernetes kube-apiserver, kube-controller-manager, kube-scheduler,
#              kubelet, kube-proxy and kubectl from the k8s.io/kubernetes
#              module (Go module proxy), through a wrapper module that pins
#              its staging modules
#   e2e        e2e.test, agnhost and the ginkgo CLI from the same module
#   sidecars   external-provisioner, -attacher, -resizer, csi-snapshotter
#              and snapshot-controller (Go module proxy), node-driver-registrar
#              and livenessprobe (vendored upstream sources in
#              ../shared/third_party)
#   images     the container images (tests/cluster/images.sh)
#   tools      kustomize and helm at the versions tests/manifests pins
# usage: build.sh [all|debs|kubernetes|e2e|sidecars|images|tools]...
# Each result is written under a temporary name and renamed when complete,
# so an interrupted build is never mistaken for a cached one.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir -p "$CACHE" "$GOMODCACHE" "$GOCACHE"
# one build at a time: a second one waits, then finds the first one's work
exec 9> "$CACHE/build.lock"
flock 9

elapsed() { echo "$(( SECONDS - $1 )) s"; }

build_debs() {
  [ -x "$DEBROOT/usr/bin/containerd" ] && return 0
  local t=$SECONDS d=$CACHE/debian.tmp
  rm -rf "$d"; mkdir -p "$d/debs" "$d/root"
  ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq
  # shellcheck disable=SC2086
  (cd "$d/debs" && apt-get download -qq $DEBS)
  for f in "$d"/debs/*.deb; do dpkg -x "$f" "$d/root"; done
  # Debian's postinst (update-alternatives) makes these links; dpkg -x does not.
  for b in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf xtables-nft-multi "$d/root/usr/sbin/$b"
  done
  ls "$d/debs" > "$d/packages.txt"
  rm -rf "$d/debs" "$CACHE/debian"; mv "$d" "$CACHE/debian"
  say "Debian packages unpacked in $(elapsed $t)"
}

# The wrapper module: requires k8s.io/kubernetes and pins each staging module
# its go.mod replaces with a local path to the published v0.X.Y; tools.go
# imports the commands, the packages e2e_test.go imports and agnhost, so one
# `go mod tidy` records every dependency.
K8S_SRC=$CACHE/kubernetes-$K8S_VERSION/src
k8s_module() {
  [ -f "$K8S_SRC/go.sum" ] && return 0
  local dir minor=${K8S_VERSION#v1.}
  rm -rf "$K8S_SRC"; mkdir -p "$K8S_SRC"
  dir=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  {
    printf 'module berth.test/k8sbuild\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
    grep -E '^\s+k8s.io/\S+ => ./staging' "$dir/go.mod" | awk -v v="v0.$minor" '{print "\t" $1 " => " $1 " " v}'
    printf ')\n'
  } > "$K8S_SRC/go.mod.tmp"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
      printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"
    done
    printf '\t_ "k8s.io/kubernetes/test/images/agnhost"\n'
    # every import of test/e2e/e2e_test.go, so that e2e.test builds
    awk '/^import \(/{i=1;next} i&&/^\)/{exit} i' "$dir/test/e2e/e2e_test.go" \
      | grep -oE '"[^"]+"' | grep -E '^"(k8s.io|github.com|sigs.k8s.io|go.opentelemetry.io)' \
      | sed 's/^/\t_ /'
    printf ')\n'
  } > "$K8S_SRC/tools.go"
  mv "$K8S_SRC/go.mod.tmp" "$K8S_SRC/go.mod"
  (cd "$K8S_SRC" && go mod tidy -e)
}

k8s_ldflags() {
  local minor=${K8S_VERSION#v1.} ld="-s -w" p
  minor=${minor%%.*}
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld="$ld -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ld"
}

build_kubernetes() {
  local bins="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl" b ok=1
  for b in $bins; do [ -x "$K8S_BIN/$b" ] || ok=0; done
  [ $ok = 1 ] && return 0
  local t=$SECONDS pkgs=""
  k8s_module
  for b in $bins; do pkgs="$pkgs k8s.io/kubernetes/cmd/$b"; done
  mkdir -p "$K8S_BIN.tmp"
  # shellcheck disable=SC2086
  (cd "$K8S_SRC" && go build -p 2 -trimpath -ldflags "$(k8s_ldflags)" -o "$K8S_BIN.tmp/" $pkgs)
  for b in $bins; do mv "$K8S_BIN.tmp/$b" "$K8S_BIN/$b" 2>/dev/null || { mkdir -p "$K8S_BIN"; mv "$K8S_BIN.tmp/$b" "$K8S_BIN/$b"; }; done
  rmdir "$K8S_BIN.tmp"
  say "Kubernetes $K8S_VERSION built in $(elapsed $t)"
}

build_e2e() {
  [ -x "$K8S_BIN/e2e.test" ] && [ -x "$K8S_BIN/agnhost" ] && [ -x "$K8S_BIN/ginkgo" ] && return 0
  local t=$SECONDS gv
  k8s_module
  mkdir -p "$K8S_BIN"
  # the ginkgo CLI runs e2e.test's specs in parallel processes; the version
  # e2e.test is built with, recorded as a tool of the wrapper module
  gv=$(cd "$K8S_SRC" && go list -m -f '{{.Version}}' github.com/onsi/ginkgo/v2)
  (cd "$K8S_SRC" && go get -tool "github.com/onsi/ginkgo/v2/ginkgo@$gv" \
    && go build -p 2 -trimpath -ldflags "-s -w" -o "$K8S_BIN/ginkgo.tmp" github.com/onsi/ginkgo/v2/ginkgo)
  mv "$K8S_BIN/ginkgo.tmp" "$K8S_BIN/ginkgo"
  (cd "$K8S_SRC" && go build -p 2 -trimpath -ldflags "-s -w" -o "$K8S_BIN/agnhost.tmp" k8s.io/kubernetes/test/images/agnhost)
  mv "$K8S_BIN/agnhost.tmp" "$K8S_BIN/agnhost"
  (cd "$K8S_SRC" && go test -c -p 2 -trimpath -ldflags "$(k8s_ldflags)" -o "$K8S_BIN/e2e.test.tmp" k8s.io/kubernetes/test/e2e)
  mv "$K8S_BIN/e2e.test.tmp" "$K8S_BIN/e2e.test"
  say "e2e.test and agnhost built in $(elapsed $t)"
}

# binary name, module or tarball, version; the binaries of one module and
# version are built by one `go build` (csi-snapshotter and the
# snapshot-controller)
SIDECARS="csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 $PROVISIONER_VERSION
csi-attacher github.com/kubernetes-csi/external-attacher/v4 $ATTACHER_VERSION
csi-resizer github.com/kubernetes-csi/external-resizer/v2 $RESIZER_VERSION
csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 $SNAPSHOTTER_VERSION
snapshot-controller github.com/kubernetes-csi/external-snapshotter/v8 $SNAPSHOTTER_VERSION
csi-node-driver-registrar node-driver-registrar $REGISTRAR_VERSION
livenessprobe livenessprobe $LIVENESSPROBE_VERSION"

# module_dir MODULE@VERSION: its directory in the (read-only) module cache
module_dir() { go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'; }

build_sidecars() {
  local src version names name dir t mod pkgs
  while read -r src version; do
    names=$(awk -v s="$src" -v v="$version" '$2 == s && $3 == v {print $1}' <<< "$SIDECARS")
    pkgs=""
    for name in $names; do
      [ -x "$CSI_BIN/$name-$version" ] || pkgs="$pkgs ./cmd/$name"
    done
    [ -n "$pkgs" ] || continue
    t=$SECONDS
    dir=$CACHE/sidecars/src/${src##*/}-$version
    rm -rf "$dir" "$CSI_BIN/tmp"; mkdir -p "$dir" "$CSI_BIN/tmp"
    case $src in
      */*) # a module the proxy serves: copy it out of the read-only module cache
        cp -r "$(module_dir "$src@$version")/." "$dir"
        chmod -R u+w "$dir"; mod=-mod=mod
        # external-snapshotter's go.mod replaces its client module with
        # ./client, which its module zip leaves out: the published client
        # module of the same version instead
        if grep -q '^replace github.com/kubernetes-csi/external-snapshotter/client/v8 => ./client' "$dir/go.mod"; then
          (cd "$dir" && go mod edit -replace "github.com/kubernetes-csi/external-snapshotter/client/v8=github.com/kubernetes-csi/external-snapshotter/client/v8@$version")
        fi ;;
      *) # vendored upstream source
        tar -xzf "$THIRD_PARTY/$src-$version.tar.gz" -C "$dir" --strip-components=1; mod=-mod=vendor ;;
    esac
    # shellcheck disable=SC2086
    (cd "$dir" && go build -p 2 $mod -trimpath -ldflags "-s -w -X main.version=$version" \
      -o "$CSI_BIN/tmp/" $pkgs)
    for name in $names; do
      [ -x "$CSI_BIN/tmp/$name" ] && mv "$CSI_BIN/tmp/$name" "$CSI_BIN/$name-$version"
    done
    rm -rf "$dir" "$CSI_BIN/tmp"
    say "$(echo $names) $version built in $(elapsed $t)"
  done <<< "$(awk '{print $2, $3}' <<< "$SIDECARS" | uniq)"
}

# The snapshot add-on as external-snapshotter's release ships it: the
# VolumeSnapshot CRDs (its client module's config/crd) and the
# snapshot-controller's manifests (deploy/kubernetes/snapshot-controller),
# each a kustomization; tests/cluster/snapshot-addon.sh installs them.
snapshot_addon() {
  local out=$CACHE/snapshot-addon-$SNAPSHOTTER_VERSION
  [ -f "$out/crd/kustomization.yaml" ] && [ -f "$out/snapshot-controller/kustomization.yaml" ] && return 0
  rm -rf "$out.tmp"; mkdir -p "$out.tmp/crd" "$out.tmp/snapshot-controller"
  cp "$(module_dir "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION")"/config/crd/*.yaml "$out.tmp/crd/"
  cp "$(module_dir "github.com/kubernetes-csi/external-snapshotter/v8@$SNAPSHOTTER_VERSION")"/deploy/kubernetes/snapshot-controller/*.yaml "$out.tmp/snapshot-controller/"
  chmod -R u+w "$out.tmp"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

# kustomize and helm, pinned as tests/manifests/validate.sh pins them.
build_tools() {
  local kv hv
  kv=$(sed -n 's/^KUSTOMIZE_VERSION=//p' "$ROOT/tests/manifests/validate.sh")
  hv=$(sed -n 's/^HELM_VERSION=//p' "$ROOT/tests/manifests/validate.sh")
  mkdir -p "$CACHE/tools"
  [ -x "$CACHE/tools/kustomize-$kv" ] || {
    GOBIN=$CACHE/tools/tmp go install "sigs.k8s.io/kustomize/kustomize/v5@$kv"
    mv "$CACHE/tools/tmp/kustomize" "$CACHE/tools/kustomize-$kv"; }
  [ -x "$CACHE/tools/helm-$hv" ] || {
    GOBIN=$CACHE/tools/tmp go install "helm.sh/helm/v3/cmd/helm@$hv"
    mv "$CACHE/tools/tmp/helm" "$CACHE/tools/helm-$hv"; }
  ln -sfn "kustomize-$kv" "$CACHE/tools/kustomize"
  ln -sfn "helm-$hv" "$CACHE/tools/helm"
}

[ $# -gt 0 ] || set -- all
for what in "$@"; do
  case $what in
    all) build_debs; build_tools; build_kubernetes; build_sidecars; snapshot_addon; "$CLUSTER_DIR/images.sh"; build_e2e; "$CLUSTER_DIR/images.sh" e2e ;;
    debs) build_debs ;;
    kubernetes) build_kubernetes ;;
    e2e) build_e2e; "$CLUSTER_DIR/images.sh" e2e ;;
    sidecars) build_sidecars; snapshot_addon ;;
    images) "$CLUSTER_DIR/images.sh" ;;
    tools) build_tools ;;
    *) die "unknown build step $what" ;;
  esac
done
