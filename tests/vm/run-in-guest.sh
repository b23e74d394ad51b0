#!/bin/bash
# Boot Berth's test guest (built by build-guest.sh) and run SHAREDIR/run.sh in it.
#
#   tests/vm/run-in-guest.sh SHAREDIR [TIMEOUT_SECONDS]     (as root)
#
# SHAREDIR is shared with the guest as /share (9p). The guest's init runs
# /share/run.sh with cwd /share and /share/bin first on PATH; this script copies
# guest-lib.sh to SHAREDIR/guest-lib.sh first, so run.sh can source it.
# The guest console (kernel messages + run.sh output) is streamed to stdout and
# saved to SHAREDIR/console.log; run.sh's own output is saved by the guest to
# SHAREDIR/out.log.
#
# Exit code: run.sh's exit code; 99 if it produced none (did not run, guest
# crashed, or the timeout fired); 98 if the guest is not built.
# qemu runs under `timeout` (default 300 s) and is killed on timeout or when this
# script is interrupted or killed.
#
# The guest also gets a scratch disk: a fresh, sparse ext4 image (default 8G,
# BERTH_VM_SCRATCH_SIZE) in ${TMPDIR:-/tmp}, unlinked at once (it takes host
# disk space only while the guest runs), mounted on /scratch with /var/tmp on it. Loop-device images belong there.
#
# Environment: BERTH_VM_CACHE (default /var/cache/berth-vm), BERTH_VM_MEM (MB,
# default 2048), BERTH_VM_CPUS (default 2), BERTH_VM_APPEND (extra kernel args),
# BERTH_VM_SCRATCH_SIZE (default 8G).
set -uo pipefail
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${BERTH_VM_CACHE:-/var/cache/berth-vm}

if [ $# -lt 1 ] || [ $# -gt 2 ] || [ ! -d "$1" ]; then
  echo "usage: $0 SHAREDIR [TIMEOUT_SECONDS]" >&2; exit 2
fi
SHARE=$(realpath -e "$1")
TIMEOUT=${2:-300}
case $SHARE in *,*) echo "run-in-guest: SHAREDIR must not contain a comma: $SHARE" >&2; exit 2;; esac
if [ ! -s "$CACHE/vmlinuz" ] || [ ! -s "$CACHE/initrd.img" ]; then
  echo "run-in-guest: no guest in $CACHE; run tests/vm/build-guest.sh first" >&2; exit 98
fi
command -v qemu-system-x86_64 >/dev/null || { echo "run-in-guest: qemu-system-x86_64 missing; run build-guest.sh" >&2; exit 98; }

cp "$HERE/guest-lib.sh" "$SHARE/guest-lib.sh"
rm -f "$SHARE/rc" "$SHARE/out.log" "$SHARE/console.log"

QPID='' SCRATCH=''
stop_qemu() {
  [ -n "$QPID" ] || return 0
  if kill -0 "$QPID" 2>/dev/null; then
    kill -TERM "$QPID" 2>/dev/null          # timeout(1) passes it on to qemu
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$QPID" 2>/dev/null          # qemu dies with it (pdeathsig)
  fi
  wait "$QPID" 2>/dev/null
  QPID=
}
on_exit() { stop_qemu; [ -z "$SCRATCH" ] || rm -f "$SCRATCH"; }
trap on_exit EXIT
trap 'echo "run-in-guest: interrupted, stopping qemu" >&2; exit 130' INT
trap 'exit 143' TERM HUP

# Scratch disk: made, opened, and unlinked at once; qemu opens it through our
# descriptor, so it disappears with the run even if this script is SIGKILLed.
SCRATCH=$(mktemp "${TMPDIR:-/tmp}/berth-vm-scratch.XXXXXX") &&
  mkfs.ext4 -q -F -O ^has_journal -T largefile -L scratch -E lazy_itable_init=1,nodiscard \
    "$SCRATCH" "${BERTH_VM_SCRATCH_SIZE:-8G}" &&
  exec {SCRFD}<>"$SCRATCH" ||
  { echo "run-in-guest: cannot make the scratch disk" >&2; exit 98; }
rm -f "$SCRATCH"; SCRATCH=

# Console: strip the serial line's CRs, copy to stdout and console.log.
exec {CON}> >(tr -d '\r' | tee "$SHARE/console.log")
CONPID=$!

# setpriv --pdeathsig: if this script dies even by SIGKILL, timeout gets SIGTERM
# (and passes it to qemu); if timeout dies, qemu gets SIGKILL. No qemu survives us.
start=$(date +%s.%N)
setpriv --pdeathsig TERM \
  timeout -k 5 "$TIMEOUT" \
  setpriv --pdeathsig KILL \
  qemu-system-x86_64 \
    -nodefaults -no-user-config -machine pc -accel tcg,thread=multi -cpu max \
    -m "${BERTH_VM_MEM:-2048}" -smp "${BERTH_VM_CPUS:-2}" \
    -display none -monitor none -no-reboot -nic none \
    -chardev stdio,id=con,signal=off -serial chardev:con \
    -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initrd.img" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off 8250.nr_uarts=1 ${BERTH_VM_APPEND:-}" \
    -drive "file=/proc/self/fd/$SCRFD,format=raw,if=virtio,cache=unsafe,discard=unmap" \
    -virtfs "local,path=$SHARE,mount_tag=share,security_model=none,id=share" \
    </dev/null >&"$CON" 2>&1 &
QPID=$!
wait "$QPID"; qrc=$?
QPID=
exec {CON}>&-
wait "$CONPID" 2>/dev/null
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')

if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  echo "run-in-guest: TIMEOUT: guest killed after ${TIMEOUT}s" >&2
elif [ "$qrc" != 0 ]; then
  echo "run-in-guest: qemu exited with $qrc" >&2
fi
rc=$(cat "$SHARE/rc" 2>/dev/null)
case $rc in ''|*[!0-9]*) rc=99;; esac
echo "run-in-guest: guest finished in ${elapsed}s, run.sh exit code $rc" >&2
exit "$rc"
