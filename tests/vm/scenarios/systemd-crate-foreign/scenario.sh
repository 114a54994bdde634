#!/bin/bash
# Boot 2/3 of the cohort-systemd proof: the credentials from boot 1, and boot 1's host key
# (as a copied disk would carry it), on a machine whose TPM is given by the harness.
# /scenario/in/expect says what must happen: "not-this-machine" (another TPM) or "ok"
# (the same TPM state again: the control that shows the failure is the TPM's doing).
set -euo pipefail
IN=/scenario/in
expect="$(cat "$IN/expect")"
as_alice() { runuser -u alice -- env HOME=/home/alice "$@"; }

# What a copied disk carries: machine A's machine ID and host key. Only the TPM differs
# (or, for the control boot, not even that). systemd-creds reads both per request.
umount /etc/machine-id 2>/dev/null || true
cat "$IN/machine-id" >/etc/machine-id
install -m 0400 "$IN/credential.secret" /var/lib/systemd/credential.secret
cp /scenario/bin/probe /usr/local/bin/probe
cp "$IN/user.cred" /tmp/user.cred && chmod 0644 /tmp/user.cred

if [[ "$expect" == ok ]]; then
  probe decrypt --scope system --name cohort-test --in "$IN/system.cred" --secret s3cret-system
  as_alice probe decrypt --scope user --name cohort-test --in /tmp/user.cred --secret s3cret-user
else
  probe decrypt --scope system --name cohort-test --in "$IN/system.cred" --expect-error "$expect"
  as_alice probe decrypt --scope user --name cohort-test --in /tmp/user.cred --expect-error "$expect"
fi
echo "ALL OK"
