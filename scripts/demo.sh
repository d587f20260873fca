#!/usr/bin/env bash
# The main job: the seed's PORTFW scenario in a namespace lab, applied with Ansible
# (gateway role + ipmasq.gateway.masq_portfw) and shown with real probes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/setup.sh"
# shellcheck source=scripts/env.sh
. "$here/env.sh"
repo=$(dirname "$here")   # as env.sh sets it; said here so shellcheck sees it
cd "$repo"

prefix=demo$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
trap 'ipmasq-lab down "$prefix" >/dev/null' EXIT
ipmasq-lab up seed --prefix "$prefix" >/dev/null
echo "seed lab $prefix is up: client, gateway, web1, web2, friendsrv, neutralsrv, friend"
ANSIBLE_DISPLAY_SKIPPED_HOSTS=false ansible-playbook -i inventory/lab.yml -e lab_prefix="$prefix" playbooks/lab_demo.yml "$@"
