#!/bin/bash
# install.sh kustomize|helm: installs Berth into the running test cluster the
# way deploy/README-install.md tells users, and waits until its pods are
# Ready. The only differences from a user's install are the Berth image
# (the one images.sh built from the Dockerfile) and, when kubelet's root is
# not /var/lib/kubelet, that directory; both are set the documented way:
#   kustomize  an overlay of deploy/kubernetes made with `kustomize create`
#              and `kustomize edit set image`, plus the kubelet-dir component
#              and its ConfigMap; `kubectl apply -k`
#   helm       `helm install` of deploy/helm/berth with image.repository,
#              image.tag and kubeletDir
# The snapshot classes: `kubectl apply -k deploy/kubernetes/snapshot-classes`
# after the kustomize install; the chart renders them itself when the
# cluster has the VolumeSnapshot CRDs (snapshot-addon.sh, run before).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
how=${1:?usage: install.sh kustomize|helm}
KUBELET_ROOT=$(cat "$RUN/kubelet-root")
IMAGE=$(cat "$IMAGES/berth-image")
t=$SECONDS
case $how in
  kustomize)
    ov=$RUN/install
    rm -rf "$ov"; mkdir -p "$ov"
    base=$(realpath --relative-to="$ov" "$ROOT/deploy/kubernetes")
    (
      cd "$ov"
      "$CACHE/tools/kustomize" create --resources "$base"
      "$CACHE/tools/kustomize" edit set image "berth=$IMAGE"
      if [ "$KUBELET_ROOT" != /var/lib/kubelet ]; then
        cat > kubelet-dir.yaml <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: berth-kubelet-dir
  annotations:
    config.kubernetes.io/local-config: "true"
data:
  kubeletDir: $KUBELET_ROOT
YAML
        "$CACHE/tools/kustomize" edit add resource kubelet-dir.yaml
        "$CACHE/tools/kustomize" edit add component "$base/components/kubelet-dir"
      fi
    )
    kubectl_ apply -k "$ov" > "$LOGS/install.log"
    # the snapshot classes, once the CRDs are there (snapshot-addon.sh)
    kubectl_ apply -k "$ROOT/deploy/kubernetes/snapshot-classes" >> "$LOGS/install.log"
    ;;
  helm)
    kubectl_ create namespace berth-system > "$LOGS/install.log"
    kubectl_ label namespace berth-system pod-security.kubernetes.io/enforce=privileged >> "$LOGS/install.log"
    "$CACHE/tools/helm" --kubeconfig "$KUBECONFIG_FILE" install berth "$ROOT/deploy/helm/berth" -n berth-system \
      --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
      --set kubeletDir="$KUBELET_ROOT" >> "$LOGS/install.log"
    touch "$RUN/helm-release"
    ;;
  *) die "usage: install.sh kustomize|helm" ;;
esac
echo "$how" > "$RUN/installed-with"
# The DaemonSet and the StatefulSet exist once apply returns; wait for their
# pods.
kubectl_ -n berth-system rollout status daemonset/berth-node --timeout=300s > /dev/null \
  || { kubectl_ -n berth-system get pods -o wide; kubectl_ -n berth-system describe pods | tail -40; die "berth-node not ready"; }
if kubectl_ -n berth-system get statefulset berth-controller > /dev/null 2>&1; then
  kubectl_ -n berth-system rollout status statefulset/berth-controller --timeout=300s > /dev/null \
    || { kubectl_ -n berth-system get pods -o wide; die "berth-controller not ready"; }
fi
# A Ready pod is not yet a registered driver: kubelet adds it to the node's
# CSINode once node-driver-registrar has answered its plugin watcher, which
# can come seconds later. Nothing can be mounted until then.
want=local.berth.csi.io
kubectl_ -n berth-system get daemonset berth-node -o jsonpath='{.spec.template.spec.containers[*].name}' \
  | grep -qw berth-nfs-node && want="$want nfs.berth.csi.io"
for d in $want; do
  tr=$SECONDS
  until kubectl_ get csinode -o jsonpath='{range .items[*].spec.drivers[*]}{.name}{"\n"}{end}' 2> /dev/null | grep -qx "$d"; do
    [ $((SECONDS - tr)) -lt 120 ] || { kubectl_ get csinode -o yaml; die "$d not registered in CSINode after 120 s"; }
    sleep 1
  done
done
say "Berth installed with $how ($IMAGE, kubelet root $KUBELET_ROOT) in $((SECONDS - t)) s"
