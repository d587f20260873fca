#!/usr/bin/env bash
# Runs every test, as root on Debian: installs what is missing (scripts/setup.sh), then
#   1. pytest: unit tests, namespace labs (real kernel, nftables, packets), real Ansible runs
#   2. molecule: one namespace lab per facility (molecule test --all, offline)
#   3. quality gates: ansible-test sanity and ansible-lint (production profile)
# Arguments go to pytest (e.g. `bash scripts/test.sh -k portfw`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/setup.sh"
# shellcheck source=scripts/env.sh
. "$here/env.sh"
repo=$(dirname "$here")   # as env.sh sets it; said here so shellcheck sees it
cd "$repo"
pytest -p no:cacheprovider "$@"
bash "$here/molecule.sh"
bash "$here/quality.sh"
