#!/usr/bin/env bash
# Installs everything the lab and the tests need on a Debian machine, as root:
# Debian packages, then a virtual environment at .venv with pinned versions.
# A second run does nothing when nothing changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

debs=(nftables libnftables1 iproute2 conntrack socat iperf3 iputils-ping procps python3 python3-venv systemd-container debootstrap openssh-client)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Some machines' pip config lists local package indexes that may be absent: hide that noise.
pip_install() {
    .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    return "${PIPESTATUS[0]}"
}

python=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: building .venv (pinned requirements.txt)"
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    pip_install -r requirements.txt
    pip_install --no-deps -e .
    echo "$want" > "$stamp"
fi

# Make the collection importable and discoverable as ipmasq.gateway from the venv.
link=.venv/collections/ansible_collections/ipmasq/gateway
if [ "$(readlink "$link" 2>/dev/null)" != "$repo" ]; then
    mkdir -p "$(dirname "$link")"
    ln -sfn "$repo" "$link"
fi
