"""Backend health checks with real servers that die and come back (docs/health.md).

masqd runs in the seed lab's gateway; web1 (10.16.0.27) and web2 (10.16.0.28) run
identity servers that are killed by PID and restarted, an http.server for the http
check, and an nft drop in a server's own namespace for the ICMP check (a host that
stops answering). Short intervals (0.1 s, fall 2, rise 2) keep the module ~1 min.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from ipmasq_lab import probes
from masqd.client import Client

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import running_agent  # noqa: E402

pytestmark = pytest.mark.lab

WEB1, WEB2, SORRY = "10.16.0.27", "10.16.0.28", "10.16.0.3"
KEY = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80}
FAST = {"interval": 0.1, "fall": 2, "rise": 2, "timeout": 0.2}


def tcp(**extra):
    return dict(FAST, type="tcp", **extra)


@pytest.fixture
def gateway(seed_lab):
    with running_agent(seed_lab, "masqd-health-") as agent:
        agent.client = Client(agent.socket, timeout=20)
        yield agent
        agent.client.close()


def call(agent, op, **args):
    return agent.client.request(op, **args)["result"]


def health_states(agent, table="portfw"):
    """{backend address: state} of every checked backend of `table`."""
    out = {}
    for entry in call(agent, "list", table=table)["entries"]:
        for b in entry["backends"]:
            if "health" in b:
                out[b["address"]] = b["health"]["state"]
    return out


def wait_state(agent, address, state, table="portfw", timeout=8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_states(agent, table).get(address) == state:
            return
        time.sleep(0.05)
    raise AssertionError("%s did not become %s within %ss: %s\n%s" % (
        address, state, timeout, call(agent, "list", table=table), call(agent, "status")["watchers"]))


def kill(server):
    """Kill the listener by PID (SIGKILL: no goodbye), as a crashed backend."""
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(timeout=5)


def backends(answers):
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok]
    return [a.backend for a in answers]


def test_round_robin_dead_backend_leaves_and_comes_back(gateway, seed_lab):
    call(gateway, "add", table="portfw", entry=dict(KEY, backends=[
        {"address": WEB1, "port": 80, "pref": 1, "check": tcp()},
        {"address": WEB2, "port": 80, "pref": 1, "check": tcp()}]))
    with probes.serve_identity(seed_lab, "web1", 80):
        web2 = probes.serve_identity(seed_lab, "web2", 80)
        try:
            wait_state(gateway, WEB2, "up")
            assert sorted(backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=4))) == [
                "web1", "web1", "web2", "web2"]
            kill(web2)
            wait_state(gateway, WEB2, "down")
            assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=10)) == ["web1"] * 10
            listing = gateway.masqctl("portfw", "-l", "-n").stdout
            assert "tcp down since" in listing and "refused" in listing.lower(), listing
            web2 = probes.serve_identity(seed_lab, "web2", 80)
            wait_state(gateway, WEB2, "up")
            assert sorted(backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=4))) == [
                "web1", "web1", "web2", "web2"]
        finally:
            web2.stop()
    status = call(gateway, "status")["watchers"]["health"]
    assert status["running"] and status["targets"] == 2 and status["transitions"] >= 2


def test_weighted_15_5_with_the_5_down_is_all_to_the_15(gateway, seed_lab):
    call(gateway, "add", table="portfw", entry=dict(KEY, backends=[
        {"address": WEB1, "port": 80, "pref": 15, "check": tcp()},
        {"address": WEB2, "port": 80, "pref": 5, "check": tcp()}]))
    with probes.serve_identity(seed_lab, "web1", 80):
        web2 = probes.serve_identity(seed_lab, "web2", 80)
        try:
            wait_state(gateway, WEB2, "up")
            kill(web2)
            wait_state(gateway, WEB2, "down")
            assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=20)) == ["web1"] * 20
            web2 = probes.serve_identity(seed_lab, "web2", 80)
            wait_state(gateway, WEB2, "up")
            # Back up: the 15/5 sequence resumes (a fresh cycle).
            assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=20)) == (
                ["web1"] * 15 + ["web2"] * 5)
        finally:
            web2.stop()


def _http_server(lab, host, port):
    """python's http.server in `host`'s namespace (a real HTTP server for the check)."""
    proc = lab.spawn(host, [sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if lab.run(host, ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/%d" % port], timeout=5).returncode == 0:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("http.server did not listen on %s:%d" % (host, port))


def _mfw_failover(gateway, seed_lab, failback):
    """mfw pref 0 list web1, web2 with an http check on 8080 (identity servers on 80)."""
    call(gateway, "add", table="marks", entry={"name": "client", "source": "198.51.100.0/24", "mark": 7})
    check = dict(FAST, type="http", port=8080, path="/")
    call(gateway, "add", table="mfw", entry={"mark": 7, "failback": failback, "backends": [
        {"address": WEB1, "port": 80, "pref": 0, "check": check},
        {"address": WEB2, "port": 80, "pref": 0, "check": check}]})
    h1, h2 = _http_server(seed_lab, "web1", 8080), _http_server(seed_lab, "web2", 8080)
    try:
        with probes.serve_identity(seed_lab, "web1", 80), probes.serve_identity(seed_lab, "web2", 80):
            wait_state(gateway, WEB1, "up", "mfw")
            wait_state(gateway, WEB2, "up", "mfw")
            before = backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=5))
            os.kill(h1.pid, signal.SIGKILL)  # web1's health endpoint dies: web1 is down
            h1.wait(timeout=5)
            wait_state(gateway, WEB1, "down", "mfw")
            during = backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=5))
            h1 = _http_server(seed_lab, "web1", 8080)
            wait_state(gateway, WEB1, "up", "mfw")
            after = backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=5))
            listing = gateway.masqctl("mfw", "-L", "-n").stdout  # while both are up
    finally:
        for proc in (h1, h2):
            proc.kill()
            proc.wait(timeout=5)
    return before, during, after, listing


def test_mfw_pref0_failover_without_failback(gateway, seed_lab):
    before, during, after, listing = _mfw_failover(gateway, seed_lab, failback=False)
    assert (before, during, after) == (["web1"] * 5, ["web2"] * 5, ["web2"] * 5)
    assert listing.splitlines()[1].split()[1] == WEB2, listing  # web2 is the head now
    assert "http up" in listing, listing


def test_mfw_pref0_failover_with_failback(gateway, seed_lab):
    before, during, after, listing = _mfw_failover(gateway, seed_lab, failback=True)
    assert (before, during, after) == (["web1"] * 5, ["web2"] * 5, ["web1"] * 5)
    assert listing.splitlines()[1].split()[1] == WEB1, listing


def test_all_down_reject_and_fallback(gateway, seed_lab):
    entry = dict(KEY, all_down="reject", backends=[{"address": WEB1, "port": 80, "check": tcp()},
                                                   {"address": WEB2, "port": 80, "check": tcp()}])
    call(gateway, "add", table="portfw", entry=entry)
    wait_state(gateway, WEB1, "down")
    wait_state(gateway, WEB2, "down")
    started = time.monotonic()
    (answer,) = probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=1, timeout=2.0)
    assert not answer.ok and "refused" in (answer.error or "").lower(), answer  # a reset, at once
    assert time.monotonic() - started < 1.5
    assert "reject with tcp reset" in gateway.table()
    # The sorry server: every backend down sends all to the fallback.
    call(gateway, "set", table="portfw", entries=[dict(entry, all_down="fallback",
                                                       fallback={"address": SORRY, "port": 80})])
    with probes.serve_identity(seed_lab, "friendsrv", 80):
        wait_state(gateway, WEB1, "down")
        wait_state(gateway, WEB2, "down")
        assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=3)) == ["friendsrv"] * 3
        with probes.serve_identity(seed_lab, "web2", 80):
            wait_state(gateway, WEB2, "up")
            assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=3)) == ["web2"] * 3


def test_all_down_default_keeps_forwarding(gateway, seed_lab):
    call(gateway, "add", table="portfw", entry=dict(KEY, backends=[{"address": WEB1, "port": 80, "pref": 1,
                                                                   "check": tcp()}]))
    wait_state(gateway, WEB1, "down")
    with probes.serve_identity(seed_lab, "web1", 80):
        # Still forwarded (degrade, not vanish): the first connection gets through at
        # once, before the check notices the backend is back.
        assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=2)) == ["web1"] * 2


def _conntrack_to(lab, address):
    """The client's TCP connections DNATed to `address` (not the checks' own pings)."""
    out = lab.run("gateway", ["conntrack", "-L", "-p", "tcp", "-r", address], timeout=10).stdout
    return [line for line in out.splitlines() if "src=198.51.100.10 " in line and "dport=80 " in line]


def test_icmp_check_and_flush_on_down(gateway, seed_lab):
    """web1 stops answering (an nft drop in its own namespace): the ICMP check takes
    it down, and flush_on_down deletes the conntrack entries of connections to it."""
    call(gateway, "add", table="portfw", entry=dict(KEY, flush_on_down=True, backends=[
        {"address": WEB1, "port": 80, "pref": 0, "check": dict(FAST, type="icmp")},
        {"address": WEB2, "port": 80, "pref": 0, "check": dict(FAST, type="icmp")}]))
    with probes.serve_identity(seed_lab, "web1", 80), probes.serve_identity(seed_lab, "web2", 80):
        wait_state(gateway, WEB1, "up")
        # A connection that stays open: its conntrack entry (DNAT to web1) lives on.
        holder = seed_lab.spawn("client", [sys.executable, "-c", (
            "import socket,time; s=socket.create_connection(('198.51.100.1',80)); time.sleep(30)")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 5
            while not _conntrack_to(seed_lab, WEB1) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _conntrack_to(seed_lab, WEB1)
            seed_lab.run("web1", ["nft", "add table inet hc; add chain inet hc in { type filter hook input "
                                  "priority 0; policy drop; }"], timeout=10, check=True)
            wait_state(gateway, WEB1, "down")
            deadline = time.monotonic() + 3
            while _conntrack_to(seed_lab, WEB1) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _conntrack_to(seed_lab, WEB1) == []
            stats = call(gateway, "status")["watchers"]["health"]
            assert stats["conntrack_flushed"] >= 1 and stats["flush_error"] is None, stats
            assert stats["icmp_socket"], stats
            assert backends(probes.connect_many(seed_lab, "client", "198.51.100.1", 80, count=3)) == ["web2"] * 3
        finally:
            holder.kill()
            holder.wait(timeout=5)
            seed_lab.run("web1", ["nft", "delete table inet hc"], timeout=10)


def test_bad_check_changes_nothing(gateway):
    before = (gateway.table(), call(gateway, "get"))
    envelope = gateway.client.call({"op": "add", "table": "portfw", "entry": dict(KEY, backends=[
        {"address": WEB1, "port": 80, "check": {"type": "http", "path": "/a b"}}])})
    assert not envelope["ok"] and envelope["error"]["field"] == "entry.backends[0].check.path"
    assert envelope["error"]["value"] == "/a b"
    assert (gateway.table(), call(gateway, "get")) == before
