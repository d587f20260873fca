"""nf_tables over netlink, write side: a PORTFW transaction as one nfnetlink batch.

A PORTFW key is one element of a `portfw_direct_*` shard (one target) or `portfw_*` (a goto
into its cascade chain: one rule per backend). libnftables turns 100,000 such elements
into ~210 MB and ~1 s of parsing and evaluation before the kernel spends ~0.4 s on
them, and on nftables 1.0.6 it reads every chain of the namespace before any element
or rule command (~30 ms with 20,000 cascade chains, for a one-key change). Here the
transactions render.diff makes for PORTFW keys are encoded straight to nf_tables
messages and sent as one nfnetlink batch, which the kernel commits atomically:
regular chains added, flushed or deleted; the rules render.cascade_rules and
render.reject_rules write (recognised by pattern, below); elements of the PORTFW
maps (~40 bytes each), each op in the table its name says (render.table_of).
Anything else in a transaction (the table, maps, base chains, any other rule or map)
leaves the whole transaction to libnftables (`batch_ops` answers None), and so does
every dry run.

pyroute2's nftables messages encode in pure Python per attribute, about ten times
slower than the struct packing here, so they do not serve for 100,000 elements. The
expressions are the ones `nft --debug=netlink` shows nft emitting for the same rule
text; a lab test compares the listings of tables written both ways and the kernel's
own dump of every rule, byte for byte. Layouts:
linux/netfilter/nf_tables.h, linux/netfilter/nfnetlink.h.
"""

import errno
import os
import re
import socket
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

from masqd import render
from masqd.nfnetlink import (NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFTA_CHAIN_NAME, NFTA_CHAIN_TABLE,
                             NFTA_DATA_VALUE, NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM, NFTA_RULE_CHAIN,
                             NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE, NFTA_RULE_USERDATA, NFTA_SET_ELEM_DATA,
                             NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET,
                             NFTA_SET_ELEM_LIST_TABLE, NFTNL_UDATA_RULE_COMMENT, NLA_F_NESTED, NLM_F_REQUEST,
                             NLMSG_ERROR, PROTOCOL_NUMBERS, PROTOCOL_REGISTERS, attr, attributes, headers)

# The maps whose elements this module writes (or flushes): every PORTFW key, nothing else.
MAPS = render.PORTFW_MAPS

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 3, 5, 6, 8
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 12, 14, 15, 16
NFTA_GEN_ID = 1
GENERATION_TIMEOUT = 5.0  # seconds for the kernel's answer to GETGEN
NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x4, 0x400, 0x800
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_GOTO = -4
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
MESSAGE_ELEMENTS = 60000  # bytes of elements per message: the list's nla_len is 16 bits
QUIET_AFTER = 10000  # elements, chains and rules: larger batches run with the ruleset monitor's events off


class BatchError(Exception):
    """The kernel refused the batch (nothing of it was committed) or its answer was lost."""


_nla = attr


def _nest(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


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
        protos = PROTOCOL_REGISTERS
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


# --- rules: the shapes render.cascade_rules and render.reject_rules write -------------

CASCADE_RULE = re.compile(r'meta l4proto (?P<proto>[a-z]+) (?:numgen inc mod (?P<modulus>[0-9]+) < (?P<below>[0-9]+) )?'
                          r'counter dnat (?P<family>ip6?) to (?P<target>[^ ]+)(?: comment "(?P<comment>[a-z0-9 ]+)")?')
REJECT_RULES = {"meta l4proto tcp reject with tcp reset", "reject"}

NFTA_META_DREG, NFTA_META_KEY, NFT_META_L4PROTO = 1, 2, 16
NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA, NFT_CMP_EQ, NFT_CMP_LT = 1, 2, 3, 0, 2
NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE, NFTA_NG_OFFSET, NFT_NG_INCREMENTAL = 1, 2, 3, 4, 0
NFTA_BYTEORDER_SREG, NFTA_BYTEORDER_DREG, NFTA_BYTEORDER_OP = 1, 2, 3
NFTA_BYTEORDER_LEN, NFTA_BYTEORDER_SIZE, NFT_BYTEORDER_HTON = 4, 5, 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_NAT_TYPE, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_FLAGS = 1, 2, 3, 5, 7
NFT_NAT_DNAT, NF_NAT_RANGE_PROTO_SPECIFIED = 1, 0x2
NFTA_REJECT_TYPE, NFTA_REJECT_ICMP_CODE = 1, 2
NFT_REJECT_TCP_RST, NFT_REJECT_ICMPX_UNREACH, NFT_REJECT_ICMPX_PORT_UNREACH = 1, 2, 1
REG_1, REG_2 = 1, 2  # nft's 16-byte registers, as it uses them for these rules


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _expr(name: str, attrs: bytes) -> bytes:
    return _nest(NFTA_LIST_ELEM, _nla(NFTA_EXPR_NAME, name.encode() + b"\0") + _nest(NFTA_EXPR_DATA, attrs))


def _cmp(op: int, data: bytes) -> bytes:
    return _expr("cmp", _nla(NFTA_CMP_SREG, _u32(REG_1)) + _nla(NFTA_CMP_OP, _u32(op))
                 + _nest(NFTA_CMP_DATA, _nla(NFTA_DATA_VALUE, data)))


def _immediate(reg: int, data: bytes) -> bytes:
    return _expr("immediate", _nla(NFTA_IMMEDIATE_DREG, _u32(reg)) + _nest(NFTA_IMMEDIATE_DATA, _nla(NFTA_DATA_VALUE, data)))


_L4PROTO = _expr("meta", _nla(NFTA_META_DREG, _u32(REG_1)) + _nla(NFTA_META_KEY, _u32(NFT_META_L4PROTO)))
_COUNTER = _expr("counter", _nla(NFTA_COUNTER_BYTES, bytes(8)) + _nla(NFTA_COUNTER_PACKETS, bytes(8)))
_HTON = _expr("byteorder", _nla(NFTA_BYTEORDER_SREG, _u32(REG_1)) + _nla(NFTA_BYTEORDER_DREG, _u32(REG_1))
              + _nla(NFTA_BYTEORDER_OP, _u32(NFT_BYTEORDER_HTON)) + _nla(NFTA_BYTEORDER_LEN, _u32(4))
              + _nla(NFTA_BYTEORDER_SIZE, _u32(4)))
_REJECTS = {
    "meta l4proto tcp reject with tcp reset": _L4PROTO + _cmp(NFT_CMP_EQ, bytes((PROTOCOL_NUMBERS["tcp"],)))
    + _expr("reject", _nla(NFTA_REJECT_TYPE, _u32(NFT_REJECT_TCP_RST)) + _nla(NFTA_REJECT_ICMP_CODE, b"\0")),
    "reject": _expr("reject", _nla(NFTA_REJECT_TYPE, _u32(NFT_REJECT_ICMPX_UNREACH))
                    + _nla(NFTA_REJECT_ICMP_CODE, bytes((NFT_REJECT_ICMPX_PORT_UNREACH,)))),
}


def rule_attrs(text: str) -> Optional[bytes]:
    """NFTA_RULE_EXPRESSIONS (and USERDATA) of a cascade or reject rule's text, or None
    for any other rule. The expressions are those nft emits for the same text:
      meta load l4proto => reg 1; cmp eq reg 1 PROTO
      [numgen reg 1 = inc mod M; byteorder reg 1 = hton(reg 1, 4, 4); cmp lt reg 1 B]
      counter; immediate reg 1 ADDRESS; immediate reg 2 PORT
      nat dnat ip|ip6 addr_min reg 1 proto_min reg 2 flags 0x2   [userdata: comment]"""
    rejected = _REJECTS.get(text)
    if rejected is not None:
        return _nest(NFTA_RULE_EXPRESSIONS, rejected)
    match = CASCADE_RULE.fullmatch(text)
    if match is None or match["proto"] not in PROTOCOL_NUMBERS:
        return None
    target = match["target"]
    address, _colon, port = target.rpartition(":")
    v6 = match["family"] == "ip6"
    if v6 != address.startswith("["):
        return None
    try:
        raw = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, address.strip("[]"))
        port_raw = int(port).to_bytes(2, "big")
    except (OSError, ValueError, OverflowError):
        return None
    exprs = _L4PROTO + _cmp(NFT_CMP_EQ, bytes((PROTOCOL_NUMBERS[match["proto"]],)))
    if match["modulus"] is not None:
        exprs += (_expr("numgen", _nla(NFTA_NG_DREG, _u32(REG_1)) + _nla(NFTA_NG_MODULUS, _u32(int(match["modulus"])))
                        + _nla(NFTA_NG_TYPE, _u32(NFT_NG_INCREMENTAL)) + _nla(NFTA_NG_OFFSET, _u32(0)))
                  + _HTON + _cmp(NFT_CMP_LT, _u32(int(match["below"]))))
    exprs += (_COUNTER + _immediate(REG_1, raw) + _immediate(REG_2, port_raw)
              + _expr("nat", _nla(NFTA_NAT_TYPE, _u32(NFT_NAT_DNAT))
                      + _nla(NFTA_NAT_FAMILY, _u32(socket.AF_INET6 if v6 else socket.AF_INET))
                      + _nla(NFTA_NAT_REG_ADDR_MIN, _u32(REG_1)) + _nla(NFTA_NAT_REG_PROTO_MIN, _u32(REG_2))
                      + _nla(NFTA_NAT_FLAGS, _u32(NF_NAT_RANGE_PROTO_SPECIFIED))))
    attrs = _nest(NFTA_RULE_EXPRESSIONS, exprs)
    if match["comment"] is not None:
        comment = match["comment"].encode() + b"\0"
        attrs += _nla(NFTA_RULE_USERDATA, bytes((NFTNL_UDATA_RULE_COMMENT, len(comment))) + comment)
    return attrs


def batch_ops(txn: render.Transaction) -> Optional[List[Tuple[render.Op, Optional[bytes]]]]:
    """[(op, its rule's attributes or None)] when every op of `txn` is one this module
    encodes: regular chains added, flushed or deleted, cascade and reject rules, the
    PORTFW maps' elements, and those maps flushed. None otherwise: the whole
    transaction goes to libnftables."""
    out: List[Tuple[render.Op, Optional[bytes]]] = []
    for op in txn.ops:
        if (op.kind == "element" or (op.kind == "map" and op.verb == "flush")) and op.name in MAPS:
            out.append((op, None))
        elif op.kind == "chain" and (op.verb in ("flush", "delete") or (op.verb == "add" and not op.arg.hook)):
            out.append((op, None))
        elif op.kind == "rule":
            attrs = rule_attrs(op.arg)
            if attrs is None:
                return None
            out.append((op, attrs))
        else:
            return None
    return out or None


def _buffer(sock: socket.socket, option: int, force: int, size: int) -> None:
    """A socket buffer of at least `size` bytes (and 256 KiB): beyond the sysctl's
    maximum with CAP_NET_ADMIN (the agent has it), else as far as the maximum goes."""
    size = max(size, 1 << 18)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)


class BatchWriter:
    """One NETLINK_NETFILTER socket that commits PORTFW batches (not thread-safe: the
    Service applies one transaction at a time)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks without the (60 KB) request
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def messages(self, ops: Sequence[Tuple[render.Op, Optional[bytes]]]) -> List[bytes]:
        """The batch of batch_ops' `ops`: BEGIN, a message per chain or rule op, element
        messages of at most MESSAGE_ELEMENTS bytes, END. Only the last message before
        END asks for an ack: the kernel answers every failed message anyway."""
        body: List[Tuple[int, int, bytes]] = []  # (message type, flags, attributes)
        tables = {name: name.encode() + b"\0" for name in render.TABLES}
        table_of = render.table_of
        encoder = Encoder()
        for op, rule in ops:
            name = op.name.encode() + b"\0"
            table = tables[table_of(op.name)]
            if op.kind == "rule":
                body.append((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND,
                             _nla(NFTA_RULE_TABLE, table) + _nla(NFTA_RULE_CHAIN, name) + (rule or b"")))
            elif op.kind == "chain":
                chain = _nla(NFTA_CHAIN_TABLE, table) + _nla(NFTA_CHAIN_NAME, name)
                if op.verb == "add":
                    body.append((NFT_MSG_NEWCHAIN, NLM_F_CREATE, chain))
                elif op.verb == "delete":
                    body.append((NFT_MSG_DELCHAIN, 0, chain))
                else:  # flush: every rule of the chain
                    body.append((NFT_MSG_DELRULE, 0, _nla(NFTA_RULE_TABLE, table) + _nla(NFTA_RULE_CHAIN, name)))
            elif op.kind == "map":  # flush: a deletion that names no element takes them all
                body.append((NFT_MSG_DELSETELEM, 0,
                             _nla(NFTA_SET_ELEM_LIST_TABLE, table) + _nla(NFTA_SET_ELEM_LIST_SET, name)))
            else:
                head = _nla(NFTA_SET_ELEM_LIST_TABLE, table) + _nla(NFTA_SET_ELEM_LIST_SET, name)
                if op.verb == "add":
                    msg_type, flags, encoded = NFT_MSG_NEWSETELEM, NLM_F_CREATE, encoder.elements(op.arg)
                else:
                    msg_type, flags, encoded = NFT_MSG_DELSETELEM, 0, encoder.elements([(k, None) for k in op.arg])
                chunk: List[bytes] = []
                size = 0
                for item in encoded:
                    if size + len(item) > MESSAGE_ELEMENTS:
                        body.append((msg_type, flags, head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk))))
                        chunk, size = [], 0
                    chunk.append(item)
                    size += len(item)
                if chunk:
                    body.append((msg_type, flags, head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk))))
        out = [self._header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, b"", batch=True)]
        for index, (msg_type, flags, attrs) in enumerate(body):
            ack = NLM_F_ACK if index == len(body) - 1 else 0
            out.append(self._header(msg_type, NLM_F_REQUEST | flags | ack, attrs))
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
                for offset, length, mtype, seq in headers(data):
                    if seq == self.seq and mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        raise OSError(code, os.strerror(code))
                    if seq == self.seq and mtype & 0xFF == NFT_MSG_NEWGEN:
                        gen_id = attributes(data[offset + 20:offset + length]).get(NFTA_GEN_ID)
                        if gen_id is not None:
                            return struct.unpack(">I", gen_id)[0]
        finally:
            self.sock.settimeout(None)

    def commit(self, ops: Sequence[Tuple[render.Op, Optional[bytes]]], alongside: Any = None) -> int:
        """Send batch_ops' `ops` as one batch and return its size in bytes; BatchError
        if the kernel refused it (then none of it is in). `alongside.start()` is
        called once the batch is encoded, as the kernel's work (without the GIL) begins."""
        parts = self.messages(ops)
        payload = b"".join(parts)
        first, last = self.seq - len(parts) + 2, self.seq - 1  # the messages between BEGIN and END
        try:
            _buffer(self.sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, len(payload) + 65536)
            # Room for an error answer to every message (a refused batch may fail many).
            _buffer(self.sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, (len(parts) << 10) + 65536)
            self._drain()
            if alongside is not None:
                alongside.start()
            # The kernel runs the whole batch inside this call: its answers are queued on return.
            self.sock.sendto(payload, (0, 0))
        except OSError as exc:  # EMSGSIZE: a buffer it could not have; nothing was committed
            raise BatchError("could not send a PORTFW batch of %d bytes: %s" % (len(payload), exc)) from None
        errors: Dict[int, int] = {}
        acked = False
        try:
            while True:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                for offset, _length, mtype, seq in headers(data):
                    if mtype == NLMSG_ERROR and first <= seq <= last:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        if code:
                            errors[seq] = code
                        elif seq == last:
                            acked = True
        except BlockingIOError:
            pass
        except OSError as exc:  # ENOBUFS: answers lost, the outcome is unknown
            raise BatchError("the kernel's answer to a PORTFW batch was lost: %s" % exc) from None
        if errors:
            raise BatchError("the kernel refused the change: %s" % os.strerror(errors[min(errors)]))
        if not acked:
            raise BatchError("the kernel did not answer a PORTFW batch")
        return len(payload)

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
