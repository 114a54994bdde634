#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh Debian machine:
# installs what the tests need, then runs them. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v git >/dev/null || need_apt+=(git)
command -v cc >/dev/null || need_apt+=(gcc)
command -v npm >/dev/null || need_apt+=(npm)
# The git servers tests/support/remotes.rs starts on loopback (https, ssh), and its test CA.
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
[ -x /usr/sbin/fcgiwrap ] || need_apt+=(fcgiwrap)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
# The distribution registry tests/image_push.rs pushes to (started by the test on loopback).
[ -x /usr/bin/docker-registry ] || need_apt+=(docker-registry)
command -v ssh >/dev/null || need_apt+=(openssh-client)
command -v openssl >/dev/null || need_apt+=(openssl)
# The simulated hosts' test image (tests/netsim.rs): a static busybox, made into an image offline.
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
command -v ip >/dev/null || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Packages must not start their system services (nginx on :80, sshd on :22, fcgiwrap,
    # docker-registry on :5000):
    # the tests start their own, and without an init to start them a postinst can fail.
    no_start=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        no_start=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}"
    if [ -n "$no_start" ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
fi
if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 2
fi

echo "== the pinned Codex CLI (npm, project-local)"
sh fixtures/install-codex.sh

echo "== podman and runc for the disposable podman services the tests start"
bash fixtures/podman-service.sh install

echo "== formatting and lints (cargo fmt --check; clippy with warnings as errors)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (workspace)"
cargo test --workspace --locked 2>&1

# systemd, D-Bus, Varlink credentials, podman 5 and a TPM are not on this host: they are
# proven in a throwaway Debian 13 VM (qemu TCG + swtpm), with the binaries built above
# (~2 min to build the VM image once, ~10 min for the two boots). COHORT_VM=0 skips it.
if [ "${COHORT_VM:-1}" = 0 ]; then
    echo "== VM proof skipped (COHORT_VM=0)"
else
    echo "== the service in a VM: keys (TPM2), both scopes, a stolen credential"
    bash tests/vm/test-service.sh
fi
