#!/bin/bash
# The service end to end on "machine A" (systemd 257, podman 5, swtpm): for the system
# scope (rootful, hardened, LoadCredentialEncrypted=) and then the user scope (rootless,
# lingering alice): place the key with --tpm2 require, build the image, install the
# service, submit a request of 4 tasks (the last one hostile), wait until all 4 are merged into the service
# branch, and scan everything for the key. The system service also pulls from and pushes to an
# origin behind sshd with a TPM2-sealed deploy key. Leaves both credentials, the host key and the
# machine ID in out/ for the stolen-file boot. Runs as root; inputs in /scenario/in.
set -euo pipefail
# The unit that runs this gives root no HOME; root's own cohort commands keep their user-scope
# trust store under it.
export HOME=/root
OUT=/scenario/out
KEY="sk-cohort-vm-test-0123456789abcdef"
step() { echo; echo "=== $(cut -d' ' -f1 /proc/uptime)s $*"; }
as_alice() { runuser -u alice -- env HOME=/home/alice XDG_RUNTIME_DIR=/run/user/1000 PATH=/usr/local/bin:/usr/bin:/bin "$@"; }
as_cohort() { runuser -u cohort -- env HOME=/srv/cohort PATH=/usr/local/bin:/usr/bin:/bin "$@"; }
timer() { echo "timing $1=$(( $(date +%s) - $2 ))s" | tee -a "$OUT/timings"; }

step "programs"
install -m 0755 /scenario/bin/cohort /scenario/bin/codex /scenario/bin/cohort-standin /usr/local/bin/
cohort --version; codex --version; systemctl --version | head -1; podman --version

step "test set-up: an address task containers can reach, the model stand-in, no containers ranges"
# The VM has no network; the stand-in listens on 192.0.2.1, which cohort's model gateway on
# this host reaches (task containers have no network: they reach the gateway through its
# socket). (Test set-up, not product.)
ip link add dummy0 type dummy && ip addr add 192.0.2.1/24 dev dummy0 && ip link set dummy0 up
ip route add default via 192.0.2.254 dev dummy0 onlink
cohort-standin --host 192.0.2.1 --port 8080 --record "$OUT/standin.jsonl" --max-seconds 3000 >/dev/null 2>"$OUT/standin.err" &
# A fresh server (issue 19): no `containers` range, which rootful userns=auto needs.
# `service install` must refuse, and `service install --setup` add one.
sed -i '/^containers:/d' /etc/subuid /etc/subgid
cp /etc/subuid /tmp/subuid.before; cp /etc/subgid /tmp/subgid.before

make_repo() { # dir; run as the repo's owner. Task containers get the default network (none):
  # codex reaches the stand-in through cohort's gateway only.
  local dir="$1"
  mkdir -p "$dir" && cd "$dir" && git init -q -b main
  git config user.name "Repo Owner" && git config user.email owner@example.com
  printf '# demo\n' >README.md
  printf '[agent]\nkind = "codex"\nmodel = "gpt-5-codex"\nbase_url = "http://192.0.2.1:8080/v1"\n\n[run]\njobs = 3\n' >cohort.toml
  git add -A && git commit -q -m initial
}
wait_merged() { # repo, as-function, seconds: until 4 task merges are on cohort/service
  local repo="$1" as="$2" limit="$3" t0=$SECONDS n=0 last=0
  while ((SECONDS - t0 < limit)); do
    n=$($as git -C "$repo" log --first-parent --format=%s cohort/service 2>/dev/null | grep -c '^Merge task' || true)
    [[ "$n" == 4 ]] && return 0
    if $as cohort -C "$repo" status 2>/dev/null | head -1 | grep -q '(done'; then
      echo "the run finished with $n of 4 merged; its task logs:"
      $as cohort -C "$repo" status
      for f in "$repo"/.git/cohort/runs/*/logs/*.log; do echo "--- $f"; tail -40 "$f"; done
      return 1
    fi
    if ((SECONDS - last >= 60)); then
      last=$SECONDS
      echo "  $((SECONDS - t0))s: $n of 4 merged; $($as cohort -C "$repo" status 2>&1 | tail -4 | tr '\n' ' ')"
    fi
    sleep 5
  done
  echo "only $n of 4 tasks merged after ${limit}s"; return 1
}
# The hostile fourth task (request.md) plants hooks and an fsmonitor command in its git dir and,
# by path, in the repository's, and moves refs. None of it may reach the repository.
guard() { # repo, as-function: what the hostile task must not change
  local repo="$1" as="$2"
  { sha256sum "$repo/.git/config"; ls -la "$repo/.git/hooks" | awk '{print $1, $5, $9}'
    $as git -C "$repo" for-each-ref --format='%(refname) %(objectname) %(symref)' refs/heads/main; } 2>&1
}
check_sealed() { # repo, as-function, guard-before
  local repo="$1" as="$2" before="$3"
  [[ "$(guard "$repo" "$as")" == "$before" ]] || { echo "the repository's config, hooks or main changed:"; diff <(echo "$before") <(guard "$repo" "$as"); return 1; }
  $as git -C "$repo" symbolic-ref -q refs/heads/cohort/service && { echo "cohort/service became a symbolic ref"; return 1; }
  $as git -C "$repo" show cohort/service:honest.txt >/dev/null || { echo "the hostile task's honest file was not merged"; return 1; }
  $as git -C "$repo" status >/dev/null && $as git -C "$repo" merge -q --no-edit cohort/service >/dev/null
  ls /tmp/PWNED-* 2>/dev/null && { echo "something the hostile task planted ran on the host"; return 1; }
  echo "the hostile task changed nothing outside its branch, and its honest file was merged"
}
check_environ() { # repo, as-function: the third task's container held a token, not the key
  local environ; environ=$($2 git -C "$1" show cohort/service:environ.txt)
  grep -q '^COHORT_CODEX_KEY=cohort-' <<<"$environ" || { echo "no gateway token in the container's environment"; return 1; }
  grep -qF "$KEY" <<<"$environ" && { echo "the key is in a task container's environment"; return 1; }
  echo "the task container's processes held a gateway token and no key"
}
scan_for_key() { # paths...
  if grep -rIl --binary-files=text -F "$KEY" "$@" 2>/dev/null; then echo "the key leaked into the files above"; return 1; fi
  echo "no trace of the key in: $*"
}

# ---------------------------------------------------------------------------- system
# Anything that reads the repository runs as its owner: git refuses a repository owned by
# someone else, and root opening the state DB could leave root-owned WAL files behind.
step "system scope: a service user owns the repository"
useradd --system --create-home --home-dir /srv/cohort --shell /usr/sbin/nologin cohort
as_cohort bash -c "$(declare -f make_repo); make_repo /srv/cohort/repo"

step "system scope: trust the repository's settings (base_url)"
# For root's own commands here (image build), and for the system service (/etc/cohort).
cohort trust /srv/cohort/repo/cohort.toml
cohort trust --scope system /srv/cohort/repo/cohort.toml
stat -c '%U %a %n' /etc/cohort/trusted.toml

step "system scope: origin behind sshd, reached with a deploy key sealed like the API key"
useradd --system --create-home --home-dir /srv/git --shell /usr/bin/git-shell git
as_git() { runuser -u git -- env HOME=/srv/git PATH=/usr/local/bin:/usr/bin:/bin "$@"; }
# Each repository is handled by its owner: git refuses another user's (also to clone from).
as_cohort git clone -q --bare /srv/cohort/repo /tmp/origin.git
mv /tmp/origin.git /srv/git/origin.git && chown -R git:git /srv/git/origin.git
ssh-keygen -q -t ed25519 -N "" -C cohort-deploy -f /tmp/deploy
install -d -m 0700 -o git -g git /srv/git/.ssh
install -m 0600 -o git -g git /tmp/deploy.pub /srv/git/.ssh/authorized_keys
# Someone else's commit on origin's main, for the service to pull before its request.
as_git git clone -q /srv/git/origin.git /tmp/other
as_git git -C /tmp/other -c user.name=Other -c user.email=other@example.com commit -q --allow-empty -m "upstream change"
as_git git -C /tmp/other push -q origin main
UPSTREAM=$(as_git git -C /tmp/other rev-parse HEAD)
systemctl start ssh.service
ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null >/etc/ssh/ssh_known_hosts
[[ -s /etc/ssh/ssh_known_hosts ]] || { echo "no host key from sshd"; exit 1; }
as_cohort git -C /srv/cohort/repo remote add origin git@127.0.0.1:/srv/git/origin.git
as_cohort git -C /srv/cohort/repo update-ref refs/remotes/origin/main main
as_cohort git -C /srv/cohort/repo branch -q -u origin/main main
# Line 4: private key material (line 2 is the same header for every ed25519 key).
DEPLOY_LINE=$(sed -n 4p /tmp/deploy)
cohort keys place git_ssh_key --scope system --tpm2 require </tmp/deploy
shred -u /tmp/deploy
# The service's own settings (trusted): push after each request.
printf '[run]\npush = true\n' >/etc/cohort/config.toml

step "system scope: place the key, TPM2 required"
printf '%s' "$KEY" | cohort keys place openai_api_key --scope system --tpm2 require
cohort keys list
cohort keys check openai_api_key --scope system
cp /etc/credstore.encrypted/cohort.openai_api_key "$OUT/system.cred"

step "system scope: the image, into root's storage"
systemctl enable --now podman.socket
t=$(date +%s)
cohort -C /srv/cohort/repo image build --copy-system --archive /tmp/cohort-image.tar
timer image_build_system "$t"

step "system scope: doctor flags the missing id ranges"
rc=0; cohort -C /srv/cohort/repo doctor --scope system >"$OUT/doctor-system.txt" || rc=$?
cat "$OUT/doctor-system.txt"
[[ $rc == 1 ]] && grep -q '^FAIL  user namespaces: no `containers` range' "$OUT/doctor-system.txt" \
  || { echo "doctor did not flag the missing containers range (rc=$rc)"; exit 1; }
[[ $(grep -c '^FAIL' "$OUT/doctor-system.txt") == 1 ]] || { echo "doctor flagged more than the id ranges"; exit 1; }

step "system scope: install refuses, exit 2, with the fix; nothing written or enabled"
rc=0; cohort service install --scope system --repo /srv/cohort/repo >"$OUT/install-refused.txt" 2>&1 || rc=$?
cat "$OUT/install-refused.txt"
[[ $rc == 2 ]] || { echo "install without the ranges exited $rc, not 2"; exit 1; }
grep -q 'user namespaces: no `containers` range' "$OUT/install-refused.txt" \
  && grep -q 'cohort service install --setup' "$OUT/install-refused.txt" \
  || { echo "the refusal does not name the problem and its fix"; exit 1; }
[[ ! -e /etc/systemd/system/cohort.service ]] || { echo "a refused install wrote the unit"; exit 1; }
cmp -s /etc/subuid /tmp/subuid.before && cmp -s /etc/subgid /tmp/subgid.before \
  || { echo "a refused install changed /etc/subuid or /etc/subgid"; exit 1; }

step "system scope: install --setup adds the ranges, says so, and installs"
t=$(date +%s)
cohort service install --scope system --repo /srv/cohort/repo --setup 2>&1 | tee "$OUT/install-setup.txt"
timer install_system "$t"
grep -q '^setup: added containers:[0-9]*:[0-9]* to /etc/subuid and /etc/subgid' "$OUT/install-setup.txt" \
  || { echo "--setup did not say what it changed"; exit 1; }
for f in subuid subgid; do
  # Every line that was there is still there, and one containers line was added.
  diff <(cat /tmp/$f.before) <(grep -v '^containers:' /etc/$f) || { echo "/etc/$f lost or changed a line"; exit 1; }
  [[ $(grep -c '^containers:' /etc/$f) == 1 ]] || { echo "/etc/$f has no single containers line"; exit 1; }
  echo "/etc/$f: $(grep '^containers:' /etc/$f)"
done
cohort -C /srv/cohort/repo doctor --scope system >"$OUT/doctor-system-after.txt" \
  || { cat "$OUT/doctor-system-after.txt"; echo "doctor still fails after --setup"; exit 1; }
systemctl show -p ActiveState -p SubState -p User -p DynamicUser -p PrivateUsers cohort.service
systemd-analyze security --no-pager cohort.service | tee "$OUT/security-system.txt" | tail -3
grep -o 'Overall exposure level for cohort.service: [0-9.]*' "$OUT/security-system.txt" | tee "$OUT/exposure"

step "system scope: submit 4 tasks (one hostile) and wait"
t=$(date +%s)
# The service's sync fast-forwards main to origin's new commit; nothing else may move it.
before=$(guard /srv/cohort/repo as_cohort | sed "s/$(as_cohort git -C /srv/cohort/repo rev-parse main)/$UPSTREAM/")
cohort -C /srv/cohort/repo submit /scenario/request.md
wait_merged /srv/cohort/repo as_cohort 900 || { cohort service logs --scope system -n 80; journalctl -u cohort.service --no-pager | tail -60; exit 1; }
timer four_tasks_system "$t"
as_cohort git -C /srv/cohort/repo log --first-parent --format=%s cohort/service | tee "$OUT/system-service-branch.txt"
[[ $(grep -c '^Merge task' "$OUT/system-service-branch.txt") == 4 ]]
as_cohort cohort -C /srv/cohort/repo status --json >"$OUT/system-status.json"
check_sealed /srv/cohort/repo as_cohort "$before"

step "system scope: the service pulled from origin over ssh, and pushed its branch there"
as_cohort git -C /srv/cohort/repo merge-base --is-ancestor "$UPSTREAM" main \
  || { echo "origin's new commit was not pulled into main"; exit 1; }
pushed() { [[ "$(as_git git --git-dir=/srv/git/origin.git rev-parse -q --verify refs/heads/cohort/service)" == "$(as_cohort git -C /srv/cohort/repo rev-parse cohort/service)" ]]; }
for _ in $(seq 60); do pushed && break; sleep 2; done
pushed || { echo "origin has not got the service branch"; journalctl -u cohort.service --no-pager | tail -40; exit 1; }
as_cohort cohort -C /srv/cohort/repo report | grep -E 'cohort/service (pushed|up to date) at' \
  || { echo "report shows no push"; exit 1; }
grep -qx 'LoadCredentialEncrypted=cohort.git_ssh_key' /etc/systemd/system/cohort.service \
  || { echo "the unit does not load the deploy key"; exit 1; }
echo "pulled $UPSTREAM, pushed cohort/service to origin with the deploy key"

step "system scope: the task containers had their own user and network namespaces"
# The third task wrote its container's uid_map and network namespace (request.md).
as_cohort git -C /srv/cohort/repo show cohort/service:userns.txt | tee "$OUT/system-userns.txt"
awk '$1 == 0 && $2 != 0 { ok = 1 } END { exit !ok }' "$OUT/system-userns.txt" \
  || { echo "container root is host root: no userns=auto"; exit 1; }
grep -qx "1000 $(id -u cohort) 1" "$OUT/system-userns.txt" \
  || { echo "the image user is not mapped onto the repository's owner"; exit 1; }
[[ "$(as_cohort git -C /srv/cohort/repo show cohort/service:netns.txt)" != "$(readlink /proc/1/ns/net)" ]] \
  || { echo "the task container shared the host's network namespace"; exit 1; }
echo "userns=auto (image user = the repository's owner), own network namespace"
check_environ /srv/cohort/repo as_cohort
# The stand-in saw the key, from the gateway, on every request, and no gateway token.
[[ $(grep -c . "$OUT/standin.jsonl") == $(grep -cF "\"authorization\":\"Bearer $KEY\"" "$OUT/standin.jsonl") ]] \
  || { echo "a request reached the stand-in without the key"; exit 1; }
grep -q 'cohort-[0-9a-f]\{64\}' "$OUT/standin.jsonl" && { echo "a gateway token reached the stand-in"; exit 1; }
echo "the stand-in saw the key from the gateway only"
cohort service status --scope system
journalctl -u cohort.service -o verbose --no-pager | grep -m3 -E '^ *(RUN_ID|TASK_ID)=' || { echo "no structured fields in the journal"; exit 1; }
journalctl -b --no-pager >"$OUT/journal-for-scan.txt"
scan_for_key /srv/cohort/repo /var/lib/private/cohort /etc/systemd/system "$OUT/journal-for-scan.txt" /var/lib/containers/storage/overlay
as_cohort git -C /srv/cohort/repo log -p --all | grep -F "$KEY" && { echo "key in a commit"; exit 1; } || echo "no key in any commit"
if grep -rIl --binary-files=text -F "$DEPLOY_LINE" /srv/cohort/repo /var/lib/private/cohort /srv/git /etc/systemd/system "$OUT/journal-for-scan.txt" /var/lib/containers/storage/overlay 2>/dev/null; then
  echo "the deploy key leaked into the files above"; exit 1
fi
echo "no trace of the deploy key outside its runtime file"
[[ "$(stat -c %a /run/cohort/git_ssh_key)" == 600 ]] || { echo "the deploy key's file is not 0600"; exit 1; }
systemctl stop cohort.service
[[ ! -e /run/cohort/git_ssh_key ]] || { echo "the deploy key outlived the service"; exit 1; }
echo "the deploy key's runtime file was 0600 and went with the service"

# ------------------------------------------------------------------------------ user
step "user scope: lingering alice"
loginctl enable-linger alice
for _ in $(seq 180); do [[ -S /run/user/1000/bus ]] && break; sleep 1; done
as_alice bash -c "$(declare -f make_repo); make_repo /home/alice/repo"
as_alice cohort trust /home/alice/repo/cohort.toml

step "user scope: place the key, TPM2 required"
printf '%s' "$KEY" | as_alice cohort keys place openai_api_key --scope user --tpm2 require
cp /home/alice/.config/credstore.encrypted/cohort.openai_api_key "$OUT/user.cred"

step "user scope: the same image, into alice's storage"
as_alice systemctl --user enable --now podman.socket
t=$(date +%s)
chmod 0644 /tmp/cohort-image.tar
as_alice cohort image load /tmp/cohort-image.tar
timer image_load_user "$t"

step "user scope: doctor, install"
as_alice cohort -C /home/alice/repo doctor --scope user | tee "$OUT/doctor-user.txt" || true
as_alice cohort service install --scope user --repo /home/alice/repo

step "user scope: submit 4 tasks (one hostile) and wait"
t=$(date +%s)
before=$(guard /home/alice/repo as_alice)
as_alice cohort -C /home/alice/repo submit /scenario/request.md
wait_merged /home/alice/repo as_alice 900 || { as_alice cohort service logs --scope user -n 80; exit 1; }
timer four_tasks_user "$t"
as_alice git -C /home/alice/repo log --first-parent --format=%s cohort/service | tee "$OUT/user-service-branch.txt"
[[ $(grep -c '^Merge task' "$OUT/user-service-branch.txt") == 4 ]]
check_sealed /home/alice/repo as_alice "$before"
as_alice cohort service status --scope user
check_environ /home/alice/repo as_alice
journalctl -b --no-pager >"$OUT/journal-for-scan.txt"
scan_for_key /home/alice/repo /home/alice/.local/state/cohort "$OUT/journal-for-scan.txt"
rm -f "$OUT/journal-for-scan.txt"

step "hand over what a copied disk carries"
# The system unit, for machine B to start (its credential cannot load there).
grep -v '^LoadCredentialEncrypted=cohort.git_' /etc/systemd/system/cohort.service >"$OUT/cohort.service"
cp /var/lib/systemd/credential.secret "$OUT/credential.secret"
cp /etc/machine-id "$OUT/machine-id"
echo "ALL OK"
