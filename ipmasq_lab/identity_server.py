"""A lab backend that says who it is: one JSON line per TCP connection or UDP datagram.

    python -m ipmasq_lab.identity_server --name web1 --port 80 --protocol tcp --lifetime 300

The answer names the host and the connection as this server saw it, after any NAT:

    {"host": "web1", "protocol": "tcp", "source_address": "198.51.100.10",
     "source_port": 40112, "destination_address": "10.16.0.27", "destination_port": 80}

It binds a dual-stack socket on `::` (IPv4 and IPv6) unless `--address` is given, prints
`{"ready": true, ...}` once listening, then stops by itself after `--lifetime` seconds
or `--max-connections` answers, or on SIGTERM. Stdlib only, so it also runs as a script.
"""

import argparse
import ipaddress
import json
import os
import selectors
import signal
import socket
import sys
import time

IP_PKTINFO = 8  # linux/in.h; Python's socket module lacks the name


def _say(message):
    """One JSON line on stdout: the starter's handshake."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def normalize_address(addr):
    ip = ipaddress.ip_address(addr.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def identity(name, protocol, peer, local):
    return (json.dumps({
        "host": name, "protocol": protocol,
        "source_address": normalize_address(peer[0]), "source_port": peer[1],
        "destination_address": normalize_address(local[0]), "destination_port": local[1],
    }) + "\n").encode()


def bind(protocol, address, port):
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET if address and ipaddress.ip_address(address).version == 4 \
        else socket.AF_INET6
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and not address:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((address or "::", port))
    if protocol == "udp":  # learn each datagram's destination address (answer_udp)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if family == socket.AF_INET or not address:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    if protocol == "tcp":
        sock.listen(128)
    sock.setblocking(False)
    return sock


def answer_tcp(name, listener):
    conn, peer = listener.accept()
    with conn:
        conn.settimeout(1.0)
        try:
            conn.sendall(identity(name, "tcp", peer, conn.getsockname()))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client went away: nothing to tell anyone


def answer_udp(name, sock):
    """Answers from the address the datagram was sent to (IP_PKTINFO), so the reply
    leaves with the right source even on a socket bound to the wildcard address."""
    _data, ancdata, _flags, peer = sock.recvmsg(4096, socket.CMSG_SPACE(64))
    local_address, pktinfo = sock.getsockname()[0], []
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            local_address = socket.inet_ntop(socket.AF_INET, value[8:12])
            pktinfo = [(level, kind, bytes(4) + value[8:12] + bytes(4))]
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            local_address = socket.inet_ntop(socket.AF_INET6, value[:16])
            pktinfo = [(level, kind, value[:16] + bytes(4))]
    reply = identity(name, "udp", peer, (local_address, sock.getsockname()[1]))
    try:
        sock.sendmsg([reply], pktinfo, 0, peer)
    except OSError:
        pass


def serve(args):
    protocols = ("tcp", "udp") if args.protocol == "both" else (args.protocol,)
    sel = selectors.DefaultSelector()
    for proto in protocols:
        sel.register(bind(proto, args.address, args.port), selectors.EVENT_READ, proto)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    _say({"ready": True, "pid": os.getpid(), "host": args.name, "port": args.port, "protocol": args.protocol})
    # Nobody reads our output after the handshake (the starter may be gone): detach.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    deadline = time.monotonic() + args.lifetime
    answered = 0
    while not stop and answered < args.max_connections:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _events in sel.select(min(left, 0.5)):
            try:
                (answer_tcp if key.data == "tcp" else answer_udp)(args.name, key.fileobj)
                answered += 1
            except (BlockingIOError, InterruptedError):
                pass


def main(argv=None):
    parser = argparse.ArgumentParser(prog="identity_server", description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--name", required=True, help="the host name to answer with")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=("tcp", "udp", "both"), default="tcp")
    parser.add_argument("--address", default=None, help="bind address (default: :: dual-stack)")
    parser.add_argument("--lifetime", type=float, default=300.0, help="seconds, then exit")
    parser.add_argument("--max-connections", type=int, default=100000)
    parser.add_argument("--lab", default=None, help="the lab's prefix (tags the process)")
    args = parser.parse_args(argv)
    try:
        serve(args)
    except OSError as exc:
        _say({"ready": False, "error": "%s: %s" % (type(exc).__name__, exc)})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
