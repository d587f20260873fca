"""Fixtures for running real Ansible against throwaway network namespaces.

Every namespace carries a per-run random prefix, is joined only to another
throwaway namespace (never the root namespace), uses 10.x addresses, and is
deleted at teardown, also when the test fails.
"""

import os
import secrets

import pytest

from ansible_lab import PYTHON, REPO, run

VENV_BIN = os.path.dirname(PYTHON)


@pytest.fixture
def ansible_env(tmp_path):
    """The environment scripts/env.sh sets, with Ansible's writable dirs in tmp."""
    collections = tmp_path / "collections"
    (collections / "ansible_collections" / "ipmasq").mkdir(parents=True)
    (collections / "ansible_collections" / "ipmasq" / "gateway").symlink_to(REPO)
    home = tmp_path / "ansible-home"
    env = dict(os.environ)
    env.update({
        "PATH": VENV_BIN + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
        "ANSIBLE_PYTHON_INTERPRETER": PYTHON,
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(tmp_path / "remote-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_STDOUT_CALLBACK": "json_results",
        "ANSIBLE_CALLBACK_PLUGINS": os.path.join(os.path.dirname(os.path.abspath(__file__)), "callback_plugins"),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.pop("ANSIBLE_CONFIG", None)
    return env


@pytest.fixture
def netns_pair():
    """Two namespaces joined by a veth pair: `gw` (10.x.y.1/24) and `peer` (10.x.y.2/24).

    Returns a dict with the names and addresses; deletes both at teardown.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    prefix = "ipmq-" + secrets.token_hex(3)
    octet = 64 + secrets.randbelow(128)
    lab = {"prefix": prefix, "gw": prefix + "-gw", "peer": prefix + "-peer",
           "gw_address": "10.%d.7.1" % octet, "peer_address": "10.%d.7.2" % octet}
    created = []
    try:
        for name in (lab["gw"], lab["peer"]):
            run(["ip", "netns", "add", name])
            created.append(name)
        run(["ip", "-n", lab["gw"], "link", "add", "veth0", "type", "veth", "peer", "name", "veth0",
             "netns", lab["peer"]])
        for name, address in ((lab["gw"], lab["gw_address"]), (lab["peer"], lab["peer_address"])):
            run(["ip", "-n", name, "addr", "add", address + "/24", "dev", "veth0"])
            run(["ip", "-n", name, "link", "set", "veth0", "up"])
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield lab
    finally:
        for name in created:
            run(["ip", "netns", "pids", name], check=False)  # diagnostics only
            run(["ip", "netns", "del", name], check=False)
