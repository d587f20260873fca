"""mfw acts only on packets addressed to the gateway itself ("to-firewall packets",
ipmasqadm(8)): forwarded traffic that a classifier marked passes untouched."""

import os
import sys

import pytest

from ipmasq_lab import probes

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import FWMARK_SCRIPT, run_script, running_agent  # noqa: E402

pytestmark = pytest.mark.lab


@pytest.fixture
def gateway(seed_lab):
    with running_agent(seed_lab, "masqd-mfw-") as agent:
        yield agent


def test_forwarded_marked_traffic_passes_untouched(gateway, seed_lab):
    run_script(gateway, FWMARK_SCRIPT)   # `-s ! FRIEND -m 3` marks the client's traffic
    with probes.serve_identity(seed_lab, "web1", 80), probes.serve_identity(seed_lab, "neutralsrv", 80):
        # routed through the gateway to web1's own address: marked 3, but not for the gateway
        routed = probes.connect_many(seed_lab, "client", "10.16.0.27", 80, count=3)
        # addressed to the gateway: mfw sends it to mark 3's backend
        local = probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=3)
    assert [a.backend for a in routed] == ["web1"] * 3, [a.error for a in routed]
    assert {a.seen_destination_address for a in routed} == {"10.16.0.27"}
    assert [a.backend for a in local] == ["neutralsrv"] * 3, [a.error for a in local]
    # the routed connections did carry mark 3 (so the fib check, not a missing mark,
    # let them pass), and the three local ones went through mfw_3
    marked = seed_lab.run("gateway", ["conntrack", "-L", "-p", "tcp", "--orig-dst", "10.16.0.27",
                                      "--mark", "3"], timeout=10)
    assert marked.stdout.count("dport=80 ") >= 3, marked.stdout + marked.stderr
    assert "packets 3 " in gateway.nft("list", "chain", "inet", "masqd", "mfw_3")
