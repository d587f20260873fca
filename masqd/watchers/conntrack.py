"""AUTOFW control-port detection: conntrack events -> Service.autofw_control_seen.

The kernel announces every connection it tracks on the ctnetlink multicast groups
(NEW, UPDATE). The watcher subscribes to them (pyroute2), keeps the events of
connections to a control protocol/port that pass *through* the gateway (neither end
is one of its own addresses), and hands them to the Service, which programs the
sending host as the recipient of the entry's port range: timed nftables map elements
that the kernel expires. No polling, no CLI output parsing, no packet in Python.

pyroute2 0.9 (the venv) has `AsyncNFCTSocket(...).bind(groups=...)` and
`async for msg in sock.get()`; Debian 12's python3-pyroute2 0.7.2 has a blocking
`NFCTSocket().bind(groups=...)` / `get()`. Both are supported (`backend` in stats).

Conntrack runs in a namespace only when some rule needs it; masqd's own table always
does (`ct state` in mark_prerouting), so events flow once the agent has started.
`stats()["detection_latency"]` is the agent's share of the detection latency: event
received -> recipient element committed to the kernel. The end-to-end figure (first
control packet -> inbound forwarding ready) is measured with real packets by
tests/lab/autofw_latency.py (ctnetlink NEW events carry no timestamp to compute it here).
"""

import asyncio
import concurrent.futures
import logging
import select
import socket
import statistics
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("masqd.watchers.conntrack")

# ctnetlink multicast groups as bind() bitmask: NFNLGRP_CONNTRACK_NEW (1), _UPDATE (2).
GROUPS = 1 | 2
NLM_F_CREATE = 0x400
PROTOCOLS = {6: "tcp", 17: "udp"}
LATENCY_SAMPLES = 256


@dataclass(frozen=True)
class ConntrackEvent:
    """One ctnetlink event, original direction: who opened what."""

    kind: str                 # "new" (the connection was just created) or "update"
    protocol: str             # "tcp" | "udp"
    source: str
    destination: str
    source_port: int
    destination_port: int


def _attr(msg, *path):
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def parse_event(msg):
    """A pyroute2 nfct_msg -> ConntrackEvent, or None (not TCP/UDP, not a create/update)."""
    if msg.get("header", {}).get("type", 0) & 0xFF != 0:  # IPCTNL_MSG_CT_NEW (new + update)
        return None
    number = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_NUM")
    if number not in PROTOCOLS:
        return None
    source = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_IP", "CTA_IP_V4_SRC") or \
        _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_IP", "CTA_IP_V6_SRC")
    destination = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_IP", "CTA_IP_V4_DST") or \
        _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_IP", "CTA_IP_V6_DST")
    sport = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_SRC_PORT")
    dport = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_DST_PORT")
    if not source or not destination or dport is None:
        return None
    kind = "new" if msg["header"].get("flags", 0) & NLM_F_CREATE else "update"
    return ConntrackEvent(kind, PROTOCOLS[number], source, destination, sport or 0, dport)


def control_ports(tables):
    """{(protocol, port)} of the control-port AUTOFW entries of a Service's tables."""
    return {(e["control_protocol"], e["control_port"])
            for e in tables.get("autofw", {}).values() if e.get("control_port")}


def is_control(event, ports, local):
    """A control connection through the gateway: its protocol/port is a control port,
    and neither end is the gateway (the gateway's own connections and connections to
    the gateway are not "an internal host talking to a server")."""
    return ((event.protocol, event.destination_port) in ports
            and event.source not in local and event.destination not in local)


class LocalAddresses:
    """The namespace's own addresses, read (netlink) when a control event needs them,
    at most once a second."""

    def __init__(self, reader=None, ttl=1.0):
        self._reader = reader or _read_local_addresses
        self._ttl = ttl
        self._cache, self._read_at = frozenset(), None

    def __call__(self):
        now = time.monotonic()
        if self._read_at is None or now - self._read_at > self._ttl:
            self._cache, self._read_at = frozenset(self._reader()), now
        return self._cache


def _read_local_addresses():
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()} - {None}


class AutofwWatcher:
    """Runs in its own thread; `service` offers `autofw_control_seen(...)` and
    `control_ports()`."""

    name = "autofw"

    def __init__(self, service, local_addresses=None):
        self.service = service
        self.local = local_addresses or LocalAddresses()
        self.running = False
        self.backend = None
        self.error = None
        self.events = self.control_events = self.detections = 0
        self.latencies = []
        self._thread = None
        self._stop = threading.Event()
        self._loop = self._task = self._sync_socket = None
        self._ready = threading.Event()

    # --- lifecycle ------------------------------------------------------------------

    def start(self, wait=5.0):
        self._thread = threading.Thread(target=self._main, name="autofw-watch", daemon=True)
        self._thread.start()
        self._ready.wait(wait)  # subscribed (or failed) before the agent says ready
        return self.running

    def stop(self):
        self._stop.set()
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._sync_socket is not None:
            try:
                self._sync_socket.close()
            except Exception:  # closing wakes the blocking get()
                pass
        if self._thread is not None:
            self._thread.join(5)
        self.running = False

    def stats(self):
        out = {"running": self.running, "backend": self.backend, "error": self.error,
               "events": self.events, "control_events": self.control_events,
               "detections": self.detections, "detection_latency": None}
        if self.latencies:
            values = sorted(self.latencies)
            out["detection_latency"] = {"count": len(values), "last": self.latencies[-1],
                                        "min": values[0], "median": statistics.median(values),
                                        "max": values[-1]}
        return out

    # --- events -----------------------------------------------------------------------

    def handle(self, msg):
        """One netlink message (public so tests can feed recorded ones)."""
        received = time.monotonic()
        self.events += 1
        event = parse_event(msg)
        if event is None:
            return []
        ports = self.service.control_ports()
        if (event.protocol, event.destination_port) not in ports:
            return []  # cheap check first: most connections are not control connections
        if not is_control(event, ports, self.local()):
            return []
        self.control_events += 1
        done = self.service.autofw_control_seen(event.protocol, event.source, event.destination,
                                                event.destination_port, event.kind)
        if any(action in ("set", "replaced") for _key, action in done):
            self.detections += 1
            self.latencies.append(round(time.monotonic() - received, 6))
            del self.latencies[:-LATENCY_SAMPLES]
        return done

    def _handle_safely(self, msg):
        try:
            self.handle(msg)
        except Exception as exc:  # one bad event must not end detection
            log.warning("autofw watcher: event ignored: %s: %s", type(exc).__name__, exc)

    # --- backends ---------------------------------------------------------------------

    def _main(self):
        try:
            try:
                from pyroute2 import AsyncNFCTSocket  # pyroute2 >= 0.9
            except ImportError:
                AsyncNFCTSocket = None
            if AsyncNFCTSocket is not None:
                self.backend = "pyroute2-async"
                asyncio.run(self._run_async(AsyncNFCTSocket))
            else:
                self.backend = "pyroute2-sync"
                self._run_sync()
        except Exception as exc:
            if not self._stop.is_set():
                self.error = "%s: %s" % (type(exc).__name__, exc)
                log.error("autofw watcher stopped: %s", self.error)
        finally:
            self.running = False
            self._ready.set()

    async def _run_async(self, socket_class):
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        sock = socket_class(nfgen_family=socket.AF_UNSPEC)
        # Events are handled on one worker thread, in order: the Service and pyroute2's
        # sync IPRoute (local addresses) must not run inside this event loop.
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="autofw-event")
        try:
            await sock.bind(groups=GROUPS)
            self.running = True
            self._ready.set()
            log.info("autofw watcher: subscribed to conntrack events")
            while not self._stop.is_set():
                try:
                    # get() yields the messages of one datagram, then returns.
                    async for msg in sock.get():
                        await self._loop.run_in_executor(worker, self._handle_safely, msg)
                except OSError as exc:  # ENOBUFS: events were dropped; keep going
                    log.warning("autofw watcher: %s", exc)
        except asyncio.CancelledError:
            pass
        finally:
            worker.shutdown(wait=False)
            sock.close()

    def _run_sync(self):  # pyroute2 0.7 (Debian 12's python3-pyroute2)
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket
        sock = self._sync_socket = NFCTSocket()
        sock.bind(groups=GROUPS)
        self.running = True
        self._ready.set()
        while not self._stop.is_set():
            # Closing the socket from stop() does not wake a blocked recv on Linux:
            # wait with a timeout so the agent stops within half a second.
            if not select.select([sock], [], [], 0.5)[0]:
                continue
            try:
                messages = sock.get()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            for msg in messages:
                self._handle_safely(msg)
