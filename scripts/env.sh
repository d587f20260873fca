# shellcheck shell=bash
# Sourced by the scripts: the environment the lab, Ansible and the tests run in.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$repo/.venv/bin:$PATH"
export ANSIBLE_COLLECTIONS_PATH="$repo/.venv/collections"
export ANSIBLE_PYTHON_INTERPRETER="$repo/.venv/bin/python"
export ANSIBLE_HOME="$repo/.venv/ansible-home"
export ANSIBLE_LOCAL_TEMP="$ANSIBLE_HOME/tmp"
export PYTHONDONTWRITEBYTECODE=1
