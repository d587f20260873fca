"""The namespace side of the lab probes: capture, send, connect.

Runs inside one network namespace (started there by `Lab.spawn`/`Lab.run`) and speaks
JSON on stdout. `ipmasq_lab.probes` drives it; nobody else needs to.

    python -m ipmasq_lab.probe_agent capture --timeout 3
    python -m ipmasq_lab.probe_agent send --host client --match '{...}' --destination ...
    python -m ipmasq_lab.probe_agent connect --destination 10.16.0.27 --port 80 --count 5

The file is self-contained (stdlib, plus scapy imported lazily) so it also runs as a
plain script path: no package import on the hot path, which keeps start-up near 30 ms.

Capture uses an AF_PACKET SOCK_DGRAM socket for every protocol (ETH_P_ALL): it sees
each interface of the namespace, both directions, with the link header already
stripped and a kernel timestamp; no libpcap, so no BPF filter: matching is done in
Python (`Matcher`). The socket is opened before `{"ready": true}` is printed, so
every packet sent after the handshake is queued in it. `capture` itself stays
stdlib-only and prints raw frames; `Recorder` (scapy) dissects them in the caller,
so no scapy import competes with the sender for the CPU while the probe flies.

Sending uses a raw IP socket (IP_HDRINCL): scapy builds the packet, the namespace's
own kernel routes it and resolves the neighbour, exactly as for any local packet.
"""

import argparse
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
SNAPLEN = 512  # headers, the probe's token, an ICMP error's quote: all fit
SO_TIMESTAMPNS = 35  # asm-generic/socket.h; cmsg data: struct timespec (two longs)

# ICMP types that quote the offending packet (IPv4: unreachable, source quench,
# redirect, time exceeded, parameter problem; IPv6: unreachable, too big, time
# exceeded, parameter problem).
ICMP4_ERRORS = {3, 4, 5, 11, 12}
ICMP6_ERRORS = {1, 2, 3, 4}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def normalize_address(addr):
    """'::ffff:10.0.0.1' (a dual-stack socket's view of IPv4) -> '10.0.0.1'."""
    ip = ipaddress.ip_address(addr.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


# ---------------------------------------------------------------- capture + match

def open_capture():
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    # Kernel receive timestamps: packets from different hosts order by when they
    # passed, not by when each capture process got round to reading them.
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setblocking(False)
    return sock


class Matcher:
    """Decides whether a captured packet belongs to one probe, and how.

    The probe is recognised by its source port, its TCP sequence number, its ICMP
    echo id, or the token in its payload. Sequence numbers and payloads survive
    NAT; when a packet is recognised that way under a rewritten source port
    (masquerade), that port is learned so replies to it are recognised too.
    """

    def __init__(self, match):
        self.protocol = match["protocol"]
        self.ports = {match["source_port"]} if match.get("source_port") else set()
        self.seq = match.get("seq")
        self.icmp_ids = {match["icmp_id"]} if match.get("icmp_id") is not None else set()
        self.token = match.get("token", "").encode()

    def _has_token(self, layer):
        return bool(self.token) and self.token in bytes(layer.payload)

    def _classify_l4(self, l4, name):
        """'probe', 'reply' or None for a TCP/UDP/ICMP-echo layer of class `name`."""
        if name in ("TCP", "TCPerror") and self.protocol == "tcp":
            if l4.sport in self.ports or (self.seq is not None and l4.seq == self.seq):
                self.ports.add(l4.sport)
                return "probe"
            if l4.dport in self.ports or (
                    self.seq is not None and "A" in str(l4.flags)
                    and l4.ack == (self.seq + 1) % 2**32):
                return "reply"
        elif name in ("UDP", "UDPerror") and self.protocol == "udp":
            if l4.sport in self.ports or (name == "UDP" and self._has_token(l4)):
                self.ports.add(l4.sport)
                return "probe"
            if l4.dport in self.ports:
                return "reply"
        elif self.protocol == "icmp" and name in (
                "ICMP", "ICMPerror", "ICMPv6EchoRequest", "ICMPv6EchoReply"):
            request = name == "ICMPv6EchoRequest" or (name != "ICMPv6EchoReply" and l4.type == 8)
            reply = name == "ICMPv6EchoReply" or (name in ("ICMP", "ICMPerror") and l4.type == 0)
            if not (request or reply):
                return None
            if l4.id in self.icmp_ids or (name != "ICMPerror" and self._has_token(l4)):
                self.icmp_ids.add(l4.id)
                return "probe" if request else "reply"
        return None

    def classify(self, ip):
        """Returns (kind, transport layer, quoted packet or None) or None."""
        l4 = ip.payload
        while type(l4).__name__.startswith("IPv6ExtHdr"):
            l4 = l4.payload
        name = type(l4).__name__
        if name in ("ICMP", "ICMPv6DestUnreach", "ICMPv6PacketTooBig",
                    "ICMPv6TimeExceeded", "ICMPv6ParamProblem"):
            icmp_errors = ICMP4_ERRORS if name == "ICMP" else ICMP6_ERRORS
            if l4.type in icmp_errors:
                inner_ip = l4.payload
                inner = inner_ip.payload
                if type(inner_ip).__name__ in ("IPerror", "IPerror6") and \
                        self._classify_l4(inner, type(inner).__name__) == "probe":
                    return "error", l4, inner_ip
                return None
        kind = self._classify_l4(l4, name)
        return (kind, l4, None) if kind else None


def describe(ip, kind, l4, quoted, host, ifname, direction, stamp):
    """One captured packet as the JSON record `probes.SeenPacket` is built from."""
    family = 4 if ip.version == 4 else 6
    name = type(l4).__name__
    rec = {
        "host": host, "interface": ifname, "direction": direction, "time": stamp,
        "kind": kind, "family": family,
        "source_address": ip.src, "destination_address": ip.dst,
        "source_port": None, "destination_port": None,
        "tcp_flags": None, "icmp_type": None, "icmp_code": None,
        "ttl": ip.ttl if family == 4 else ip.hlim,
        "length": ip.len if family == 4 else ip.plen + 40, "summary": ip.summary(), "quoted": None,
    }
    if name == "TCP":
        rec.update(protocol="tcp", source_port=l4.sport, destination_port=l4.dport,
                   tcp_flags=str(l4.flags))
    elif name == "UDP":
        rec.update(protocol="udp", source_port=l4.sport, destination_port=l4.dport)
    else:
        rec.update(protocol="icmp" if family == 4 else "icmpv6",
                   icmp_type=l4.type, icmp_code=getattr(l4, "code", 0))
    if quoted is not None:
        inner = quoted.payload
        rec["quoted"] = {
            "source_address": quoted.src, "destination_address": quoted.dst,
            "source_port": getattr(inner, "sport", None),
            "destination_port": getattr(inner, "dport", None),
        }
    return rec


def read_frames(sock, frames, max_frames):
    """Appends every frame queued on `sock` to `frames` (at most `max_frames`; the
    first SNAPLEN bytes each); returns the frames appended by this call."""
    new = []
    while True:
        try:
            data, ancdata, _flags, addr = sock.recvmsg(SNAPLEN, socket.CMSG_SPACE(16))
        except BlockingIOError:
            return new
        if addr[1] not in (ETH_P_IP, ETH_P_IPV6):
            continue
        stamp = time.time()
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack("qq", value[:16])
                stamp = sec + nsec / 1e9
        if len(frames) >= max_frames:
            continue
        frame = {"interface": addr[0], "ethertype": addr[1],
                 "direction": "out" if addr[2] == PACKET_OUTGOING else "in",
                 "time": stamp, "data": data}
        frames.append(frame)
        new.append(frame)


class Recorder:
    """Turns one host's frames, in capture order, into records of the probe's packets
    (dissected with scapy, imported on first use)."""

    def __init__(self, host, match, max_packets):
        self.host, self.max_packets = host, max_packets
        self.matcher = Matcher(match)
        self.packets = []
        self.truncated = False

    def add(self, frame):
        """The record for `frame` if it belongs to the probe, else None."""
        from scapy.layers.inet import IP  # registers the ICMP/TCP/UDP layers too
        from scapy.layers.inet6 import IPv6
        try:
            ip = (IP if frame["ethertype"] == ETH_P_IP else IPv6)(frame["data"])
            hit = self.matcher.classify(ip)
        except Exception:  # a malformed frame is not ours to report
            return None
        if not hit:
            return None
        if len(self.packets) >= self.max_packets:
            self.truncated = True
            return None
        rec = describe(ip, hit[0], hit[1], hit[2], self.host, frame["interface"],
                       frame["direction"], frame["time"])
        self.packets.append(rec)
        return rec


def cmd_capture(args):
    """Capture raw frames until stdin says stop (a line or EOF) or the hard timeout
    passes; print them. Stdlib only: no scapy import competes with the sender for
    the CPU while the probe is in flight; the caller dissects (Recorder)."""
    sock = open_capture()
    emit({"ready": True, "pid": os.getpid()})
    frames = []
    deadline = time.monotonic() + args.timeout
    stdin = sys.stdin.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable = select.select([sock, stdin], [], [], left)[0]
        if sock in readable:
            read_frames(sock, frames, args.max_frames)
        if stdin in readable:
            os.read(stdin, 4096)  # any line or EOF means: stop
            break
    read_frames(sock, frames, args.max_frames)
    emit({"frames": [dict(f, data=f["data"].hex()) for f in frames],
          "truncated": len(frames) >= args.max_frames})


# ---------------------------------------------------------------- send

def build_packet(args, match, source):
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.packet import Raw
    family = ipaddress.ip_address(args.destination).version
    token = match["token"].encode()
    l3 = IP(src=source, dst=args.destination, ttl=64) if family == 4 else \
        IPv6(src=source, dst=args.destination, hlim=64)
    if args.protocol == "tcp":
        l4 = TCP(sport=match["source_port"], dport=args.port, flags="S",
                 seq=match["seq"], window=64240, options=[("MSS", 1460)])
    elif args.protocol == "udp":
        l4 = UDP(sport=match["source_port"], dport=args.port) / Raw(token + b"\n")
    elif family == 4:
        l4 = ICMP(type=8, id=match["icmp_id"], seq=1) / Raw(token)
    else:
        l4 = ICMPv6EchoRequest(id=match["icmp_id"], seq=1, data=token)
    return family, l3 / l4


def route_source(destination, family):
    """The source address this namespace's kernel would pick for `destination`."""
    with socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                       socket.SOCK_DGRAM) as s:
        s.connect((destination, 9))  # no packet is sent by a UDP connect
        return normalize_address(s.getsockname()[0])


def cmd_send(args):
    """Send one crafted packet, collect what comes back until done or timeout."""
    match = json.loads(args.match)
    sock = open_capture()
    frames = []
    recorder = Recorder(args.host, match, args.max_packets)
    family = ipaddress.ip_address(args.destination).version
    result = {"source_address": None, "sent_at": None, "send_error": None}
    try:
        source = args.source_address or route_source(args.destination, family)
        result["source_address"] = source
        family, packet = build_packet(args, match, source)
        raw_sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                                 socket.SOCK_RAW, socket.IPPROTO_RAW)
        with raw_sock:
            read_frames(sock, [], 0)  # drop anything queued before the send
            result["sent_at"] = time.time()
            raw_sock.sendto(bytes(packet), (args.destination, 0))
    except OSError as exc:  # e.g. ENETUNREACH: no route in the source namespace
        result["send_error"] = "%s: %s" % (type(exc).__name__, exc.strerror or exc)
    if result["sent_at"] is not None:
        deadline = time.monotonic() + args.timeout
        answered_at = None
        while time.monotonic() < deadline:
            wait = deadline - time.monotonic()
            if answered_at is not None:  # a short grace for what the answer triggers
                wait = min(wait, answered_at + args.grace - time.monotonic())
                if wait <= 0:
                    break
            readable = select.select([sock], [], [], max(wait, 0))[0]
            if readable:
                for frame in read_frames(sock, frames, args.max_frames):
                    rec = recorder.add(frame)
                    if rec and answered_at is None and rec["direction"] == "in" and \
                            rec["kind"] in ("reply", "error"):
                        answered_at = time.monotonic()
        for frame in read_frames(sock, frames, args.max_frames):
            recorder.add(frame)
    result.update(packets=recorder.packets,
                  truncated=recorder.truncated or len(frames) >= args.max_frames)
    emit(result)


# ---------------------------------------------------------------- connect

def exchange(family, protocol, destination, port, timeout):
    """One TCP connection or UDP exchange; returns (local address, answer bytes)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, kind) as s:
        s.settimeout(timeout)
        s.connect((destination, port))
        local = s.getsockname()
        if protocol == "udp":
            s.send(b"identify\n")
            return local, s.recv(4096)
        data = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in data and len(data) < 4096:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return local, data


def cmd_connect(args):
    family = ipaddress.ip_address(args.destination).version
    deadline = time.monotonic() + args.total_timeout
    results = []
    for index in range(args.count):
        rec = {"index": index, "protocol": args.protocol, "ok": False, "backend": None,
               "source_address": None, "source_port": None,
               "destination_address": args.destination, "destination_port": args.port,
               "seen_source_address": None, "seen_source_port": None,
               "seen_destination_address": None, "seen_destination_port": None,
               "elapsed": None, "error": None}
        results.append(rec)
        left = deadline - time.monotonic()
        if left <= 0:
            rec["error"] = "not attempted: total_timeout %.3gs reached" % args.total_timeout
            continue
        start = time.monotonic()
        try:
            local, data = exchange(family, args.protocol, args.destination, args.port,
                                   min(args.timeout, left))
            rec["source_address"] = normalize_address(local[0])
            rec["source_port"] = local[1]
            answer = json.loads(data.split(b"\n", 1)[0] or b"null")
            if not isinstance(answer, dict):
                raise ValueError("no identity line in the answer: %r" % data[:200])
            rec.update(ok=True, backend=answer.get("host"),
                       seen_source_address=answer.get("source_address"),
                       seen_source_port=answer.get("source_port"),
                       seen_destination_address=answer.get("destination_address"),
                       seen_destination_port=answer.get("destination_port"))
        except socket.timeout:
            rec["error"] = "timeout after %.3gs" % min(args.timeout, left)
        except (OSError, ValueError) as exc:
            rec["error"] = "%s: %s" % (type(exc).__name__, getattr(exc, "strerror", None) or exc)
        rec["elapsed"] = round(time.monotonic() - start, 6)
    emit({"connections": results})


# ---------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="probe_agent", description=__doc__.split("\n", maxsplit=1)[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("capture", help="print the IP frames seen in this namespace")
    cap.add_argument("--timeout", type=float, required=True, help="hard limit, seconds")
    cap.add_argument("--max-frames", type=int, default=4096)
    cap.set_defaults(func=cmd_capture)

    snd = sub.add_parser("send", help="send one crafted packet, report replies")
    snd.add_argument("--host", required=True)
    snd.add_argument("--match", required=True)
    snd.add_argument("--protocol", choices=("tcp", "udp", "icmp"), required=True)
    snd.add_argument("--destination", required=True)
    snd.add_argument("--port", type=int)
    snd.add_argument("--source-address")
    snd.add_argument("--timeout", type=float, required=True)
    snd.add_argument("--grace", type=float, default=0.05)
    snd.add_argument("--max-packets", type=int, default=64)
    snd.add_argument("--max-frames", type=int, default=4096)
    snd.set_defaults(func=cmd_send)

    con = sub.add_parser("connect", help="open COUNT connections, report who answered")
    con.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    con.add_argument("--destination", required=True)
    con.add_argument("--port", type=int, required=True)
    con.add_argument("--count", type=int, default=1)
    con.add_argument("--timeout", type=float, default=1.0, help="per connection")
    con.add_argument("--total-timeout", type=float, required=True)
    con.set_defaults(func=cmd_connect)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
