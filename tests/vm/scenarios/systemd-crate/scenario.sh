#!/bin/bash
# Boot 1 of the cohort-systemd proof ("machine A"): credentials via Varlink (TPM-bound,
# system and user scope), units via D-Bus (plain, Type=notify, failing; system and user
# manager), lingering via logind. Leaves the credentials and this machine's host key in
# /scenario/out for the second boot. Runs as root inside the VM; probe is /scenario/bin/probe.
set -euo pipefail
OUT=/scenario/out
step() { echo; echo "=== $*"; }
as_alice() { runuser -u alice -- env HOME=/home/alice XDG_RUNTIME_DIR=/run/user/1000 "$@"; }

step "environment"
systemctl --version | head -1
systemd-analyze has-tpm2 | head -1

step "system scope credential, TPM required (root)"
probe encrypt --scope system --name cohort-test --secret s3cret-system --out "$OUT/system.cred"

step "lingering for alice via logind"
probe linger --uid 1000
# logind starts user@1000 for a lingering user; wait for its bus.
t0=$SECONDS
for _ in $(seq 180); do [[ -S /run/user/1000/bus ]] && break; sleep 1; done
[[ -S /run/user/1000/bus ]] || { echo "alice's user bus never appeared"; systemctl status user@1000.service --no-pager; exit 1; }
echo "alice's user manager is up after $((SECONDS - t0))s"

step "user scope credential, TPM required (alice, unprivileged)"
cp /scenario/bin/probe /usr/local/bin/probe
as_alice probe encrypt --scope user --name cohort-test --secret s3cret-user --out /tmp/user.cred
cp /tmp/user.cred "$OUT/user.cred"

step "unprivileged system scope is refused with a typed error"
as_alice probe encrypt --scope system --name cohort-test --expect-error permission-denied

step "a unit over D-Bus on the system manager"
probe unit --bus system --name cohort-probe.service
systemctl is-enabled cohort-probe.service

step "a Type=notify unit whose main process uses sd_notify (with watchdog)"
probe unit --bus system --name cohort-probe-notify.service --notify
systemctl show -p StatusText -p WatchdogTimestampMonotonic cohort-probe-notify.service
sleep 12   # past WatchdogSec=10s: still active only if the pings arrive
[[ "$(systemctl show -P ActiveState cohort-probe-notify.service)" == active ]] || { echo "watchdog killed it"; exit 1; }
echo "still active after the watchdog period"

step "a failing unit reports the job's result"
probe unit --bus system --name cohort-probe-fail.service --fail

step "Type=notify unit on alice's user manager (user bus)"
as_alice probe unit --bus user --name cohort-probe-user.service --notify

step "hand over this machine's host key and machine ID (a copied disk carries both)"
cp /var/lib/systemd/credential.secret "$OUT/credential.secret"
# The host key embeds the machine ID: systemd discards it on a machine with another one.
cp /etc/machine-id "$OUT/machine-id"
echo "ALL OK"
