#!/bin/bash
# Local volumes held to their size by project quotas, in the test guest (as
# root; this host's kernel has no quotas):
#   tests/vm/quota.sh
# Builds on the host what the guest needs (the release berth for csi-sanity
# and the bench; the root_quota integration test binary, in the dev profile
# that `cargo test` has built already; csi-sanity comes from
# tests/install-deps.sh), builds the guest if needed (cached), boots it once
# with quota/run.sh: the integration tests on xfs and ext4, csi-sanity in
# local mode on a prjquota root, start-up log and metric, and the lifecycle
# bench with quotas against without. Prints the guest's summary; exits
# non-zero on any failure.
# Env: CARGO_TARGET_DIR, CSI_SANITY (default target/tools/bin/csi-sanity),
# QUOTA_VM_TIMEOUT (default 1200 s), QUOTA_BENCH_CYCLES (default 10),
# KEEP_SHARE=1 keeps the share directory (kept anyway on failure).
. "$(dirname "$0")/host-lib.sh" quota root_quota
install -m 0644 "$ROOT/csi-sanity/local.yaml" "$SHARE/csi-sanity/local.yaml"
install -m 0755 "$HERE/quota/run.sh" "$SHARE/run.sh"
[ -n "${QUOTA_BENCH_CYCLES:-}" ] && sed -i "s/^CYCLES=.*/CYCLES=$QUOTA_BENCH_CYCLES/" "$SHARE/run.sh"
guest_run "${QUOTA_VM_TIMEOUT:-1200}" quota '^(xfs|ext4): '
