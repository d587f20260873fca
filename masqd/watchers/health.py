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

import _socket
import asyncio
import concurrent.futures
import ctypes
import errno
import heapq
import itertools
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
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
    started: float = 0.0          # loop time the current/last probe started
    current: bool = True          # False once the configuration dropped this target

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


# Probe sockets carry this mark (SO_MARK), and the table's `health_output` chain
# (render.health_fragment) turns off conntrack events for their connections: the
# agent's own checks would otherwise wake every ctnetlink listener (the AUTOFW
# watcher among them) several times per check.
QUIET_MARK = 0x6D617364  # "masd"
_LINGER0 = struct.pack("ii", 1, 0)  # close = reset: no TIME_WAIT from 1,000 checks a second
_FAILED = select.EPOLLERR | select.EPOLLHUP
# Constants of the per-check path, bound once (module globals, not attribute lookups).
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_SOL_SOCKET, _SO_MARK, _SO_LINGER, _SO_ERROR = socket.SOL_SOCKET, socket.SO_MARK, socket.SO_LINGER, socket.SO_ERROR
_IPPROTO_TCP, _TCP_QUICKACK = socket.IPPROTO_TCP, socket.TCP_QUICKACK
_EINPROGRESS, _EAGAIN = errno.EINPROGRESS, errno.EAGAIN
_OUT_ONESHOT = select.EPOLLOUT | select.EPOLLONESHOT


def probe_socket(family: int, kind: int, proto: int = 0) -> socket.socket:
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, QUIET_MARK)
    except OSError:  # no CAP_NET_ADMIN: checks still work, just not quietly
        pass
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    return sock


async def probe_tcp(address: str, port: int) -> None:
    """Connect and drop the connection at once (the watcher's own TCP checks use the
    batched form, TcpProbes; this one is for tests and tools)."""
    loop = asyncio.get_running_loop()
    sock = probe_socket(_family(address), socket.SOCK_STREAM)
    try:
        await loop.sock_connect(sock, (address, port))
    finally:
        sock.close()


def _disconnector() -> Optional[Any]:
    """libc's connect(), for connect(fd, AF_UNSPEC): the kernel's tcp_disconnect. It
    resets an established connection (as a close with SO_LINGER 0 does) and leaves the
    socket unconnected, ready for the next check. Python's socket.connect() cannot
    pass AF_UNSPEC to an AF_INET socket; None where libc is not reachable (sockets are
    then closed after each check)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        connect = libc.connect
    except (OSError, AttributeError):
        return None
    connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    connect.restype = ctypes.c_int
    return connect


_UNSPEC = bytes(16)  # struct sockaddr with sa_family = AF_UNSPEC (0)


class TcpProbes:
    """TCP checks without a coroutine, a handle or a callback object per check: a
    non-blocking connect registered (EPOLLOUT, one-shot) in one epoll of our own, whose
    descriptor is the only thing the asyncio loop watches; ready connects are collected
    in batches and handed to `finish(target, state, ok, error)`, and one sweep every
    SWEEP seconds ends those past their timeout. This is the path 1,000 checks a second
    take (bench/health.py).

    A socket whose connect succeeded is disconnected (AF_UNSPEC: a reset, as HAProxy's
    close with SO_LINGER 0) and kept for the next check: no socket(), no options, no
    close() and no epoll registration per check, only connect, re-arm and disconnect.
    A socket that failed or timed out is closed (its error state is not carried into a
    later check)."""

    SWEEP = 0.02
    IDLE_MAX = 256  # per address family; more than that in flight are closed after use

    def __init__(self, loop, finish) -> None:
        self.loop = loop
        self.finish = finish
        self.epoll = select.epoll()
        # fd -> (socket, target, its state, deadline, timeout)
        self.pending: Dict[int, Tuple[Any, Any, Any, float, float]] = {}
        self.idle: Dict[int, list] = {socket.AF_INET: [], socket.AF_INET6: []}
        self.registered: set = set()  # fds in the epoll (they leave it when closed)
        self.disconnect = _disconnector()
        self._sweeper = None
        loop.add_reader(self.epoll.fileno(), self._ready)

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        if self._sweeper is not None:
            self._sweeper.cancel()
        for item in self.pending.values():
            item[0].close()
        self.pending.clear()
        for pool in self.idle.values():
            for sock in pool:
                sock.close()
            pool.clear()
        self.epoll.close()

    def _new_socket(self, family: int) -> Any:
        # The C socket type: no Python-level wrapper to build and tear down per check.
        sock = _socket.socket(family, _STREAM_NONBLOCK)
        try:
            sock.setsockopt(_SOL_SOCKET, _SO_MARK, QUIET_MARK)
        except OSError:  # as probe_socket
            pass
        sock.setsockopt(_SOL_SOCKET, _SO_LINGER, _LINGER0)
        return sock

    def start(self, address: str, port: int, timeout: float, target: Any, st: Any) -> None:
        family = _family(address)
        pool = self.idle[family]
        try:
            sock = pool.pop() if pool else self._new_socket(family)
            # HAProxy's way for a connect-only check: with quick ACKs off, the
            # kernel holds the handshake's last ACK (it waits for data to carry it),
            # and the disconnect sends a reset instead: SYN, SYN-ACK, RST. The
            # backend's kernel never completes the connection, so its application
            # never accepts one and no FIN exchange follows: about half the packets.
            # (A disconnect clears this mode: it is set for every check.)
            sock.setsockopt(_IPPROTO_TCP, _TCP_QUICKACK, 0)
        except OSError as exc:
            self.finish(target, st, False, os.strerror(exc.errno) if exc.errno else str(exc))
            return
        err = sock.connect_ex((address, port))
        if err == _EINPROGRESS or err == _EAGAIN:
            fd = sock.fileno()
            if fd in self.registered:
                self.epoll.modify(fd, _OUT_ONESHOT)
            else:
                self.epoll.register(fd, _OUT_ONESHOT)
                self.registered.add(fd)
            self.pending[fd] = (sock, target, st, self.loop.time() + timeout, timeout)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(self.SWEEP, self._sweep)
            return
        if err == 0:
            self._release(sock)
            self.finish(target, st, True, None)
        else:
            self._discard(sock)
            self.finish(target, st, False, os.strerror(err))

    def _release(self, sock: Any) -> None:
        """Reset the connection and keep the socket, or close it."""
        pool = self.idle[sock.family]
        if self.disconnect is not None and len(pool) < self.IDLE_MAX and self.disconnect(sock.fileno(), _UNSPEC, 16) == 0:
            pool.append(sock)
        else:
            self._discard(sock)

    def _discard(self, sock: Any) -> None:
        self.registered.discard(sock.fileno())
        sock.close()  # also leaves the epoll: no EPOLL_CTL_DEL

    def _ready(self) -> None:
        pending, finish = self.pending, self.finish
        for fd, events in self.epoll.poll(0):
            item = pending.pop(fd, None)
            if item is None:
                continue
            sock = item[0]
            # A connect that failed reports EPOLLERR (and HUP); only then is the
            # error worth a getsockopt.
            if events & _FAILED:
                err = sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
                self._discard(sock)
                finish(item[1], item[2], False, os.strerror(err) if err else "connect failed")
            else:
                self._release(sock)
                finish(item[1], item[2], True, None)

    def _sweep(self) -> None:
        now = self.loop.time()
        for fd in [fd for fd, item in self.pending.items() if item[3] <= now]:
            sock, target, st, _deadline, timeout = self.pending.pop(fd)
            self._discard(sock)
            self.finish(target, st, False, "timeout after %gs" % timeout)
        self._sweeper = self.loop.call_later(self.SWEEP, self._sweep) if self.pending else None


def http_status_ok(check: Dict[str, Any], status: int) -> bool:
    expected = check.get("status")
    return 200 <= status <= 399 if not expected else status in expected


async def probe_http(address: str, port: int, check: Dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    sock = probe_socket(_family(address), socket.SOCK_STREAM)
    try:
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
                sock = probe_socket(family, socket.SOCK_DGRAM, proto)
                self.kind[family] = "datagram"
                return sock, "datagram"
            except PermissionError as exc:  # ping_group_range excludes us
                self.error = "datagram ICMP refused (%s), using raw" % exc
                self.kind[family] = "raw"
        return probe_socket(family, socket.SOCK_RAW, proto), "raw"


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

TICK = 0.02  # probes due within one tick start together: fewer loop wake-ups


class HealthWatcher:
    """Probes every checked backend of the Service's PORTFW and mfw tables.

    Scheduling is one heap of (due time, target) and one timer for its earliest
    entry; at most `concurrency` probes are in flight (the rest wait in order). TCP
    probes go through TcpProbes (no coroutine per check), http and icmp probes are
    coroutines."""

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
        self.quiet: Optional[bool] = None  # the table's health_output chain, when known
        self._seq = random.randrange(0x10000)
        self._thread: Optional[threading.Thread] = None
        self._loop: Any = None  # the running asyncio loop, once started
        self._stop: Optional[asyncio.Event] = None
        self._started = threading.Event()
        self._commits = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="masqd-health-commit")
        self._revision = None
        self._heap: list = []
        self._order = itertools.count()
        self._timer: Any = None
        self._timer_at: Optional[float] = None
        self._waiting: list = []
        self._tasks: set = set()
        self._tcp: Any = None  # TcpProbes, once the loop runs

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
                "quiet_conntrack_events": self.quiet,
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
        self._tcp = TcpProbes(self._loop, self._finish)
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
            if self._timer is not None:
                self._timer.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tcp.close()

    def _sync_targets(self) -> None:
        """Follow the configuration: a new or changed check starts unknown, a removed
        one is forgotten."""
        revision = getattr(self.service, "_revision", None)
        if revision == self._revision and revision is not None:
            return
        self._revision = revision
        wanted = self.service.health_targets()
        for target in [t for t in self.targets if t not in wanted or wanted[t] != self.targets[t].check]:
            self.targets.pop(target).current = False
        now = self._loop.time()
        for target, check in wanted.items():
            if target not in self.targets:
                st = TargetState(check=check)
                self.targets[target] = st
                self._push(now + random.uniform(0, min(check["interval"], 1.0)), target, st)
        self._set_quiet(bool(self.targets))

    def _set_quiet(self, on: bool) -> None:
        quiet = getattr(self.service, "health_quiet", None)
        if quiet is None or self.quiet == on:
            return
        self.quiet = on
        self._commits.submit(quiet, on)

    def _push(self, due: float, target: Target, st: TargetState) -> None:
        heapq.heappush(self._heap, (due, next(self._order), target, st))
        if self._timer_at is None or due < self._timer_at - TICK:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = self._loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        now = self._loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now + TICK:
            _due, _n, target, st = heapq.heappop(heap)
            if not st.current:
                continue
            if self.in_flight >= self.concurrency:
                self._waiting.append((target, st))
            else:
                self._start(target, st, now)
        if heap:
            self._arm(heap[0][0])

    def _start(self, target: Target, st: TargetState, now: float) -> None:
        _table, _key, address, backend_port = target
        check = st.check
        st.started = now
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

        if check["type"] == "tcp":
            self._tcp.start(address, check.get("port") or backend_port, check["timeout"], target, st)
            return

        def done(ok: bool, error: Optional[str]) -> None:
            self._finish(target, st, ok, error)

        task = self._loop.create_task(self._probe(address, check.get("port") or backend_port, check))
        self._tasks.add(task)

        def finished(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled():
                done(*t.result())

        task.add_done_callback(finished)

    async def _probe(self, address: str, port: Optional[int], check: Dict[str, Any]) -> Tuple[bool, Optional[str]]:
        try:
            if check["type"] == "http":
                coro = probe_http(address, int(port or 0), check)
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

    def _finish(self, target: Target, st: TargetState, ok: bool, error: Optional[str]) -> None:
        self.in_flight -= 1
        if st.current:
            change = record(st, ok, error, time.time())
            if change is not None:
                log.info("health: %s %s backend %s port %s is %s%s", target[0], target[1], target[2], target[3],
                         change, "" if ok else " (%s)" % error)
            self._propagate(target, st)
            now = self._loop.time()
            self._push(max(st.started + st.check["interval"], now), target, st)
        while self._waiting and self.in_flight < self.concurrency:
            waiting, wst = self._waiting.pop(0)
            if wst.current:
                self._start(waiting, wst, self._loop.time())

    def _propagate(self, target: Target, st: TargetState) -> None:
        """Hand a state the Service has not rendered yet to the commit worker (one at a
        time per backend; a failed commit is retried after the next probe)."""
        want = "down" if st.state == "down" else "up"
        if st.pending or want == st.applied:
            return
        st.pending = True
        future = self._loop.run_in_executor(self._commits, self._commit, target, want)

        def committed(f: Any, st: Any = st, want: str = want) -> None:
            self._committed(st, want, f)

        future.add_done_callback(committed)

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
