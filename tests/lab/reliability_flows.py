"""Traffic for the reliability tests, as operators measure it: a steady, numbered
probe stream through the gateway with loss counted, and a capture that says which
host saw which probe.

Run inside a lab namespace as a script (`python reliability_flows.py echo|stream|capture`)
or drive it from a test through the helpers at the bottom. Standard library only, so it
starts in ~30 ms; every loop is bounded in count and time.

  echo HOST PORT LIFETIME         UDP and TCP echo on PORT: answers "HOST <line>"
  stream PROTO DST PORT RATE MAX  one UDP flow (fixed source port) or one TCP connection,
                                  numbered probes at RATE/s until SIGTERM or MAX seconds;
                                  prints {"ready"...} once the first echo is back, and a
                                  summary {"sent", "received", "lost", "backends", "error"}
  capture TOKEN SECONDS           every IPv4 frame carrying TOKEN, as JSON lines at the end
"""

import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time


# -- echo ------------------------------------------------------------------------------

def cmd_echo(host, port, lifetime):
    port, deadline = int(port), time.monotonic() + float(lifetime)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind(("0.0.0.0", port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(64)
    prefix = host.encode() + b" "

    def serve(conn):
        conn.settimeout(max(1.0, deadline - time.monotonic()))
        reader = conn.makefile("rb")
        try:
            for line in reader:
                conn.sendall(prefix + line)
        except OSError:
            pass
        finally:
            conn.close()

    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() < deadline:
        ready, _writable, _exceptional = select.select([udp, tcp], [], [], 0.5)
        for sock in ready:
            if sock is udp:
                data, peer = udp.recvfrom(65535)
                udp.sendto(prefix + data, peer)
            else:
                conn, _peer = tcp.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()


# -- stream ----------------------------------------------------------------------------

def cmd_stream(proto, dst, port, rate, max_seconds):
    port, interval, deadline = int(port), 1.0 / float(rate), time.monotonic() + float(max_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    echoed, backends, errors = set(), {}, []
    sent = [0]
    ready = threading.Event()
    if proto == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((dst, port))
    else:
        sock = socket.create_connection((dst, port), timeout=5)
    sock.settimeout(0.2)

    def note(line):
        host, _space, seq = line.decode().strip().partition(" ")
        echoed.add(int(seq))
        backends[host] = backends.get(host, 0) + 1
        ready.set()

    def receive():
        buffer = b""
        while not (stop.is_set() and time.monotonic() > finish[0]):
            try:
                data = sock.recv(65535)
            except socket.timeout:
                continue
            except OSError as exc:
                errors.append("recv: %s" % exc)
                return
            if proto == "udp":
                note(data)
                continue
            if not data:
                errors.append("recv: connection closed by the peer")
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                note(line)

    finish = [float("inf")]
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    next_send = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline and not errors:
        try:
            sock.sendall(b"%d\n" % sent[0])
        except OSError as exc:
            errors.append("send: %s" % exc)
            break
        sent[0] += 1
        if sent[0] == 1:
            if not ready.wait(5):
                errors.append("no echo of the first probe within 5 s")
                break
            print(json.dumps({"ready": True, "source_port": sock.getsockname()[1]}), flush=True)
        next_send += interval
        time.sleep(max(0.0, next_send - time.monotonic()))
    finish[0] = time.monotonic() + 1.0  # grace for echoes in flight
    stop.set()
    receiver.join(3)
    lost = sorted(set(range(sent[0])) - echoed)
    print(json.dumps({"sent": sent[0], "received": len(echoed), "lost": len(lost), "lost_seqs": lost[:50],
                      "backends": backends, "error": errors[0] if errors else None,
                      "source_port": sock.getsockname()[1]}), flush=True)
    sock.close()


# -- capture -----------------------------------------------------------------------------

def cmd_capture(token, seconds):
    token = token.encode()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    sock.settimeout(0.1)
    deadline = time.monotonic() + float(seconds)
    seen = []
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() < deadline and len(seen) < 1000:
        try:
            frame, addr = sock.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[1] != 0x0800 or token not in frame or len(frame) < 20:
            continue
        proto = frame[9]
        seen.append({"interface": addr[0], "direction": "out" if addr[2] == socket.PACKET_OUTGOING else "in",
                     "source_address": socket.inet_ntoa(frame[12:16]),
                     "destination_address": socket.inet_ntoa(frame[16:20]),
                     "protocol": {1: "icmp", 6: "tcp", 17: "udp"}.get(proto, str(proto)),
                     "fragment": bool(struct.unpack("!H", frame[6:8])[0] & 0x3fff)})
    print(json.dumps({"seen": seen}), flush=True)


# -- helpers for tests -------------------------------------------------------------------

SCRIPT = os.path.abspath(__file__)


def _ready(proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("%s exited %s: %s" % (what, proc.returncode, proc.stderr.read()))
        ready, _writable, _exceptional = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line:
                return json.loads(line)
    raise AssertionError("%s not ready within %ss" % (what, timeout))


def start_echo(lab, host, port, lifetime=300):
    import subprocess
    proc = lab.spawn(host, [sys.executable, SCRIPT, "echo", host, str(port), str(lifetime)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _ready(proc, 10, "echo server on %s:%d" % (host, port))
    return proc


class Stream:
    """A running probe stream; `finish()` stops it and returns its summary."""

    def __init__(self, lab, host, proto, dst, port, rate=200, max_seconds=300):
        import subprocess
        self.proc = lab.spawn(host, [sys.executable, SCRIPT, "stream", proto, dst, str(port), str(rate),
                                     str(max_seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.start = _ready(self.proc, 10, "%s stream to %s:%d" % (proto, dst, port))

    def finish(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        lines = [l for l in out.splitlines() if l.startswith("{")]
        if not lines:
            raise AssertionError("stream printed no summary: %s" % err)
        return json.loads(lines[-1])


def start_capture(lab, host, token, seconds):
    import subprocess
    proc = lab.spawn(host, [sys.executable, SCRIPT, "capture", token, str(seconds)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _ready(proc, 10, "capture on %s" % host)
    return proc


def capture_result(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    return json.loads(out.splitlines()[-1])["seen"]


if __name__ == "__main__":
    commands = {"echo": cmd_echo, "stream": cmd_stream, "capture": cmd_capture}
    commands[sys.argv[1]](*sys.argv[2:])
