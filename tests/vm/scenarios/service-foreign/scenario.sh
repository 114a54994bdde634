#!/bin/bash
# "Machine B": a different TPM, with machine A's credential files, host key and machine
# ID (what a stolen disk image or a copied file carries). Every way cohort reads the key
# must refuse it and say why: `keys check`, the system service (LoadCredentialEncrypted=)
# and `cohort serve` in the user scope.
set -euo pipefail
export HOME=/root  # the unit running this gives root none
IN=/scenario/in
step() { echo; echo "=== $*"; }
as_alice() { runuser -u alice -- env HOME=/home/alice XDG_RUNTIME_DIR=/run/user/1000 PATH=/usr/local/bin:/usr/bin:/bin "$@"; }
install -m 0755 /scenario/bin/cohort /usr/local/bin/

step "put machine A's files in place"
cp "$IN/machine-id" /etc/machine-id
install -m 0400 "$IN/credential.secret" /var/lib/systemd/credential.secret
install -d -m 0700 /etc/credstore.encrypted
install -m 0600 "$IN/system.cred" /etc/credstore.encrypted/cohort.openai_api_key
install -d -o alice -g alice -m 0700 /home/alice/.config /home/alice/.config/credstore.encrypted
install -o alice -g alice -m 0600 "$IN/user.cred" /home/alice/.config/credstore.encrypted/cohort.openai_api_key

step "keys check, system scope"
set +e
out=$(cohort keys check openai_api_key --scope system 2>&1); rc=$?
set -e
echo "$out"; echo "rc=$rc"
[[ $rc != 0 && "$out" == *"stolen file on another machine"* ]]

step "the system service refuses to start, and says why"
useradd --system --create-home --home-dir /srv/cohort --shell /usr/sbin/nologin cohort
runuser -u cohort -- bash -c 'mkdir -p /srv/cohort/repo && cd /srv/cohort/repo && git init -q -b main && git -c user.name=o -c user.email=o@e commit -q --allow-empty -m initial'
systemctl disable --now podman.socket 2>/dev/null || true
# install's host checks decrypt the key first: it refuses before it writes anything.
set +e
out=$(cohort service install --scope system --repo /srv/cohort/repo 2>&1); rc=$?
set -e
echo "$out"; echo "rc=$rc"
[[ $rc == 2 && "$out" == *"stolen file on another machine"* ]]
[[ ! -e /etc/systemd/system/cohort.service ]]
# Machine A's unit (as a copied disk carries it): systemd cannot load the credential
# (exit status 243), and `service status` says why.
install -m 0644 "$IN/cohort.service" /etc/systemd/system/cohort.service
systemctl daemon-reload
systemctl start cohort.service || true
systemctl show -p ActiveState -p Result -p ExecMainStatus cohort.service
out=$(cohort service status --scope system 2>&1) || true
echo "$out"
[[ "$out" == *"stolen file on another machine"* ]]

step "the user scope: cohort serve stops with the reason"
loginctl enable-linger alice
for _ in $(seq 180); do [[ -S /run/user/1000/bus ]] && break; sleep 1; done
runuser -u alice -- bash -c 'mkdir -p /home/alice/repo && cd /home/alice/repo && git init -q -b main && git -c user.name=a -c user.email=a@e commit -q --allow-empty -m initial'
set +e
out=$(as_alice cohort -C /home/alice/repo serve --once --runtime host 2>&1); rc=$?
set -e
echo "$out"; echo "rc=$rc"
[[ $rc == 2 && "$out" == *"stolen file on another machine"* ]]
echo "ALL OK"
