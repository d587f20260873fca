#!/usr/bin/env bash
# Collection quality gates: `ansible-test sanity`, `ansible-lint --profile production` and
# mypy on the agent.
#
#   scripts/quality.sh            both
#   scripts/quality.sh sanity     ansible-test sanity only (extra args go to it, e.g. --test pylint)
#   scripts/quality.sh lint       ansible-lint only
#   scripts/quality.sh types      mypy on the agent (masqd/)
#
# Non-interactive and without docker. ansible-test needs the collection at
# .../ansible_collections/ipmasq/gateway, so it runs on a copy of the tracked (and
# untracked, not ignored) files in a temporary directory. `--venv` builds one cached
# virtual environment per sanity test under ~/.ansible/test; the first run fetches
# their pinned requirements from PyPI, later runs reuse them offline.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/env.sh
. "$here/env.sh"
repo=$(dirname "$here")   # as env.sh sets it; said here so shellcheck sees it
cd "$repo"

what=${1:-all}
[ $# -gt 0 ] && shift
python_version=3.11

# ansible-test bootstraps pip in each venv with a get-pip script it downloads from a
# host this machine cannot reach; this stand-in does the same job with ensurepip
# (offline), then lets pip install what was asked for.
install_get_pip_standin() {
    local cache=~/.ansible/test/cache
    mkdir -p "$cache"
    for name in get_pip_24_2.py get_pip_25_0_1.py get_pip_25_1_1.py; do
        [ -s "$cache/$name" ] && ! grep -q 'ipmasq.gateway stand-in' "$cache/$name" && continue
        cat > "$cache/$name" <<'EOF'
# ipmasq.gateway stand-in for pip's get-pip.py: ensurepip, then pip does the rest.
import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"])
packages = [a for a in args if not a.startswith("-")]
if packages:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check"] + args)
EOF
    done
}

run_sanity() {
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/ipmasq-sanity.XXXXXX")
    trap 'rm -rf "$work"' RETURN
    local dest="$work/ansible_collections/ipmasq/gateway"
    mkdir -p "$dest"
    # Tracked files plus new files that are not ignored: what the next commit holds.
    { git ls-files; git ls-files --others --exclude-standard; } | sort -u | while read -r f; do
        [ -e "$f" ] && printf '%s\0' "$f"
    done | xargs -0 cp --parents -t "$dest"
    install_get_pip_standin
    echo "quality: ansible-test sanity --python $python_version (in $dest)"
    (cd "$dest" && ansible-test sanity --venv --python "$python_version" --color no "$@")
}

run_types() {
    # The agent's type hints, checked (its third-party libraries have no stubs).
    echo "quality: mypy masqd"
    mypy --ignore-missing-imports --no-error-summary masqd
}

run_lint() {
    echo "quality: ansible-lint --profile production"
    ansible-lint --profile production --offline --nocolor
}

case "$what" in
    sanity) run_sanity "$@" ;;
    lint) run_lint ;;
    types) run_types ;;
    all) run_sanity "$@"; run_lint; run_types ;;
    *) echo "usage: $0 [all|sanity|lint|types] [ansible-test args]" >&2; exit 2 ;;
esac
