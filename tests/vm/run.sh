#!/usr/bin/env bash
# Boot the Debian 13 test VM once and run one scenario in it.
#
#   tests/vm/run.sh --scenario DIR [--bin PATH]... [--file SRC[:NAME]]... \
#                   [--tpm-state DIR] [--no-tpm] [--out DIR] [--timeout SECS]
#
# A scenario is a directory with a `scenario.sh` (run as root by a systemd unit in the VM,
# from the scenario drive mounted at /scenario, with /scenario/bin on PATH). `--bin`
# copies executables to /scenario/bin, `--file` copies inputs to /scenario/in/NAME.
# Whatever the scenario writes under /scenario/out comes back to `--out DIR` (plus
# console.log and the guest's journal). The exit code is the scenario's.
#
# The TPM is a swtpm whose state directory is the machine's TPM identity: pass the same
# `--tpm-state` to boot "the same machine" again, another one (or none: a fresh one) for a
# different machine. The root image is used read-only (qemu snapshot), so every boot
# starts from the same clean system.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VM_CACHE="${VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-vm}"
SCENARIO="" OUT="" TPM_STATE="" TIMEOUT="${VM_TIMEOUT:-600}" USE_TPM=1 MEM="${VM_MEM:-2048}"
BINS=() FILES=()

die() { echo "[vm] FAIL: $*" >&2; exit 1; }
log() { echo "[vm] $*" >&2; }

while (($#)); do
  case "$1" in
    --scenario) SCENARIO="$2"; shift 2 ;;
    --bin) BINS+=("$2"); shift 2 ;;
    --file) FILES+=("$2"); shift 2 ;;
    --tpm-state) TPM_STATE="$2"; shift 2 ;;
    --no-tpm) USE_TPM=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n "$SCENARIO" && -f "$SCENARIO/scenario.sh" ]] || die "--scenario DIR with a scenario.sh is required"

IMAGE_DIR="$("$HERE/build-image.sh" | tail -1)"
[[ -f "$IMAGE_DIR/rootfs.img" ]] || die "no image in $IMAGE_DIR"

mkdir -p "$VM_CACHE"
WORK="$(mktemp -d "$VM_CACHE/run.XXXXXX")"
SWTPM_PID=""
qpid=""
cleanup() {
  local rc=$?
  set +x
  [[ -n "$qpid" ]] && kill -KILL "$qpid" 2>/dev/null || true
  [[ -n "$SWTPM_PID" ]] && kill "$SWTPM_PID" 2>/dev/null || true
  # A harness failure that `die` did not explain: show where it stopped.
  if ((rc != 0)) && [[ -s "$OUT/run.trace" ]]; then
    echo "[vm] run.sh exited with $rc; its last steps:" >&2
    grep -v -e '^+* sleep' -e "^+* kill -0" "$OUT/run.trace" | tail -15 >&2
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
OUT="${OUT:-$VM_CACHE/out-$(basename "$SCENARIO")}"
rm -rf "$OUT"
mkdir -p "$OUT"
# Trace the harness into OUT/run.trace (not the terminal), for the message above.
exec {trace_fd}>"$OUT/run.trace"
BASH_XTRACEFD=$trace_fd
set -x

# --- the scenario drive: scenario dir + binaries + inputs, as an ext4 image -----------
STAGE="$WORK/stage"
mkdir -p "$STAGE/bin" "$STAGE/in" "$STAGE/out"
cp -r "$SCENARIO"/. "$STAGE/"
mkdir -p "$STAGE/.harness"
cp "$HERE/inner.sh" "$STAGE/.harness/inner.sh"
for b in "${BINS[@]}"; do
  [[ -x "$b" ]] || die "--bin $b is not an executable"
  cp "$b" "$STAGE/bin/"
done
for f in "${FILES[@]}"; do
  src="${f%%:*}" name="${f#*:}"
  [[ "$f" == *:* ]] || name="$(basename "$src")"
  [[ -f "$src" ]] || die "--file $src does not exist"
  cp "$src" "$STAGE/in/$name"
done
size_mb=$(( $(du -sm "$STAGE" | cut -f1) * 2 + 64 ))
mkfs.ext4 -q -L scenario -d "$STAGE" "$WORK/scenario.img" "${size_mb}M"

# --- the TPM ------------------------------------------------------------------------
TPM_ARGS=()
start_swtpm() {
  # The socket lives in the run dir: a state dir can be reused by later boots.
  swtpm socket --tpm2 --tpmstate dir="$TPM_STATE" \
    --ctrl type=unixio,path="$WORK/swtpm.sock" \
    --pid file="$WORK/swtpm.pid" --log file="$WORK/swtpm.log" --daemon
  SWTPM_PID="$(cat "$WORK/swtpm.pid")"
}
stop_swtpm() {
  [[ -n "$SWTPM_PID" ]] || return 0
  kill "$SWTPM_PID" 2>/dev/null || true
  while kill -0 "$SWTPM_PID" 2>/dev/null; do sleep 0.2; done
  SWTPM_PID=""
}
if ((USE_TPM)); then
  TPM_STATE="${TPM_STATE:-$WORK/tpm}"
  mkdir -p "$TPM_STATE"
  TPM_ARGS=(-chardev socket,id=chrtpm,path="$WORK/swtpm.sock"
    -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0)
  log "swtpm state: $TPM_STATE"
fi

# --- boot -----
# UEFI (OVMF) rather than SeaBIOS: systemd 257's Varlink Encrypt has no `withKey` and picks
# the key itself; it only uses the TPM when it was booted through EFI firmware that saw the
# TPM (efi_has_tpm2()). qemu still loads our kernel+initrd directly (fw_cfg), no bootloader.
FW_ARGS=(-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
  -drive if=pflash,format=raw,file="$WORK/vars.fd")
# -----------------------------------------------------------------------------
# On a starved host, TCG guests now and then hang early in boot (RCU stalls, a CPU whose timer
# never fires). Until the scenario has started nothing on the drives has changed, so such a
# boot is power-cycled: up to VM_BOOT_TRIES boots, each given VM_BOOT_WAIT seconds to start it.
BOOT_WAIT="${VM_BOOT_WAIT:-420}" TRIES="${VM_BOOT_TRIES:-3}"
qrc=1 secs=0
for ((try = 1; try <= TRIES; try++)); do
  ((USE_TPM)) && start_swtpm
  cp /usr/share/OVMF/OVMF_VARS_4M.fd "$WORK/vars.fd"
  : >"$OUT/console.log"
  log "booting (try $try, timeout ${TIMEOUT}s), console: $OUT/console.log"
  t0=$(date +%s)
  qemu-system-x86_64 \
    -machine q35 -accel tcg,thread=multi -cpu max -m "$MEM" -smp 2 "${FW_ARGS[@]}" \
    -display none -monitor none -serial file:"$OUT/console.log" -no-reboot \
    -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 panic=-1 net.ifnames=0" \
    -drive file="$IMAGE_DIR/rootfs.img",format=raw,if=virtio,snapshot=on \
    -drive file="$WORK/scenario.img",format=raw,if=virtio \
    -nic none "${TPM_ARGS[@]}" &
  qpid=$! started=0 qrc=""
  while kill -0 "$qpid" 2>/dev/null; do
    secs=$(($(date +%s) - t0))
    ((started)) || ! grep -aq 'COHORT-VM: scenario starting' "$OUT/console.log" || {
      started=1
      log "scenario started after ${secs}s"
    }
    if ((secs >= TIMEOUT)) || { ((!started)) && ((secs >= BOOT_WAIT)); }; then
      kill -KILL "$qpid" 2>/dev/null || true
      qrc=124
      break
    fi
    sleep 2
  done
  if [[ -z "$qrc" ]]; then
    set +e; wait "$qpid"; qrc=$?; set -e
  else
    wait "$qpid" 2>/dev/null || true
  fi
  secs=$(($(date +%s) - t0))
  stop_swtpm
  log "VM exited (qemu rc=$qrc) after ${secs}s"
  ((qrc == 124 && !started)) || break
  log "the guest never reached the scenario: power-cycling it"
  mv "$OUT/console.log" "$OUT/console.try$try.log"
done
((qrc == 124)) && {
  tail -30 "$OUT/console.log" >&2 || true
  die "timed out after ${secs}s"
}

# --- results --------------------------------------------------------------------------
debugfs -R "rdump /out $WORK" "$WORK/scenario.img" >/dev/null 2>&1 || true
cp -r "$WORK/out"/. "$OUT/" 2>/dev/null || true
marker="$(grep -a 'COHORT-VM: RESULT' "$OUT/console.log" | tail -1 || true)"
[[ -n "$marker" ]] || { tail -30 "$OUT/console.log" >&2; die "no result marker on the console"; }
[[ -f "$OUT/rc" ]] || die "scenario left no rc on its drive ($marker)"
rc="$(cat "$OUT/rc")"
log "scenario rc=$rc, boot+scenario ${secs}s; results in $OUT"
echo "vm_seconds=$secs" >"$OUT/timing"
exit "$rc"
