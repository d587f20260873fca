"""Drift: other software changes the ruleset under a running masqd (real kernel, real
packets). `nft flush ruleset` is what `systemctl restart nftables` does on Debian; the
agent must notice from nftables events, repair within a second, leave other tables
alone, not react to its own changes, and continue the seed's schedule where it stood."""

import json
import os
import re
import sys
import time

import pytest

from ipmasq_lab import probes

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import run_script, running_agent, table_objects  # noqa: E402

pytestmark = pytest.mark.lab

SEED_PORTFW = """set -e
masqctl portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15
masqctl portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5
"""

# What iptables-nft and a docker-like NAT table leave in a namespace: they must survive.
OTHER_TABLES = """
table ip filter {
    chain INPUT { type filter hook input priority filter; policy accept; }
    chain FORWARD { type filter hook forward priority filter; policy accept; counter accept; }
}
table ip nat {
    chain DOCKER { }
    chain PREROUTING { type nat hook prerouting priority dstnat; policy accept; fib daddr type local counter jump DOCKER; }
    chain POSTROUTING { type nat hook postrouting priority srcnat; policy accept; oifname != "docker0" ip saddr 172.17.0.0/16 masquerade; }
}
"""


def status(agent):
    return json.loads(agent.masqctl("status", "--json").stdout)


def wait_for(predicate, timeout=5.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def table_or_none(agent):
    """masqd's tables, None while the main one is missing."""
    listing = agent.table()
    return listing if listing.startswith("table inet masqd {") else None


def without_counters(text):
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text or "")


def backends(answers):
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok]
    return [a.backend for a in answers]


@pytest.fixture
def agent(seed_lab):
    with running_agent(seed_lab) as running:
        yield running


def test_a_flushed_ruleset_is_repaired_and_the_schedule_continues(agent, seed_lab):
    run_script(agent, SEED_PORTFW)
    before = without_counters(agent.table())
    with probes.serve_identity(seed_lab, "web1", 80), probes.serve_identity(seed_lab, "web2", 80):
        first = backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=8))
        assert first == ["web1"] * 8
        agent.nft("flush", "ruleset")
        flushed = time.monotonic()
        assert wait_for(lambda: table_or_none(agent), timeout=1.0), "not repaired within 1 s"
        repaired_after = time.monotonic() - flushed
        rest = backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=32))
    # 8 of 15 before the flush, then 7 more to .27, 5 to .28, 15 to .27, 5 to .28.
    assert rest == ["web1"] * 7 + ["web2"] * 5 + ["web1"] * 15 + ["web2"] * 5
    drift = status(agent)["drift"]
    assert drift["count"] == 1 and drift["failures"] == 0, drift
    assert "delete table inet masqd" in drift["last"]["found"] and "by nft" in drift["last"]["found"]
    assert drift["last"]["detected_to_repaired_seconds"] < 1.0
    # Same shape as before; the first rule of the rebuilt cascade says where it started.
    after = without_counters(agent.table())
    assert after.replace(' comment "phase 8"', "").count("dnat ip to") == before.count("dnat ip to") + 1
    assert 'comment "phase 8"' in after
    print("repaired and visible after %.3f s" % repaired_after)


def test_own_changes_never_count_as_drift(agent):
    run_script(agent, SEED_PORTFW)
    for port in range(1000, 1040):
        agent.masqctl("portfw", "-a", "-P", "udp", "-L", "198.51.100.1", str(port), "-R", "10.16.0.27", str(port))
    agent.masqctl("portfw", "-f")
    time.sleep(0.3)
    found = status(agent)
    assert found["drift"]["count"] == 0, found["drift"]
    assert found["watchers"]["ruleset"]["running"] and found["watchers"]["ruleset"]["events"] > 40


@pytest.mark.parametrize("change", [
    ["delete", "table", "inet", "masqd"],
    ["flush", "chain", "inet", "masqd", "prerouting"],
    ["delete", "rule", "inet", "masqd", "prerouting", "handle", "HANDLE"],
    ["delete", "element", "inet", "masqd", "portfw_direct_v4_4", "{ 198.51.100.1 . tcp . 8080 }"],
    ["add", "element", "inet", "masqd", "portfw_direct_v4_7", "{ 198.51.100.1 . tcp . 9999 : 10.16.0.99 . 1 }"],
    ["delete", "table", "inet", "masqd_portfw_3"],  # a PORTFW shard table (render.SHARD_TABLES)
    ["flush", "chain", "inet", "masqd_portfw_0", "portfw_prerouting_0"],
])
def test_every_kind_of_foreign_change_inside_the_table_is_repaired(agent, change):
    agent.masqctl("portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "8080", "-R", "10.16.0.27", "80")
    expected = without_counters(agent.table())
    if "HANDLE" in change:
        listing = agent.nft("-a", "list", "chain", "inet", "masqd", "prerouting")
        handle = re.findall(r"# handle (\d+)", listing)[-1]
        change = [handle if word == "HANDLE" else word for word in change]
    agent.nft(*change)
    assert wait_for(lambda: table_objects(without_counters(table_or_none(agent))) == table_objects(expected),
                    timeout=1.0), "not repaired:\n%s" % table_or_none(agent)
    assert status(agent)["drift"]["count"] == 1


def nft_file(lab, text, tmp_path):
    path = tmp_path / "ruleset.nft"
    path.write_text(text)
    lab.run("gateway", ["nft", "-f", str(path)], timeout=10, check=True)


def test_other_tables_coexist_and_survive_a_repair(agent, seed_lab, tmp_path):
    agent.masqctl("portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", "10.16.0.27", "80")
    nft_file(seed_lab, OTHER_TABLES, tmp_path)
    others = {name: without_counters(agent.nft("list", "table", "ip", name)) for name in ("filter", "nat")}
    agent.nft("delete", "table", "inet", "masqd")
    assert wait_for(lambda: table_or_none(agent), timeout=1.0)
    for name, text in others.items():
        assert without_counters(agent.nft("list", "table", "ip", name)) == text
    with probes.serve_identity(seed_lab, "web1", 80):
        assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=3)) == ["web1"] * 3
    # systemctl restart nftables: flush ruleset, then the host's own file, in one transaction.
    nft_file(seed_lab, "flush ruleset\n" + OTHER_TABLES, tmp_path)
    assert wait_for(lambda: table_or_none(agent), timeout=1.0)
    assert status(agent)["drift"]["count"] == 2
    with probes.serve_identity(seed_lab, "web1", 80):
        assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=3)) == ["web1"] * 3


def test_periodic_verification_repairs_what_the_events_missed(seed_lab):
    # Without the event monitor's repair (as if its messages were lost), the backstop
    # still finds the missing table: here the agent verifies every 0.5 s.
    with running_agent(seed_lab, extra=["--verify-interval", "0.5"]) as agent:
        agent.masqctl("portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", "10.16.0.27", "80")
        monitor = status(agent)["watchers"]["ruleset"]
        assert monitor["verify_interval"] == 0.5
        verifications = monitor["verifications"]
        time.sleep(1.2)
        assert status(agent)["watchers"]["ruleset"]["verifications"] > verifications
        assert status(agent)["drift"]["count"] == 0  # nothing to repair: no false alarm


def test_restart_continues_the_schedule_where_the_kernel_stood(seed_lab):
    with running_agent(seed_lab) as agent:
        run_script(agent, SEED_PORTFW)
        with probes.serve_identity(seed_lab, "web1", 80), probes.serve_identity(seed_lab, "web2", 80):
            assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=8)) == ["web1"] * 8
            agent.stop(sig=9)
            agent.start()
            rest = backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=12))
            assert rest == ["web1"] * 7 + ["web2"] * 5
            # and once more, across a second restart mid-cycle (now 5 into a new cycle... of .27)
            agent.stop()
            agent.start()
            more = backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=20))
        assert more == ["web1"] * 15 + ["web2"] * 5
        listing = agent.masqctl("portfw", "-l", "-n").stdout.splitlines()
        # 40 connections in all: the head is .27 again with its whole pcnt.
        assert [row.split()[2:] for row in listing[1:]] == [
            ["10.16.0.27", "80", "80", "15", "15"], ["10.16.0.28", "80", "80", "5", "5"]]
