#!/usr/bin/env bash
# The main job: builds the reference lab and shows what real probes see in it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/setup.sh"
. "$here/env.sh"
exec ipmasq-lab demo "$@"
