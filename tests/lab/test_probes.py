"""The probe library against real namespaces, real packets, a real routed gateway."""

import os
import subprocess
import sys
import time

import pytest

from ipmasq_lab import nsexec, probes

pytestmark = pytest.mark.lab

CLIENT4, GW_OUT4, GW_IN4, WEB1_4 = "198.51.100.10", "198.51.100.1", "10.16.0.1", "10.16.0.27"
CLIENT6, GW_OUT6, GW_IN6, WEB1_6 = "2001:db8:100::10", "2001:db8:100::1", "fd00:16::1", "fd00:16::27"


@pytest.fixture
def lab(seed_lab):
    """The reference topology (client - gateway - inside bridge - friend), routing
    only: the gateway forwards, nothing is NATed unless a test adds rules."""
    return seed_lab


def nft(lab, host, ruleset):
    """Loads a hand-written ruleset inside the lab host's namespace (never the root's)."""
    proc = nsexec.popen(lab.netns(host), ["nft", "-f", "-"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(ruleset, timeout=10)
    assert proc.returncode == 0, err


# ---------------------------------------------------------------- packets

@pytest.mark.parametrize("family", [4, 6])
def test_udp_datagram_arrives_with_client_source(lab, family):
    dst = lab.address("web1", family)
    report = probes.send_packet(lab, "client", dst, "udp", 5353, watch=["web1"], timeout=0.5)
    arrived = report.arrived("web1")
    assert len(arrived) == 1, report.to_dict()
    got = arrived[0]
    assert (got.source_address, got.destination_address) == (lab.address("client", family), dst)
    assert (got.source_port, got.destination_port) == (report.source_port, 5353)
    assert got.interface == "eth0" and got.protocol == "udp"
    assert got.ttl == 63  # one routed hop
    # Nobody listens on 5353: web1 answers with port unreachable, quoting the datagram.
    assert report.reply.kind == "error" and report.reply.source_address == dst
    assert report.reply.quoted["destination_port"] == 5353


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_syn_gets_syn_ack(lab, family):
    dst = lab.address("web1", family)
    with probes.serve_identity(lab, "web1", 8080):
        report = probes.send_packet(lab, "client", dst, "tcp", 8080, watch=["web1"])
    syn = report.arrived("web1")[0]
    assert syn.tcp_flags == "S" and syn.source_address == lab.address("client", family)
    reply = report.reply
    assert reply.tcp_flags == "SA", report.to_dict()
    assert (reply.source_address, reply.source_port) == (dst, 8080)
    assert reply.destination_port == report.source_port
    assert report.elapsed < 2  # ended on the answer, not on the timeout


def test_tcp_syn_to_closed_port_gets_rst(lab):
    report = probes.send_packet(lab, "client", WEB1_4, "tcp", 81, watch=["web1"], timeout=1)
    assert report.reply.tcp_flags == "RA"


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_echo_gets_reply(lab, family):
    dst = lab.address("web1", family)
    report = probes.send_packet(lab, "client", dst, "icmp", watch=["web1", "gateway"])
    assert [p.interface for p in report.arrived("gateway")] == ["eth0"]
    assert report.arrived("web1")[0].source_address == lab.address("client", family)
    assert report.reply.kind == "reply"
    assert report.reply.icmp_type == (0 if family == 4 else 129)
    assert report.reply.source_address == dst


def test_gateway_sees_probe_in_on_eth0_and_out_on_eth1(lab):
    report = probes.send_packet(lab, "client", WEB1_4, "udp", 9, watch=["gateway"], timeout=0.5)
    legs = [(p.interface, p.direction) for p in report.packets
            if p.host == "gateway" and p.kind == "probe"]
    assert legs == [("eth0", "in"), ("eth1", "out")]


@pytest.mark.parametrize("protocol, dst", [("udp", "10.99.0.5"), ("icmp", "10.99.0.5"),
                                           ("tcp", "fd00:99::5"), ("icmp", "fd00:99::5")])
def test_unrouted_destination_reports_nothing_arrived(lab, protocol, dst):
    started = time.monotonic()
    report = probes.send_packet(lab, "client", dst, protocol, None if protocol == "icmp" else 53,
                                watch=["web1", "web2"], timeout=1)
    assert report.arrived() == []
    # The gateway has no route there: it says so with an ICMP error quoting the probe.
    assert report.reply is not None and report.reply.kind == "error", report.to_dict()
    assert report.reply.source_address == (GW_OUT4 if "." in dst else GW_OUT6)
    assert report.reply.quoted["destination_address"] == dst
    assert time.monotonic() - started < 2.5


def test_silent_host_reports_nothing_and_respects_timeout(lab):
    # 10.16.0.99 is on web1's segment but absent: no answer, the probe waits it out.
    started = time.monotonic()
    report = probes.send_packet(lab, "client", "10.16.0.99", "tcp", 80, watch=["web1"],
                                timeout=1)
    took = time.monotonic() - started
    assert report.arrived("web1") == [] and report.replies == []
    assert 1.0 <= took < 2.5, took


def test_spoofed_source_address(lab):
    report = probes.send_packet(lab, "client", WEB1_4, "udp", 9, watch=["web1"], timeout=0.3,
                                source_address="198.51.100.77")
    assert report.arrived("web1")[0].source_address == "198.51.100.77"


def test_dnat_in_gateway_rewrites_destination_and_keeps_source(lab):
    nft(lab, "gateway", """
        table ip probetest {
          chain prerouting {
            type nat hook prerouting priority dstnat;
            iifname "eth0" tcp dport 80 dnat to 10.16.0.27:8080
            iifname "eth0" udp dport 5300 dnat to 10.16.0.27:5301
          }
        }""")
    with probes.serve_identity(lab, "web1", 8080), probes.serve_identity(lab, "web1", 5301, "udp"):
        report = probes.send_packet(lab, "client", GW_OUT4, "tcp", 80, watch=["gateway", "web1"])
        answers = probes.connect_many(lab, "client", GW_OUT4, 5300, count=3, protocol="udp")
    syn = report.arrived("web1")[0]
    assert (syn.destination_address, syn.destination_port) == (WEB1_4, 8080)
    assert syn.source_address == CLIENT4
    # The gateway received it addressed to itself (captured before DNAT).
    assert report.arrived("gateway")[0].destination_address == GW_OUT4
    # The SYN-ACK reaches the client from the address it asked for (un-DNAT).
    assert (report.reply.source_address, report.reply.source_port) == (GW_OUT4, 80)
    assert report.reply.tcp_flags == "SA"
    assert [a.backend for a in answers] == ["web1"] * 3
    assert all(a.seen_destination_address == WEB1_4 and a.seen_destination_port == 5301
               and a.seen_source_address == CLIENT4 for a in answers), answers


def test_snat_with_port_rewrite_is_still_recognised(lab):
    # Source NAT to the gateway's inside address and a fixed port: the probe is known
    # at web1 by its token, and web1's ICMP error about it by the learned port.
    nft(lab, "gateway", """
        table ip probetest {
          chain postrouting {
            type nat hook postrouting priority srcnat;
            oifname "eth1" udp dport 9999 snat to 10.16.0.1:20000
          }
        }""")
    report = probes.send_packet(lab, "client", WEB1_4, "udp", 9999, watch=["web1"], timeout=1)
    got = report.arrived("web1")[0]
    assert (got.source_address, got.source_port) == (GW_IN4, 20000)
    errors = [p for p in report.packets if p.host == "web1" and p.kind == "error"]
    assert errors and errors[0].quoted["source_port"] == 20000
    # Back at the client, conntrack has undone the rewrite inside the quote too.
    assert report.reply.quoted["source_port"] == report.source_port


# ---------------------------------------------------------------- streams

@pytest.mark.parametrize("family", [4, 6])
def test_connect_many_names_the_server_and_the_client(lab, family):
    dst = lab.address("web1", family)
    with probes.serve_identity(lab, "web1", 8000) as server:
        answers = probes.connect_many(lab, "client", dst, 8000, count=5)
        assert server.running
    assert not server.running
    assert len(answers) == 5
    assert [a.index for a in answers] == list(range(5))
    for a in answers:
        assert a.ok and a.backend == "web1", a
        assert a.seen_source_address == lab.address("client", family)
        assert a.seen_source_port == a.source_port
        assert (a.seen_destination_address, a.seen_destination_port) == (dst, 8000)
    assert len({a.source_port for a in answers}) == 5  # five distinct connections


def test_connect_many_udp(lab):
    with probes.serve_identity(lab, "web1", 8001, "both"):
        tcp = probes.connect_many(lab, "client", WEB1_4, 8001, count=2)
        udp = probes.connect_many(lab, "client", WEB1_4, 8001, count=2, protocol="udp")
    assert [a.backend for a in tcp + udp] == ["web1"] * 4
    assert [a.protocol for a in udp] == ["udp", "udp"]
    assert udp[0].seen_destination_address == WEB1_4


def test_connect_many_to_closed_port_reports_refused(lab):
    answers = probes.connect_many(lab, "client", WEB1_4, 8999, count=2)
    assert [a.ok for a in answers] == [False, False]
    assert all("ConnectionRefused" in a.error for a in answers)


def test_connect_many_total_timeout_bounds_the_run(lab):
    started = time.monotonic()
    answers = probes.connect_many(lab, "client", "10.16.0.99", 80, count=5, timeout=0.3,
                                  total_timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert len(answers) == 5 and not any(a.ok for a in answers)
    assert "not attempted" in answers[-1].error


def test_identity_server_stop_and_port_in_use(lab):
    server = probes.serve_identity(lab, "web1", 8002)
    with pytest.raises(probes.ProbeError, match="port"):
        probes.serve_identity(lab, "web1", 8002)
    server.stop()
    assert not server.running
    assert not probes.connect_many(lab, "client", WEB1_4, 8002, count=1)[0].ok


def test_identity_server_lifetime_is_bounded(lab):
    server = probes.serve_identity(lab, "web1", 8003, lifetime=0.3)
    server.proc.wait(3)
    assert not server.running


# ---------------------------------------------------------------- ping

def test_ping(lab):
    result = probes.ping(lab, "client", WEB1_4, count=2, timeout=1)
    assert (result.transmitted, result.received) == (2, 2)
    assert [r["address"] for r in result.replies] == [WEB1_4, WEB1_4]
    assert result.replies[0]["ttl"] == 63


def test_ping_to_absent_host_fails_within_bounds(lab):
    started = time.monotonic()
    result = probes.ping(lab, "client", "10.16.0.99", count=1, timeout=1)
    assert not result.ok and result.received == 0
    assert time.monotonic() - started < 3


# ---------------------------------------------------------------- input checks

@pytest.mark.parametrize("kwargs, field", [
    ({"src": "nosuch"}, "src"),
    ({"dst": "192.0.2.1"}, "dst"),          # the machine's uplink: refused
    ({"dst": "not-an-ip"}, "dst"),
    ({"protocol": "sctp"}, "protocol"),
    ({"port": 70000}, "port"),
    ({"watch": ["nosuch"]}, "watch"),
    ({"timeout": 0}, "timeout"),
    ({"source_address": "2001:db8:100::10"}, "source_address"),
])
def test_bad_input_names_the_field(lab, kwargs, field):
    args = dict(src="client", dst=WEB1_4, protocol="udp", port=9)
    args.update(kwargs)
    with pytest.raises(probes.ProbeError) as err:
        probes.send_packet(lab, **args)
    assert err.value.field == field
    assert str(err.value).startswith(field + "=")


# ---------------------------------------------------------------- the Ansible module

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars: {lab_prefix: %(prefix)s}
  tasks:
    - ipmasq.gateway.lab_probe: {prefix: "{{ lab_prefix }}", kind: serve, host: web2, port: 8090}
      register: served
    - ipmasq.gateway.lab_probe:
        prefix: "{{ lab_prefix }}"
        kind: packet
        src: client
        dst: 10.16.0.28
        port: 8090
        watch: [web2]
      register: syn
    - ipmasq.gateway.lab_probe:
        {prefix: "{{ lab_prefix }}", kind: connect, src: client, dst: 10.16.0.28, port: 8090, count: 3}
      register: conns
    - ipmasq.gateway.lab_probe: {prefix: "{{ lab_prefix }}", kind: ping, src: client, dst: 10.16.0.28}
      register: echo
    - ipmasq.gateway.lab_probe: {prefix: "{{ lab_prefix }}", kind: stop, host: web2}
      register: stopped
    - ipmasq.gateway.lab_probe: {prefix: "{{ lab_prefix }}", kind: stop, host: web2}
      register: stopped_again
    - ipmasq.gateway.lab_probe: {prefix: "{{ lab_prefix }}", kind: packet, src: client, dst: 192.0.2.1, port: 80}
      register: refused
      ignore_errors: true
    - ansible.builtin.assert:
        that:
          - served is changed and served.server.host == 'web2'
          - syn is not changed
          - syn.packet.arrived.web2[0].source_address == '198.51.100.10'
          - syn.packet.arrived.web2[0].tcp_flags == 'S'
          - syn.packet.replies[0].tcp_flags == 'SA'
          - conns is not changed and conns.backends == ['web2', 'web2', 'web2']
          - conns.connections[0].seen_source_address == '198.51.100.10'
          - echo.ping.received == 1
          - stopped is changed and stopped.stopped == [served.server.pid]
          - stopped_again is not changed
          - refused is failed and refused.field == 'dst'
"""


def test_lab_probe_module_in_a_playbook(lab, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bindir = os.path.dirname(sys.executable)
    playbook = tmp_path / "probe.yml"
    playbook.write_text(PLAYBOOK % {"prefix": lab.prefix})
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"],
               ANSIBLE_COLLECTIONS_PATH=os.path.join(repo, ".venv", "collections"),
               ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run([os.path.join(bindir, "ansible-playbook"), "-i", "localhost,",
                           str(playbook)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "failed=0" in proc.stdout and "ignored=1" in proc.stdout
