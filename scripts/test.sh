#!/usr/bin/env bash
# Runs every test, as root on Debian: installs what is missing (scripts/setup.sh), then
#   1. pytest: unit tests, namespace labs (real kernel, nftables, packets), real Ansible runs,
#      then tests/hosts: the gateway role over SSH on booted Debian hosts (docs/hosts.md)
#   2. molecule: one namespace lab per facility (molecule test --all, offline)
#   3. quality gates: ansible-test sanity and ansible-lint (production profile)
# Arguments go to pytest (e.g. `bash scripts/test.sh -k portfw`); `--hosts` first adds
# Debian 13 and the reboot test to tests/hosts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/setup.sh"
# shellcheck source=scripts/env.sh
. "$here/env.sh"
repo=$(dirname "$here")   # as env.sh sets it; said here so shellcheck sees it
cd "$repo"
# --hosts: booted Debian hosts on every release, with the reboot test (docs/hosts.md).
if [ "${1:-}" = "--hosts" ]; then shift; export MASQD_HOSTS=all; fi
pytest -p no:cacheprovider "$@"
# Booted Debian hosts over SSH (tests/hosts): bookworm unless --hosts; not with arguments.
if [ $# -eq 0 ]; then pytest -p no:cacheprovider tests/hosts; fi
bash "$here/molecule.sh"
bash "$here/quality.sh"
