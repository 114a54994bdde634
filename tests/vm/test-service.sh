#!/usr/bin/env bash
# The service end to end in the VM (issue: keys and the service), in two boots:
#   1. machine A (fresh TPM A): system scope and user scope, each: key placed with
#      --tpm2 require, image built, service installed, 3 tasks submitted and merged.
#   2. machine B (fresh TPM B) with A's credential files, host key and machine ID:
#      every way of reading the key refuses it as "a stolen file on another machine".
# Prints the figures the README quotes (exposure, wall times). Exit 0 only if all held.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VM_CACHE="${VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-vm}"
W="$VM_CACHE/service"
rm -rf "$W"; mkdir -p "$W/bin"
t_all=$(date +%s)

# The test profile's binaries (what `cargo test` already built; dependencies are optimized in
# the dev profile), so CI pays for no second build.
echo "[test] building cohort and the stand-in"
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
(cd "$REPO" && cargo build --locked -q -p cohort -p cohort-standin)
strip -o "$W/bin/cohort" "$TARGET/debug/cohort"
strip -o "$W/bin/cohort-standin" "$TARGET/debug/cohort-standin"
CODEX="$(sh "$REPO/fixtures/install-codex.sh" | tail -1)"
cp "$CODEX" "$W/bin/codex"

"$HERE/build-image.sh" >/dev/null

summary=()
boot() { # name, then run.sh args
  local name="$1"; shift
  local t0=$(date +%s) rc=0
  VM_MEM="${VM_MEM:-3072}" "$HERE/run.sh" --out "$W/$name" "$@" || rc=$?
  summary+=("$name: rc=$rc, $(($(date +%s) - t0))s")
  if ((rc != 0)) || ! grep -q "ALL OK" "$W/$name/log"; then
    echo "[test] FAIL in $name (rc=$rc); its log:" >&2
    tail -60 "$W/$name/log" >&2 || true
    exit 1
  fi
}

boot boot1-machineA --scenario "$HERE/scenarios/service" --tpm-state "$W/tpmA" --timeout 2400 \
  --bin "$W/bin/cohort" --bin "$W/bin/cohort-standin" --bin "$W/bin/codex"
A="$W/boot1-machineA"
for f in system.cred user.cred credential.secret machine-id cohort.service; do
  [[ -s "$A/$f" ]] || { echo "[test] boot 1 left no $f" >&2; exit 1; }
done
boot boot2-machineB --scenario "$HERE/scenarios/service-foreign" --tpm-state "$W/tpmB" --timeout 900 \
  --bin "$W/bin/cohort" --file "$A/system.cred" --file "$A/user.cred" \
  --file "$A/credential.secret" --file "$A/machine-id" --file "$A/cohort.service"

echo
echo "[test] figures:"
cat "$A/exposure" "$A/timings" | sed 's/^/  /'
printf '[test] %s\n' "${summary[@]}"
echo "[test] service VM proof passed in $(($(date +%s) - t_all))s"
