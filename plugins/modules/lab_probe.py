#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_probe
short_description: Probe a namespace lab with real packets and report what arrived where
version_added: 0.1.0
description:
  - Runs one probe of the C(ipmasq_lab) harness against a lab that is up, named by its
    O(prefix), and returns the structured result.
  - V(packet) sends one crafted TCP SYN, UDP datagram or ICMP echo request from host
    O(src) to address O(dst) and reports every packet of it seen at O(src) and at the
    O(watch) hosts, with interface, direction, addresses and ports, so a play can
    check that the destination was rewritten and the client's source preserved.
  - V(connect) opens O(count) TCP connections (or UDP exchanges) one after another and
    reports, in order, which backend answered each (backends run identity servers).
  - V(ping) sends O(count) ICMP echo requests with the system's C(ping).
  - V(serve) starts an identity server on O(host); V(stop) stops the identity servers of
    this lab on O(host) (those on O(port) only, if given).
  - Probes change nothing (C(changed=false)); only V(serve) and V(stop) do. Every probe is
    bounded in count and time. Addresses outside the lab's ranges are refused.
  - Runs where the lab runs (usually C(localhost), as root). The harness ships with the
    module; the interpreter needs only pyroute2, PyYAML and scapy.
author: ipmasq.gateway developers (@ipmasq)
options:
  prefix:
    description: The lab's prefix, as C(ipmasq-lab up) printed it.
    type: str
    required: true
  kind:
    description: What to do.
    type: str
    required: true
    choices: [packet, connect, ping, serve, stop]
  src:
    description: The host the probe is sent from (V(packet), V(connect), V(ping)).
    type: str
  dst:
    description: The address the probe is sent to (V(packet), V(connect), V(ping)).
    type: str
  protocol:
    description:
      - V(packet) sends a TCP SYN, a UDP datagram or an ICMP echo request (ICMPv6 for an
        IPv6 O(dst)). V(connect) uses V(tcp) or V(udp). V(serve) also accepts V(both).
    type: str
    choices: [tcp, udp, icmp, both]
    default: tcp
  port:
    description:
      - The destination port (V(packet) with tcp/udp, V(connect)), the port to serve on
        (V(serve)), or the servers to stop (V(stop)).
    type: int
  watch:
    description: Hosts where V(packet) captures what arrives (the source always is).
    type: list
    elements: str
    default: []
  count:
    description: Connections for V(connect), echo requests for V(ping).
    type: int
    default: 1
  timeout:
    description:
      - Seconds to wait for an answer. V(packet) ends early once the source received a
        reply or ICMP error; V(connect) applies it to each connection; V(ping) to the
        last echo request.
      - Defaults to 2 for V(packet), 1 otherwise.
    type: float
  total_timeout:
    description:
      - V(connect) only. The whole run's bound; connections not yet attempted then are
        reported as not attempted. Default O(count) * O(timeout) + 1.
    type: float
  source_address:
    description: V(packet) only. Send from this address instead of the routed one.
    type: str
  source_port:
    description: V(packet) only. The probe's source port (default random).
    type: int
  host:
    description: The host to start (V(serve)) or stop (V(stop)) identity servers on.
    type: str
  address:
    description: V(serve) only. Bind this address only (default every address).
    type: str
  lifetime:
    description: V(serve) only. Seconds after which the identity server exits by itself.
    type: float
    default: 300
attributes:
  check_mode:
    support: full
    description: Probes run as usual (they change nothing); V(serve) and V(stop) only
      report what they would do.
  diff_mode:
    support: none
    description: There is no configuration to diff.
  platform:
    support: full
    platforms: posix
    description: Runs on the machine that hosts the lab namespaces.
requirements:
  - pyroute2, PyYAML and scapy on the target's Python (the lab harness itself ships with the module)
  - root, for network namespaces
notes:
  - An identity server answers each TCP connection or UDP datagram with one JSON line
    naming its host and the connection as it saw it, after any NAT.
  - The lab kills identity servers when it is torn down; O(lifetime) bounds them anyway.
seealso:
  - module: ipmasq.gateway.masq_portfw
  - module: ipmasq.gateway.masq_info
"""

EXAMPLES = r"""
- name: Start an identity server on each web backend
  ipmasq.gateway.lab_probe:
    prefix: "{{ lab_prefix }}"
    kind: serve
    host: "{{ item }}"
    port: 80
  loop: [web1, web2]

- name: A SYN to the gateway's external address lands on web1, client source kept
  ipmasq.gateway.lab_probe:
    prefix: "{{ lab_prefix }}"
    kind: packet
    src: client
    dst: 198.51.100.1
    protocol: tcp
    port: 80
    watch: [web1, web2]
  register: syn

- name: Check the rewrite
  ansible.builtin.assert:
    that:
      - syn.packet.arrived.web1[0].destination_address == '10.16.0.27'
      - syn.packet.arrived.web1[0].source_address == '198.51.100.10'
      - syn.packet.replies[0].tcp_flags == 'SA'
      - syn.packet.replies[0].source_address == '198.51.100.1'

- name: Twenty connections follow the prefs (15 to web1, then 5 to web2)
  ipmasq.gateway.lab_probe:
    prefix: "{{ lab_prefix }}"
    kind: connect
    src: client
    dst: 198.51.100.1
    port: 80
    count: 20
  register: conns

- name: Check the order
  ansible.builtin.assert:
    that: conns.backends == ['web1'] * 15 + ['web2'] * 5

- name: The friend network reaches friendsrv
  ipmasq.gateway.lab_probe:
    prefix: "{{ lab_prefix }}"
    kind: ping
    src: friend
    dst: 203.0.113.1
    count: 2
  register: echo
  failed_when: echo.ping.received != 2

- name: Stop the identity servers
  ipmasq.gateway.lab_probe:
    prefix: "{{ lab_prefix }}"
    kind: stop
    host: "{{ item }}"
  loop: [web1, web2]
"""

RETURN = r"""
packet:
  description:
    - What the crafted packet did. C(packets) lists every packet of the probe seen at
      the source and the watched hosts, in time order; C(arrived) maps each watched
      host to the probe packets it received; C(replies) lists the replies and ICMP
      errors the source received.
    - A packet has C(host), C(interface), C(direction) (V(in) or V(out)), C(kind)
      (V(probe), V(reply) or V(error)), C(family), C(protocol), C(source_address),
      C(source_port), C(destination_address), C(destination_port), C(tcp_flags),
      C(icmp_type), C(icmp_code), C(ttl), C(length), C(time) (seconds after sending),
      C(summary) and, for ICMP errors, C(quoted) (the quoted packet's addresses and ports).
    - Inbound packets are captured before the host's netfilter hooks (pre-DNAT),
      outbound ones after them (post-SNAT).
  returned: when O(kind=packet)
  type: dict
  sample:
    src: client
    dst: 198.51.100.1
    protocol: tcp
    port: 80
    source_address: 198.51.100.10
    source_port: 41733
    watch: [web1]
    timeout: 2.0
    elapsed: 0.61
    send_error: null
    truncated: false
    arrived:
      web1:
        - {host: web1, interface: eth0, direction: in, kind: probe, family: 4,
           protocol: tcp, source_address: 198.51.100.10, source_port: 41733,
           destination_address: 10.16.0.27, destination_port: 80, tcp_flags: S,
           icmp_type: null, icmp_code: null, ttl: 63, length: 44, time: 0.0004,
           summary: "IP / TCP 198.51.100.10:41733 > 10.16.0.27:http S", quoted: null}
    replies:
      - {host: client, interface: eth0, direction: in, kind: reply, family: 4,
         protocol: tcp, source_address: 198.51.100.1, source_port: 80,
         destination_address: 198.51.100.10, destination_port: 41733, tcp_flags: SA,
         icmp_type: null, icmp_code: null, ttl: 63, length: 44, time: 0.0009,
         summary: "IP / TCP 198.51.100.1:http > 198.51.100.10:41733 SA", quoted: null}
    packets: []
connections:
  description:
    - One entry per connection of V(connect), in order. C(backend) is the host that
      answered (null if none, and C(error) says why). C(source_*) and C(destination_*) are
      the connection as the client made it; C(seen_*) as the backend saw it.
  returned: when O(kind=connect)
  type: list
  elements: dict
  sample:
    - {index: 0, protocol: tcp, ok: true, backend: web1,
       source_address: 198.51.100.10, source_port: 50412,
       destination_address: 198.51.100.1, destination_port: 80,
       seen_source_address: 198.51.100.10, seen_source_port: 50412,
       seen_destination_address: 10.16.0.27, seen_destination_port: 80,
       elapsed: 0.0011, error: null}
backends:
  description: The C(backend) of each connection, in order (null where none answered).
  returned: when O(kind=connect)
  type: list
  elements: str
  sample: [web1, web1, web2]
ping:
  description: The ping's counts, each reply (address, icmp_seq, ttl, time_ms) and
    the ICMP errors ping reported.
  returned: when O(kind=ping)
  type: dict
  sample:
    src: client
    dst: 10.16.0.27
    transmitted: 1
    received: 1
    ok: true
    replies: [{address: 10.16.0.27, icmp_seq: 1, ttl: 63, time_ms: 0.061}]
    errors: []
    elapsed: 0.01
server:
  description: The identity server started (its C(pid) is what O(kind=stop) ends).
  returned: when O(kind=serve) and not in check mode
  type: dict
  sample: {host: web1, port: 80, protocol: tcp, address: null, lifetime: 300.0,
           pid: 31337, running: true}
stopped:
  description: PIDs of the identity servers stopped (or, in check mode, that would be).
  returned: when O(kind=stop)
  type: list
  elements: int
  sample: [31337]
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab import probes, topology
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab import spec as lab_spec
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab.lab import Lab
except ImportError:
    HAS_IPMASQ_LAB = False
    IPMASQ_LAB_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_IPMASQ_LAB = True
    IPMASQ_LAB_IMPORT_ERROR = None

# The options each kind uses; any other option given is a mistake worth naming.
OPTIONS_OF = {
    "packet": {"src", "dst", "protocol", "port", "watch", "timeout", "source_address",
               "source_port"},
    "connect": {"src", "dst", "protocol", "port", "count", "timeout", "total_timeout"},
    "ping": {"src", "dst", "count", "timeout"},
    "serve": {"host", "protocol", "port", "address", "lifetime"},
    "stop": {"host", "port"},
}
DEFAULTED = {"protocol", "watch", "count", "lifetime"}


def run_probe(module, lab, p):
    kind = p["kind"]
    timeout = p["timeout"]
    if kind == "packet":
        report = probes.send_packet(
            lab, p["src"], p["dst"], p["protocol"], p["port"], watch=p["watch"],
            timeout=2.0 if timeout is None else timeout,
            source_address=p["source_address"], source_port=p["source_port"])
        return False, {"packet": report.to_dict()}
    if kind == "connect":
        results = probes.connect_many(
            lab, p["src"], p["dst"], p["port"], p["count"], p["protocol"],
            timeout=1.0 if timeout is None else timeout, total_timeout=p["total_timeout"])
        return False, {"connections": [r.to_dict() for r in results],
                       "backends": [r.backend for r in results]}
    if kind == "ping":
        result = probes.ping(lab, p["src"], p["dst"], p["count"],
                             timeout=1.0 if timeout is None else timeout)
        return False, {"ping": result.to_dict()}
    if kind == "serve":
        if module.check_mode:
            return True, {}
        server = probes.serve_identity(lab, p["host"], p["port"], p["protocol"],
                                       address=p["address"], lifetime=p["lifetime"])
        return True, {"server": server.to_dict()}
    # stop
    if module.check_mode:
        pids = probes.find_identity_servers(lab, p["host"], p["port"])
    else:
        pids = probes.stop_identity_servers(lab, p["host"], p["port"])
    return bool(pids), {"stopped": pids}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            prefix=dict(type="str", required=True),
            kind=dict(type="str", required=True, choices=list(OPTIONS_OF)),
            src=dict(type="str"),
            dst=dict(type="str"),
            protocol=dict(type="str", default="tcp", choices=["tcp", "udp", "icmp", "both"]),
            port=dict(type="int"),
            watch=dict(type="list", elements="str", default=[]),
            count=dict(type="int", default=1),
            timeout=dict(type="float"),
            total_timeout=dict(type="float"),
            source_address=dict(type="str"),
            source_port=dict(type="int"),
            host=dict(type="str"),
            address=dict(type="str"),
            lifetime=dict(type="float", default=300.0),
        ),
        required_if=[
            ("kind", "packet", ("src", "dst")),
            ("kind", "connect", ("src", "dst", "port")),
            ("kind", "ping", ("src", "dst")),
            ("kind", "serve", ("host", "port")),
            ("kind", "stop", ("host",)),
        ],
        supports_check_mode=True,
    )
    # The harness imports pyroute2 and PyYAML guarded: None when the target lacks them.
    if not HAS_IPMASQ_LAB or topology.IPRoute is None or lab_spec.yaml is None:
        module.fail_json(msg=missing_required_lib("pyroute2, PyYAML and scapy (the lab "
                                                  "harness's libraries)"),
                         exception=IPMASQ_LAB_IMPORT_ERROR)
    p = module.params
    kind = p["kind"]
    stray = sorted(name for name in set(module.argument_spec) - OPTIONS_OF[kind]
                   - DEFAULTED - {"prefix", "kind"} if p[name] is not None)
    if stray:
        module.fail_json(msg="%s=%r: not an option of kind=%s (it uses: %s)"
                         % (stray[0], p[stray[0]], kind, ", ".join(sorted(OPTIONS_OF[kind]))))
    if kind in ("connect", "serve") and p["protocol"] == "icmp" or \
            kind in ("packet", "connect") and p["protocol"] == "both":
        module.fail_json(msg="protocol=%r: not a protocol of kind=%s" % (p["protocol"], kind))
    try:
        lab = Lab.attach(p["prefix"])
        changed, result = run_probe(module, lab, p)
    except probes.ProbeError as exc:
        module.fail_json(msg=str(exc), field=exc.field, value=exc.value)
    except Exception as exc:  # the lab's own errors (unknown prefix, host) say what is wrong
        module.fail_json(msg="%s: %s" % (type(exc).__name__, exc),
                         exception=traceback.format_exc())
    module.exit_json(changed=changed, **result)


if __name__ == "__main__":
    main()
