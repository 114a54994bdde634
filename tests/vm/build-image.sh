#!/usr/bin/env bash
# Build (or reuse) a Debian 13 (trixie) VM image for cohort's systemd/TPM tests.
#
# Output: $VM_CACHE/<hash>/{rootfs.img,vmlinuz,initrd.img} where <hash> is a hash of
# everything that shapes the image (package list, suite, this script). A second run
# with the same inputs does nothing, so CI pays the ~1-2 min mmdebstrap cost once per
# machine.
#
# Prints the image directory on its last line of stdout.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VM_CACHE="${VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-vm}"
SUITE="${VM_SUITE:-trixie}"
# Room for podman: a scenario loads the ~400 MB image (stored layers) into two storages, and
# each load stages the archive and its blobs in /var/tmp first (4G ran out).
IMG_SIZE="${VM_IMG_SIZE:-8G}"

# What the scenarios need: the real systemd (257 in trixie) with D-Bus and logind for
# lingering, podman 5 and its helpers for later scenarios, the TPM tools for
# diagnosis, and a kernel+initrd we can boot directly.
PACKAGES=(
  systemd systemd-sysv dbus dbus-user-session libpam-systemd systemd-container
  podman crun nftables passt uidmap netavark aardvark-dns catatonit
  git ca-certificates tpm2-tools openssh-server
  linux-image-amd64 initramfs-tools
  e2fsprogs procps iproute2 kmod
)

log() { echo "[build-image] $*" >&2; }

need_host_tools() {
  local missing=()
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v swtpm >/dev/null || missing+=(swtpm)
  command -v swtpm_setup >/dev/null || missing+=(swtpm-tools)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v debugfs >/dev/null || missing+=(e2fsprogs)
  # UEFI firmware: systemd only trusts a TPM for automatic credential sealing when the
  # firmware reports it (efi_has_tpm2()), which needs an EFI boot.
  [[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ]] || missing+=(ovmf)
  if ((${#missing[@]})); then
    log "installing host tools: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=900)
    local target=()
    # These hosts are bookworm with qemu-utils from bookworm-backports preinstalled,
    # which Breaks bookworm's qemu-system-common: take qemu from backports too (qemu
    # 10 also runs TCG faster than 7.2).
    if grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
      local src=/etc/apt/sources.list.d/cohort-bookworm-backports.sources
      if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
      fi
      target=(-t bookworm-backports)
    fi
    # Other processes (other engineers, CI steps) may hold the dpkg lock; wait for it.
    "${apt[@]}" update -qq
    "${apt[@]}" install -y -qq --no-install-recommends "${target[@]}" "${missing[@]}" >&2
  fi
}

need_host_tools

# The cache key covers what shapes the image: the package list, and this script from the
# recipe marker on (host-tool handling above it does not change the image), and the guest files.
KEY="$( (printf '%s\n' "$SUITE" "$IMG_SIZE" "${PACKAGES[@]}"; sed -n '/^# --- recipe/,$p' "$HERE/build-image.sh"; cat "$HERE"/guest/*) | sha256sum | cut -c1-16)"
OUT="$VM_CACHE/image-$KEY"
if [[ -f "$OUT/done" ]]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

# --- recipe (everything below is part of the cache key) ---
mkdir -p "$VM_CACHE"
TMP="$(mktemp -d "$VM_CACHE/build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
ROOT="$TMP/root"
mkdir -p "$ROOT"

t0=$(date +%s)
log "mmdebstrap $SUITE (${#PACKAGES[@]} packages) -> $ROOT"
# --variant=apt: only Essential + apt + what we list. Customize hooks shape the guest:
#  - root without password on the serial console (throwaway VM, no network);
#  - an fstab for the virtio root;
#  - an ordinary user "alice" with subuids for the user-scope scenarios;
#  - our scenario runner unit, which starts the scenario from the /dev/vdb drive.
IFS=,
mmdebstrap --variant=apt --mode=root --format=directory \
  --include="${PACKAGES[*]}" \
  --customize-hook='echo cohort-vm > "$1/etc/hostname"' \
  --customize-hook='printf "/dev/vda / ext4 rw,errors=remount-ro 0 1\n" > "$1/etc/fstab"' \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='chroot "$1" useradd -m -s /bin/bash -u 1000 alice' \
  --customize-hook='chroot "$1" usermod --add-subuids 100000-165535 --add-subgids 100000-165535 alice' \
  --customize-hook="copy-in $HERE/guest/cohort-scenario.service /etc/systemd/system/" \
  --customize-hook="copy-in $HERE/guest/cohort-scenario-runner /usr/local/sbin/" \
  --customize-hook='chmod 0755 "$1/usr/local/sbin/cohort-scenario-runner"' \
  --customize-hook='chroot "$1" systemctl enable cohort-scenario.service' \
  --customize-hook='chroot "$1" systemctl mask serial-getty@ttyS0.service getty@tty1.service' \
  --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer systemd-timesyncd.service' \
  --customize-hook='rm -rf "$1/var/cache/apt/archives/"*.deb "$1/usr/share/doc" "$1/usr/share/man" "$1/usr/share/locale"' \
  "$SUITE" "$ROOT" >&2
unset IFS
log "mmdebstrap took $(($(date +%s) - t0)) s"

# The kernel and initrd are booted directly by qemu (no bootloader in the image).
cp "$(ls "$ROOT"/boot/vmlinuz-* | sort | tail -1)" "$TMP/vmlinuz"
cp "$(ls "$ROOT"/boot/initrd.img-* | sort | tail -1)" "$TMP/initrd.img"
chmod 0644 "$TMP/vmlinuz" "$TMP/initrd.img"

t1=$(date +%s)
log "mkfs.ext4 -d ($IMG_SIZE)"
mkfs.ext4 -q -L cohort-root -d "$ROOT" "$TMP/rootfs.img" "$IMG_SIZE" >&2
log "mkfs took $(($(date +%s) - t1)) s"

rm -rf "$ROOT"
trap - EXIT
rm -rf "$OUT"
mv "$TMP" "$OUT"
touch "$OUT/done"
log "image ready in $(($(date +%s) - t0)) s: $OUT"
echo "$OUT"
