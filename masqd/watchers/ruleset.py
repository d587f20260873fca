"""Drift: someone else changed `inet masqd` or a PORTFW shard table (or flushed the
whole ruleset).

The kernel announces every committed nftables change on the NFNLGRP_NFTABLES netlink
multicast group: one message per object (table, chain, rule, set, element), each with
the netlink port id of the socket that committed it, then a NEWGEN message that ends
the batch. The monitor subscribes in the agent's network namespace, keeps the
messages that touch masqd's tables (render.TABLES), and when a batch from a port
that is not one of the agent's own sockets ends, it hands the Service a DriftReport:
the Service repairs the tables with a full re-sync. The agent's own commits come from its libnftables socket,
whose port id the monitor learns from /proc (it is the process's NETLINK_NETFILTER
socket), so they never trigger a repair; kernel-originated messages (port 0, e.g. the
expiry of a timed element) are not drift either.

A deleted rule's message carries its expressions, so the counters (and the phase
comment) of the schedules a `flush ruleset` destroyed are kept in the report: the
repair continues every PORTFW/mfw schedule where it stood.

Backstop (kube-proxy style): every `verify_interval` seconds, and after the socket
overflowed (ENOBUFS: messages were lost), the Service compares the kernel's table
with what it rendered and repairs a difference.

The agent's own large PORTFW batches (masqd.portfw_batch) run with the
subscription dropped (`events_off`): a 1,000,000-element commit would overflow any
socket buffer, and while nobody listens the kernel builds no events. The ruleset's
generation, read before and after, says whether anything but that batch committed
meanwhile; if so, the comparison runs as after an overflow.

The socket and the message parsing are plain stdlib (socket, struct) rather than
pyroute2: the messages needed are five attribute types, the subscription is two
calls, and pyroute2's nftables API differs between Debian 12's 0.7 and the 0.9 line
(the agent must run on both), while this code does not depend on either.
"""

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from masqd import render
from masqd.nfnetlink import (NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET,
                             attributes, counter_packets, rule_comment, string)

log = logging.getLogger("masqd.watchers.ruleset")

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_DROP_MEMBERSHIP = 1, 2
NFNLGRP_NFTABLES = 7
RCVBUF = 32 << 20
PERIODIC = "periodic verification"  # the reason on_verify gets for the every-interval one

# NFT_MSG_* (linux/netfilter/nf_tables.h) -> (verb, object) as `nft monitor` says them.
MESSAGES = {0: ("add", "table"), 2: ("delete", "table"), 3: ("add", "chain"),
            5: ("delete", "chain"), 6: ("add", "rule"), 8: ("delete", "rule"),
            9: ("add", "set"), 11: ("delete", "set"), 12: ("add", "element"),
            14: ("delete", "element"), 18: ("add", "object"), 20: ("delete", "object")}
NFT_MSG_NEWGEN = 15
# Every NFT_MSG_* above carries its table's name as attribute 1 (NFTA_*_TABLE).
NFTA_TABLE = 1
NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 2, 4
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
NFTA_CHAIN_NAME, NFTA_SET_NAME = 3, 2


@dataclass
class DriftReport:
    """What one foreign batch did to the table."""

    changes: List[str] = field(default_factory=list)          # "delete rule pf_… (…)", capped
    change_count: int = 0
    by: Optional[str] = None                                  # "nft (pid 1234)"
    deleted_rules: Dict[str, List[Tuple[int, str]]] = field(default_factory=dict)  # chain -> [(packets, comment)]
    table_deleted: bool = False
    received: float = 0.0                                     # monotonic time of the batch's end

    def summary(self) -> str:
        if self.table_deleted:  # flush ruleset, delete table: the rest follows from it
            return "delete table inet masqd (%d objects)%s" % (
                self.change_count, " by %s" % self.by if self.by else "")
        what = "; ".join(self.changes)
        more = self.change_count - len(self.changes)
        return "%s%s%s" % (what, " and %d more" % more if more > 0 else "",
                           " by %s" % self.by if self.by else "")


MAX_CHANGES_LISTED = 8


def rule_counter_and_comment(attrs: Dict[int, bytes]) -> Tuple[int, str]:
    """(packets of the rule's counter, its comment) from a rule message."""
    return counter_packets(attrs.get(NFTA_RULE_EXPRESSIONS, b"")) or 0, rule_comment(attrs)


@dataclass
class Message:
    kind: int          # NFT_MSG_*
    portid: int
    family: int
    attrs: Dict[int, bytes]


def messages(datagram: bytes, own: AbstractSet[int] = frozenset()) -> Tuple[List[Message], int]:
    """The nftables messages of one netlink datagram, and how many were left out: those
    sent for one of the `own` port ids (the monitor ignores them, and one 100,000-key
    commit of the agent's own sends about that many), except NEWGEN, which ends a batch."""
    out, offset, left_out = [], 0, 0
    unpack = struct.unpack_from
    while offset + 16 <= len(datagram):
        length, mtype, _flags, _seq, portid = unpack("=IHHII", datagram, offset)
        if length < 16:
            break
        if mtype >> 8 == NFNL_SUBSYS_NFTABLES and length >= 20:
            kind = mtype & 0xFF
            if portid in own and kind != NFT_MSG_NEWGEN:
                left_out += 1
            else:
                out.append(Message(kind, portid, datagram[offset + 16],
                                   attributes(datagram, offset + 20, offset + length)))
        offset += (length + 3) & ~3
    return out, left_out


def own_netfilter_portids(exclude: int = 0) -> Set[int]:
    """Port ids of this process's NETLINK_NETFILTER sockets (libnftables' among them),
    from /proc/self/fd and /proc/self/net/netlink."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    ports = set()
    with open("/proc/self/net/netlink") as table:
        next(table)
        for line in table:
            cols = line.split()
            if len(cols) >= 10 and cols[1] == str(NETLINK_NETFILTER) and int(cols[9]) in inodes:
                ports.add(int(cols[2]) & 0xFFFFFFFF)
    ports.discard(exclude)
    return ports


class RulesetMonitor:
    """Watches nftables events for foreign changes to the `family` tables `tables`;
    `on_drift` gets a DriftReport (from the monitor's thread), `on_verify` is called
    for the backstop."""

    name = "ruleset"

    def __init__(self, on_drift: Callable[[DriftReport], None], on_verify: Callable[[str], None],
                 tables: Tuple[str, ...] = render.TABLES, family: int = NFPROTO_INET,
                 verify_interval: float = 60.0) -> None:
        self.on_drift = on_drift
        self.on_verify = on_verify
        # The first of `tables` is the main one: its deletion is a table_deleted report
        # (a re-sync from nothing); a shard table's is a change like any other.
        self.table, self.tables, self.family = tables[0], frozenset(tables), family
        self.verify_interval = verify_interval
        self.running = False
        self.error: Optional[str] = None
        self.events = self.foreign_batches = self.overflows = self.verifications = 0
        self._sock: Optional[socket.socket] = None
        self._own: Set[int] = set()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._pending: Optional[DriftReport] = None
        self._next_verify = 0.0
        self._verify_due: Optional[str] = None  # set by events_off, run by the monitor's thread

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> bool:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
            try:  # root may exceed rmem_max: a full re-sync's events must not overflow it
                sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.settimeout(0.5)
        except OSError as exc:
            self.error = "cannot subscribe to nftables events: %s" % exc
            log.error("ruleset monitor not running: %s", self.error)
            return False
        self._sock = sock
        self._own = own_netfilter_portids(exclude=sock.getsockname()[0])
        self._next_verify = time.monotonic() + self.verify_interval
        self.running = True
        self._thread = threading.Thread(target=self._main, name="ruleset-monitor", daemon=True)
        self._thread.start()
        log.info("ruleset monitor: subscribed to nftables events (own ports %s)",
                 ", ".join(str(p) for p in sorted(self._own)) or "none yet")
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.running = False

    @contextlib.contextmanager
    def events_off(self, generation: Callable[[], int]) -> Iterator[None]:
        """No events for the agent's own commit run inside (one batch, or none if it
        raises). `generation()` reads the ruleset's generation: if it moved by anything
        else than that commit, another program's commit may have been missed, and the
        monitor's thread compares the table as after an overflow."""
        sock = self._sock
        try:
            before = generation() if sock is not None and self.running else None
        except OSError:
            before = None  # no generation to check against: keep the events on
        if sock is None or before is None:
            yield
            return
        # Commits up to here have their events queued already.
        sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, NFNLGRP_NFTABLES)
        committed = False
        try:
            yield
            committed = True
        finally:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            try:
                moved = generation() - before
            except OSError:
                moved = -1
            if moved != (1 if committed else 0):
                self._verify_due = "a commit by another program may have been missed during the agent's own"

    def stats(self) -> Dict[str, Any]:
        return {"running": self.running, "error": self.error, "events": self.events,
                "foreign_batches": self.foreign_batches, "overflows": self.overflows,
                "verifications": self.verifications, "verify_interval": self.verify_interval}

    # --- the loop ---------------------------------------------------------------------

    def _main(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                datagram = self._sock.recv(1 << 20)
            except socket.timeout:
                datagram = b""
            except OSError as exc:
                if self._stop.is_set():
                    break
                if exc.errno == errno.ENOBUFS:  # messages lost: only a comparison can tell
                    self.overflows += 1
                    self._pending = None
                    self._verify("events lost (socket overflow)")
                    continue
                self.error = "%s" % exc
                log.error("ruleset monitor stopped: %s", exc)
                break
            try:
                found, self_sent = messages(datagram, self._own)
                self.events += self_sent
                for msg in found:
                    self.handle(msg)
            except Exception as exc:  # one odd message must not end the monitor
                log.warning("ruleset monitor: message ignored: %s: %s", type(exc).__name__, exc)
            if self._verify_due is not None:
                reason, self._verify_due = self._verify_due, None
                self._verify(reason)
            elif self.verify_interval and time.monotonic() >= self._next_verify:
                self._verify(PERIODIC)
        self.running = False

    def _verify(self, reason: str) -> None:
        self._next_verify = time.monotonic() + self.verify_interval
        self.verifications += 1
        try:
            self.on_verify(reason)
        except Exception as exc:
            log.warning("ruleset verification failed: %s: %s", type(exc).__name__, exc)

    def is_own(self, portid: int) -> bool:
        if portid in self._own:
            return True
        if portid == 0:
            return True  # the kernel itself (element expiry): not somebody's change
        if self._sock is not None:  # a socket opened since start (libnftables reconnects)
            self._own = own_netfilter_portids(exclude=self._sock.getsockname()[0])
        return portid in self._own

    def handle(self, msg: Message) -> Optional[DriftReport]:
        """One message; returns the report handed to on_drift at the end of a foreign batch."""
        self.events += 1
        if msg.kind == NFT_MSG_NEWGEN:
            report, self._pending = self._pending, None
            if report is None or self.is_own(msg.portid):
                return None
            name = string(msg.attrs.get(NFTA_GEN_PROC_NAME))
            pid = msg.attrs.get(NFTA_GEN_PROC_PID)
            report.by = "%s (pid %d)" % (name, struct.unpack(">I", pid[:4])[0]) if name and pid else name
            report.received = time.monotonic()
            self.foreign_batches += 1
            log.warning("drift: %s", report.summary())
            self.on_drift(report)
            return report
        verb_kind = MESSAGES.get(msg.kind)
        if verb_kind is None or msg.family != self.family:
            return None
        table = string(msg.attrs.get(NFTA_TABLE))
        if table not in self.tables or self.is_own(msg.portid):
            return None
        report = self._pending = self._pending or DriftReport()
        verb, kind = verb_kind
        report.change_count += 1
        if kind == "table" and verb == "delete" and table == self.table:
            report.table_deleted = True
        if kind == "rule" and verb == "delete":
            chain = string(msg.attrs.get(NFTA_RULE_CHAIN)) or "?"
            report.deleted_rules.setdefault(chain, []).append(rule_counter_and_comment(msg.attrs))
        described = _describe(verb, kind, msg.attrs, table or "?")
        if len(report.changes) < MAX_CHANGES_LISTED and "__set" not in described:  # not anonymous sets
            report.changes.append(described)
        return None


def _describe(verb: str, kind: str, attrs: Dict[int, bytes], table: str) -> str:
    name = None
    if kind == "chain":
        name = string(attrs.get(NFTA_CHAIN_NAME))
    elif kind == "rule":
        name = string(attrs.get(NFTA_RULE_CHAIN))
    elif kind in ("set", "element"):
        name = string(attrs.get(NFTA_SET_NAME))
    where = "inet %s" % table if kind == "table" else "%s%s" % (
        "in " if kind in ("rule", "element") else "", name or "?")
    return "%s %s %s" % (verb, kind, where)
