#!/bin/bash
# snapshot-addon.sh: installs the VolumeSnapshot CRDs and the
# snapshot-controller into the running test cluster, the way
# deploy/README-install.md tells users to: external-snapshotter's own
# kustomizations (client/config/crd and deploy/kubernetes/snapshot-controller
# of the release deploy/ names, copied into the cache by build.sh), with an
# overlay for what Berth needs and this cluster differs in:
#   --enable-distributed-snapshotting  Berth's node-local snapshots are made
#       by the csi-snapshotter on the volume's node (--node-deployment); the
#       controller labels each VolumeSnapshotContent with that node, and
#       needs to read nodes for it (the rule upstream leaves commented out)
#   the image tag of this release, one replica, no leader election, no 35 s
#       minReadySeconds (one node, nothing to roll)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ADDON=$CACHE/snapshot-addon-$SNAPSHOTTER_VERSION
[ -f "$ADDON/crd/kustomization.yaml" ] || die "$ADDON missing: build.sh sidecars first"
t=$SECONDS
ov=$RUN/snapshot-addon
rm -rf "$ov"; mkdir -p "$ov"
crd=$(realpath --relative-to="$ov" "$ADDON/crd")
ctl=$(realpath --relative-to="$ov" "$ADDON/snapshot-controller")
cat > "$ov/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $crd
  - $ctl
images:
  - name: registry.k8s.io/sig-storage/snapshot-controller
    newTag: $SNAPSHOTTER_VERSION
patches:
  - target: {kind: Deployment, name: snapshot-controller}
    patch: |
      - op: replace
        path: /spec/replicas
        value: 1
      - op: replace
        path: /spec/minReadySeconds
        value: 0
      - op: replace
        path: /spec/template/spec/containers/0/args
        value: ["--v=2", "--leader-election=false", "--enable-distributed-snapshotting"]
  - target: {kind: ClusterRole, name: snapshot-controller-runner}
    patch: |
      - op: add
        path: /rules/-
        value: {apiGroups: [""], resources: ["nodes"], verbs: ["get", "list", "watch"]}
YAML
"$CACHE/tools/kustomize" build "$ov" > "$ov/rendered.yaml"
# CRDs first: the same apply cannot create objects of a kind it defines.
kubectl_ apply -k "$ADDON/crd" > "$LOGS/snapshot-addon.log" 2>&1 || die "applying the VolumeSnapshot CRDs failed: $(tail -5 "$LOGS/snapshot-addon.log")"
kubectl_ wait --for condition=established --timeout=60s crd/volumesnapshotclasses.snapshot.storage.k8s.io \
  crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshots.snapshot.storage.k8s.io >> "$LOGS/snapshot-addon.log"
kubectl_ apply -f "$ov/rendered.yaml" >> "$LOGS/snapshot-addon.log" || die "applying the snapshot add-on failed: $(tail -5 "$LOGS/snapshot-addon.log")"
kubectl_ -n kube-system rollout status deployment/snapshot-controller --timeout=180s > /dev/null \
  || { kubectl_ -n kube-system get pods -o wide; die "snapshot-controller not ready"; }
say "snapshot add-on (CRDs, snapshot-controller $SNAPSHOTTER_VERSION) installed in $((SECONDS - t)) s"
