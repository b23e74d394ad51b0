#!/usr/bin/env bash
# Offline validation of Berth's Kubernetes manifests.
#
#   bash tests/manifests/validate.sh            (from the repository root)
#   BERTH_UPDATE_FIXTURES=1 bash tests/manifests/validate.sh
#                                   also rewrites tests/manifests/berth-args.json
#
# Installs what it needs under target/tools/ (once; later runs reuse it):
#   - a Python venv with tests/manifests/requirements.txt
#     (kubernetes-validate bundles the Kubernetes OpenAPI schemas),
#   - kustomize and helm, built with `go install` from the Go module proxy
#     (needs Go >= 1.26 on PATH).
# Renders deploy/kubernetes with kustomize (and with `kubectl kustomize` when
# kubectl is installed, which must give the same output) and the Helm chart
# with several value sets, validates every object and examples/*.yaml, and
# prints "N passed, M failed" last. Exits non-zero on any failure.
set -uo pipefail

KUSTOMIZE_VERSION=v5.8.2
HELM_VERSION=v3.22.0
# Schemas: the oldest Kubernetes the manifests claim to support and the
# newest that kubernetes-validate bundles.
K8S_VERSIONS=(1.33.0 1.37.0)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
TOOLS="$ROOT/target/tools"
SHARED_TOOLS="${BERTH_K8S_CACHE:-/var/cache/berth-k8s}/tools"
OUT="$ROOT/target/manifests"
mkdir -p "$TOOLS/bin" "$OUT"
RESULTS="$OUT/shell-results.txt"
: > "$RESULTS"

log() { printf '==> %s\n' "$*" >&2; }
pass() { printf 'PASS %s\n' "$1" >> "$RESULTS"; }
fail() { printf 'FAIL %s: %s\n' "$1" "$2" >> "$RESULTS"; printf 'FAIL %s: %s\n' "$1" "$2" >&2; }
# When the Python side cannot run, still end with the summary line.
bail() {
  local p f
  p=$(grep -c '^PASS ' "$RESULTS" || true)
  f=$(grep -c '^FAIL ' "$RESULTS" || true)
  echo "$*" >&2
  echo "${p} passed, $((f + 1)) failed"
  exit 1
}

# ---- Python venv -------------------------------------------------------------
VENV="$TOOLS/venv"
REQ="$ROOT/tests/manifests/requirements.txt"
req_hash=$(sha256sum "$REQ" | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]]; then
  log "setting up $VENV"
  PY=$(command -v python3) || bail "python3 not found"
  if ! "$PY" -m venv --clear "$VENV" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv for `-m venv`.
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null
    fi
    "$PY" -m venv --clear "$VENV" || bail "cannot create a Python venv (install python3-venv)"
  fi
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ" || bail "pip install -r $REQ failed"
  echo "$req_hash" > "$VENV/.requirements.sha256"
fi

# ---- kustomize and helm (go install, pinned) --------------------------------
go_ok() {
  command -v go >/dev/null || return 1
  local v
  v=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
  [[ "$(printf '%s\n1.26.0\n' "$v" | sort -V | head -1)" == "1.26.0" ]]
}
go_tool() { # go_tool NAME STAMP PACKAGE@VERSION
  local name=$1 stamp=$2 pkg=$3
  if [[ -x "$TOOLS/bin/$name" && -f "$TOOLS/bin/.$name-$stamp" ]]; then
    return 0
  fi
  # The test cluster's tool cache (tests/cluster/build.sh tools) holds the
  # same versions: one build serves both, and survives a fresh clone.
  local shared=$SHARED_TOOLS/$name-$stamp
  if [[ -x "$shared" ]]; then
    cp "$shared" "$TOOLS/bin/$name.tmp" && mv "$TOOLS/bin/$name.tmp" "$TOOLS/bin/$name"
    rm -f "$TOOLS/bin/.$name-"*; touch "$TOOLS/bin/.$name-$stamp"
    return 0
  fi
  go_ok || { fail "install $name $stamp" "needs Go >= 1.26 on PATH (found: $(go version 2>/dev/null || echo none))"; return 1; }
  log "building $name $stamp (go install $pkg)"
  if GOBIN="$TOOLS/bin" GOTOOLCHAIN=local GOFLAGS=-mod=mod go install "$pkg" >"$OUT/go-install-$name.log" 2>&1; then
    rm -f "$TOOLS/bin/.$name-"*
    touch "$TOOLS/bin/.$name-$stamp"
    if mkdir -p "$SHARED_TOOLS" 2>/dev/null; then
      cp "$TOOLS/bin/$name" "$shared.tmp.$$" && mv "$shared.tmp.$$" "$shared"
    fi
  else
    fail "install $name $stamp" "go install $pkg failed, see $OUT/go-install-$name.log"
    return 1
  fi
}
go_tool kustomize "$KUSTOMIZE_VERSION" "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
have_kustomize=$?
go_tool helm "$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
have_helm=$?
KUSTOMIZE="$TOOLS/bin/kustomize"
HELM="$TOOLS/bin/helm"

# ---- render ------------------------------------------------------------------
DEPLOY_ARGS=()
rm -f "$OUT"/*.yaml

if [[ $have_kustomize == 0 ]]; then
  if "$KUSTOMIZE" build deploy/kubernetes > "$OUT/kustomize.yaml" 2> "$OUT/kustomize.err"; then
    pass "kustomize $KUSTOMIZE_VERSION build deploy/kubernetes"
    DEPLOY_ARGS+=(--deploy "kustomize=$OUT/kustomize.yaml")
  else
    fail "kustomize $KUSTOMIZE_VERSION build deploy/kubernetes" "$(tr '\n' ' ' < "$OUT/kustomize.err")"
  fi
fi
# The kubelet-dir component, as deploy/README-install.md tells users to use
# it: an overlay with the component and its ConfigMap. Nothing may still
# name /var/lib/kubelet (validate.py checks that the registration paths and
# the socket volumes agree).
if [[ $have_kustomize == 0 ]]; then
  OV="$OUT/kubelet-dir-overlay"
  rm -rf "$OV"; mkdir -p "$OV"
  cat > "$OV/kustomization.yaml" <<YAML
resources:
  - ../../../deploy/kubernetes
  - kubelet-dir.yaml
components:
  - ../../../deploy/kubernetes/components/kubelet-dir
YAML
  cat > "$OV/kubelet-dir.yaml" <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: berth-kubelet-dir
  annotations:
    config.kubernetes.io/local-config: "true"
data:
  kubeletDir: /var/lib/k0s/kubelet
YAML
  if "$KUSTOMIZE" build "$OV" > "$OUT/kustomize-kubelet-dir.yaml" 2> "$OUT/kustomize-kubelet-dir.err"; then
    left=$(grep -c '/var/lib/kubelet' "$OUT/kustomize-kubelet-dir.yaml")
    moved=$(grep -c '/var/lib/k0s/kubelet' "$OUT/kustomize-kubelet-dir.yaml")
    if [[ $left == 0 && $moved -ge 8 ]] && ! grep -q berth-kubelet-dir "$OUT/kustomize-kubelet-dir.yaml"; then
      pass "kustomize build with components/kubelet-dir (/var/lib/k0s/kubelet in $moved places, none left at /var/lib/kubelet)"
      DEPLOY_ARGS+=(--deploy "kustomize-kubelet-dir=$OUT/kustomize-kubelet-dir.yaml")
    else
      fail "kustomize build with components/kubelet-dir" "/var/lib/kubelet left $left times, /var/lib/k0s/kubelet $moved times, or the ConfigMap is in the output"
    fi
  else
    fail "kustomize build with components/kubelet-dir" "$(tr '\n' ' ' < "$OUT/kustomize-kubelet-dir.err")"
  fi
fi
# The VolumeSnapshotClasses are a kustomization of their own: the base must
# apply on a cluster without the VolumeSnapshot CRDs.
if [[ -f "$OUT/kustomize.yaml" ]]; then
  if grep -q '^kind: VolumeSnapshotClass' "$OUT/kustomize.yaml"; then
    fail "kustomize build deploy/kubernetes has no VolumeSnapshotClass" "it has one: apply -k fails on a cluster without the snapshot CRDs"
  else
    pass "kustomize build deploy/kubernetes has no VolumeSnapshotClass"
  fi
  if "$KUSTOMIZE" build deploy/kubernetes/snapshot-classes > "$OUT/snapshot-classes.yaml" 2> "$OUT/snapshot-classes.err"; then
    pass "kustomize build deploy/kubernetes/snapshot-classes"
    DEPLOY_ARGS+=(--fragment "snapshot-classes=$OUT/snapshot-classes.yaml:kustomize")
  else
    fail "kustomize build deploy/kubernetes/snapshot-classes" "$(tr '\n' ' ' < "$OUT/snapshot-classes.err")"
  fi
fi
if command -v kubectl >/dev/null; then
  if kubectl kustomize deploy/kubernetes > "$OUT/kubectl-kustomize.yaml" 2> "$OUT/kubectl.err"; then
    if [[ -f "$OUT/kustomize.yaml" ]] && ! cmp -s "$OUT/kustomize.yaml" "$OUT/kubectl-kustomize.yaml"; then
      fail "kubectl kustomize deploy/kubernetes" "output differs from kustomize $KUSTOMIZE_VERSION (diff $OUT/kustomize.yaml $OUT/kubectl-kustomize.yaml)"
    else
      pass "kubectl kustomize deploy/kubernetes ($(kubectl version --client 2>/dev/null | head -1))"
      [[ -f "$OUT/kustomize.yaml" ]] || DEPLOY_ARGS+=(--deploy "kustomize=$OUT/kubectl-kustomize.yaml")
    fi
  else
    fail "kubectl kustomize deploy/kubernetes" "$(tr '\n' ' ' < "$OUT/kubectl.err")"
  fi
else
  log "kubectl not installed: skipping the kubectl kustomize cross-check"
fi

NFS_SET=(--set kinds.nfs=true --set storageClasses.nfs.server=nfs.example.com --set storageClasses.nfs.share=/exports/berth)
helm_render() { # helm_render LABEL [helm args...]
  local lbl=$1; shift
  if "$HELM" template berth deploy/helm/berth --namespace berth-system --kube-version "${K8S_VERSIONS[0]}" "$@" \
      > "$OUT/$lbl.yaml" 2> "$OUT/$lbl.err"; then
    pass "helm template ($lbl)"
    DEPLOY_ARGS+=(--deploy "$lbl=$OUT/$lbl.yaml")
  else
    fail "helm template ($lbl)" "$(tr '\n' ' ' < "$OUT/$lbl.err")"
  fi
}
if [[ $have_helm == 0 ]]; then
  if "$HELM" lint deploy/helm/berth --strict "${NFS_SET[@]}" > "$OUT/helm-lint.log" 2>&1; then
    pass "helm lint --strict deploy/helm/berth"
  else
    fail "helm lint --strict deploy/helm/berth" "see $OUT/helm-lint.log"
  fi
  helm_render helm-default
  if grep -q '^kind: VolumeSnapshotClass' "$OUT/helm-default.yaml" 2>/dev/null; then
    fail "helm template without the snapshot CRDs renders no VolumeSnapshotClass" "it renders one"
  else
    pass "helm template without the snapshot CRDs renders no VolumeSnapshotClass"
  fi
  helm_render helm-snapshots "${NFS_SET[@]}" --api-versions snapshot.storage.k8s.io/v1/VolumeSnapshotClass
  if [[ $(grep -c '^kind: VolumeSnapshotClass' "$OUT/helm-snapshots.yaml" 2>/dev/null) == 3 ]]; then
    pass "helm template with the snapshot CRDs renders the local, block and nfs VolumeSnapshotClasses"
  else
    fail "helm template with the snapshot CRDs renders the local, block and nfs VolumeSnapshotClasses" "see $OUT/helm-snapshots.yaml"
  fi
  helm_render helm-nfs "${NFS_SET[@]}"
  helm_render helm-nfs-only "${NFS_SET[@]}" --set kinds.local=false --set kinds.block=false
  helm_render helm-options "${NFS_SET[@]}" --set kinds.local=false \
    --set 'diskPool={/dev/disk/by-id/nvme-*,/dev/sdb}' --set diskWipe=signatures --set maxVolumesPerNode=64 \
    --set logFormat=json --set logLevel=debug --set metrics.enabled=false \
    --set node.resizer.enabled=false --set controller.attacher.enabled=false \
    --set kubeletDir=/var/lib/k0s/kubelet --set dataDir=/srv/berth \
    --set driverNames.local=local.storage.example.org --set driverNames.nfs=nfs.storage.example.org \
    --set storageClasses.nfs.mountPermissions=0775
  # The chart must refuse an NFS StorageClass without a server.
  if "$HELM" template berth deploy/helm/berth --kube-version "${K8S_VERSIONS[0]}" --set kinds.nfs=true \
      > /dev/null 2> "$OUT/helm-nfs-missing.err"; then
    fail "helm template refuses kinds.nfs without server/share" "it rendered"
  elif grep -q "storageClasses.nfs.server" "$OUT/helm-nfs-missing.err"; then
    pass "helm template refuses kinds.nfs without server/share"
  else
    fail "helm template refuses kinds.nfs without server/share" "$(tr '\n' ' ' < "$OUT/helm-nfs-missing.err")"
  fi
  # A mode written in a values file without quotes is a YAML number
  # (0777 is 511, 0775 is 509): the class must get the mode meant or the
  # chart must refuse it, never the decimal digits as a mode ("511" is
  # mode 0511; "509" fails every CreateVolume).
  printf 'storageClasses:\n  nfs:\n    mountPermissions: 0777\n' > "$OUT/helm-mode-values.yaml"
  if "$HELM" template berth deploy/helm/berth --kube-version "${K8S_VERSIONS[0]}" "${NFS_SET[@]}" \
      -f "$OUT/helm-mode-values.yaml" > "$OUT/helm-mode.yaml" 2> "$OUT/helm-mode.err"; then
    if grep -qx '  mountPermissions: "0777"' "$OUT/helm-mode.yaml"; then
      pass "helm template takes mountPermissions 0777 unquoted in a values file as 0777 or refuses it"
    else
      fail "helm template takes mountPermissions 0777 unquoted in a values file as 0777 or refuses it" \
        "it renders $(grep -m1 'mountPermissions:' "$OUT/helm-mode.yaml" | tr -s ' ')"
    fi
  elif grep -q "storageClasses.nfs.mountPermissions" "$OUT/helm-mode.err"; then
    pass "helm template takes mountPermissions 0777 unquoted in a values file as 0777 or refuses it"
  else
    fail "helm template takes mountPermissions 0777 unquoted in a values file as 0777 or refuses it" "$(tr '\n' ' ' < "$OUT/helm-mode.err")"
  fi
  # image.tag given as a number: `--set image.tag=42` (a number to helm)
  # must give berth:42, and a values file's unquoted 1.10 (the number 1.1)
  # must be refused or give berth:1.10; never an image reference such as
  # berth:%!s(int64=42) that no node can pull.
  printf 'image:\n  tag: 1.10\n' > "$OUT/helm-tag-values.yaml"
  what="helm template renders a numeric image.tag as that tag or refuses it"
  if ! "$HELM" template berth deploy/helm/berth --kube-version "${K8S_VERSIONS[0]}" --set image.tag=42 \
      > "$OUT/helm-tag.yaml" 2> "$OUT/helm-tag.err"; then
    fail "$what" "--set image.tag=42: $(tr '\n' ' ' < "$OUT/helm-tag.err")"
  elif grep 'image: ' "$OUT/helm-tag.yaml" | grep -v 'registry.k8s.io/' | grep -vqx ' *image: berth:42'; then
    fail "$what" "--set image.tag=42 renders $(grep -m1 'image: berth' "$OUT/helm-tag.yaml" | tr -s ' ')"
  elif "$HELM" template berth deploy/helm/berth --kube-version "${K8S_VERSIONS[0]}" -f "$OUT/helm-tag-values.yaml" \
      > "$OUT/helm-tag.yaml" 2> "$OUT/helm-tag.err"; then
    if grep 'image: ' "$OUT/helm-tag.yaml" | grep -v 'registry.k8s.io/' | grep -vqx ' *image: berth:1.10'; then
      fail "$what" "tag 1.10 in a values file renders $(grep -m1 'image: berth' "$OUT/helm-tag.yaml" | tr -s ' ')"
    else
      pass "$what"
    fi
  elif grep -q "image.tag" "$OUT/helm-tag.err"; then
    pass "$what"
  else
    fail "$what" "$(tr '\n' ' ' < "$OUT/helm-tag.err")"
  fi
  # Numbers from a values file reach templates as floats, which print in
  # e-notation from a million up: --max-volumes-per-node=1e+06 is refused
  # by berth's parser, and berth then does not start on any node.
  printf 'maxVolumesPerNode: 1000000\n' > "$OUT/helm-maxvol-values.yaml"
  what="helm template passes maxVolumesPerNode 1000000 from a values file as digits"
  if "$HELM" template berth deploy/helm/berth --kube-version "${K8S_VERSIONS[0]}" "${NFS_SET[@]}" \
      -f "$OUT/helm-maxvol-values.yaml" > "$OUT/helm-maxvol.yaml" 2> "$OUT/helm-maxvol.err"; then
    got=$(grep -c -- '- --max-volumes-per-node=' "$OUT/helm-maxvol.yaml")
    good=$(grep -cx -- ' *- --max-volumes-per-node=1000000' "$OUT/helm-maxvol.yaml")
    if [[ $got == 2 && $good == 2 ]]; then
      pass "$what"
    else
      fail "$what" "$got flags, $good as 1000000: $(grep -m1 -- '--max-volumes-per-node=' "$OUT/helm-maxvol.yaml" | tr -s ' ')"
    fi
  else
    fail "$what" "$(tr '\n' ' ' < "$OUT/helm-maxvol.err")"
  fi
fi

# ---- validate ------------------------------------------------------------------
VALIDATE_ARGS=()
# Sidecar images must name the versions the test cluster builds.
for pv in csi-provisioner:PROVISIONER csi-attacher:ATTACHER csi-resizer:RESIZER \
    csi-node-driver-registrar:REGISTRAR livenessprobe:LIVENESSPROBE csi-snapshotter:SNAPSHOTTER; do
  v=$(sed -n "s/^${pv#*:}_VERSION=//p" tests/cluster/lib.sh)
  [[ -n "$v" ]] && VALIDATE_ARGS+=(--pin "${pv%%:*}=$v")
done
# The VolumeSnapshot CRDs of that external-snapshotter release (its client
# module, from the Go module proxy), to validate the snapshot classes.
SNAP_VERSION=$(sed -n 's/^SNAPSHOTTER_VERSION=//p' tests/cluster/lib.sh)
if crd_dir=$(cd "$OUT" && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json \
    "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAP_VERSION" 2> "$OUT/crd-download.err" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p') && [[ -n "$crd_dir" && -d "$crd_dir/config/crd" ]]; then
  for f in "$crd_dir"/config/crd/snapshot.storage.k8s.io_*.yaml; do VALIDATE_ARGS+=(--crd "$f"); done
  pass "VolumeSnapshot CRDs of external-snapshotter $SNAP_VERSION"
else
  fail "VolumeSnapshot CRDs of external-snapshotter $SNAP_VERSION" "go mod download failed: $(tr '\n' ' ' < "$OUT/crd-download.err")"
fi
for v in "${K8S_VERSIONS[@]}"; do VALIDATE_ARGS+=(--k8s-version "$v"); done
VALIDATE_ARGS+=("${DEPLOY_ARGS[@]}")
if [[ -f "$OUT/kustomize.yaml" || -f "$OUT/kubectl-kustomize.yaml" ]]; then
  VALIDATE_ARGS+=(--fragment "storageclass-nfs=deploy/kubernetes/storageclass-nfs.yaml:kustomize")
  [[ -f "$OUT/helm-nfs.yaml" ]] && VALIDATE_ARGS+=(--compare "kustomize+storageclass-nfs=helm-nfs")
fi
for f in examples/*.yaml; do VALIDATE_ARGS+=(--example "$f"); done
if [[ $have_kustomize == 0 && $have_helm == 0 ]]; then
  VALIDATE_ARGS+=(--args-fixture tests/manifests/berth-args.json)
  [[ "${BERTH_UPDATE_FIXTURES:-}" == 1 ]] && VALIDATE_ARGS+=(--update-fixture)
fi

# Rendered output stays in target/manifests/ for inspection and for
# tests/manifests/extract_berth_args.py.
log "validating (rendered manifests in ${OUT#"$ROOT"/}/)"
"$VENV/bin/python" tests/manifests/validate.py --extra-results "$RESULTS" "${VALIDATE_ARGS[@]}"
