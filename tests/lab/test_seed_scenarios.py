"""The seed's scenarios with real packets: masqd in the gateway namespace, configured
with the seed's own command lines through masqctl, probed from the lab's hosts."""

import os
import sys

import pytest

from ipmasq_lab import probes

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import FWMARK_SCRIPT, run_script, running_agent  # noqa: E402

pytestmark = pytest.mark.lab


@pytest.fixture
def gateway(seed_lab):
    with running_agent(seed_lab, "masqd-seed-") as agent:
        yield agent


def test_portfw_prefs_15_and_5_give_15_then_5_connections(gateway, seed_lab):
    run_script(gateway, """set -e
masqctl portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15
masqctl portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5
""")
    with probes.serve_identity(seed_lab, "web1", 80), probes.serve_identity(seed_lab, "web2", 80):
        first = probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=18)
        listing = gateway.masqctl("portfw", "-l", "-n").stdout
        rest = probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=22)
    answers = first + rest
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok]
    assert [a.backend for a in answers] == ["web1"] * 15 + ["web2"] * 5 + ["web1"] * 15 + ["web2"] * 5
    # PORTFW keeps the client's address
    assert {a.seen_source_address for a in answers} == {"198.51.100.10"}
    # after 18 connections web2 is the head with 2 of its 5 left, web1 back to 15
    assert [row.split()[2:] for row in listing.splitlines()[1:]] == [
        ["10.16.0.28", "80", "80", "2", "5"], ["10.16.0.27", "80", "80", "15", "15"]]


def test_fwmark_script_splits_friends_from_the_rest_on_every_port(gateway, seed_lab):
    run_script(gateway, FWMARK_SCRIPT)
    servers = [probes.serve_identity(seed_lab, host, port)
               for host in ("friendsrv", "neutralsrv") for port in (80, 8080)]
    try:
        for port in (80, 8080):
            friend = probes.connect_many(seed_lab, "friend", "203.0.113.1", port, count=3)
            other = probes.connect_many(seed_lab, "client", "198.51.100.1", port, count=3)
            assert [a.backend for a in friend] == ["friendsrv"] * 3, [a.error for a in friend]
            assert [a.backend for a in other] == ["neutralsrv"] * 3, [a.error for a in other]
    finally:
        for server in servers:
            server.stop()
    # all protocols: ICMP to the gateway from a friend is forwarded to friendsrv
    report = probes.send_packet(seed_lab, "friend", "203.0.113.1", "icmp", watch=["friendsrv"])
    assert report.arrived("friendsrv"), report.to_dict()


def test_pref_0_failover_with_forced_scheduling(gateway, seed_lab):
    run_script(gateway, """set -e
masqctl mark -A -s 198.51.100.0/24 -m 7
masqctl mfw -A -m 7 -r 10.16.0.27 80 -p 0
masqctl mfw -A -m 7 -r 10.16.0.28 80 -p 0
""")
    with probes.serve_identity(seed_lab, "web1", 80), probes.serve_identity(seed_lab, "web2", 80):
        before = probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=12)
        gateway.masqctl("mfw", "-S", "-m", "7")  # the primary is down: fail over
        after = probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=12)
    assert [a.backend for a in before] == ["web1"] * 12
    assert [a.backend for a in after] == ["web2"] * 12
