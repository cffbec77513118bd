#!/usr/bin/env bash
# A pure cgroup v2 host on any of our machines: boots a stock Debian kernel under QEMU (KVM
# where a real one exists, TCG otherwise) with the host's / mounted read-only over virtio-9p
# under a tmpfs overlay, cgroup2 mounted alone with every controller enabled, runs CMD as
# root in the host's current directory, and powers off. CMD's output is the guest console,
# streamed here; the script exits with CMD's exit status.
#
#   scripts/v2vm.sh [--kernel stable|newest] [--cpus N] [--mem MIB] [--timeout S] -- CMD [ARGS...]
#   scripts/v2vm.sh [--kernel ...] --prepare   # download and unpack the kernel and busybox only
#
# --kernel stable (the default) is the release's kernel (linux-image-amd64's, 6.1 on
# bookworm); newest is the newest linux-image-*-amd64 apt knows (6.12 on bookworm), for what
# only recent kernels do (resetting memory.peak).
#
# Everything comes from Debian packages, downloaded (`apt-get download`) and unpacked
# (`dpkg-deb -x`) into the cache, never installed on the host: linux-image-*-amd64 (it has 9p,
# virtio-pci and overlay as modules; the -cloud- flavour lacks 9p) and busybox-static for the
# initramfs. qemu-system-x86 is installed by install-deps.sh --test.
set -euo pipefail

cache=${V2VM_CACHE:-/var/cache/cloudfunc-v2vm}
cpus=2
mem=3072
limit=3600
prepare_only=0
kernel=stable
while (($#)); do
  case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --prepare) prepare_only=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if ((!prepare_only)) && (($# == 0)); then
  echo "usage: $0 [--cpus N] [--mem MIB] [--timeout S] -- CMD [ARGS...]" >&2
  exit 2
fi

# ---- the kernel and busybox, from Debian's packages ----
prepare() {
  mkdir -p "$cache"
  local kpkg
  case "$kernel" in
    stable) kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') ;;
    newest) kpkg=$(apt-cache search --names-only '^linux-image-[0-9].*-amd64$' 2>/dev/null | awk '{print $1}' |
      grep -Ev -- '-(cloud|rt)-amd64$|unsigned|dbg' | sort -V | tail -1) ;;
    *) echo "v2vm: --kernel is stable or newest" >&2; return 1 ;;
  esac
  if [ -z "$kpkg" ]; then
    echo "v2vm: apt knows no linux-image-amd64 (run apt-get update)" >&2
    return 1
  fi
  kdir="$cache/$kpkg"
  if [ ! -f "$kdir/ready" ]; then
    rm -rf "$kdir" && mkdir -p "$kdir"
    (cd "$kdir" && apt-get download -q "$kpkg" >/dev/null 2>&1) || {
      echo "v2vm: could not download $kpkg" >&2
      return 1
    }
    dpkg-deb -x "$kdir"/linux-image-*.deb "$kdir"
    rm -f "$kdir"/*.deb
    touch "$kdir/ready"
  fi
  if [ ! -x "$cache/busybox/bin/busybox" ]; then
    rm -rf "$cache/busybox" "$cache/bb.tmp" && mkdir -p "$cache/bb.tmp"
    (cd "$cache/bb.tmp" && apt-get download -q busybox-static >/dev/null 2>&1) || {
      echo "v2vm: could not download busybox-static" >&2
      return 1
    }
    dpkg-deb -x "$cache"/bb.tmp/busybox-static_*.deb "$cache/busybox"
    rm -rf "$cache/bb.tmp"
  fi
  kver=$(ls "$kdir/lib/modules")
}
prepare
if ((prepare_only)); then
  echo "v2vm: kernel $kver and busybox ready in $cache"
  exit 0
fi
command -v qemu-system-x86_64 >/dev/null || {
  echo "v2vm: qemu-system-x86_64 is not installed (apt install qemu-system-x86)" >&2
  exit 1
}

work=$(mktemp -d /tmp/v2vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
out="$work/out"
mkdir -p "$out"

# ---- the initramfs: busybox, the modules for 9p and overlay, and /init ----
root="$work/initramfs"
mkdir -p "$root"/{bin,proc,sys,dev,lower,upper,newroot,modules}
cp "$cache/busybox/bin/busybox" "$root/bin/busybox"
for applet in sh mount umount mkdir insmod switch_root cat cp echo sleep poweroff; do
  ln -s busybox "$root/bin/$applet"
done
mods="$kdir/lib/modules/$kver/kernel"
# In dependency order (busybox insmod loads exactly what it is given); a module a kernel has
# built in (virtio on 6.12) or folded into another (fscache into netfs) is not there, and
# compressed ones are unpacked here.
order=()
for name in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
  netfs fscache 9pnet 9pnet_virtio 9p overlay; do
  file=$(find "$mods" -name "$name.ko" -o -name "$name.ko.xz" | head -1)
  [ -n "$file" ] || continue
  case "$file" in
    *.xz) "$cache/busybox/bin/busybox" xz -dc "$file" >"$root/modules/$name.ko" ;;
    *) cp "$file" "$root/modules/$name.ko" ;;
  esac
  order+=("$name")
done
{
  echo '#!/bin/sh'
  echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
  for m in "${order[@]}"; do echo "insmod /modules/$m.ko"; done
  cat <<'INIT'
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /lower || { echo "v2vm: no host share"; poweroff -f; }
mount -t tmpfs -o size=80% tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || { echo "v2vm: no overlay"; poweroff -f; }
mkdir -p /newroot/v2vm
cp /stage2 /newroot/v2vm/stage2
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /v2vm/stage2
INIT
} >"$root/init"
chmod +x "$root/init"

# Stage 2 runs in the host's filesystem: cgroup2 alone, every controller on, the command.
{
  echo '#!/bin/sh'
  printf 'cd %q\n' "$PWD"
  printf 'set --'
  printf ' %q' "$@"
  echo
  cat <<'STAGE2'
export PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm 2>/dev/null || true
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mkdir -p /v2vm/out && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /v2vm/out
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control; done
echo "v2vm: kernel $(uname -r), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
"$@"
echo $? > /v2vm/out/rc
sync
echo o > /proc/sysrq-trigger
# Init must outlive the power-off: an external sleep could fail once the shares go away,
# and init's exit then panicked the kernel (a harmless trace, after the results, in CI's log).
while :; do :; done
STAGE2
} >"$root/stage2"
(cd "$root" && find . | "$cache/busybox/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.gz"

# ---- boot ----
accel="tcg,thread=multi"
cpu="max"
if [ -w /dev/kvm ] && grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
  accel=kvm
  cpu=host
fi
echo "v2vm: booting Debian $kver under QEMU ($accel), $cpus CPUs, $mem MiB"
set +e
timeout "$limit" qemu-system-x86_64 \
  -machine q35 -accel "$accel" -cpu "$cpu" -smp "$cpus" -m "$mem" \
  -kernel "$kdir/boot/vmlinuz-$kver" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 rw" \
  -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$out,mount_tag=out,security_model=none" \
  -nographic -serial stdio -monitor none -no-reboot -nodefaults \
  </dev/null
qemu=$?
set -e
if [ ! -f "$out/rc" ]; then
  echo "v2vm: the guest gave no exit status (qemu exited $qemu)" >&2
  exit 125
fi
exit "$(cat "$out/rc")"
