#!/bin/bash
# Builds the container images the test cluster runs, with buildah (Debian's
# package) and no registry to pull from, and saves each as a docker-archive
# under $IMAGES (up.sh imports them into containerd):
#   debian:bookworm-slim   a Debian bookworm bootstrapped with mmdebstrap,
#                          the runtime base the Dockerfile names
#   rust:1-bookworm        that base with build-essential and the Rust
#                          toolchain this machine builds Berth with, the
#                          builder the Dockerfile names
#   berth                  the project's Dockerfile, built by buildah; tagged
#                          with a hash of its inputs (Dockerfile, Cargo.*,
#                          build.rs, proto/, src/)
#   the CSI sidecars       each binary of build.sh on an empty base, under the
#                          exact name deploy/ uses
#   busybox:1.36, pause    busybox-static from Debian
#   the e2e test images   busybox, agnhost (built by build.sh e2e), a glibc
#                          image with GNU coreutils, nginx (a shell), pause,
#                          under the names
#                          Kubernetes' e2e suite of $K8S_VERSION uses
# usage: images.sh [all|base|berth|sidecars|small|e2e]...
# Every image is keyed by what it is made from, so a warm run builds nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || {
  say "apt-get install buildah mmdebstrap"
  ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah mmdebstrap >/dev/null
}
BUILDAH_DIR=$CACHE/buildah
mkdir -p "$IMAGES" "$BUILDAH_DIR/tmp"
# buildah keeps its images and the Dockerfile's RUN --mount=type=cache
# directories (cargo registry and target) under $TMPDIR: both in the cache.
export TMPDIR=$BUILDAH_DIR/tmp
bah() { buildah --root "$BUILDAH_DIR/storage" --runroot /run/berth-buildah --storage-driver overlay "$@"; }
# working containers left by an interrupted run of this script (this
# storage is the harness's own)
bah rm --all > /dev/null
has_image() { bah inspect --type image "$1" >/dev/null 2>&1; }
archive() { # image-name: path of its docker-archive
  echo "$IMAGES/$(echo "$1" | tr '/:' '__').tar"; }
save() { # image-name: docker-archive for containerd
  local out; out=$(archive "$1")
  [ -f "$out" ] && return 0
  rm -f "$out.tmp"
  bah push -q "$1" "docker-archive:$out.tmp:$1"
  mv "$out.tmp" "$out"
}
# an image from one directory tree: name, dir, entrypoint (JSON, may be
# empty), command (JSON, default none)
from_tree() {
  local c
  c=$(bah from scratch)
  bah add "$c" "$2" / >/dev/null
  bah config --entrypoint "$3" --cmd "${4:-}" --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  bah commit -q --rm "$c" "$1" >/dev/null
}

# ---- the Dockerfile's base images -----------------------------------------
BASE=docker.io/library/debian:bookworm-slim
BUILDER=docker.io/library/rust:1-bookworm
base_images() {
if ! has_image "$BASE"; then
  t=$SECONDS
  rm -f "$BUILDAH_DIR/bookworm.tar"
  # minbase is what Docker's debian:bookworm-slim is: essential packages and
  # apt, without documentation, man pages and translations.
  mmdebstrap --quiet --variant=minbase \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "$BUILDAH_DIR/bookworm.tar" http://deb.debian.org/debian
  c=$(bah from scratch)
  bah add "$c" "$BUILDAH_DIR/bookworm.tar" / >/dev/null
  bah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  bah commit -q --rm "$c" "$BASE" >/dev/null
  rm -f "$BUILDAH_DIR/bookworm.tar"
  say "bootstrapped $BASE in $((SECONDS - t)) s"
fi

# The builder carries the toolchain the host's cargo uses (the same one CI
# tests with), laid out as the official rust image lays it out, and the
# host's own CA certificates (update-ca-certificates' local ones), so that
# cargo in the builder reaches crates.io the way cargo on the host does.
SYSROOT=$(rustc --print sysroot)
LOCAL_CAS=$(find /usr/local/share/ca-certificates -name '*.crt' 2> /dev/null | sort)
RUST_VERSION="$(rustc --version | awk '{print $2}') cas:$(cat $LOCAL_CAS /dev/null | sha256sum | cut -c1-12)"
if ! has_image "$BUILDER" || [ "$(bah inspect --type image --format '{{index .ImageAnnotations "berth.rust-version"}}' "$BUILDER")" != "$RUST_VERSION" ]; then
  t=$SECONDS
  c=$(bah from --pull-never "$BASE")
  bah run --isolation chroot --network host "$c" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends build-essential ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*'
  for ca in $LOCAL_CAS; do bah copy "$c" "$ca" /usr/local/share/ca-certificates/ > /dev/null; done
  bah run --isolation chroot "$c" -- update-ca-certificates > /dev/null
  bah copy "$c" "$SYSROOT/bin" /usr/local/rustup/bin >/dev/null
  bah copy "$c" "$SYSROOT/lib" /usr/local/rustup/lib >/dev/null
  bah run --isolation chroot "$c" -- sh -c \
    'mkdir -p /usr/local/cargo/bin && ln -s /usr/local/rustup/bin/* /usr/local/cargo/bin/ && /usr/local/cargo/bin/cargo --version && /usr/local/cargo/bin/rustc --version'
  bah config --env CARGO_HOME=/usr/local/cargo --env RUSTUP_HOME=/usr/local/rustup \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --annotation berth.rust-version="$RUST_VERSION" "$c"
  bah commit -q --rm "$c" "$BUILDER" >/dev/null
  say "made $BUILDER (Rust $RUST_VERSION) in $((SECONDS - t)) s"
fi
}

# ---- Berth, from the Dockerfile -------------------------------------------
berth_tag() {
  (cd "$ROOT" && find Dockerfile .dockerignore Cargo.toml Cargo.lock build.rs proto src -type f -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}
berth_image() {
BERTH_IMAGE=localhost/berth:$(berth_tag)
if [ ! -f "$(archive "$BERTH_IMAGE")" ]; then
  t=$SECONDS
  bah bud --pull-never --isolation chroot --network host --layers=false -q \
    -f "$ROOT/Dockerfile" -t "$BERTH_IMAGE" "$ROOT" >/dev/null
  save "$BERTH_IMAGE"
  say "built $BERTH_IMAGE from the Dockerfile in $((SECONDS - t)) s"
  # earlier builds of other sources
  for f in "$IMAGES"/localhost_berth_*.tar; do
    [ "$f" = "$(archive "$BERTH_IMAGE")" ] || rm -f "$f"
  done
  bah images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/berth:' | grep -vxF "$BERTH_IMAGE" \
    | xargs -r buildah --root "$BUILDAH_DIR/storage" --runroot /run/berth-buildah rmi > /dev/null 2>&1 || true
fi
echo "$BERTH_IMAGE" > "$IMAGES/berth-image"
}

# ---- sidecars --------------------------------------------------------------
SIDECAR_IMAGES="csi-provisioner $PROVISIONER_VERSION
csi-attacher $ATTACHER_VERSION
csi-resizer $RESIZER_VERSION
csi-snapshotter $SNAPSHOTTER_VERSION
snapshot-controller $SNAPSHOTTER_VERSION
csi-node-driver-registrar $REGISTRAR_VERSION
livenessprobe $LIVENESSPROBE_VERSION"
sidecar_images() {
while read -r name version; do
  img=registry.k8s.io/sig-storage/$name:$version
  [ -f "$(archive "$img")" ] && continue
  d=$BUILDAH_DIR/tree/$name
  rm -rf "$d"; mkdir -p "$d/tmp" "$d/etc"
  chmod 1777 "$d/tmp"
  cp "$CSI_BIN/$name-$version" "$d/$name"
  echo "root:x:0:0:root:/root:/sbin/nologin" > "$d/etc/passwd"
  # upstream images: distroless/static with ENTRYPOINT ["/<name>"]
  from_tree "$img" "$d" "[\"/$name\"]"
  save "$img"; rm -rf "$d"
done <<< "$SIDECAR_IMAGES"
}

# ---- busybox and pause -----------------------------------------------------
tree_busybox() { # dir
  rm -rf "$1"; mkdir -p "$1/bin" "$1/tmp" "$1/etc" "$1/root"
  chmod 1777 "$1/tmp"
  cp "$DEBROOT/bin/busybox" "$1/bin/busybox"
  for a in $("$DEBROOT/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$1/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$1/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$1/etc/group"
}
small_images() {
for img in docker.io/library/busybox:1.36; do
  [ -f "$(archive "$img")" ] && continue
  tree_busybox "$BUILDAH_DIR/tree/busybox"
  # as Docker's busybox: no entrypoint, command sh
  from_tree "$img" "$BUILDAH_DIR/tree/busybox" '' '["sh"]'
  save "$img"; rm -rf "$BUILDAH_DIR/tree/busybox"
done
PAUSE=registry.k8s.io/pause:3.10.1
if [ ! -f "$(archive "$PAUSE")" ]; then
  tree_busybox "$BUILDAH_DIR/tree/pause"
  # the pause container: wait for a signal, exit 0 on TERM/INT
  from_tree "$PAUSE" "$BUILDAH_DIR/tree/pause" \
    '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'
  save "$PAUSE"; rm -rf "$BUILDAH_DIR/tree/pause"
fi
}

# ---- the test images Kubernetes' e2e storage suite starts ------------------
# Names and tags as test/utils/image/manifest.go of $K8S_VERSION has them;
# checked against it so that a Kubernetes bump cannot silently pull.
E2E_REGISTRY=registry.k8s.io/e2e-test-images
E2E_IMAGES="BusyBox busybox 1.37.0-1
Agnhost agnhost 2.63.0
GlibcDnsTesting glibc-dns-testing 2.0.0
Nginx nginx 1.15-4
Pause pause 3.10.2"
e2e_images() {
  local manifest id name tag img
  manifest=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')/test/utils/image/manifest.go
  while read -r id name tag; do
    grep -qE "configs\[$id\] = Config[{]list[.][A-Za-z0-9]+, \"$name\", \"$tag\"[}]" "$manifest" \
      || die "Kubernetes $K8S_VERSION names another $id image than $name:$tag (see $manifest)"
    case $id in Pause) img=registry.k8s.io/$name:$tag ;; *) img=$E2E_REGISTRY/$name:$tag ;; esac
    [ -f "$(archive "$img")" ] && continue
    case $id in
      BusyBox | Nginx) # the volumes suite runs nginx only with its own shell command
        tree_busybox "$BUILDAH_DIR/tree/e2e"
        from_tree "$img" "$BUILDAH_DIR/tree/e2e" '' '["sh"]' ;;
      Agnhost) # upstream: agnhost on a small distribution, ENTRYPOINT ["/agnhost"]
        tree_busybox "$BUILDAH_DIR/tree/e2e"
        cp "$K8S_BIN/agnhost" "$BUILDAH_DIR/tree/e2e/agnhost"
        from_tree "$img" "$BUILDAH_DIR/tree/e2e" '["/agnhost"]' ;;
      GlibcDnsTesting) # multiVolume runs GNU dd (oflag=nocache) and a POSIX shell in it
        bah tag "$BASE" "$img" ;;
      Pause)
        tree_busybox "$BUILDAH_DIR/tree/e2e"
        from_tree "$img" "$BUILDAH_DIR/tree/e2e" \
          '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]' ;;
    esac
    save "$img"; rm -rf "$BUILDAH_DIR/tree/e2e"
  done <<< "$E2E_IMAGES"
}

[ $# -gt 0 ] || set -- all
for what in "$@"; do
  case $what in
    all) base_images; berth_image; sidecar_images; small_images ;;
    base) base_images ;;
    berth) base_images; berth_image ;;
    sidecars) sidecar_images ;;
    small) small_images ;;
    e2e) base_images; e2e_images ;;
    *) die "unknown image step $what" ;;
  esac
done
say "images ready: $(ls "$IMAGES" | grep -c '\.tar$') archives, Berth image $(cat "$IMAGES/berth-image" 2>/dev/null)"
