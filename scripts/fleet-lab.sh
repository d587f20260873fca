#!/usr/bin/env bash
# The fleet lab: N gateway namespaces (default 20), each with its own client and
# server, converged by one run of playbooks/site.yml (the gateway role + each
# gateway's tables), every gateway verified with real connections, then converged
# again (must change nothing). Writes bench/results/fleet_lab.json and regenerates
# bench/REPORT.md. The lab is torn down on every path. Not part of the tests.
#
#   scripts/fleet-lab.sh              20 gateways, site.yml's own rollout batches
#   scripts/fleet-lab.sh 40           40 gateways
#   scripts/fleet-lab.sh 20 --serial 100% --forks 20 --timeout 900 --no-report
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ "$(id -u)" = 0 ] || { echo "fleet-lab: must run as root (namespaces, nftables)" >&2; exit 2; }

gateways=20
if [[ ${1:-} =~ ^[0-9]+$ ]]; then gateways=$1; shift; fi

"$repo/scripts/setup.sh"
# shellcheck source=scripts/env.sh
source "$repo/scripts/env.sh"
exec python -m bench.fleet_lab --gateways "$gateways" "$@"
