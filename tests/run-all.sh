#!/bin/bash
# Runs every test of Berth on a fresh machine, as root. This is the README's
# test command and what CI runs (.ci/run).
#   1. installs what is missing (tests/install-deps.sh)
#   2. cargo fmt --check, cargo clippy -D warnings
#   3. unit and handler tests (recording fakes, no root), binary tests
#   4. root integration tests with real mounts, in a private mount namespace
#      (block volumes also inside the full-kernel qemu guest of tests/vm/,
#      where root may resize ext4 online: see tests/vm-block.sh)
#   5. the README walkthrough against a running berth
#   6. csi-sanity (pinned) for every volume kind available; NFS (csi-sanity
#      and the root_nfs integration tests) inside the full-kernel guest
#      against its kernel NFS server (tests/vm/nfs.sh); local volumes with
#      project quotas on xfs and ext4 (integration tests, csi-sanity, the
#      lifecycle bench with and without quotas) in the guest too
#      (tests/vm/quota.sh)
#   7. `berth bench` against a CSI driver that is not Berth (a Python grpcio
#      driver, tests/foreign/) and against berth (bench/run.sh --quick)
#   8. Kubernetes manifest and Helm chart validation
#   9. Berth in a real single-node Kubernetes built here (tests/cluster/):
#      its image from the Dockerfile, the real CSI sidecars, installed with
#      kustomize (two kubelet directories) and Helm, the scenarios and the
#      focused Kubernetes e2e storage suite; everything is cached under
#      /var/cache/berth-k8s and torn down afterwards
# and checks that no mount or loop device was leaked. Fails on the first
# failing stage; prints "N passed, M failed" for the stages at the end.
#
# Two tracks run at once once clippy passes, on this 2-core machine's
# otherwise idle time: the release build's link is one thread, the cluster
# stage mostly waits for pods, and each guest uses one core. Track "host" (the release build, the README
# walkthrough, csi-sanity, benches, both full-kernel guests) runs in the
# background, its output kept in a log that is printed when it ends; the
# cluster track runs in the foreground. A failure in either fails the run.
#   run-all.sh --track host   that track alone (what the background runs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ "$(id -u)" = 0 ] || { echo "run-all.sh must run as root (it mounts)"; exit 1; }

PASSED=0; FAILED=0
stage() {
  local name=$1; shift
  echo
  echo "=== $name"
  local t0=$SECONDS
  if "$@"; then
    PASSED=$((PASSED + 1)); echo "=== $name: ok ($((SECONDS - t0)) s)"
  else
    FAILED=$((FAILED + 1)); echo "=== $name: FAILED ($((SECONDS - t0)) s)"
    echo "stages: $PASSED passed, $FAILED failed"
    exit 1
  fi
}

host_track() {
  stage "build (release, glibc static as the image ships it)" tests/build-release.sh --bins --examples
  stage "README walkthrough" tests/walkthrough.sh
  stage "csi-sanity local" csi-sanity/run.sh local
  stage "csi-sanity block-raw" csi-sanity/run.sh block-raw
  stage "csi-sanity block-ext4" csi-sanity/run.sh block-ext4
  stage "csi-sanity block-xfs" csi-sanity/run.sh block-xfs
  stage "berth bench against a CSI driver that is not Berth" tests/foreign/run.sh
  stage "berth bench against berth (bench/run.sh --quick; numbers printed, not asserted)" bench/run.sh --quick
  stage "root block tests in the full-kernel guest" tests/vm-block.sh
  stage "NFS volumes in the full-kernel guest" tests/vm/nfs.sh
  stage "local volumes held to their size by project quotas in the full-kernel guest" tests/vm/quota.sh
  echo "$PASSED $FAILED" > "${TRACK_RESULT:-/dev/null}"
}
if [ "${1:-}" = --track ]; then
  [ "${2:-}" = host ] || { echo "usage: run-all.sh [--track host]"; exit 2; }
  host_track
  exit 0
fi

mounts_before=$(wc -l </proc/self/mountinfo)
loops_before=$(losetup -a 2>/dev/null | wc -l)

# the host track and the cluster's prebuild in the background, each in a
# process group of its own so that it is stopped (its traps clean up) if
# this script ends first
TRACK_DIR=$(mktemp -d /tmp/berth-run-all.XXXXXX)
TRACK_PID=
PREBUILD_PID=
stop_prebuild() {
  if [ -n "$PREBUILD_PID" ] && kill -0 "$PREBUILD_PID" 2>/dev/null; then
    echo "run-all: stopping the cluster's prebuild"
    kill -TERM -- "-$PREBUILD_PID" 2>/dev/null || true
    wait "$PREBUILD_PID" 2>/dev/null || true
    echo "--- cluster prebuild output (stopped)"; tail -40 "$TRACK_DIR/prebuild.log"
  fi
  PREBUILD_PID=
}
stop_track() {
  stop_prebuild
  if [ -n "$TRACK_PID" ] && kill -0 "$TRACK_PID" 2>/dev/null; then
    echo "run-all: stopping the host track"
    kill -TERM -- "-$TRACK_PID" 2>/dev/null || true
    # `|| true`: under `set -e` a track killed by the signal (wait's status
    # 143) ended this trap here, before the log and the removal below
    wait "$TRACK_PID" 2>/dev/null || true
    echo "--- host track output (stopped)"; cat "$TRACK_DIR/log"
  elif [ -n "$TRACK_PID" ]; then
    # a main-track stage failed after the host track had ended: its
    # output still belongs in the log
    wait "$TRACK_PID" 2>/dev/null || true
    echo "--- host track output (it had ended)"; cat "$TRACK_DIR/log"
  fi
  rm -rf "$TRACK_DIR"
}
trap stop_track EXIT

stage "install dependencies" tests/install-deps.sh
# Everything the cluster stage runs (tests/cluster/build.sh all: Debian
# packages, Kubernetes, the sidecars, e2e.test, the container images with
# Berth's from the Dockerfile) is built from here on in the background at
# the lowest CPU priority, so that it takes only the time the stages before
# the cluster leave idle (a warm run: Berth's image, about 2 min; a cold one:
# the Go builds, about 30 min). The cluster stage raises it to normal
# priority and waits for it; build.sh's lock would make run.sh's own
# build.sh wait for it too, and then find everything built (or build again
# what this one did not finish, and fail there, visibly).
PREBUILD_T0=$SECONDS
setsid nice -n 19 tests/cluster/build.sh all > "$TRACK_DIR/prebuild.log" 2>&1 < /dev/null &
PREBUILD_PID=$!
echo "=== the cluster's builds started in the background at the lowest priority (tests/cluster/build.sh all); its output follows at the cluster stage"
# every process of the prebuild at normal priority (its children spawned
# later inherit it from their parents)
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
cluster_stage() {
  if [ -n "$PREBUILD_PID" ]; then
    local t0=$SECONDS rc=0 p
    for p in "$PREBUILD_PID" $(descendants "$PREBUILD_PID"); do renice -n 0 -p "$p" > /dev/null 2>&1 || true; done
    wait "$PREBUILD_PID" || rc=$?
    PREBUILD_PID=
    echo "--- cluster prebuild output (exit $rc; ended $((SECONDS - PREBUILD_T0)) s after it began, $((SECONDS - t0)) s waited here)"
    cat "$TRACK_DIR/prebuild.log"
    echo "--- end of cluster prebuild output"
    # a failed prebuild is not the verdict: run.sh's build.sh builds what
    # is missing and fails the stage itself if it cannot
  fi
  tests/cluster/run.sh
}
stage "cargo fmt" cargo fmt --check
stage "cargo clippy" cargo clippy --all-targets --locked -- -D warnings
TRACK_RESULT=$TRACK_DIR/result setsid "$0" --track host > "$TRACK_DIR/log" 2>&1 < /dev/null &
TRACK_PID=$!
echo
echo "=== host track started in the background (release build, walkthrough, csi-sanity, benches, guests); its output follows the cluster's"

stage "unit, handler and binary tests (tests/unit.sh: cargo test, three test binaries at a time)" tests/unit.sh
stage "root integration tests" unshare --mount --propagation private -- \
  cargo test --locked --test root_local --test root_multinode --test root_kill --test root_pid1 -- --ignored --test-threads=4
# a_refused_stage_leaves_no_attachment detaches a loop device by hand
# under its binds: while they last, any other test's stage that gets that
# device number is (rightly) refused; a_reboot_under_a_raw_publish_leaves_
# nothing_behind detaches its volume's device and attaches a file of its
# own at the freed number, which another test's attach may take first
# (CI once: "losetup /dev/loop0 .../unrelated.img" failed);
# a_claim_let_go_beside_spawning_commands_leaves_the_disk_free_at_once
# counts a disk held right after berth let it go, which the children that
# other tests spawn themselves (std's Command, not berth's runner, whose
# spawns berth's closes wait for) can hold for a moment (CI once: 4 of
# 1,587). a_detached_loop_disk_is_missing_and_only_its_own_file_is_wiped
# detaches its pool disk's loop device and reads the freed number's size
# (0), which another test's attach (each takes the lowest free number) can
# take first (CI on a fresh machine once: 64 MiB, another test's file). They
# run alone.
stage "root block tests" unshare --mount --propagation private -- \
  cargo test --locked --test root_block -- --ignored --test-threads=4 \
  --skip a_refused_stage_leaves_no_attachment --skip a_reboot_under_a_raw_publish_leaves_nothing_behind \
  --skip a_claim_let_go_beside_spawning_commands_leaves_the_disk_free_at_once \
  --skip a_detached_loop_disk_is_missing_and_only_its_own_file_is_wiped
stage "root block tests that detach a loop device by hand (alone)" unshare --mount --propagation private -- \
  cargo test --locked --test root_block -- --ignored --test-threads=1 \
  --exact a_refused_stage_leaves_no_attachment a_reboot_under_a_raw_publish_leaves_nothing_behind \
  a_claim_let_go_beside_spawning_commands_leaves_the_disk_free_at_once \
  a_detached_loop_disk_is_missing_and_only_its_own_file_is_wiped
stage "root snapshot tests" unshare --mount --propagation private -- \
  cargo test --locked --test root_snapshots -- --ignored --test-threads=2
# block volumes: berth killed at swept moments of each RPC, restarted, the
# CO's retries replayed (its block root on an ext4 of its own, so that
# capacity is compared exactly)
stage "root block kill tests" unshare --mount --propagation private -- \
  env PROBE_OWN_FS=1 cargo test --locked --test root_kill_block -- --ignored --test-threads=1

stage "manifest validation" bash tests/manifests/validate.sh
stage "Berth in a real Kubernetes cluster (tests/cluster/run.sh)" cluster_stage

track_done() {
  local t0=$SECONDS rc=0
  wait "$TRACK_PID" || rc=$?
  TRACK_PID=
  echo "(waited $((SECONDS - t0)) s for the host track)"
  echo "--- host track output"
  cat "$TRACK_DIR/log"
  echo "--- end of host track output"
  local p f
  read -r p f 2>/dev/null < "$TRACK_DIR/result" || { p=0; f=1; }
  PASSED=$((PASSED + p)); FAILED=$((FAILED + f))
  [ "$rc" = 0 ] && [ "$f" = 0 ] && [ -s "$TRACK_DIR/result" ]
}
stage "host track (its stages above)" track_done

mounts_after=$(wc -l </proc/self/mountinfo)
loops_after=$(losetup -a 2>/dev/null | wc -l)
leaks() {
  echo "mounts: $mounts_before before, $mounts_after after; loop devices: $loops_before before, $loops_after after"
  [ "$mounts_after" -le "$mounts_before" ] && [ "$loops_after" -le "$loops_before" ]
}
stage "no leaked mounts or loop devices" leaks
echo
echo "stages: $PASSED passed, $FAILED failed"
