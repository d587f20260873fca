"""The role's reverse path filtering against spoofing, with real Ansible, the real
agent it starts and scapy-crafted packets: the seed's FWMARK script as written (marks
by source only) on a gateway the role set up. With the default (gateway_rp_filter:
strict) a spoofed friend source from the client side never reaches the friend server;
opted out (disabled), it does -- the finding the default fixes."""

import json
import os
import sys

import pytest

from ansible_lab import REPO
from test_role import ROLE_PLAY, gateway_lab, playbook, stats  # noqa: F401  pylint: disable=unused-import

sys.path.insert(0, os.path.join(REPO, "tests", "lab"))
from masqd_agent import FWMARK_SCRIPT, VENV_BIN  # noqa: E402
from test_reliability_hostile import crafted, spoofed_from_client  # noqa: E402

from ipmasq_lab import probes  # noqa: E402
from masqd.rp_filter import rp_filter_warnings  # noqa: E402

pytestmark = pytest.mark.lab

RP_FILTERS = ["net.ipv4.conf.%s.rp_filter" % name for name in ("all", "default", "eth0", "eth1", "eth2")]


@pytest.fixture
def env(ansible_env):
    return dict(ansible_env, ANSIBLE_PIPELINING="true")


def fwmark_script(lab):
    socket = "/run/ipmasq-lab/%s/gateway/masqd.sock" % lab.prefix
    env = dict(os.environ, PATH=VENV_BIN + ":" + os.environ["PATH"], MASQD_SOCKET=socket)
    result = lab.run("gateway", ["bash", "-c", FWMARK_SCRIPT], timeout=30, env=env)
    assert result.returncode == 0, result.stderr


def warnings_in_gateway(lab):
    """masqd.rp_filter's warnings for the seed's classifiers, read in the gateway's namespace."""
    code = ("import json, sys; sys.path.insert(0, %r); from masqd.rp_filter import read_rp_filter; "
            "print(json.dumps(read_rp_filter()))" % REPO)
    result = lab.run("gateway", [sys.executable, "-c", code], timeout=20, check=True)
    values = json.loads(result.stdout)
    friend = {"name": "friend", "mark": 1, "source": "203.0.113.0/24", "source_invert": False,
              "input_interface": None}
    return rp_filter_warnings([friend], values)


def test_role_default_stops_a_spoofed_friend_source(tmp_path, env, gateway_lab):
    prefix = gateway_lab.prefix
    for name in RP_FILTERS:  # the kernel's default, and loose on one interface (Debian's systemd sets 2)
        gateway_lab.set_sysctl("gateway", name, 2 if name.endswith("eth0.rp_filter") else 0)
    proc, document = playbook(tmp_path, env, ROLE_PLAY, prefix)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert {name: gateway_lab.sysctl("gateway", name) for name in RP_FILTERS} == {name: "1" for name in RP_FILTERS}
    assert warnings_in_gateway(gateway_lab) == []
    fwmark_script(gateway_lab)
    arrived, crafted_arrived = spoofed_from_client(gateway_lab)
    assert not arrived and crafted_arrived == []
    report = probes.send_packet(gateway_lab, "friend", "203.0.113.1", "udp", 80, watch=["friendsrv"], timeout=0.5)
    assert report.arrived("friendsrv")  # real friends still get through
    assert crafted(gateway_lab, "198.51.100.10")["neutralsrv"]  # and the client to the neutral server

    # Opting out brings the finding back: the test can fail, and the variable is honoured.
    proc, document = playbook(tmp_path, env, ROLE_PLAY, prefix, "-e", "gateway_rp_filter=disabled")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert stats(document)["changed"] > 0
    assert {name: gateway_lab.sysctl("gateway", name) for name in RP_FILTERS} == {name: "0" for name in RP_FILTERS}
    assert len(warnings_in_gateway(gateway_lab)) == 1
    arrived, crafted_arrived = spoofed_from_client(gateway_lab)
    assert arrived and crafted_arrived
