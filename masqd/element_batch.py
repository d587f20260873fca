"""nf_tables over netlink, write side: PORTFW map elements in one batch.

A PORTFW key is one element of `portfw_direct_*` (one target) or `portfw_*` (a goto
into its cascade chain). libnftables turns 100,000 such elements into ~210 MB and
~1 s of parsing and evaluation before the kernel spends ~0.4 s on them; on nftables
1.0.6 it also reads every chain of the namespace before any element command. Here
the elements are encoded straight to NFT_MSG_NEWSETELEM / DELSETELEM messages
(~40 bytes each) and sent as one nfnetlink batch, which the kernel commits
atomically. pyroute2's nftables messages encode in pure Python per attribute, about
ten times slower than the struct packing here, so they do not serve for 100,000
elements. Layouts: linux/netfilter/nf_tables.h, linux/netfilter/nfnetlink.h.

Only element changes go this way; chains, rules, maps and the table stay with
libnftables (`split`). A transaction is split only where that keeps it atomic for
packets: brand-new chains (nothing jumps to them yet) are added first, then one batch
switches every element, then chains nothing jumps to any more are deleted.
"""

import errno
import os
import socket
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

from masqd import render
from masqd.nfnetlink import (NETLINK_NETFILTER, attributes, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFTA_DATA_VALUE,
                             NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS,
                             NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, NLA_F_NESTED, NLM_F_REQUEST,
                             NLMSG_ERROR, PROTOCOL_NUMBERS)

# The maps whose elements this module writes: every PORTFW key, nothing else.
MAPS = frozenset(("portfw_v4", "portfw_v6", "portfw_direct_v4", "portfw_direct_v6"))

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 12, 14, 15, 16
NFTA_GEN_ID = 1
GENERATION_TIMEOUT = 5.0  # seconds for the kernel's answer to GETGEN
NLM_F_ACK, NLM_F_CREATE = 0x4, 0x400
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_GOTO = -4
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
MESSAGE_ELEMENTS = 60000  # bytes of elements per message: the list's nla_len is 16 bits
QUIET_AFTER = 10000  # elements: larger batches run with the ruleset monitor's events off
ACK_TRUESIZE = 1024  # receive-buffer charge of one ack (an skb), to size the buffer


class BatchError(Exception):
    """The kernel refused the batch (nothing of it was committed) or its answer was lost."""


def _nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _nest(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind | NLA_F_NESTED) + payload


class Encoder:
    """render's element texts -> attribute bytes, for one batch. Addresses, ports and
    attribute heads repeat across 100,000 elements, so each is built once (~2 us per
    element instead of ~7 with a struct.pack per attribute)."""

    def __init__(self) -> None:
        self._parts: Dict[str, bytes] = {}  # address or port text -> its register bytes
        self._heads: Dict[Any, bytes] = {}  # see _heads_for

    def _part(self, text: str) -> bytes:
        raw = self._parts.get(text)
        if raw is None:
            if "." in text or ":" in text:
                raw = socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
            else:
                raw = int(text).to_bytes(2, "big") + b"\0\0"  # a port: network order, in a 4-byte register
            self._parts[text] = raw
        return raw

    @staticmethod
    def verdict(chain: str) -> bytes:
        """NFTA_SET_ELEM_DATA of `goto chain`."""
        verdict = _nla(NFTA_VERDICT_CODE, struct.pack(">i", NFT_GOTO)) + _nla(NFTA_VERDICT_CHAIN, chain.encode() + b"\0")
        return _nest(NFTA_SET_ELEM_DATA, _nest(NFTA_DATA_VERDICT, verdict))

    def _heads_for(self, key_len: int, data_len: Optional[int]) -> bytes:
        """The attribute heads before a key of `key_len` bytes in an element whose data
        attribute is `data_len` bytes; with data_len None, the heads of a data attribute
        whose address . port value starts with a `key_len`-byte address."""
        if data_len is None:
            value_len = key_len + 4
            heads = (struct.pack("=HH", 8 + value_len, NFTA_SET_ELEM_DATA | NLA_F_NESTED)
                     + struct.pack("=HH", 4 + value_len, NFTA_DATA_VALUE))
            self._heads[key_len] = heads
            return heads
        heads = (struct.pack("=HH", 12 + key_len + data_len, NFTA_LIST_ELEM | NLA_F_NESTED)
                 + struct.pack("=HH", 8 + key_len, NFTA_SET_ELEM_KEY | NLA_F_NESTED)
                 + struct.pack("=HH", 4 + key_len, NFTA_DATA_VALUE))
        self._heads[(key_len, data_len)] = heads
        return heads

    def elements(self, items: Sequence[Tuple[str, Optional[str]]]) -> List[bytes]:
        """NFTA_LIST_ELEM attributes of `(key, value)` texts (value None: a deletion).
        Keys are `address . proto . port`, each part in a 4-byte register. One loop with
        its lookups bound locally: this runs for every element of a whole-table set."""
        parts, part, heads, heads_for, verdict = self._parts, self._part, self._heads, self._heads_for, self.verdict
        protos = _PROTOCOLS
        out: List[bytes] = []
        append = out.append
        for key, value in items:
            address, proto, port = key.split(" . ")
            raw = (parts.get(address) or part(address)) + protos[proto] + (parts.get(port) or part(port))
            if value is None:
                data = b""
            elif value[0] == "g":  # goto CHAIN
                data = verdict(value[5:])
            else:  # address . port
                to, _dot, to_port = value.partition(" . ")
                data = parts.get(to) or part(to)
                data = ((heads.get(len(data)) or heads_for(len(data), None))
                        + data + (parts.get(to_port) or part(to_port)))
            append((heads.get((len(raw), len(data))) or heads_for(len(raw), len(data))) + raw + data)
        return out


_PROTOCOLS = {name: bytes((number, 0, 0, 0)) for name, number in PROTOCOL_NUMBERS.items()}


def split(txn: render.Transaction) -> Optional[Tuple[render.Transaction, List[render.Op], render.Transaction]]:
    """(before, element ops, after) when `txn` can run as libnftables' `before`, one
    element batch, libnftables' `after` and stay atomic for packets; else None.

    `before` may only add chains and fill them (nothing jumps to a new chain until the
    batch commits); `after` may only delete chains (nothing jumps to them once it has).
    Any other op (the table, maps, a rewrite of a live chain, other maps' elements)
    keeps the whole transaction in libnftables."""
    before: List[render.Op] = []
    switch: List[render.Op] = []
    after: List[render.Op] = []
    added = set()
    for op in txn.ops:
        if op.kind == "element" and op.name in MAPS and not after:
            switch.append(op)
        elif op.kind == "chain" and op.verb == "add" and not op.arg.hook and not switch and not after:
            added.add(op.name)
            before.append(op)
        elif op.kind == "rule" and op.name in added and not switch:
            before.append(op)
        elif op.kind == "chain" and op.verb == "delete" and switch:
            after.append(op)
        else:
            return None
    if not switch:
        return None
    return render.Transaction(before), switch, render.Transaction(after)


class ElementWriter:
    """One NETLINK_NETFILTER socket that commits element batches (not thread-safe: the
    Service applies one transaction at a time)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks without the (60 KB) request
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def messages(self, ops: Sequence[render.Op]) -> List[bytes]:
        """The batch: BEGIN, element messages of at most MESSAGE_ELEMENTS bytes, END."""
        out = [self._header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, b"", batch=True)]
        table = _nla(NFTA_SET_ELEM_LIST_TABLE, render.TABLE.encode() + b"\0")
        encoder = Encoder()
        for op in ops:
            head = table + _nla(NFTA_SET_ELEM_LIST_SET, op.name.encode() + b"\0")
            if op.verb == "add":
                msg_type, flags = NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK
                encoded = encoder.elements(op.arg)
            else:
                msg_type, flags = NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK
                encoded = encoder.elements([(k, None) for k in op.arg])
            chunk: List[bytes] = []
            size = 0
            for item in encoded:
                if size + len(item) > MESSAGE_ELEMENTS:
                    out.append(self._header(msg_type, flags, head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk))))
                    chunk, size = [], 0
                chunk.append(item)
                size += len(item)
            if chunk:
                out.append(self._header(msg_type, flags, head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk))))
        out.append(self._header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, b"", batch=True))
        return out

    def _header(self, msg_type: int, flags: int, attrs: bytes, batch: bool = False) -> bytes:
        self.seq += 1
        if batch:  # nfgenmsg of BEGIN/END: AF_UNSPEC, res_id = the subsystem (big-endian)
            nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", NFNL_SUBSYS_NFTABLES)
        else:
            nfgen = struct.pack("=BBH", NFPROTO_INET, 0, 0)
            msg_type |= NFNL_SUBSYS_NFTABLES << 8
        return struct.pack("=IHHII", 20 + len(attrs), msg_type, flags, self.seq, 0) + nfgen + attrs

    def generation(self) -> int:
        """The ruleset's generation: the kernel adds one for every committed batch."""
        self.seq += 1
        self._drain()
        request = struct.pack("=IHHII", 20, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST,
                              self.seq, 0) + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        self.sock.sendto(request, (0, 0))
        self.sock.settimeout(GENERATION_TIMEOUT)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                offset = 0
                while offset + 20 <= len(data):
                    length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                    if seq == self.seq and mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        raise OSError(code, os.strerror(code))
                    if seq == self.seq and mtype & 0xFF == NFT_MSG_NEWGEN:
                        gen_id = attributes(data[offset + 20:offset + length]).get(NFTA_GEN_ID)
                        if gen_id is not None:
                            return struct.unpack(">I", gen_id)[0]
                    offset += (max(length, 20) + 3) & ~3
        finally:
            self.sock.settimeout(None)

    def commit(self, ops: Sequence[render.Op], alongside: Any = None) -> None:
        """Send `ops` (element ops of MAPS) as one batch; BatchError if refused.
        `alongside.start()` is called once the batch is encoded, as the kernel's
        work (without the GIL) begins."""
        parts = self.messages(ops)
        payload = b"".join(parts)
        acked = len(parts) - 2  # every element message asks for an ack
        self.sock.setsockopt(socket.SOL_SOCKET, 32, max(len(payload) + 65536, 1 << 18))  # SO_SNDBUFFORCE
        self.sock.setsockopt(socket.SOL_SOCKET, 33, max(acked * ACK_TRUESIZE + 65536, 1 << 18))  # SO_RCVBUFFORCE
        self._drain()
        if alongside is not None:
            alongside.start()
        # The kernel runs the whole batch inside this call: its answers are queued on
        # return (an ack or an error per element message).
        self.sock.sendto(payload, (0, 0))
        errors: Dict[int, int] = {}
        answered = 0
        first_seq = self.seq - len(parts) + 2
        try:
            while answered < acked or errors:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                offset = 0
                while offset + 20 <= len(data):
                    length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                    if mtype == NLMSG_ERROR and first_seq <= seq <= self.seq:
                        answered += 1
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        if code:
                            errors[seq] = code
                    offset += (max(length, 20) + 3) & ~3
        except BlockingIOError:
            pass
        except OSError as exc:  # ENOBUFS: answers lost, the outcome is unknown
            raise BatchError("the kernel's answer to an element batch was lost: %s" % exc) from None
        if errors:
            code = errors[min(errors)]
            raise BatchError("the kernel refused the element changes: %s" % os.strerror(code))
        if answered < acked:
            raise BatchError("the kernel answered %d of %d element messages" % (answered, acked))

    def _drain(self) -> None:
        """Answers left over from an earlier batch that raised."""
        while True:
            try:
                self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    return
