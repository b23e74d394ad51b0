#!/bin/bash
# NFS volumes against a real kernel NFS server, in the test guest (as root):
#   tests/vm/nfs.sh
# Builds on the host what the guest needs (the release berth for
# csi-sanity; the root_nfs integration test binary, in the dev profile that
# `cargo test` has built already; csi-sanity comes from
# tests/install-deps.sh), builds the guest if needed (cached), boots it once
# with nfs/run.sh: csi-sanity in NFS mode, the integration tests, the
# canary. Prints the guest's summary; exits non-zero on any failure.
# Env: CARGO_TARGET_DIR, CSI_SANITY (default target/tools/bin/csi-sanity),
# NFS_VM_TIMEOUT (default 1500 s, as tests/vm-block.sh), KEEP_SHARE=1 keeps the share directory
# (kept anyway on failure).
. "$(dirname "$0")/host-lib.sh" nfs root_nfs
install -m 0755 "$HERE/nfs/nfs-ctl.sh" "$SHARE/bin/berth-nfs-ctl"
install -m 0755 "$HERE/nfs/run.sh" "$SHARE/run.sh"
guest_run "${NFS_VM_TIMEOUT:-1500}" NFS
