#!/bin/bash
# Guest side of tests/vm/run.sh (copied to /scenario/.harness/ on the scenario drive):
# run scenario.sh, keep its log, exit code and the journal on the drive, and print markers
# on the serial console (no getty runs on it in our image).
set -u
console=/dev/ttyS0
mark() { echo "COHORT-VM: $*" >"$console" 2>/dev/null || true; }
mkdir -p /scenario/out
mark "scenario starting after $(cut -d' ' -f1 /proc/uptime)s of uptime"
start=$(date +%s)
# Output goes to the drive (read back by the host) and to the console (a hang shows live).
( cd /scenario && PATH=/scenario/bin:$PATH timeout "${SCENARIO_TIMEOUT:-1800}" bash ./scenario.sh ) 2>&1 \
  | tee /scenario/out/log >"$console"
rc=${PIPESTATUS[0]}
echo "$rc" >/scenario/out/rc
journalctl -b --no-pager -o short-monotonic >/scenario/out/journal.txt 2>&1 || true
sync
mark "RESULT rc=$rc seconds=$(( $(date +%s) - start ))"
