#!/bin/bash
# Build Berth's full-kernel test guest: a Debian 12 (bookworm) kernel plus a
# debootstrap minbase root filesystem packed as one (uncompressed) initramfs.
#
#   tests/vm/build-guest.sh            (as root)
#
# Output, in ${BERTH_VM_CACHE:-/var/cache/berth-vm}:
#   vmlinuz        the guest kernel (linux-image-6.1.*-amd64, never installed on the host)
#   initrd.img     the whole guest root filesystem (cpio); its /init runs /share/run.sh
#   stamp          hash of the inputs this guest was built from
#   guest-info     human-readable summary (kernel, packages, sizes)
#
# If the stamp matches the current inputs (this script, the package and module
# lists, the kernel package version the apt lists offer) nothing is rebuilt.
# FORCE=1 rebuilds anyway.
#
# Environment:
#   BERTH_VM_CACHE          cache directory (default /var/cache/berth-vm)
#   GUEST_EXTRA_PACKAGES    extra Debian packages for the guest, comma separated
#                           (for example a library a host-built binary links to)
#   MIRROR                  Debian mirror (default: read from /etc/apt/sources.list.d)
#   FORCE=1                 rebuild even if the stamp matches
set -euo pipefail
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

CACHE=${BERTH_VM_CACHE:-/var/cache/berth-vm}
SUITE=bookworm
SELF=$(readlink -f "${BASH_SOURCE[0]}")

# Packages in the guest (debootstrap resolves their Depends, not Recommends).
GUEST_PACKAGES=nfs-kernel-server,nfs-common,rpcbind,kmod,e2fsprogs,xfsprogs,util-linux,mount,iproute2,procps,quota,lvm2,thin-provisioning-tools,psmisc,strace
GUEST_PACKAGES+=${GUEST_EXTRA_PACKAGES:+,$GUEST_EXTRA_PACKAGES}

# Kernel modules copied into the guest, with their dependencies. A name the
# kernel does not have (or has built in) is reported and skipped.
MODULES="virtio_pci virtio_blk 9p 9pnet_virtio nfsd nfs nfsv3 nfsv4 loop ext4 xfs overlay
  dm_mod dm_thin_pool dm_snapshot quota_v1 quota_v2 sch_netem"

HOST_PACKAGES="qemu-system-x86 debootstrap cpio e2fsprogs"

log() { printf '[build-guest %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mount)"

# --- host packages -----------------------------------------------------------
missing=()
for p in $HOST_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
if [ ${#missing[@]} -gt 0 ]; then
  log "installing host packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt_updated=1
  # Note: on some machines this replaces a newer qemu-utils; we do not need qemu-img.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- which kernel ------------------------------------------------------------
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ] && [ $apt_updated = 0 ]; then
  apt-get update -qq; KPKG=$(kernel_pkg)
fi
[ -n "$KPKG" ] || die "apt offers no linux-image-amd64 (apt-get update?)"
KVER=$(apt-cache policy "$KPKG" | awk '/Candidate:/{print $2; exit}')
[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate version for $KPKG"

if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(awk '/^URIs:/{for(i=2;i<=NF;i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' \
             /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  [ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' \
             /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

STAMP=$( { sha256sum < "$SELF"; echo "suite=$SUITE"; echo "packages=$GUEST_PACKAGES";
           echo "modules=$(echo $MODULES)"; echo "kernel=$KPKG=$KVER"; } | sha256sum | cut -c1-32)

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one build at a time; a second caller waits and then finds the cache fresh

if [ "${FORCE:-0}" != 1 ] && [ -s "$CACHE/vmlinuz" ] && [ -s "$CACHE/initrd.img" ] &&
   [ "$(cat "$CACHE/stamp" 2>/dev/null)" = "$STAMP" ]; then
  log "guest is up to date ($KPKG $KVER, stamp $STAMP) in $CACHE"
  exit 0
fi

# --- build ---------------------------------------------------------------------
log "building guest: $KPKG $KVER, $SUITE from $MIRROR, stamp $STAMP"
W=$CACHE/build.$$
R=$W/rootfs

umount_under() {  # unmount everything mounted at or below $1, deepest first
  local p
  awk -v r="$1" '{ gsub(/\\040/, " ", $5); if ($5 == r || index($5, r "/") == 1) print $5 }' \
      /proc/self/mountinfo | sort -r | while IFS= read -r p; do
    umount "$p" 2>/dev/null || umount -l "$p" 2>/dev/null || true
  done
}
cleanup() {
  [ -d "$W" ] || return 0
  umount_under "$W"
  if awk -v r="$W" 'index($5, r) == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
    log "WARNING: mounts remain under $W, not removing it"; return 0
  fi
  rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
rm -rf --one-file-system "$CACHE"/build.* 2>/dev/null || true   # leftovers of a killed build
mkdir -p "$W/kernel"
chown _apt "$W/kernel" 2>/dev/null || true   # apt-get download drops to _apt

# Kernel: download and unpack only (dpkg -x), never install on the host.
( cd "$W/kernel" && apt-get download -qq "$KPKG=$KVER" && dpkg -x "$KPKG"_*.deb x && rm -f ./*.deb )
K=$(ls "$W/kernel/x/lib/modules")
[ -f "$W/kernel/x/boot/vmlinuz-$K" ] || die "no vmlinuz in $KPKG"
log "kernel $K unpacked"

log "debootstrap --variant=minbase $SUITE (takes a while)"
if ! debootstrap --variant=minbase --include="$GUEST_PACKAGES" "$SUITE" "$R" "$MIRROR" \
       > "$W/debootstrap.log" 2>&1; then
  tail -n 30 "$W/debootstrap.log" >&2
  [ -f "$R/debootstrap/debootstrap.log" ] && tail -n 30 "$R/debootstrap/debootstrap.log" >&2
  die "debootstrap failed"
fi
umount_under "$R"   # debootstrap normally unmounts its /proc and /sys; make sure
# A package's maintainer script must not have left a daemon running from the chroot.
for p in /proc/[0-9]*; do
  if [ "$(readlink "$p/root" 2>/dev/null)" = "$R" ]; then
    log "WARNING: process ${p#/proc/} ($(cat "$p/comm" 2>/dev/null)) runs in the guest chroot; stopping it"
    kill -KILL "${p#/proc/}" 2>/dev/null || true
  fi
done
log "debootstrap done"

# Modules: resolve dependencies with the guest's own modprobe against the unpacked tree.
mkdir -p "$R/tmp/m"
mount --bind "$W/kernel/x" "$R/tmp/m"
chroot "$R" depmod -b /tmp/m "$K"
: > "$W/mods.txt"
for m in $MODULES; do
  if ! out=$(chroot "$R" modprobe -d /tmp/m -S "$K" --show-depends "$m" 2>&1); then
    log "module $m: not available, skipped ($out)"; continue
  fi
  grep -qx "builtin ${m//-/_}" <<<"${out//-/_}" && log "module $m: built into the kernel"
  awk '$1=="insmod"{print $2}' <<<"$out" | sed 's|^/tmp/m/||' >> "$W/mods.txt"
done
umount "$R/tmp/m"; rmdir "$R/tmp/m"
sort -u -o "$W/mods.txt" "$W/mods.txt"
( cd "$W/kernel/x" &&
  cp --parents lib/modules/"$K"/modules.{order,builtin,builtin.modinfo} $(cat "$W/mods.txt") "$R/" )
chroot "$R" depmod "$K"
log "$(wc -l < "$W/mods.txt") module files copied"

# Guest configuration.
echo guest > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
ln -sf ../proc/self/mounts "$R/etc/mtab"
: > "$R/etc/exports"
mkdir -p "$R/share" "$R/scratch" "$R/mnt" "$R/var/lib/nfs/v4recovery"
# No udev in the guest: LVM must create device nodes itself and not wait for udev
# (init also exports DM_DISABLE_UDEV=1); no dmeventd monitoring.
if [ -f "$R/etc/lvm/lvm.conf" ]; then
  sed -i -E 's/^(\s*)#?\s*udev_sync = 1/\1udev_sync = 0/; s/^(\s*)#?\s*udev_rules = 1/\1udev_rules = 0/;
             s/^(\s*)#?\s*monitoring = 1/\1monitoring = 0/' "$R/etc/lvm/lvm.conf"
fi
# Trim what a test never reads: a smaller initramfs boots faster under TCG.
# libicu is only for xfs_scrub; python3 only for nfs-utils' admin scripts
# (mountstats, nfsiostat, rpcctl; read /proc/self/mountstats instead).
( cd "$R" && rm -rf var/cache/apt/*.bin var/cache/apt/archives/*.deb var/lib/apt/lists/* \
    usr/share/doc/* usr/share/man/* usr/share/info/* usr/share/locale/* \
    var/log/*.log debootstrap var/cache/debconf/*-old \
    usr/lib/x86_64-linux-gnu/libicu* usr/sbin/xfs_scrub* usr/lib/x86_64-linux-gnu/gconv \
    usr/lib/python3* usr/share/python3 usr/bin/python3* usr/bin/py3* usr/bin/pydoc3* \
    usr/bin/pygettext3* usr/bin/pdb3* )

cat > "$R/init" <<'INIT'
#!/bin/sh
# Berth test guest: PID 1. Runs /share/run.sh (cwd /share, PATH starting with
# /share/bin), copies its output to the console and /share/out.log, writes its
# exit code to /share/rc, then powers the machine off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
stty -onlcr 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "[berth-guest $(up)s] $*"; }
mkdir -p /dev/pts /dev/shm /run /tmp /share /var/tmp
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /run/lock /run/rpcbind /run/berth
hostname guest
ip link set lo up
modprobe -a virtio_pci virtio_blk 9pnet_virtio 9p loop ext4
# Scratch disk from the host (an empty ext4 image, thrown away after the run):
# /scratch and /var/tmp live there instead of in guest RAM.
if [ -b /dev/vda ] && mount -o noinit_itable /dev/vda /scratch; then
  mkdir -p /scratch/tmp && chmod 1777 /scratch/tmp && mount --bind /scratch/tmp /var/tmp
fi
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /share; then
  say "ERROR: cannot mount the 9p share"
elif [ ! -f /share/run.sh ]; then
  say "ERROR: /share/run.sh does not exist"
else
  cd /share
  export HOME=/root TERM=dumb LANG=C.UTF-8 PATH=/share/bin:$PATH DM_DISABLE_UDEV=1 BERTH_GUEST=1
  say "running /share/run.sh"
  mkfifo /run/berth/out
  tee /share/out.log < /run/berth/out &
  tee_pid=$!
  if [ -x /share/run.sh ]; then /share/run.sh; else bash /share/run.sh; fi > /run/berth/out 2>&1
  rc=$?
  echo "$rc" > /share/rc
  # Daemons run.sh left behind may still hold the pipe: give tee 2 s, then stop everyone.
  i=0
  while kill -0 "$tee_pid" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
  if kill -0 "$tee_pid" 2>/dev/null; then
    kill -TERM -1 2>/dev/null; sleep 0.3; kill -KILL -1 2>/dev/null
  fi
  cd /
  say "run.sh exited with $rc"
fi
# 9p is uncached: everything written to /share is already on the host. Do not
# sync: a hard NFS mount to a dead server would hang it.
echo o > /proc/sysrq-trigger
sleep 5
echo b > /proc/sysrq-trigger
sleep 60
INIT
chmod 755 "$R/init"

# Uncompressed: under TCG the guest decompresses zstd slower than qemu loads
# the bigger file (measured: Run /init about 0.7 s earlier).
log "packing initramfs"
( cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet ) > "$W/initrd.img"
cp "$W/kernel/x/boot/vmlinuz-$K" "$W/vmlinuz"
{
  echo "built:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "kernel:   $KPKG $KVER ($K)"
  echo "suite:    $SUITE from $MIRROR"
  echo "packages: $GUEST_PACKAGES"
  echo "modules:  $(echo $MODULES)"
  echo "rootfs:   $(du -sh --apparent-size "$R" | cut -f1) unpacked, initrd $(du -h "$W/initrd.img" | cut -f1)"
  echo "glibc:    $(chroot "$R" dpkg-query -W -f='${Version}' libc6)"
  echo "stamp:    $STAMP"
} > "$W/guest-info"

mv -f "$W/vmlinuz" "$CACHE/vmlinuz"
mv -f "$W/initrd.img" "$CACHE/initrd.img"
mv -f "$W/guest-info" "$CACHE/guest-info"
echo "$STAMP" > "$CACHE/stamp"
log "guest built in $CACHE"
sed 's/^/    /' "$CACHE/guest-info" >&2
