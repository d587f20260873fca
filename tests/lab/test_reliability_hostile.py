"""Hostile input, access and traffic isolation against a real agent in a lab.

- Garbage, huge, deeply nested, non-UTF-8, NUL-laden and nft-injection requests over
  the socket never crash the agent, never reach the kernel (its table and the
  namespace's other table are byte-identical afterwards), and always get a refusal
  naming the field and value. The size caps of docs/agent-api.md hold.
- Only root (or the configured group) talks to the agent; the socket, lock and state
  files are private.
- The seed's FWMARK scenario: no probe from a non-friend address reaches the friend
  server, on any sampled port or protocol, with IP options or fragments. A spoofed
  friend source arriving on the client side is the one gap: see the xfail below.
"""

import json
import os
import secrets
import shutil
import socket
import stat
import string
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from reliability_flows import capture_result, start_capture  # noqa: E402
from masqd_agent import PYTHON, VENV_BIN, Agent, unprivileged_user  # noqa: E402

from ipmasq_lab import probes  # noqa: E402
from masqd.client import Client  # noqa: E402
from masqd.server import MAX_DISCARD, MAX_REQUEST  # noqa: E402
from masqd import render  # noqa: E402

pytestmark = pytest.mark.lab

GW = "198.51.100.1"
OTHER_TABLE = ("add table inet other; add chain inet other c { type filter hook input priority 0; }; "
               "add rule inet other c tcp dport 22 counter accept; add set inet other s { type ipv4_addr; }")
HOSTILE = ['eth0"; flush ruleset; "', "eth0; flush ruleset", "}", "\n", "@set", "$var", "eth0\x00", "a b",
           "💥", "10.16.0.27; flush ruleset", "10.16.0.0/24 } ; flush ruleset", "x" * 5000, "", "\\", '"',
           "goto prerouting", "ip saddr 1.2.3.4 accept", "::ffff:10.16.0.27", "-1", "1e3"]
VALID = {
    "portfw": {"protocol": "tcp", "local_address": GW, "local_port": 80,
               "backends": [{"address": "10.16.0.27", "port": 80, "pref": 10}]},
    "autofw": {"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27"},
    "mfw": {"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 10}]},
    "marks": {"name": "friend", "mark": 1, "source": "203.0.113.0/24", "input_interface": "eth2"},
    "masquerade": {"name": "out", "source": "10.16.0.0/24", "output_interface": "eth0"},
}
STRING_FIELDS = {
    "portfw": ["protocol", "local_address", "backends.0.address"],
    "autofw": ["protocol", "hidden_host"],
    "mfw": ["backends.0.address"],
    "marks": ["name", "source", "destination", "input_interface", "protocol"],
    "masquerade": ["name", "source", "destination", "output_interface", "protocol"],
}


class Raw:
    """A raw connection to the agent's socket: bytes in, one JSON line (or EOF) out."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: a full backlog waits instead of EAGAIN
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        line = self.reader.readline(1 << 22)
        return json.loads(line) if line else None

    def close(self):
        self.reader.close()
        self.sock.close()


@pytest.fixture
def hostile(seed_lab):
    """An agent holding a little of everything, beside a table it does not own."""
    base = tempfile.mkdtemp(prefix="masqd-hostile-")
    os.chmod(base, 0o755)
    agent = Agent(seed_lab, base)
    agent.start()
    seed_lab.run("gateway", ["nft", OTHER_TABLE], timeout=10, check=True)
    with Client(agent.socket) as client:
        for table, entry in VALID.items():
            client.request("add", table=table, entry=entry)
    yield agent
    agent.stop()
    shutil.rmtree(base, ignore_errors=True)


def snapshot(agent):
    return (agent.table(), agent.nft("list", "table", "inet", "other"), agent.state_bytes())


def assert_refused(response, request=None):
    assert response is not None, request
    assert response["ok"] is False, (request, response)
    error = response["error"]
    assert error["field"], (request, response)
    assert error["message"] and "internal error" not in error["message"], (request, response)


def literal_value(path, value):
    """What may be accepted for a field: a value nft takes literally (or never sees)."""
    import ipaddress
    import re
    field = path.split(".")[-1]
    if field == "name":
        return re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value) is not None
    if field.endswith("_interface"):
        return re.fullmatch(r"[!-~]{1,15}", value) is not None and not set(value) & set('"\\/:')
    try:
        ipaddress.ip_network(value)
        return True
    except ValueError:
        return False


def set_path(entry, path, value):
    parts = path.split(".")
    target = entry
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    target[parts[-1]] = value
    return entry


def test_hostile_requests_never_reach_the_kernel(hostile):
    before = snapshot(hostile)
    raw = Raw(hostile.socket)
    corpus = [b"\xff\xfe\n", b"{not json\n", b"[]\n", b"1\n", b'"status"\n', b"null\n",
              b"[" * 200000 + b"\n", b'{"op": "status", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}\n",
              b'{"op": "add\x00", "table": "portfw"}\n', b'{"op": "add", "table": "portfw\\u0000"}\n',
              b'{"op": "add", "table": "portfw", "entry": {}, "extra": 1}\n',
              b'{"op": "__init__"}\n', b'{"op": "_op_status"}\n', b'{"op": "_commit", "table": "portfw"}\n',
              b'{"op": "set", "table": "portfw", "entries": {"a": 1}}\n',
              b'{"op": "add", "table": "portfw", "entry": [1, 2]}\n',
              b'{"op": "set", "table": "portfw", "entries": [], "revision": true}\n',
              b'{"op": "schedule", "mark": 1e400}\n', b'{"op": "schedule", "mark": NaN}\n',
              b'{"op": "add", "table": "portfw", "entry": {"protocol": "tcp", "local_address": "198.51.100.1", '
              b'"local_port": 99999999999999999999999999999, "backends": []}}\n']
    refused = 0
    for data in corpus:
        assert_refused(raw.send(data), data[:80])
        refused += 1
    for table, fields in STRING_FIELDS.items():
        for path in fields:
            for value in HOSTILE:
                for op in ("add", "set", "plan", "delete"):
                    entry = set_path(json.loads(json.dumps(VALID[table])), path, value)
                    if table == "portfw" or table == "mfw":
                        entry = set_path(entry, "backends.0.address", "10.16.0.99") \
                            if path != "backends.0.address" else entry
                    request = {"op": op, "table": table}
                    request.update({"entries": [entry]} if op in ("set", "plan") else {"entry": entry})
                    response = raw.send(json.dumps(request).encode() + b"\n")
                    if response["ok"]:
                        # a literal name, interface name or network: applied as given, nothing else
                        assert literal_value(path, value), (request, response)
                        continue
                    if "embedded null character" in response["error"]["message"]:
                        continue  # tests/unit/test_fuzz_inputs.py: xfail, model._parse_address
                    assert_refused(response, request)
                    refused += 1
    raw.close()
    # the accepted ones were put back by the final set below; refused ones changed nothing
    with Client(hostile.socket) as client:
        for table in VALID:
            client.request("set", table=table, entries=[VALID[table]])
    after = snapshot(hostile)
    assert after[1] == before[1], "table inet other changed"
    assert after[0] == before[0], "the kernel table is not what the accepted requests made it"
    with Client(hostile.socket) as client:
        assert client.request("status")["ok"]
    assert hostile.proc.poll() is None
    print("\n%d hostile requests refused with a field" % refused)


def test_refused_input_leaves_kernel_state_and_other_tables_byte_identical(hostile):
    """Only refusals here: kernel listing, table inet other and state files identical."""
    before = snapshot(hostile)
    raw = Raw(hostile.socket)
    count = 0
    for table, fields in STRING_FIELDS.items():
        for path in fields:
            for value in ('eth0"; flush ruleset; "', "}\n flush ruleset", "eth0\\", "a b", "x" * 300, 7, [], {"a": 1}, True):
                entry = set_path(json.loads(json.dumps(VALID[table])), path, value)
                for op in ("add", "set", "delete"):
                    request = {"op": op, "table": table}
                    request.update({"entries": [entry]} if op == "set" else {"entry": entry})
                    response = raw.send(json.dumps(request).encode() + b"\n")
                    assert_refused(response, request)
                    count += 1
    raw.close()
    assert snapshot(hostile) == before
    print("\n%d refusals, kernel + state + other table byte-identical" % count)


SETTINGS = settings(max_examples=int(os.environ.get("MASQD_FUZZ_EXAMPLES", 200)), deadline=None,
                    suppress_health_check=list(HealthCheck))
json_leaf = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=30) | \
    st.sampled_from(HOSTILE)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c,
                                                                                       max_size=3), max_leaves=12)
live_requests = st.fixed_dictionaries({"op": st.sampled_from(["add", "insert", "edit", "delete", "flush", "set",
                                                              "plan", "schedule", "bogus"])}, optional={
    "table": st.sampled_from(sorted(VALID)) | json_leaf, "entry": json_any,
    "entries": st.lists(json_any, max_size=3), "revision": json_leaf, "mark": json_leaf})


def test_live_agent_fuzz_never_crashes_it(hostile):
    other = hostile.nft("list", "table", "inet", "other")
    raw = Raw(hostile.socket)
    seen = {"refused": 0, "accepted": 0}

    @SETTINGS
    @given(live_requests)
    def one(request):
        response = raw.send(json.dumps(request).encode() + b"\n")
        assert response is not None and isinstance(response["ok"], bool)
        if response["ok"]:
            seen["accepted"] += 1
        elif "embedded null character" not in response["error"]["message"]:
            assert_refused(response, request)
            seen["refused"] += 1

    one()
    raw.close()
    assert hostile.proc.poll() is None
    assert hostile.nft("list", "table", "inet", "other") == other
    assert sorted(t for t in hostile.nft("list", "tables").splitlines() if "masqd" in t) == sorted(
        "table inet " + name for name in render.TABLES)  # each of masqd's tables once
    print("\nlive fuzz: %s" % seen)


def test_every_interface_character_is_refused_or_applied_literally(hostile):
    other = hostile.nft("list", "table", "inet", "other")
    verdicts = {"refused": "", "applied": ""}
    with Client(hostile.socket) as client:
        for char in string.printable:
            name = "e%sx" % char
            entry = dict(VALID["marks"], input_interface=name)
            envelope = client.call({"op": "set", "table": "marks", "entries": [entry]})
            if not envelope["ok"]:
                assert envelope["error"]["field"] == "entries[0].input_interface", envelope
                assert envelope["error"]["value"] == name
                verdicts["refused"] += char
                continue
            listed = [l.strip() for l in hostile.table().splitlines() if "iifname" in l]
            assert len(listed) == 1 and listed[0].startswith('iifname "%s" ip saddr 203.0.113.0/24' % name), listed
            verdicts["applied"] += char
    assert set(verdicts["refused"]) == set(string.whitespace) | set('/:"\\*')
    assert hostile.nft("list", "table", "inet", "other") == other
    print("\ninterface characters refused: %r" % verdicts["refused"])


def test_size_caps(hostile):
    raw = Raw(hostile.socket, timeout=60)
    before = snapshot(hostile)
    # request size: MAX_REQUEST is the limit; the connection stays usable after a refusal
    big = {"op": "set", "table": "marks", "entries": [], "pad": "x" * MAX_REQUEST}
    response = raw.send(json.dumps(big).encode() + b"\n")
    assert_refused(response)
    assert response["error"]["field"] == "request"
    assert "larger than %d bytes" % MAX_REQUEST in response["error"]["message"]
    assert raw.send(b'{"op": "status"}\n')["ok"] is True
    raw.close()
    # beyond the request cap plus the discard bound the agent hangs up instead of reading forever
    bound = MAX_REQUEST + MAX_DISCARD
    flood = Raw(hostile.socket, timeout=60)
    chunk = b"x" * (1 << 20)
    sent = 0
    try:
        while sent < bound + (32 << 20):
            flood.sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    flood.close()
    assert sent <= bound + (8 << 20), "the agent read %d MiB of a single request" % (sent >> 20)
    # table caps (docs/agent-api.md)
    caps = [
        ("marks", [dict(VALID["marks"], name="m%d" % i) for i in range(1025)], "entries", "1024"),
        ("masquerade", [dict(VALID["masquerade"], name="q%d" % i) for i in range(1025)], "entries", "1024"),
        ("mfw", [{"mark": i + 1, "backends": [{"address": "10.16.0.3"}]} for i in range(4097)], "entries", "4096"),
        ("autofw", [{"protocol": "udp", "low_port": 1000 + i, "high_port": 1000 + i, "hidden_host": "10.16.0.27"}
                    for i in range(1025)], "entries", "1024"),
        ("portfw", [dict(VALID["portfw"], backends=[{"address": "10.16.1.%d" % i, "port": 80} for i in
                                                    range(1, 66)])], "entries[0].backends", "64"),
        ("marks", [dict(VALID["marks"], destination_ports=list(range(1, 66)))],
         "entries[0].destination_ports", "64"),
        ("marks", [dict(VALID["marks"], name="n" * 65)], "entries[0].name", "64"),
    ]
    with Client(hostile.socket) as client:
        for table, entries, field, limit in caps:
            envelope = client.call({"op": "set", "table": table, "entries": entries})
            assert_refused(envelope)
            assert envelope["error"]["field"] == field, (table, envelope["error"])
            assert limit in envelope["error"]["message"], envelope["error"]
    # connections: at most 64 at once; when all are idle the 65th is served and the
    # longest-idle one is closed (tests/lab/test_hostile_socket.py: busy ones, root's reserve)
    held = [Raw(hostile.socket) for _slot in range(64)]
    try:
        time.sleep(0.2)
        extra = Raw(hostile.socket)
        assert extra.send(b'{"op": "status"}\n')["ok"] is True
        assert held[0].reader.readline() == b""
        extra.close()
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.2)
    with Client(hostile.socket) as client:
        assert client.request("status")["ok"]
    assert snapshot(hostile) == before


# -- access -----------------------------------------------------------------------------------

def test_private_modes_and_an_unprivileged_writer_is_refused(hostile):
    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(hostile.socket) == 0o600
    assert mode(os.path.dirname(hostile.socket)) == 0o700
    assert mode(hostile.socket + ".lock") == 0o600
    assert mode(hostile.state_dir) == 0o700
    for name in os.listdir(hostile.state_dir):
        assert mode(os.path.join(hostile.state_dir, name)) == 0o600, name
    before = snapshot(hostile)
    attempt = r"""
import json, os, socket, sys
out = {}
for name in sys.argv[2:]:
    try:
        open(name, "rb").read(1); out[name] = "read"
    except OSError as exc:
        out[name] = type(exc).__name__
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"op": "flush", "table": "portfw"}).encode() + b"\n")
out["reply"] = json.loads(s.makefile("rb").readline())
print(json.dumps(out))
"""
    with unprivileged_user() as user:
        # loosen the socket by mistake: SO_PEERCRED still refuses a write
        os.chmod(os.path.dirname(hostile.socket), 0o755)
        os.chmod(hostile.socket, 0o666)
        files = [os.path.join(hostile.state_dir, n) for n in os.listdir(hostile.state_dir)]
        result = hostile.lab.run("gateway", ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid,
                                             "--clear-groups", PYTHON, "-c", attempt, hostile.socket] + files,
                                 timeout=20, env={"PATH": "/usr/bin:/bin"}, cwd="/")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    reply = out.pop("reply")
    assert reply["ok"] is False and reply["error"]["field"] == "peer" and reply["error"]["value"] == user.pw_uid
    assert set(out.values()) == {"PermissionError"}, out
    assert snapshot(hostile) == before


# -- FWMARK isolation ---------------------------------------------------------------------------

FWMARK_SCRIPT = """set -e
masqctl mark -I input -s 203.0.113.0/24 -m 1
masqctl mark -I input -s ! 203.0.113.0/24 -m 3
masqctl mfw -I -m 3 -r 10.16.0.46
masqctl mfw -I -m 1 -r 10.16.0.3
masqctl masq -I forward -d 203.0.113.0/24 -s 10.16.0.3/32 -j MASQ
masqctl masq -I forward -s 10.16.0.46/32 -j MASQ
"""


@pytest.fixture
def fwmark(seed_lab):
    base = tempfile.mkdtemp(prefix="masqd-fwmark-")
    agent = Agent(seed_lab, base)
    agent.start()
    env = dict(os.environ, PATH=VENV_BIN + ":" + os.environ["PATH"], MASQD_SOCKET=agent.socket)
    result = seed_lab.run("gateway", ["bash", "-c", FWMARK_SCRIPT], timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    yield agent
    agent.stop()
    shutil.rmtree(base, ignore_errors=True)


SENDER = r"""
import sys, json
from scapy.all import IP, UDP, TCP, ICMP, Raw, IPOption_RR, IPOption_Timestamp, fragment, send, conf
conf.route.resync()
conf.verb = 0
src, dst, token = sys.argv[1], sys.argv[2], sys.argv[3].encode()
payload = Raw(token * 60)  # 60 copies: every fragment carries the token
packets = [
    IP(src=src, dst=dst, options=[IPOption_RR()]) / UDP(sport=40001, dport=80) / Raw(token),
    IP(src=src, dst=dst, options=[IPOption_Timestamp(flg=0)]) / TCP(sport=40002, dport=443, flags="S") / Raw(token),
    IP(src=src, dst=dst, options=[IPOption_RR()]) / ICMP(id=7, seq=1) / Raw(token),
] + fragment(IP(src=src, dst=dst) / UDP(sport=40003, dport=53) / payload, fragsize=256) \
  + fragment(IP(src=src, dst=dst) / ICMP(id=8, seq=1) / payload, fragsize=256) \
  + fragment(IP(src=src, dst=dst) / TCP(sport=40004, dport=8080, flags="S") / payload, fragsize=256)
for p in packets:
    send(p)
print(json.dumps({"sent": len(packets)}))
"""


def crafted(lab, source, dst="198.51.100.1", host="client"):
    """Crafted packets (IP options, fragments; TCP, UDP, ICMP) from `host` with source
    `source`: where did they arrive, friendsrv or neutralsrv?"""
    token = "masqd-iso-" + secrets.token_hex(4)
    captures = {h: start_capture(lab, h, token, 4) for h in ("friendsrv", "neutralsrv")}
    result = lab.run(host, [PYTHON, "-c", SENDER, source, dst, token], timeout=30)
    assert result.returncode == 0, result.stderr
    return {h: capture_result(p) for h, p in captures.items()}


SAMPLE_PORTS = [1, 22, 53, 80, 123, 443, 1024, 3306, 8080, 40000, 65535]


def test_non_friends_never_reach_the_friend_server(fwmark, seed_lab):
    reached = {"friendsrv": [], "neutralsrv": []}
    for protocol in ("tcp", "udp"):
        for port in SAMPLE_PORTS:
            report = probes.send_packet(seed_lab, "client", GW, protocol, port, watch=["friendsrv", "neutralsrv"],
                                        timeout=0.3)
            for host in reached:
                if report.arrived(host):
                    reached[host].append((protocol, port))
    report = probes.send_packet(seed_lab, "client", GW, "icmp", watch=["friendsrv", "neutralsrv"], timeout=0.5)
    for host in reached:
        if report.arrived(host):
            reached[host].append(("icmp", None))
    assert reached["friendsrv"] == []
    assert len(reached["neutralsrv"]) == 2 * len(SAMPLE_PORTS) + 1, reached
    # crafted: IP options and fragments, from the client's own address
    seen = crafted(seed_lab, "198.51.100.10")
    assert seen["friendsrv"] == [], seen
    arrived = [p for p in seen["neutralsrv"] if p["direction"] == "in"]
    assert {p["protocol"] for p in arrived} == {"tcp", "udp", "icmp"}, seen
    assert {p["source_address"] for p in arrived} == {"198.51.100.10"}, seen  # (PORTFW/mfw keep the source)
    # a friend is still served (the test can fail)
    report = probes.send_packet(seed_lab, "friend", "203.0.113.1", "udp", 80, watch=["friendsrv"], timeout=0.5)
    assert report.arrived("friendsrv")


def spoofed_from_client(seed_lab):
    report = probes.send_packet(seed_lab, "client", GW, "udp", 80, watch=["friendsrv", "neutralsrv"],
                                timeout=0.5, source_address="203.0.113.77")
    return bool(report.arrived("friendsrv")), crafted(seed_lab, "203.0.113.77")["friendsrv"]


@pytest.mark.xfail(strict=True, reason="FINDING: with the seed's FWMARK script as written (marks by source "
                   "address only) and rp_filter off in the gateway namespace (the kernel default), a packet "
                   "from the client side with a spoofed friend source (203.0.113.77) is marked 1 and DNATed to "
                   "friendsrv. Fix: input_interface on the friend classifier (masqctl mark -i eth2 ...), or "
                   "rp_filter=1 on the gateway: both proven by the test below; the gateway role sets "
                   "rp_filter=1 by default (gateway_rp_filter), proven in tests/ansible/test_role_rp_filter.py")
def test_spoofed_friend_source_from_the_client_side_never_reaches_the_friend_server(fwmark, seed_lab):
    assert seed_lab.sysctl("gateway", "net.ipv4.conf.eth0.rp_filter") in (0, "0")
    arrived, crafted_arrived = spoofed_from_client(seed_lab)
    assert not arrived and crafted_arrived == []


def test_spoofed_friend_source_is_stopped_by_input_interface_or_rp_filter(fwmark, seed_lab):
    # 1. strict reverse-path filtering on the gateway drops it before the classifier
    for name in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth0.rp_filter"):
        seed_lab.set_sysctl("gateway", name, 1)
    try:
        arrived, crafted_arrived = spoofed_from_client(seed_lab)
        assert not arrived and crafted_arrived == []
    finally:
        for name in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth0.rp_filter"):
            seed_lab.set_sysctl("gateway", name, 0)
    # 2. the friend classifier bound to the friend interface (the seed's ipchains -i)
    fwmark.masqctl("mark", "-F")
    fwmark.masqctl("mark", "-A", "input", "-i", "eth2", "-s", "203.0.113.0/24", "-m", "1")
    fwmark.masqctl("mark", "-A", "input", "-s", "!", "203.0.113.0/24", "-m", "3")
    arrived, crafted_arrived = spoofed_from_client(seed_lab)
    assert not arrived and crafted_arrived == []
    report = probes.send_packet(seed_lab, "friend", "203.0.113.1", "udp", 80, watch=["friendsrv"], timeout=0.5)
    assert report.arrived("friendsrv")  # real friends still get through
