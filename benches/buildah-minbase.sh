#!/bin/sh
# The baseline benches/image.rs times `cohort image build` against: the same content put into
# a from-scratch image with buildah, the way issue #4 measured it (26 s, 528 MB there).
#
#   benches/buildah-minbase.sh fetch CACHE                   # download the .debs once (untimed)
#   benches/buildah-minbase.sh build STORE CODEX TAG CACHE   # the timed part; prints the image id
#
# build: `buildah from scratch`, mount it, mmdebstrap a Debian 12 minbase with git and
# ca-certificates into the mount, copy the pinned codex to /usr/local/bin, commit as TAG.
# Storage is STORE/root and STORE/runroot (disposable, never the host's).
#
# Fairness: the .debs come from CACHE (filled by `fetch`), so the timed build does not wait
# for ~50 MB of package downloads that cohort (which copies host files) never makes. apt's
# package lists are still fetched from the mirror inside the timed part (a few MB; mmdebstrap
# needs them to resolve the package set). mmdebstrap empties the package cache at the end, so
# the .debs are not in the image.
set -eu
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS=git,ca-certificates

case "${1:-}" in
fetch)
    cache=${2:?CACHE}
    mkdir -p "$cache"
    # The two --skip keep all .debs (essential ones too) for the sync-out; /dev/null discards
    # the rootfs.
    mmdebstrap --quiet --variant=minbase --include="$PKGS" --skip=download/empty --skip=essential/unlink \
        --customize-hook="sync-out /var/cache/apt/archives $cache" \
        "$SUITE" /dev/null "$MIRROR"
    ls "$cache"/*.deb | wc -l
    ;;
build)
    store=${2:?STORE} codex=${3:?CODEX} tag=${4:?TAG} cache=${5:?CACHE}
    b() { buildah --root "$store/root" --runroot "$store/runroot" "$@"; }
    ctr=$(b from scratch)
    mnt=$(b mount "$ctr")
    mmdebstrap --quiet --mode=root --variant=minbase --include="$PKGS" \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in $cache /var/cache/apt/archives/" \
        "$SUITE" "$mnt" "$MIRROR"
    install -D -m 0755 "$codex" "$mnt/usr/local/bin/codex"
    b umount "$ctr" >/dev/null
    b config --cmd /bin/sh --workingdir /workspace "$ctr"
    b commit --quiet --rm "$ctr" "$tag"
    ;;
*)
    echo "usage: $0 fetch CACHE | build STORE CODEX TAG CACHE" >&2
    exit 2
    ;;
esac
