# syntax=docker/dockerfile:1
#
# Berth CSI driver image: one binary, /usr/local/bin/berth.
#   docker build -t berth:0.1.0 .
#
# The same image runs every Berth container (node plugin and controller);
# the mode and volume kinds come from the flags in deploy/.

# ---- build -----------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# build.rs compiles proto/csi.proto with protox (pure Rust): no protoc needed.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# glibc linked statically: about 1 MiB less resident memory and a faster
# start than with the shared libraries (README, "Performance"); --target
# keeps the flag off build scripts and proc-macros.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    triple="$(uname -m)-unknown-linux-gnu" \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$triple" \
 && install -D -m 0755 "target/$triple/release/berth" /out/berth

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim
# Tools berth runs on the node:
#   util-linux  blkid, lsblk, wipefs, blockdev, findmnt, fallocate
#   mount       mount, umount, losetup (Debian ships these in "mount")
#   e2fsprogs   mkfs.ext4, resize2fs, e2fsck, e2undo
#   xfsprogs    mkfs.xfs, xfs_growfs
#   nfs-common  mount.nfs / mount.nfs4
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      util-linux mount e2fsprogs xfsprogs nfs-common \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/berth /usr/local/bin/berth
# No USER: Berth runs as root.
#  - The node plugin must: it calls mount(2), sets up loop devices, formats
#    and grows file systems and bind-mounts volumes into kubelet's pod
#    directories (deploy/ also makes those containers privileged).
#  - The NFS controller serves no node, but CreateVolume/DeleteVolume mount
#    the NFS share to create, chmod and remove a volume's subdirectory;
#    mounting needs root (CAP_SYS_ADMIN), and creating directories owned
#    by root on a share with no_root_squash needs uid 0 as well.
# berth is the container's PID 1 (no init before it): it waits for the
# processes its commands leave behind itself (README, "State and
# concurrency").
ENTRYPOINT ["/usr/local/bin/berth"]
