#!/usr/bin/env bash
# Installs everything the lab and the tests need on a Debian machine, as root:
# Debian packages, then a virtual environment at .venv with pinned versions.
# A second run does nothing when nothing changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

debs=(nftables libnftables1 iproute2 conntrack socat iperf3 iputils-ping procps python3 python3-venv shellcheck systemd-container debootstrap openssh-client
      keepalived conntrackd)   # HA pairs (docs/ha.md): installed, never started here
debs+=(prometheus)   # promtool and the lab's Prometheus server (docs/metrics.md): never started here
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must not start keepalived/conntrackd in the machine's own namespace:
    # policy-rc.d 101 = "do not start services", removed again afterwards.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1
    fi
    trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$own_policy" = 1 ] && rm -f "$policy"
    trap - EXIT
fi

# Some machines' pip config lists local package indexes that may be absent: hide that noise.
pip_install() {
    .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    return "${PIPESTATUS[0]}"
}

python=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: building .venv (pinned requirements-dev.txt, with requirements.txt)"
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    pip_install -r requirements-dev.txt
    pip_install --no-deps -e .
    echo "$want" > "$stamp"
fi

# Make the collection importable and discoverable as ipmasq.gateway from the venv.
link=.venv/collections/ansible_collections/ipmasq/gateway
if [ "$(readlink "$link" 2>/dev/null)" != "$repo" ]; then
    mkdir -p "$(dirname "$link")"
    ln -sfn "$repo" "$link"
fi
