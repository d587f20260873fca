"""Booted Debian hosts (kind: debian) in labs: the harness and the gateway role over SSH.

Tiers (docs/hosts.md): the default run (`bash scripts/test.sh`) runs the bookworm tests;
`MASQD_HOSTS=all` (or `bash scripts/test.sh --hosts`) adds trixie and the reboot test.
The first run on a machine builds the cached roots (~2.5 min each, once).
"""

import os

import pytest

from ipmasq_lab import booted_roots

ALL = os.environ.get("MASQD_HOSTS", "") == "all"
RELEASES = ["bookworm", "trixie"] if ALL else ["bookworm"]


def pytest_configure(config):
    config.addinivalue_line("markers", "hosts: boots Debian hosts with systemd in labs "
                            "(tests/hosts; MASQD_HOSTS=all for every release)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/hosts/" in str(item.fspath):
            item.add_marker(pytest.mark.hosts)
            item.add_marker(pytest.mark.lab)


@pytest.fixture(autouse=True)
def _booted_hosts_possible():
    if os.geteuid() != 0:
        pytest.skip("booted hosts need root")
    missing = booted_roots.missing_tools()
    if missing:
        pytest.fail("booted hosts need %s (bash scripts/setup.sh installs them)"
                    % " ".join(missing))


def gateway_spec(release, name="hostgw"):
    """controller -- gw (booted) -- server; client on a third link of gw.

    The client and the server are plain namespaces: real connections go client ->
    gw (masqd's PORTFW) -> server, and SSH goes controller -> gw.
    """
    return {
        "name": name,
        "hosts": {
            "controller": {"interfaces": {"eth0": {"addresses": ["10.9.0.1/24"]}}},
            "gw": {"kind": "debian", "release": release,
                   "interfaces": {"eth0": {"addresses": ["10.9.0.2/24"]},
                                  "eth1": {"addresses": ["198.51.100.1/24"]},
                                  "eth2": {"addresses": ["10.16.0.1/24"]}}},
            "client": {"interfaces": {"eth0": {"addresses": ["198.51.100.10/24"]}},
                       "routes": [{"to": "default", "via": "198.51.100.1"}]},
            "server": {"interfaces": {"eth0": {"addresses": ["10.16.0.28/24"]}},
                       "routes": [{"to": "default", "via": "10.16.0.1"}]},
        },
        "links": [["controller:eth0", "gw:eth0"], ["client:eth0", "gw:eth1"],
                  ["gw:eth2", "server:eth0"]],
    }
