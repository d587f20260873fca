#!/usr/bin/env bash
# Runs the molecule scenarios (molecule/*), offline and non-interactively:
#   scripts/molecule.sh                 every scenario but the slow ones (all with MASQD_HOSTS=all)
#   scripts/molecule.sh portfw          one scenario (molecule test -s portfw)
#   scripts/molecule.sh portfw verify   another molecule command for one scenario
# Each scenario builds a seed lab of network namespaces under a fresh prefix and tears
# it down at the end, also when a step fails. Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/env.sh
. "$here/env.sh"
repo=$(dirname "$here")   # as env.sh sets it; said here so shellcheck sees it
cd "$repo"

# molecule writes ~/.ansible/tmp and its caches under HOME: give it its own.
export HOME="$repo/.venv/molecule-home"
export MOLECULE_NO_LOG=false
export ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1 PY_COLORS=0
export ANSIBLE_PIPELINING=true
export ANSIBLE_RETRY_FILES_ENABLED=false
export ANSIBLE_GALAXY_SERVER_LIST=""
mkdir -p "$HOME"

scenario=${1:-}
command=${2:-test}
if [ -z "$scenario" ]; then
    # The namespace-lab scenarios; the slow ones (a booted Debian host, the HA pair:
    # 5-7 min each) only in the full tier (MASQD_HOSTS=all, `scripts/test.sh --hosts`).
    slow=(debian-host ha)
    for dir in molecule/*/; do
        name=$(basename "$dir")
        [ -f "$dir/molecule.yml" ] || continue
        if [ "${MASQD_HOSTS:-}" != all ] && [[ " ${slow[*]} " == *" $name "* ]]; then
            echo "molecule: $name skipped (slow tier: scripts/test.sh --hosts)"
            continue
        fi
        molecule test -s "$name"
    done
    exit 0
fi
case "$command" in
    test|converge|verify|idempotence|destroy|create|syntax)
        exec molecule "$command" -s "$scenario" ;;
    *)
        echo "scripts/molecule.sh: unknown molecule command '$command'" >&2; exit 2 ;;
esac
