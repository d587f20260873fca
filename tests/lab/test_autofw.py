"""AUTOFW control-port detection (ipmasqadm autofw -c) with real traffic: a TCP
control connection from an inside host to an outside "streaming server" makes that
host the recipient of UDP sent to the gateway's range, until it is idle for the
timeout; keyed by peer, two clients stream from two servers at once."""

import concurrent.futures
import json
import os
import shutil
import sys
import tempfile
import time

import pytest

from ipmasq_lab import probes

sys.path.insert(0, os.path.dirname(__file__))
from autofw_latency import measure_detection_latency  # noqa: E402
from masqd_agent import Agent  # noqa: E402

pytestmark = pytest.mark.lab

GATEWAY_EXT = "198.51.100.1"     # the gateway's address facing `client`
GATEWAY_FRIEND = "203.0.113.1"   # ... facing `friend`
SERVER_1 = "198.51.100.10"       # `client`: streaming server 1
SERVER_2 = "203.0.113.10"        # `friend`: streaming server 2


@pytest.fixture
def gateway(seed_lab):
    base = tempfile.mkdtemp(prefix="masqd-autofw-")
    agent = Agent(seed_lab, base)
    agent.start()
    try:
        agent.masqctl("masq", "-A", "-s", "10.16.0.0/24", "-j", "MASQ")
        _agent["gateway"] = agent
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def udp_from(lab, server, dst, count=1):
    """Backends that answered `count` fresh UDP flows from `server` to dst:6970."""
    return [r.backend for r in probes.connect_many(lab, server, dst, 6970, count=count,
                                                   protocol="udp", timeout=0.5)]


_agent = {}


def control(lab, inside, server_address):
    """One TCP control connection; the server must have answered (masqueraded). The
    agent reacts to the conntrack event within milliseconds, asynchronously: wait
    (bounded) until it lists `inside` as the recipient, so a loaded machine cannot
    make the next probe race the detection."""
    (answer,) = probes.connect_many(lab, inside, server_address, 7070)
    assert answer.ok, answer.error
    assert answer.seen_source_address in (GATEWAY_EXT, GATEWAY_FRIEND)
    address = lab.address(inside)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        recipients = [r for e in listing(_agent["gateway"]) for r in e["recipients"]]
        if any(r["address"] == address and r["peer"] in (None, server_address) for r in recipients):
            return
        time.sleep(0.02)
    raise AssertionError("%s was not detected within 3 s" % inside)


def listing(agent):
    return json.loads(agent.masqctl("--json", "autofw", "-L").stdout)["entries"]


def test_control_connection_makes_its_sender_the_recipient_until_idle(gateway, seed_lab):
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "2")
    with probes.serve_identity(seed_lab, "client", 7070), probes.serve_identity(seed_lab, "web1", 6970, "udp"):
        # no control traffic yet: inbound data on the range is not forwarded
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == [None]
        (entry,) = listing(gateway)
        assert entry["recipient"] is None and entry["status"].startswith("waiting")

        control(seed_lab, "web1", SERVER_1)
        assert udp_from(seed_lab, "client", GATEWAY_EXT, count=3) == ["web1"] * 3
        (entry,) = listing(gateway)
        assert entry["recipient"] == "10.16.0.27" and entry["status"] == "active"
        assert 0 <= entry["expires"] <= 2
        text = gateway.masqctl("autofw", "-L", "-n").stdout
        assert "ctl tcp/7070" in text and "10.16.0.27 (" in text and "s left)" in text

        # idle for longer than the timeout: the kernel expired the element
        time.sleep(2.3)
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == [None]
        assert listing(gateway)[0]["recipient"] is None


def test_further_control_traffic_refreshes_the_recipient(gateway, seed_lab):
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "3")
    with probes.serve_identity(seed_lab, "client", 7070), probes.serve_identity(seed_lab, "web1", 6970, "udp"):
        first = time.monotonic()
        control(seed_lab, "web1", SERVER_1)
        time.sleep(2.0)
        control(seed_lab, "web1", SERVER_1)   # refresh, before the 3 s run out
        refreshed = time.monotonic()
        time.sleep(3.2 - (refreshed - first))  # past 3 s after the first: alive thanks to the refresh
        assert time.monotonic() - first > 3.0
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == ["web1"]
        assert listing(gateway)[0]["expires"] <= 2
        time.sleep(max(0.0, refreshed + 3.3 - time.monotonic()))
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == [None]


def test_one_client_at_a_time_the_most_recent_wins(gateway, seed_lab):
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "30")
    with probes.serve_identity(seed_lab, "client", 7070), \
            probes.serve_identity(seed_lab, "web1", 6970, "udp"), probes.serve_identity(seed_lab, "web2", 6970, "udp"):
        control(seed_lab, "web1", SERVER_1)
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == ["web1"]
        control(seed_lab, "web2", SERVER_1)
        assert udp_from(seed_lab, "client", GATEWAY_EXT, count=2) == ["web2"] * 2
        (entry,) = listing(gateway)
        assert entry["recipient"] == "10.16.0.28"
        assert entry["recipients"][0]["replaced"]["address"] == "10.16.0.27"
        assert "10.16.0.28 (" in gateway.masqctl("autofw", "-L", "-n").stdout
        assert "replaced 10.16.0.27 at " in gateway.masqctl("autofw", "-L", "-n").stdout


def test_keyed_by_peer_two_clients_stream_from_two_servers_at_once(gateway, seed_lab):
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "30",
                    "--keyed-by-peer")
    with probes.serve_identity(seed_lab, "client", 7070), probes.serve_identity(seed_lab, "friend", 7070), \
            probes.serve_identity(seed_lab, "web1", 6970, "udp"), probes.serve_identity(seed_lab, "web2", 6970, "udp"):
        # server 2 sends before anyone asked it: nothing is forwarded
        assert udp_from(seed_lab, "friend", GATEWAY_FRIEND) == [None]
        control(seed_lab, "web1", SERVER_1)
        control(seed_lab, "web2", SERVER_2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            one = pool.submit(udp_from, seed_lab, "client", GATEWAY_EXT, 5)
            two = pool.submit(udp_from, seed_lab, "friend", GATEWAY_FRIEND, 5)
            assert one.result() == ["web1"] * 5
            assert two.result() == ["web2"] * 5
        (entry,) = listing(gateway)
        assert entry["keyed_by_peer"] is True and entry["recipient"] is None
        assert sorted((r["peer"], r["address"]) for r in entry["recipients"]) == [
            (SERVER_1, "10.16.0.27"), (SERVER_2, "10.16.0.28")]

        # same server, another client: the most recent wins, the listing shows whom it replaced
        control(seed_lab, "web2", SERVER_1)
        assert udp_from(seed_lab, "client", GATEWAY_EXT, count=2) == ["web2"] * 2
        assert udp_from(seed_lab, "friend", GATEWAY_FRIEND) == ["web2"]
        text = gateway.masqctl("autofw", "-L", "-n").stdout
        assert "%s: 10.16.0.28" % SERVER_1 in text and "replaced 10.16.0.27 at " in text
        assert "ctl tcp/7070 by peer" in text


def test_deleting_the_entry_drops_the_recipient(gateway, seed_lab):
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "60")
    with probes.serve_identity(seed_lab, "client", 7070), probes.serve_identity(seed_lab, "web1", 6970, "udp"):
        control(seed_lab, "web1", SERVER_1)
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == ["web1"]
        gateway.masqctl("autofw", "-D", "-r", "udp", "6970", "7170")
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == [None]
        assert "autofw_r4_" not in gateway.table() and "10.16.0.27" not in gateway.table()


def test_detection_latency_is_milliseconds(gateway, seed_lab):
    result = measure_detection_latency(seed_lab, gateway.socket, samples=3)
    print("autofw detection latency (s):", result)
    assert len(result["samples"]) == 3 and max(result["samples"]) < 0.5
    assert result["agent"]["count"] >= 3


# A control connection that keeps sending: one TCP connection, a byte every 0.3 s for
# ~2.5 timeouts, then idle (open but silent) until the end.
KEEP_SENDING = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], 7070), timeout=3)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    sock.sendall(b"x")
    time.sleep(0.3)
print("sent", flush=True)
time.sleep(float(sys.argv[3]))
sock.close()
"""

SINK = """
import socket, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 7070))
srv.listen(4)
srv.settimeout(20)
conn, _ = srv.accept()
conn.settimeout(20)
end = time.monotonic() + 20
while time.monotonic() < end and conn.recv(4096):
    pass
"""


def test_a_control_connection_that_keeps_sending_keeps_its_range(gateway, seed_lab):
    # The 2.2 code restarted the timer on every outbound control packet: the kernel
    # does the same here (a 2 s timeout, 5 s of control traffic, then 2.5 s idle).
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "2")
    import subprocess
    from masqd_agent import PYTHON
    sink = seed_lab.spawn("client", [PYTHON, "-c", SINK], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sender = None
    try:
        time.sleep(0.3)
        sender = seed_lab.spawn("web1", [PYTHON, "-c", KEEP_SENDING, SERVER_1, "5", "4"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with probes.serve_identity(seed_lab, "web1", 6970, "udp"):
            started = time.monotonic()
            seen = []
            while time.monotonic() - started < 4.5:  # more than twice the timeout
                time.sleep(0.5)
                seen += udp_from(seed_lab, "client", GATEWAY_EXT)
            assert seen == ["web1"] * len(seen) and len(seen) >= 7, seen
            assert sender.stdout.readline().strip() == "sent"  # now idle, connection open
            time.sleep(2.6)
            assert udp_from(seed_lab, "client", GATEWAY_EXT) == [None]
            assert listing(gateway)[0]["recipient"] is None
    finally:
        for proc in (sender, sink):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_recipients_keep_their_remaining_time_across_a_kill_and_restart(gateway, seed_lab):
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "30")
    with probes.serve_identity(seed_lab, "client", 7070), probes.serve_identity(seed_lab, "web1", 6970, "udp"):
        control(seed_lab, "web1", SERVER_1)
        before = listing(gateway)[0]
        gateway.stop(sig=9)
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == ["web1"]  # the kernel goes on
        gateway.start()
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == ["web1"]
        after = listing(gateway)[0]
        assert after["recipient"] == "10.16.0.27" and after["status"] == "active"
        assert 20 <= after["expires"] <= before["expires"] <= 30
        # and after somebody else deletes the table: repaired, recipient still there
        gateway.nft("delete", "table", "inet", "masqd")
        deadline = time.monotonic() + 2
        while "autofw_r4_" not in (seed_lab.run("gateway", ["nft", "list", "ruleset"], timeout=10).stdout):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert udp_from(seed_lab, "client", GATEWAY_EXT) == ["web1"]
        assert listing(gateway)[0]["recipient"] == "10.16.0.27"
