"""Backend health checks: tcp, http and icmp probes -> Service.health_changed.

One thread runs one asyncio loop; every checked backend is a task (not a thread)
that probes at its `interval`, at most `concurrency` probes in flight at once (a
semaphore). Probes are ordinary sockets of the agent's own namespace: nothing runs in
the packet path, and the kernel keeps doing all forwarding. A backend goes down after
`fall` consecutive failures and up after `rise` consecutive successes; only those
changes reach the Service, through one worker thread (so a slow commit holds up no
probe, and a probe never holds the Service lock or the API). The Service re-renders
the key over its live backends in one transaction (docs/health.md).

State is runtime only: after a (re)start every backend is `unknown`, which counts as
up, until its first result (one success: up; `fall` failures: down).

ICMP: an unprivileged datagram socket (SOCK_DGRAM, IPPROTO_ICMP; allowed when the
agent's group is in net.ipv4.ping_group_range of its namespace) is preferred; if the
kernel refuses it, a raw socket (needs CAP_NET_RAW, which the agent has as root).
`stats()["icmp_socket"]` says which one is used.
"""

import asyncio
import concurrent.futures
import logging
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger("masqd.watchers.health")

Target = Tuple[str, Any, str, Optional[int]]  # (table, key, address, port)

DEFAULT_CONCURRENCY = 256
REFRESH = 0.25  # seconds between looks at the Service's configuration (revision)
HTTP_MAX_READ = 4096


@dataclass
class TargetState:
    """What the watcher knows of one checked backend."""

    check: Dict[str, Any]
    state: str = "unknown"        # unknown | up | down
    since: Optional[float] = None  # wall clock of the last change of state
    last_error: Optional[str] = None
    successes: int = 0            # consecutive
    failures: int = 0             # consecutive
    checks: int = 0
    applied: str = "up"           # what the Service has rendered (unknown counts as up)
    pending: bool = False         # a change is on its way to the Service
    task: Optional[asyncio.Task] = field(default=None, repr=False)

    def view(self) -> Dict[str, Any]:
        since = None if self.since is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        return {"state": self.state, "since": since, "last_error": self.last_error,
                "type": self.check["type"], "checks": self.checks}


def record(st: TargetState, ok: bool, error: Optional[str], now: float) -> Optional[str]:
    """Count one probe result; the new state when it changes (pure: unit-tested)."""
    st.checks += 1
    if ok:
        st.successes, st.failures = st.successes + 1, 0
        if st.state == "unknown" or (st.state == "down" and st.successes >= st.check["rise"]):
            st.state, st.since = "up", now
            return "up"
        return None
    st.failures, st.successes = st.failures + 1, 0
    st.last_error = error
    if st.state != "down" and st.failures >= st.check["fall"]:
        st.state, st.since = "down", now
        return "down"
    return None


# --- probes -----------------------------------------------------------------------------

def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


async def probe_tcp(address: str, port: int) -> None:
    """Connect and drop the connection at once (SO_LINGER 0: a reset, no TIME_WAIT
    left behind by 1,000 checks a second)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await loop.sock_connect(sock, (address, port))
    finally:
        sock.close()


def http_status_ok(check: Dict[str, Any], status: int) -> bool:
    expected = check.get("status")
    return 200 <= status <= 399 if not expected else status in expected


async def probe_http(address: str, port: int, check: Dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await loop.sock_connect(sock, (address, port))
        host = "[%s]" % address if ":" in address else address
        request = "GET %s HTTP/1.0\r\nHost: %s:%d\r\nUser-Agent: masqd-health\r\nConnection: close\r\n\r\n" % (
            check["path"], host, port)
        await loop.sock_sendall(sock, request.encode("ascii"))
        data = b""
        while b"\r\n" not in data and len(data) < HTTP_MAX_READ:
            chunk = await loop.sock_recv(sock, HTTP_MAX_READ)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectionError("not an HTTP response: %r" % line[:60])
    status = int(parts[1])
    if not http_status_ok(check, status):
        raise ConnectionError("HTTP status %d" % status)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class IcmpSockets:
    """Opens echo sockets: datagram (unprivileged ping) if the namespace allows it,
    else raw. The choice is made once per family, on first use."""

    def __init__(self) -> None:
        self.kind: Dict[int, str] = {}
        self.error: Optional[str] = None

    def open(self, family: int) -> Tuple[socket.socket, str]:
        proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
        if self.kind.get(family, "datagram") == "datagram":
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM, proto)
                self.kind[family] = "datagram"
                return sock, "datagram"
            except PermissionError as exc:  # ping_group_range excludes us
                self.error = "datagram ICMP refused (%s), using raw" % exc
                self.kind[family] = "raw"
        return socket.socket(family, socket.SOCK_RAW, proto), "raw"


async def probe_icmp(address: str, sockets: IcmpSockets, seq: int) -> None:
    loop = asyncio.get_running_loop()
    family = _family(address)
    sock, kind = sockets.open(family)
    v6 = family == socket.AF_INET6
    # The kernel sets the id of a datagram echo (and delivers only its replies); a raw
    # socket sees every echo reply, so it tells its own by id, sequence and payload.
    ident = (os.getpid() ^ seq) & 0xFFFF if kind == "raw" else 0
    payload = b"masqd-health" + struct.pack("!d", time.time())
    request, reply = (128, 129) if v6 else (8, 0)
    header = struct.pack("!BBHHH", request, 0, 0, ident, seq & 0xFFFF)
    packet = header + payload
    if not v6:
        packet = struct.pack("!BBHHH", request, 0, _checksum(packet), ident, seq & 0xFFFF) + payload
    try:
        sock.setblocking(False)
        sock.connect((address, 0))  # a datagram/raw connect only sets the peer: instant
        await loop.sock_sendall(sock, packet)
        while True:
            data = await loop.sock_recv(sock, 2048)
            if kind == "raw" and not v6:
                data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 delivers the IP header
            if len(data) < 8:
                continue
            rtype, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[:8])
            if rtype != reply or rseq != seq & 0xFFFF:
                continue
            if kind == "raw" and (rid != ident or data[8:] != payload):
                continue
            return
    finally:
        sock.close()


# --- conntrack flush (flush_on_down) ----------------------------------------------------

def flush_conntrack(address: str, port: Optional[int]) -> int:
    """Delete the conntrack entries of connections forwarded to a backend (their
    reply comes from address:port). pyroute2's Conntrack (0.7 and 0.9 alike)."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    family = _family(address)
    match = NFCTAttrTuple(family=family, saddr=address)
    ct = Conntrack()
    deleted = 0
    try:
        for entry in list(ct.dump_entries(tuple_reply=match)):
            if port is not None and entry.tuple_reply.sport != port:
                continue
            try:
                ct.delete(entry)
                deleted += 1
            except Exception:  # pylint: disable=broad-except  # gone meanwhile
                pass
    finally:
        ct.close()
    return deleted


# --- the watcher ------------------------------------------------------------------------

class HealthWatcher:
    """Probes every checked backend of the Service's PORTFW and mfw tables."""

    name = "health"

    def __init__(self, service, concurrency: int = DEFAULT_CONCURRENCY, refresh: float = REFRESH):
        self.service = service
        self.concurrency = concurrency
        self.refresh = refresh
        self.running = False
        self.error: Optional[str] = None
        self.targets: Dict[Target, TargetState] = {}
        self.icmp = IcmpSockets()
        self.transitions = 0
        self.commit_failures = 0
        self.flushed = 0
        self.flush_error: Optional[str] = None
        self.last_transition: Optional[Dict[str, Any]] = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._seq = random.randrange(0x10000)
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._started = threading.Event()
        self._commits = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="masqd-health-commit")
        self._revision = None

    # --- the Watcher interface --------------------------------------------------------

    def start(self) -> bool:
        if self.running:
            return True
        self._thread = threading.Thread(target=self._run, name="masqd-health", daemon=True)
        self._thread.start()
        self._started.wait(5)
        return self.running

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self.running:
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._commits.shutdown(wait=False)
        self.running = False

    def stats(self) -> Dict[str, Any]:
        states = [st.state for st in list(self.targets.values())]
        return {"running": self.running, "error": self.error, "targets": len(states),
                "up": states.count("up"), "down": states.count("down"), "unknown": states.count("unknown"),
                "transitions": self.transitions, "commit_failures": self.commit_failures,
                "concurrency": self.concurrency, "max_in_flight": self.max_in_flight,
                "icmp_socket": ",".join("%s:%s" % ("ipv6" if f == socket.AF_INET6 else "ipv4", k)
                                        for f, k in sorted(self.icmp.kind.items())) or None,
                "conntrack_flushed": self.flushed, "flush_error": self.flush_error,
                "last_transition": self.last_transition}

    def state_of(self, table: str, key: Any, address: str, port: Optional[int]) -> Optional[Dict[str, Any]]:
        st = self.targets.get((table, key, address, port))
        return None if st is None else st.view()

    # --- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # pylint: disable=broad-except  # reported in status
            self.error = "%s: %s" % (type(exc).__name__, exc)
            log.exception("health checks stopped")
        finally:
            self.running = False
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._sem = asyncio.Semaphore(self.concurrency)
        self.running = True
        self._started.set()
        try:
            while not self._stop.is_set():
                self._sync_targets()
                try:
                    await asyncio.wait_for(self._stop.wait(), self.refresh)
                except asyncio.TimeoutError:
                    pass
        finally:
            for st in self.targets.values():
                if st.task is not None:
                    st.task.cancel()
            await asyncio.gather(*[st.task for st in self.targets.values() if st.task], return_exceptions=True)

    def _sync_targets(self) -> None:
        """Follow the configuration: a task per checked backend; a new or changed
        check starts unknown, a removed one is forgotten."""
        revision = getattr(self.service, "_revision", None)
        if revision == self._revision and revision is not None:
            return
        self._revision = revision
        wanted = self.service.health_targets()
        for target in [t for t in self.targets if t not in wanted or wanted[t] != self.targets[t].check]:
            st = self.targets.pop(target)
            if st.task is not None:
                st.task.cancel()
        for target, check in wanted.items():
            if target not in self.targets:
                st = TargetState(check=check)
                self.targets[target] = st
                st.task = asyncio.ensure_future(self._probe_loop(target, st))

    async def _probe_loop(self, target: Target, st: TargetState) -> None:
        loop = asyncio.get_running_loop()
        check = st.check
        interval = check["interval"]
        await asyncio.sleep(random.uniform(0, min(interval, 1.0)))  # spread the first round
        while True:
            started = loop.time()
            ok, error = await self._probe(target, check)
            if self.targets.get(target) is not st:
                return
            change = record(st, ok, error, time.time())
            if change is not None:
                log.info("health: %s %s backend %s port %s is %s%s", target[0], target[1], target[2], target[3],
                         change, "" if ok else " (%s)" % error)
            self._propagate(target, st)
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    async def _probe(self, target: Target, check: Dict[str, Any]) -> Tuple[bool, Optional[str]]:
        _table, _key, address, backend_port = target
        port = check.get("port") or backend_port
        async with self._sem:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if check["type"] == "tcp":
                    coro = probe_tcp(address, port)
                elif check["type"] == "http":
                    coro = probe_http(address, port, check)
                else:
                    self._seq = (self._seq + 1) & 0xFFFF
                    coro = probe_icmp(address, self.icmp, self._seq)
                await asyncio.wait_for(coro, check["timeout"])
                return True, None
            except asyncio.TimeoutError:
                return False, "timeout after %gs" % check["timeout"]
            except OSError as exc:
                return False, os.strerror(exc.errno) if exc.errno else str(exc)
            except Exception as exc:  # pylint: disable=broad-except  # a bad reply is a failure
                return False, str(exc) or type(exc).__name__
            finally:
                self.in_flight -= 1

    def _propagate(self, target: Target, st: TargetState) -> None:
        """Hand a state the Service has not rendered yet to the commit worker (one at a
        time per backend; a failed commit is retried after the next probe)."""
        want = "down" if st.state == "down" else "up"
        if st.pending or want == st.applied:
            return
        st.pending = True
        future = self._loop.run_in_executor(self._commits, self._commit, target, want)
        future.add_done_callback(lambda f, st=st, want=want: self._committed(st, want, f))

    def _commit(self, target: Target, want: str):
        table, key, address, port = target
        flush = self.service.health_changed(table, key, address, port, want == "up")
        if flush and want == "down":
            try:
                self.flushed += flush_conntrack(address, port)
                self.flush_error = None
            except Exception as exc:  # pylint: disable=broad-except  # reported in status
                self.flush_error = "%s: %s" % (type(exc).__name__, exc)
                log.warning("flush_on_down for %s: %s", address, self.flush_error)
        return True

    def _committed(self, st: TargetState, want: str, future) -> None:
        st.pending = False
        exc = future.exception()
        if exc is not None:
            self.commit_failures += 1
            self.error = "commit of a health change failed: %s" % exc
            log.error("health: %s", self.error)
            return
        st.applied = want
        self.transitions += 1
        self.last_transition = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "state": want}
