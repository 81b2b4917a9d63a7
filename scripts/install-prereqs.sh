#!/usr/bin/env bash
# Installs what the tests need, idempotently: Debian packages (thin-provisioning-tools for the
# dm-thin interop tests, fio for the benchmarks), SPDK's spdk-rpc client (PyPI package spdk)
# and the Rust components (rustfmt, clippy).
# Runs as root on Debian 12; with a non-root user it uses sudo when present.
set -euo pipefail

APT_PKGS=(thin-provisioning-tools fio)

need=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "install-prereqs: apt-get install ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

for c in rustfmt clippy; do
    if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$c"
    fi
done

# SPDK's own JSON-RPC client, unchanged from PyPI: the end-to-end tests drive thind with it.
SPDK_PY_VERSION=26.9
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('spdk') != '$SPDK_PY_VERSION')" 2>/dev/null; then
    echo "install-prereqs: pip install spdk==$SPDK_PY_VERSION"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "spdk==$SPDK_PY_VERSION"
fi
command -v pyenv >/dev/null && pyenv rehash || true

# QEMU, the guest kernel and initramfs for the end-to-end tests with the Linux NVMe/TCP
# initiator and vhost-user-blk (../shared/guest; idempotent and cached).
GUEST_RUN="$(cd "$(dirname "$0")/../.." && pwd)/shared/guest/guest-run"
if [ -f "$GUEST_RUN" ]; then
    bash "$GUEST_RUN" --setup >/dev/null
elif [ "${CI:-}" = "true" ]; then
    echo "install-prereqs: $GUEST_RUN missing (needed by the guest tests)" >&2
    exit 1
fi

# Fail loudly (not skip) when something is still missing.
for bin in thin_check thin_dump thin_restore fio spdk-rpc; do
    command -v "$bin" >/dev/null || { echo "install-prereqs: $bin still missing" >&2; exit 1; }
done
