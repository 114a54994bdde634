#!/usr/bin/env bash
# Prove cohort-systemd against the real systemd 257 + swtpm, in three boots:
#   1. machine A (fresh TPM A): credentials, units, notify, lingering  -> creds + host key
#   2. machine B (fresh TPM B) with A's files: decryption must fail as "not this machine"
#   3. machine A again (TPM A's state) with the same files: decryption must succeed
#      (the control: the failure in 2 is the TPM's doing, not a broken file or host key).
# Set VM_SKIP_CONTROL=1 to skip boot 3. Exit code 0 only if every step held.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VM_CACHE="${VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-vm}"
W="$VM_CACHE/systemd-crate"
rm -rf "$W"; mkdir -p "$W"
t_all=$(date +%s)

echo "[test] building the probe"
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
(cd "$REPO" && cargo build --release -q -p cohort-systemd --example probe)
mkdir -p "$W/bin"
strip -o "$W/bin/probe" "$TARGET/release/examples/probe"

"$HERE/build-image.sh" >/dev/null

summary=()
boot() { # name, then run.sh args
  local name="$1"; shift
  local t0=$(date +%s) rc=0
  "$HERE/run.sh" --out "$W/$name" --bin "$W/bin/probe" "$@" || rc=$?
  summary+=("$name: rc=$rc, $(($(date +%s) - t0))s")
  if ((rc != 0)) || ! grep -q "ALL OK" "$W/$name/log"; then
    echo "[test] FAIL in $name (rc=$rc); its log:" >&2
    tail -40 "$W/$name/log" >&2 || true
    exit 1
  fi
}

boot boot1-machineA --scenario "$HERE/scenarios/systemd-crate" --tpm-state "$W/tpmA"
for f in system.cred user.cred credential.secret machine-id; do
  [[ -s "$W/boot1-machineA/$f" ]] || { echo "[test] boot 1 left no $f" >&2; exit 1; }
done
echo not-this-machine >"$W/expect-foreign"; echo ok >"$W/expect-same"
files=(--file "$W/boot1-machineA/system.cred" --file "$W/boot1-machineA/user.cred"
  --file "$W/boot1-machineA/credential.secret" --file "$W/boot1-machineA/machine-id")

boot boot2-machineB --scenario "$HERE/scenarios/systemd-crate-foreign" --tpm-state "$W/tpmB" \
  "${files[@]}" --file "$W/expect-foreign:expect"
if [[ "${VM_SKIP_CONTROL:-0}" != 1 ]]; then
  boot boot3-machineA-again --scenario "$HERE/scenarios/systemd-crate-foreign" --tpm-state "$W/tpmA" \
    "${files[@]}" --file "$W/expect-same:expect"
fi

echo
echo "[test] key lines:"
grep -h -E "^(binding|roundtrip|wrong_name|with_key_tpm2|error_kind|error_message|active_state|job_result|linger_before|manager_version|StatusText|encrypt_ms|start_ms|decrypt)" \
  "$W"/boot*/log | sort | uniq -c | sed 's/^/  /'
printf '[test] %s\n' "${summary[@]}"
echo "[test] systemd-crate VM proof passed in $(($(date +%s) - t_all))s"
