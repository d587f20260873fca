#!/usr/bin/env bash
# Runs every test: unit tests, the namespace-lab tests (real kernel, real packets).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/setup.sh"
. "$here/env.sh"
cd "$repo"
pytest -p no:cacheprovider "$@"
