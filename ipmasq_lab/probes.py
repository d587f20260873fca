"""Probes that prove what a lab does with real packets.

    report = probes.send_packet(lab, "client", "198.51.100.1", "tcp", 80, watch=["web1"])
    syn = report.arrived("web1")[0]         # the SYN as web1 received it
    syn.destination_address, syn.source_address   # '10.16.0.27', '198.51.100.10'
    report.reply.tcp_flags                  # 'SA'

    with probes.serve_identity(lab, "web1", 80):
        answers = probes.connect_many(lab, "client", "198.51.100.1", 80, count=20)
    [a.backend for a in answers]            # ['web1', 'web2', ...] in order

    probes.ping(lab, "client", "10.16.0.27").received

`lab` is anything with the `ipmasq_lab` Lab interface: `netns(host)`, `hosts`,
`spawn(host, argv, **popen_kwargs)`, `run(host, argv, timeout=, check=)`. The
namespace side is `probe_agent.py` / `identity_server.py`, run with this interpreter.
Every probe is bounded in count and time, returns a dataclass with `to_dict()`, and
leaves no process behind (identity servers: until `stop()` or their lifetime).
Field names follow docs/agent-api.md: protocol, source_address, destination_port, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import random
import re
import secrets
import select
import signal
import subprocess
import sys
import time

from . import identity_server as _identity_server
from . import probe_agent as _probe_agent


def _script_path(module):
    """A file that runs `module` as a script. Its own file when it has one; when it was
    imported from a zip (the lab modules' AnsiballZ payload), a copy of its source under
    the registry's run directory, named by content so every run shares one copy."""
    path = os.path.abspath(module.__file__)
    if os.path.isfile(path):
        return path
    from .registry import RUN_DIR
    source = module.__loader__.get_source(module.__name__).encode()
    digest = hashlib.sha256(source).hexdigest()[:16]
    scripts = os.path.join(RUN_DIR, "scripts")
    target = os.path.join(scripts, "%s-%s" % (digest, os.path.basename(path)))
    if not os.path.isfile(target):
        os.makedirs(scripts, mode=0o700, exist_ok=True)
        tmp = "%s.%d.tmp" % (target, os.getpid())
        with open(tmp, "wb") as handle:
            handle.write(source)
        os.replace(tmp, target)
    return target


AGENT = _script_path(_probe_agent)
IDENTITY_SERVER = _script_path(_identity_server)

PROTOCOLS = ("tcp", "udp", "icmp")
# Probes only ever target the lab's own ranges (and loopback): a typo can't leave the lab.
LAB_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "198.51.100.0/24", "203.0.113.0/24", "10.0.0.0/8", "127.0.0.0/8",
    "2001:db8::/32", "fd00::/8", "::1/128"))

READY_TIMEOUT = 5.0     # seconds for a namespace-side process to say it is ready
STARTUP_SLACK = 5.0     # backstop on top of a probe's own timeout (interpreter start-up)
MAX_TIMEOUT = 60.0
MAX_COUNT = 1000


class ProbeError(ValueError):
    """Bad probe input (names the field and the value) or a probe that could not run."""

    def __init__(self, field, value, message):
        super().__init__("%s=%r: %s" % (field, value, message))
        self.field, self.value = field, value


# ---------------------------------------------------------------- results

@dataclasses.dataclass
class SeenPacket:
    """One packet of a probe, as captured at one host on one interface.

    kind: 'probe' (travelling from the source, maybe rewritten on the way), 'reply'
    (travelling back), or 'error' (an ICMP error quoting the probe; `quoted` holds the
    quoted packet's addresses and ports). direction: 'in' (received on `interface`) or
    'out' (sent). Inbound packets are captured before netfilter (pre-DNAT), outbound
    ones after it (post-SNAT). time: seconds since the probe was sent.
    """
    host: str
    interface: str
    direction: str
    kind: str
    family: int
    protocol: str
    source_address: str
    source_port: int | None
    destination_address: str
    destination_port: int | None
    tcp_flags: str | None
    icmp_type: int | None
    icmp_code: int | None
    ttl: int
    length: int
    time: float
    summary: str
    quoted: dict | None = None

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PacketReport:
    """What one crafted packet did: every packet of it seen at the source and at the
    watched hosts, ordered by time."""
    src: str
    dst: str
    protocol: str
    port: int | None
    source_address: str | None
    source_port: int | None
    watch: list
    timeout: float
    elapsed: float
    packets: list
    send_error: str | None = None
    truncated: bool = False

    def arrived(self, host=None):
        """Probe packets received at `host` (any watched host if None), in order."""
        return [p for p in self.packets if p.kind == "probe" and p.direction == "in"
                and p.host != self.src and (host is None or p.host == host)]

    @property
    def replies(self):
        """Replies and ICMP errors that came back to the source, in order."""
        return [p for p in self.packets if p.host == self.src and p.direction == "in"
                and p.kind in ("reply", "error")]

    @property
    def reply(self):
        """The first of `replies`, or None."""
        replies = self.replies
        return replies[0] if replies else None

    def to_dict(self):
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["packets"] = [p.to_dict() for p in self.packets]
        out["arrived"] = {h: [p.to_dict() for p in self.arrived(h)] for h in self.watch}
        out["replies"] = [p.to_dict() for p in self.replies]
        return out


@dataclasses.dataclass
class ConnectionResult:
    """One connection (TCP) or exchange (UDP) of `connect_many`.

    source_*/destination_*: the connection as the client made it. seen_*: as the
    backend saw it (after any NAT), from the identity server's answer. backend: the
    host name the identity server answered with; None if nothing answered (error says
    why: timeout, ConnectionRefusedError, not attempted after total_timeout).
    """
    index: int
    protocol: str
    ok: bool
    backend: str | None
    source_address: str | None
    source_port: int | None
    destination_address: str
    destination_port: int
    seen_source_address: str | None
    seen_source_port: int | None
    seen_destination_address: str | None
    seen_destination_port: int | None
    elapsed: float | None
    error: str | None

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PingResult:
    """`count` ICMP echo requests (the real ping program) from `src` to `dst`.

    replies: one dict per echo reply (address it came from, icmp_seq, ttl, time_ms);
    errors: ICMP errors ping reported ('From 10.16.0.1 icmp_seq=1 Destination Host
    Unreachable').
    """
    src: str
    dst: str
    transmitted: int
    received: int
    replies: list
    errors: list
    elapsed: float

    @property
    def ok(self):
        return self.received > 0

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return out


# ---------------------------------------------------------------- input checks

def _check_host(lab, field, host):
    if host not in lab.hosts:
        raise ProbeError(field, host, "no such host in the lab (hosts: %s)"
                         % ", ".join(sorted(lab.hosts)))
    return host


def _check_address(field, value):
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ProbeError(field, value, "not an IPv4 or IPv6 address") from None
    if not any(ip in net for net in LAB_NETWORKS):
        raise ProbeError(field, value, "outside the lab's address ranges (%s)"
                         % ", ".join(str(n) for n in LAB_NETWORKS))
    return str(ip)


def _check_port(field, value, required=True):
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ProbeError(field, value, "port must be an integer 1-65535")
    return value


def _check_number(field, value, low, high, kind=float):
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not low <= value <= high:
        raise ProbeError(field, value, "must be a %s from %s to %s"
                         % ("whole number" if kind is int else "number", low, high))
    return value


def _check_protocol(field, value, allowed):
    if value not in allowed:
        raise ProbeError(field, value, "must be one of %s" % ", ".join(allowed))
    return value


# ---------------------------------------------------------------- helpers

def _read_line(proc, timeout, what):
    """First stdout line of `proc` within `timeout` seconds, as parsed JSON."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise ProbeError(what, proc.args[2:5], "not ready within %.3gs" % timeout)
        chunk = os.read(fd, 65536)
        if not chunk:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise ProbeError(what, proc.args[2:5], "exited before ready: %s" % err.strip())
        data += chunk
    line, rest = data.split(b"\n", 1)
    return json.loads(line), rest


def _stop(proc, grace=1.0):
    """Ends a process this module started (by its own Popen), never anything else."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _agent_json(completed, what):
    out = completed.stdout
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        err = completed.stderr.decode(errors="replace") \
            if isinstance(completed.stderr, bytes) else completed.stderr
        raise ProbeError(what, completed.args[2:4], "probe agent failed (exit %s): %s"
                         % (completed.returncode, (err or "").strip()[-2000:])) from None


def _run_agent(lab, host, args, timeout, what):
    try:
        completed = lab.run(host, [sys.executable, AGENT] + args, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProbeError(what, host, "probe agent did not finish within %.3gs" % timeout) \
            from None
    return _agent_json(completed, what)


# ---------------------------------------------------------------- probes

def send_packet(lab, src, dst, protocol="tcp", port=None, *, watch=(), timeout=2.0,
                source_address=None, source_port=None, max_packets=64):
    """Send one crafted packet from host `src` to address `dst` and report where it
    and its answers were seen.

    protocol: 'tcp' (a SYN), 'udp' (a datagram) or 'icmp' (echo request; ICMPv6 for
    an IPv6 `dst`). port: the destination port (tcp/udp). watch: hosts to capture
    at; the source is always captured (that is where `replies` come from).
    timeout: seconds to wait for an answer; the probe ends early once the source got
    a reply or ICMP error. source_address: send from this address instead of the
    one the source's routing picks (a spoofed source). max_packets bounds the
    packets recorded per host.
    """
    _check_host(lab, "src", src)
    dst = _check_address("dst", dst)
    _check_protocol("protocol", protocol, PROTOCOLS)
    if protocol == "icmp":
        if port is not None:
            raise ProbeError("port", port, "icmp has no port")
    else:
        _check_port("port", port)
    _check_port("source_port", source_port, required=False)
    if source_address is not None:
        source_address = _check_address("source_address", source_address)
        if ipaddress.ip_address(source_address).version != ipaddress.ip_address(dst).version:
            raise ProbeError("source_address", source_address, "not the family of dst %s" % dst)
    if isinstance(watch, str):
        watch = [watch]
    watch = [_check_host(lab, "watch", h) for h in watch]
    _check_number("timeout", timeout, 0.05, MAX_TIMEOUT)
    _check_number("max_packets", max_packets, 1, 10000, int)

    # What identifies this probe's packets at every host (see probe_agent.Matcher).
    match = {"protocol": protocol, "token": "ipmasq-probe-" + secrets.token_hex(6),
             "source_port": source_port or random.randint(33000, 60999),
             "seq": random.randint(1, 2**32 - 1), "icmp_id": random.randint(1, 65535)}
    if protocol == "icmp":
        match["source_port"] = None
    match_json = json.dumps(match)
    hard_limit = timeout + STARTUP_SLACK

    started = time.monotonic()
    sniffers = []
    try:
        captured_hosts = [h for h in dict.fromkeys(watch) if h != src]  # src: the sender
        for host in captured_hosts:
            proc = lab.spawn(host, [sys.executable, AGENT, "capture",
                                    "--timeout", str(hard_limit)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
            sniffers.append(proc)
        rests = [_read_line(proc, READY_TIMEOUT, "watch")[1] for proc in sniffers]

        args = ["send", "--host", src, "--match", match_json, "--protocol", protocol,
                "--destination", dst, "--timeout", str(timeout),
                "--max-packets", str(max_packets)]
        if port is not None:
            args += ["--port", str(port)]
        if source_address:
            args += ["--source-address", source_address]
        sent = _run_agent(lab, src, args, hard_limit, "src")

        records = list(sent["packets"])
        truncated = sent["truncated"]
        for host, proc, rest in zip(captured_hosts, sniffers, rests):
            try:
                out = proc.communicate(b"stop\n", timeout=STARTUP_SLACK)[0]
            except subprocess.TimeoutExpired:
                _stop(proc)
                raise ProbeError("watch", host, "capture did not stop") from None
            captured = json.loads((rest + out).decode().strip().splitlines()[-1])
            recorder = _probe_agent.Recorder(host, match, max_packets)
            for frame in captured["frames"]:
                recorder.add(dict(frame, data=bytes.fromhex(frame["data"])))
            records += recorder.packets
            truncated = truncated or recorder.truncated or captured["truncated"]
    finally:
        for proc in sniffers:
            _stop(proc)

    sent_at = sent["sent_at"] or time.time()  # None: nothing was sent (send_error)
    records.sort(key=lambda r: r["time"])
    packets = [SeenPacket(**dict(r, time=round(r["time"] - sent_at, 6))) for r in records]
    return PacketReport(
        src=src, dst=dst, protocol=protocol, port=port,
        source_address=sent["source_address"], source_port=match["source_port"],
        watch=watch, timeout=timeout, elapsed=round(time.monotonic() - started, 6),
        packets=packets, send_error=sent["send_error"], truncated=truncated)


def connect_many(lab, src, dst, port, count=1, protocol="tcp", *, timeout=1.0,
                 total_timeout=None):
    """Open `count` TCP connections (or UDP exchanges) one after another from host
    `src` to `dst`:`port`; returns one ConnectionResult per attempt, in order.

    Each attempt uses a new socket (a new source port, so a new conntrack entry and
    a new scheduling decision). timeout: seconds per attempt; total_timeout (default
    count * timeout + 1): when it passes, the remaining attempts are reported as not
    attempted.
    """
    _check_host(lab, "src", src)
    dst = _check_address("dst", dst)
    _check_port("port", port)
    _check_number("count", count, 1, MAX_COUNT, int)
    _check_protocol("protocol", protocol, ("tcp", "udp"))
    _check_number("timeout", timeout, 0.01, MAX_TIMEOUT)
    if total_timeout is None:
        total_timeout = min(count * timeout + 1.0, 10 * MAX_TIMEOUT)
    _check_number("total_timeout", total_timeout, 0.01, 10 * MAX_TIMEOUT)
    out = _run_agent(lab, src, ["connect", "--protocol", protocol, "--destination", dst,
                                "--port", str(port), "--count", str(count),
                                "--timeout", str(timeout),
                                "--total-timeout", str(total_timeout)],
                     total_timeout + STARTUP_SLACK, "src")
    return [ConnectionResult(**rec) for rec in out["connections"]]


_PING_REPLY = re.compile(r"bytes from ([0-9a-fA-F.:]+?):? icmp_seq=(\d+) ttl=(\d+)"
                         r"(?: time=([\d.]+) ms)?")
_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def ping(lab, src, dst, count=1, timeout=1.0):
    """`count` echo requests with the real ping program, 0.2 s apart; waits at most
    `timeout` seconds for the last reply."""
    _check_host(lab, "src", src)
    dst = _check_address("dst", dst)
    _check_number("count", count, 1, 100, int)
    _check_number("timeout", timeout, 0.1, MAX_TIMEOUT)
    deadline = (count - 1) * 0.2 + timeout
    argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "%.3f" % timeout,
            "-w", str(max(1, int(deadline + 0.999))), dst]
    started = time.monotonic()
    try:
        completed = lab.run(src, argv, timeout=deadline + STARTUP_SLACK)
    except subprocess.TimeoutExpired:
        raise ProbeError("dst", dst, "ping did not finish within %.3gs" % deadline) from None
    text = completed.stdout.decode(errors="replace") \
        if isinstance(completed.stdout, bytes) else completed.stdout
    summary = _PING_SUMMARY.search(text)
    if summary is None:
        err = completed.stderr.decode(errors="replace") \
            if isinstance(completed.stderr, bytes) else completed.stderr
        raise ProbeError("dst", dst, "ping failed: %s" % ((err or text).strip()))
    replies = [{"address": m.group(1), "icmp_seq": int(m.group(2)), "ttl": int(m.group(3)),
                "time_ms": float(m.group(4)) if m.group(4) else None}
               for m in _PING_REPLY.finditer(text)]
    errors = [line.strip() for line in text.splitlines() if line.startswith("From ")]
    return PingResult(src=src, dst=dst, transmitted=int(summary.group(1)),
                      received=int(summary.group(2)), replies=replies, errors=errors,
                      elapsed=round(time.monotonic() - started, 6))


# ---------------------------------------------------------------- identity servers

class IdentityServer:
    """A running identity server (see identity_server.py); stop() ends it.

    Also a context manager. It ends by itself after `lifetime` seconds, and the lab
    kills it at teardown (it was started with Lab.spawn).
    """

    def __init__(self, lab, host, port, protocol, address, lifetime, proc, pid):
        self.lab, self.host, self.port, self.protocol = lab, host, port, protocol
        self.address, self.lifetime, self.proc, self.pid = address, lifetime, proc, pid

    @property
    def running(self):
        return self.proc.poll() is None

    def stop(self):
        _stop(self.proc)

    def to_dict(self):
        return {"host": self.host, "port": self.port, "protocol": self.protocol,
                "address": self.address, "lifetime": self.lifetime, "pid": self.pid,
                "running": self.running}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "IdentityServer(%s %s/%d pid %d)" % (self.host, self.protocol, self.port, self.pid)


def serve_identity(lab, host, port, protocol="tcp", *, address=None, lifetime=300.0):
    """Start an identity server on `host` answering on `port` (protocol 'tcp', 'udp'
    or 'both'); returns once it listens. address: bind only this address (default:
    every address, IPv4 and IPv6). lifetime: seconds until it exits by itself."""
    _check_host(lab, "host", host)
    _check_port("port", port)
    _check_protocol("protocol", protocol, ("tcp", "udp", "both"))
    if address is not None:
        address = _check_address("address", address)
    _check_number("lifetime", lifetime, 0.1, 86400)
    argv = [sys.executable, IDENTITY_SERVER, "--name", host, "--port", str(port),
            "--protocol", protocol, "--lifetime", str(lifetime),
            "--lab", str(getattr(lab, "prefix", ""))]
    if address:
        argv += ["--address", address]
    proc = lab.spawn(host, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    try:
        ready = _read_line(proc, READY_TIMEOUT, "host")[0]
    except BaseException:
        _stop(proc)
        raise
    if not ready.get("ready"):
        _stop(proc)
        raise ProbeError("port", port, "identity server on %s did not start: %s"
                         % (host, ready.get("error")))
    # The server no longer writes anything: close our ends so nothing is held open.
    proc.stdout.close()
    proc.stderr.close()
    return IdentityServer(lab, host, port, protocol, address, lifetime, proc, ready["pid"])


def find_identity_servers(lab, host, port=None):
    """PIDs of the identity servers running in `host`'s namespace for this lab (on
    `port`, if given): those whose command line is identity_server.py tagged with the
    lab's prefix and host name, and whose network namespace is the host's."""
    _check_host(lab, "host", host)
    if port is not None:
        _check_port("port", port)
    netns_ino = os.stat(os.path.join("/run/netns", lab.netns(host))).st_ino
    want = {"--lab": str(lab.prefix), "--name": host}
    if port is not None:
        want["--port"] = str(port)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
            if not any(a.endswith("identity_server.py") for a in argv[:3]):
                continue
            opts = dict(zip(argv, argv[1:]))
            if any(opts.get(k) != v for k, v in want.items()):
                continue
            if os.stat("/proc/%s/ns/net" % entry).st_ino != netns_ino:
                continue
        except OSError:  # the process ended while we looked
            continue
        found.append(int(entry))
    return sorted(found)


def stop_identity_servers(lab, host, port=None, grace=2.0):
    """Stops the identity servers `find_identity_servers` names (SIGTERM, then SIGKILL
    after `grace` seconds); returns their PIDs. For servers started by another process
    (the Ansible module); a handle from serve_identity has stop()."""
    pids = find_identity_servers(lab, host, port)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid):
    """True while `pid` runs (a zombie counts as ended)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
