#!/usr/bin/env bash
# Runs the benchmark suite (bench/): installs what the benchmarks need beyond
# scripts/setup.sh, then runs every benchmark side by side in namespace labs, writes
# bench/results/*.json and regenerates bench/REPORT.md. Not part of the tests.
#
#   scripts/bench.sh            full suite (~30-40 min on 2 cores)
#   scripts/bench.sh --quick    fewer repetitions and sizes (< 10 min on 2 cores)
#   scripts/bench.sh --only dataplane,scale [--quick]
#   scripts/bench.sh --report   only regenerate bench/REPORT.md from bench/results/
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ "$(id -u)" = 0 ] || { echo "bench: must run as root (namespaces, nftables)" >&2; exit 2; }

"$repo/scripts/setup.sh"

# haproxy, nginx-light: proxies/backends run only inside lab namespaces; apache2-utils
# gives ab; iptables (iptables-nft) for the ansible.builtin.iptables comparison.
debs=(haproxy nginx-light apache2-utils iptables iperf3 socat conntrack)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must not start nginx/haproxy in the machine's own namespace:
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

stamp=.venv/.bench-installed
want=$(sha256sum bench/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bench: installing bench/requirements.txt into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -r bench/requirements.txt 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    echo "$want" > "$stamp"
fi

# shellcheck source=scripts/env.sh
source "$repo/scripts/env.sh"
exec python -m bench.run "$@"
