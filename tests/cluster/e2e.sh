#!/bin/bash
# e2e.sh focused|full: Kubernetes' own external storage tests (e2e.test of
# the same Kubernetes version, built by build.sh e2e) against Berth in the
# running test cluster, once per driver definition in tests/cluster/e2e/
# (local directory volumes, block volumes), the way CSI drivers validate
# themselves upstream.
#   focused  what CI runs: the provisioning (restores and clones from
#            snapshot and PVC data sources included), volumes, volumeMode,
#            volumeIO, multiVolume, capacity and volume-expand suites,
#            [Slow] left out (the snapshottable suite, ~3 min here, is in
#            full; suite.sh's snapshot scenarios run in every round)
#   full     every External.Storage spec, [Slow] included
# Specs this host cannot run are skipped by name, each with its reason
# (HOST_LIMITS below); every other skip is the suite's own, for a capability
# the definition does not claim. Prints "N passed, M failed, K skipped" last.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
what=${1:-focused}
case $what in
  focused) FOCUS='External.Storage.*\] (provisioning|volumes|volumeMode|volumeIO|multiVolume|capacity|volume-expand) '
    SLOW='|\[Slow\]' ;;
  full) FOCUS='External.Storage'; SLOW='' ;;
  *) die "usage: e2e.sh focused|full" ;;
esac
# Specs this host cannot run, and why. Each is also run in the full-kernel
# guest or stands for a limit documented in the README.
HOST_LIMITS=(
  # its host-exec pod runs nsenter --mount=/rootfs/proc/1/ns/mnt; on this
  # host even root is denied /proc/1/ns/mnt
  'volumeMode should not mount / map unused volumes in a pod'
  # online and offline ext4 growth need CAP_SYS_RESOURCE, which root lacks
  # here (tests/vm-block.sh grows ext4 in the full-kernel guest)
  '\((default fs|ext4)\)[^\]]*\] volume-expand'
  '\((default fs|ext4)\)[^\]]*\] ephemeral should support expansion'
  # runs sig-storage's volume-data-source-validator and hello-populator
  # images; their sources are not on the Go module proxy, so they are not
  # built here
  'provisioning should provision storage with any volume data source'
)
# Specs that ask for what Berth's design does not give, and why (the README
# says so too).
BERTH_LIMITS=(
  # distributed snapshotting: the csi-snapshotter of each node acts only on
  # VolumeSnapshotContents labelled snapshot.storage.kubernetes.io/
  # managed-by=<node>; the snapshot-controller sets it for dynamic
  # snapshots, but a pre-provisioned content needs it from whoever makes
  # it, and the suite does not set it (the snapshot then never gets ready)
  'Pre-provisioned Snapshot'
  # a local directory volume shows its filesystem's size unless the local
  # root enforces project quotas (this host's kernel has none): a restore
  # into a larger PVC cannot show a larger filesystem
  'Driver: local\.berth\.csi\.io\].*restoring snapshot to larger size pvc'
)
SKIP=$(IFS='|'; echo "${HOST_LIMITS[*]}|${BERTH_LIMITS[*]}")$SLOW
out=$CACHE/logs/e2e
mkdir -p "$out"
# The e2e framework writes a test-kuberc<N> directory into TMPDIR for each
# kubectl it sets up and leaves them: give it a directory of its own,
# removed at the end.
E2E_TMP=$(mktemp -d /tmp/berth-e2e.XXXXXX)
trap 'rm -rf "$E2E_TMP"' EXIT
# one definition: its ginkgo run, then its summary lines and its counts
# ("COUNTS passed failed skipped" last) into $out/summary-$what-$def
run_def() {
  local def=$1 t=$SECONDS log=$out/$what-$1.log rc summary p f s tmp=$E2E_TMP/$1
  rm -rf "$out/report-$what-$def"
  mkdir -p "$tmp"
  # three parallel processes: the specs mostly wait for pods and volumes
  TMPDIR=$tmp "$K8S_BIN/ginkgo" --procs="${E2E_PROCS:-3}" --focus="$FOCUS" --skip="$SKIP" --no-color --timeout="${E2E_TIMEOUT:-2h}" \
    --output-dir="$out/report-$what-$def" --junit-report=junit.xml \
    "$K8S_BIN/e2e.test" -- -kubeconfig="$KUBECONFIG_FILE" -storage.testdriver="$CLUSTER_DIR/e2e/$def.yaml" \
    -disable-log-dump -node-schedulable-timeout=2m > "$log" 2>&1
  rc=$?
  # passed, failed and skipped specs of the focus (specs the focus never
  # selected are not counted), with the reason of each skip and failure
  summary=$(python3 - "$out/report-$what-$def/junit.xml" <<'PY'
import collections, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print("RESULT none"); print("  no junit report: %s" % e); sys.exit()
p = f = 0
skips = collections.Counter()
fails = []
for tc in root.iter("testcase"):
    name = tc.get("name", "")
    if tc.find("failure") is not None or tc.find("error") is not None:
        f += 1; fails.append(name)
    elif tc.find("skipped") is not None:
        msg = tc.find("skipped").get("message", "")
        if "External" not in name or msg.strip() in ("", "skipped"):
            continue  # filtered out by focus or skip
        skips[msg.split("\n")[0][:160]] += 1
    elif "External" in name:
        p += 1
print("RESULT %d %d %d" % (p, f, sum(skips.values())))
for m, n in skips.most_common():
    print("  skipped %3d: %s" % (n, m))
for n in fails:
    print("  FAILED: %s" % n)
PY
)
  read -r _ p f s <<< "$(echo "$summary" | head -1)"
  {
    echo "e2e $what $def: $(grep -oE 'Ran [0-9]+ of [0-9]+ Specs in [0-9.]+ seconds' "$log" | tail -1) ($((SECONDS - t)) s)"
    echo "$summary" | tail -n +2
    if [ "$p" = none ] || [ -z "$p" ]; then
      echo "FAIL e2e $def: no report (exit $rc), see $log"; tail -20 "$log"
      echo "COUNTS 0 1 0"
      return
    fi
    echo "e2e $def: $p passed, $f failed, $s skipped"
    [ "$rc" = 0 ] || [ "$f" -gt 0 ] || { echo "FAIL e2e $def: exit $rc with no failed spec, see $log"; f=$((f + 1)); }
    echo "COUNTS $p $f $s"
  } > "$out/summary-$what-$def"
}
# The two definitions at once (their specs mostly wait for pods and volumes,
# each in namespaces of its own), their summaries printed in order.
P=0 F=0 S=0
pids=()
for def in local block; do
  rm -f "$out/summary-$what-$def"
  run_def "$def" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
for def in local block; do
  if [ ! -s "$out/summary-$what-$def" ]; then
    echo "FAIL e2e $def: no summary"; F=$((F + 1)); continue
  fi
  grep -v '^COUNTS ' "$out/summary-$what-$def"
  read -r _ p f s <<< "$(grep '^COUNTS ' "$out/summary-$what-$def" | tail -1)"
  P=$((P + p)) F=$((F + f)) S=$((S + s))
done
echo "skipped by name for this host's limits: ${HOST_LIMITS[*]}"
echo "skipped by name for Berth's design: ${BERTH_LIMITS[*]}"
echo "$P passed, $F failed, $S skipped"
[ "$F" = 0 ]
