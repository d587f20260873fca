"""nf_tables over netlink, read side: attribute decoding and dumps.

The kernel's own messages rather than libnftables' listing serve the ruleset watcher
(NFNLGRP_NFTABLES events), the counter reads of `list` and the metrics, and
`read_table` (restart, drift repair, verification): dumps of the table's chains,
sets, objects, rules and set elements. libnftables' `list table`
builds every object of the table as JSON or text first: 4 s for a map of 100,000
elements on nftables 1.0.6, where the dump of that map and its decoding here take
about 0.8 s. Writes: libnftables, and masqd.portfw_batch for PORTFW transactions (it
uses the attribute names and `attr` here). Layouts: linux/netfilter/nf_tables.h and
linux/netlink.h; pyroute2's nftables module reads only the first message of an
element dump (0.9.7), so it does not serve for large maps.
"""

import os
import re
import socket
import struct
from typing import Dict, Iterator, List, Optional, Tuple

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
NLA_TYPE_MASK = 0x3FFF
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3

NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE = 1, 4, 7
NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_GETOBJ = 10, 13, 19
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
NFTNL_UDATA_RULE_COMMENT = 0
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS = 1, 2, 3
NFT_SET_ANONYMOUS, NFT_SET_MAP, NFT_SET_TIMEOUT, NFT_SET_EVAL = 0x1, 0x8, 0x10, 0x20
TIMED = NFT_SET_TIMEOUT | NFT_SET_EVAL  # elements with a timeout, or written from the packet path
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE = 1, 2, 3
OBJECT_KINDS = {3: "ct helper"}  # NFT_OBJECT_* the table holds, as nft names them
NFTA_EXPR_NAME, NFTA_EXPR_DATA, NFTA_COUNTER_PACKETS = 1, 2, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS = 1, 2, 7, 10
NFTA_DATA_VALUE = 1
NFTA_LIST_ELEM = 1
NLA_F_NESTED = 0x8000

PROTOCOLS = {6: "tcp", 17: "udp", 33: "dccp", 132: "sctp"}  # nft's names for inet_proto
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOLS.items()}
PROTOCOL_REGISTERS = {name: bytes((number, 0, 0, 0)) for name, number in PROTOCOL_NUMBERS.items()}  # in a key
DUMP_ATTEMPTS = 5  # a dump the ruleset changed under (NLM_F_DUMP_INTR) is taken again
RECV_SIZE = 1 << 16  # the kernel fills at most 32 KiB per dump message
DUMP_TIMEOUT = 30.0  # seconds one receive may wait


class DumpInterrupted(Exception):
    """The ruleset changed during every attempt of a dump."""


def attributes(data, offset: int = 0, end: Optional[int] = None) -> Dict[int, bytes]:
    """Netlink attributes (type -> payload) of `data[offset:end]`; nested ones stay bytes."""
    out: Dict[int, bytes] = {}
    end = len(data) if end is None else end
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out.setdefault(kind & NLA_TYPE_MASK, bytes(data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return out


def attribute_list(data) -> List[bytes]:
    """Payloads of a nested list (NFTA_LIST_ELEM, ...), in order."""
    out, offset = [], 0
    while offset + 4 <= len(data):
        length, _kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out.append(bytes(data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return out


def string(payload: Optional[bytes]) -> Optional[str]:
    return None if payload is None else payload.split(b"\0", 1)[0].decode("utf-8", "replace")


def counter_packets(expressions: bytes) -> Optional[int]:
    """Packets of the `counter` among a list of expressions (NFTA_LIST_ELEM of
    NFTA_EXPR_*), None when there is none."""
    for expr in attribute_list(expressions):
        packets = expression_packets(expr)
        if packets is not None:
            return packets
    return None


def expression_packets(expr: bytes) -> Optional[int]:
    ea = attributes(expr)
    if string(ea.get(NFTA_EXPR_NAME)) != "counter":
        return None
    data = attributes(ea.get(NFTA_EXPR_DATA, b""))
    return struct.unpack(">Q", data[NFTA_COUNTER_PACKETS][:8])[0] if NFTA_COUNTER_PACKETS in data else 0


def rule_comment(attrs: Dict[int, bytes]) -> str:
    """The comment of a rule message (NFTA_RULE_USERDATA, libnftnl's TLVs), "" if none."""
    comment = ""
    udata, offset = attrs.get(NFTA_RULE_USERDATA, b""), 0
    while offset + 2 <= len(udata):  # TLV: type u8, length u8, value
        kind, length = udata[offset], udata[offset + 1]
        if kind == NFTNL_UDATA_RULE_COMMENT:
            comment = udata[offset + 2:offset + 2 + length].split(b"\0", 1)[0].decode("utf-8", "replace")
        offset += 2 + length
    return comment


def headers(data: bytes) -> Iterator[Tuple[int, int, int, int]]:
    """(offset, length, type, seq) of each netlink message in one datagram."""
    offset = 0
    while offset + 20 <= len(data):
        length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        yield offset, length, mtype, seq
        offset += (max(length, 20) + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (NLA_F_NESTED in `kind` for a nest)."""
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


class Dumper:
    """One NETLINK_NETFILTER socket of the caller's network namespace, for dumps.
    Not shared between threads: open one per reading (a socket and a bind)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(DUMP_TIMEOUT)  # a kernel that stops answering: OSError, not a hang
        self.seq = 0
        self.interrupted = False  # the last dump's walk was interrupted (partial dumps)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Dumper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dump(self, msg_type: int, attrs: List[Tuple[int, bytes]], attempts: int = DUMP_ATTEMPTS,
             partial: bool = False) -> List[memoryview]:
        """The attribute parts of every message of one dump; taken again when the
        ruleset changes during it. With `partial`, the last attempt's parts are returned
        even if it was interrupted (`self.interrupted` says so: the walk may have
        skipped or repeated entries). OSError(ENOENT) when the table/set is absent."""
        for _attempt in range(attempts):
            parts, self.interrupted = self._dump_once(msg_type, attrs)
            if not self.interrupted:
                return parts
        if partial:
            return parts
        raise DumpInterrupted("the ruleset kept changing during %d dumps" % attempts)

    def _request(self, msg_type: int, flags: int, attrs: List[Tuple[int, bytes]]) -> bytes:
        self.seq += 1
        payload = struct.pack("=BBH", NFPROTO_INET, 0, 0) + b"".join(attr(k, v) for k, v in attrs)
        return struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                           flags, self.seq, 0) + payload

    def _dump_once(self, msg_type: int, attrs: List[Tuple[int, bytes]]) -> Tuple[List[memoryview], bool]:
        self.sock.send(self._request(msg_type, NLM_F_REQUEST | NLM_F_DUMP, attrs))
        parts: List[memoryview] = []
        interrupted = False
        while True:
            data = memoryview(self.sock.recv(RECV_SIZE))
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    break
                if seq == self.seq:
                    if mtype == NLMSG_DONE:
                        return parts, interrupted
                    if mtype == NLMSG_ERROR:
                        error = -struct.unpack_from("=i", data, offset + 16)[0]
                        if error:
                            raise OSError(error, os.strerror(error))
                    else:
                        interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                        parts.append(data[offset + 20:offset + length])  # past nfgenmsg
                offset += (length + 3) & ~3

    def tables(self) -> List[str]:
        """The names of the inet tables."""
        return [string(attributes(part).get(NFTA_TABLE_NAME)) or "" for part in self.dump(NFT_MSG_GETTABLE, [])]

    def chains(self) -> Iterator[Tuple[str, str]]:
        """(table, chain) of every inet chain: the kernel's chain dump has no table
        filter, so one dump serves every table."""
        for part in self.dump(NFT_MSG_GETCHAIN, []):
            attrs = attributes(part)
            yield string(attrs.get(NFTA_CHAIN_TABLE)) or "", string(attrs.get(NFTA_CHAIN_NAME)) or ""

    def _of_table(self, msg_type: int, table_attr: int, table: str,
                  extra: Optional[List[Tuple[int, bytes]]] = None) -> Iterator[Dict[int, bytes]]:
        """The attributes of each message of a dump asked for `table`, checked to be
        of it (a kernel that ignores the filter returns every table's)."""
        for part in self.dump(msg_type, [(table_attr, table.encode() + b"\0")] + (extra or [])):
            attrs = attributes(part)
            if string(attrs.get(table_attr)) == table:
                yield attrs

    def sets(self, table: str) -> Dict[str, int]:
        """{name: NFT_SET_* flags} of the table's named sets and maps."""
        out: Dict[str, int] = {}
        for attrs in self._of_table(NFT_MSG_GETSET, NFTA_SET_TABLE, table):
            flags = struct.unpack(">I", attrs[NFTA_SET_FLAGS][:4])[0] if NFTA_SET_FLAGS in attrs else 0
            if not flags & NFT_SET_ANONYMOUS:
                out[string(attrs.get(NFTA_SET_NAME)) or ""] = flags
        return out

    def objects(self, table: str) -> List[Tuple[str, str]]:
        """(kind, name) of the table's stateful objects of the kinds in OBJECT_KINDS."""
        out = []
        for attrs in self._of_table(NFT_MSG_GETOBJ, NFTA_OBJ_TABLE, table):
            kind = struct.unpack(">I", attrs[NFTA_OBJ_TYPE][:4])[0] if NFTA_OBJ_TYPE in attrs else 0
            if kind in OBJECT_KINDS:
                out.append((OBJECT_KINDS[kind], string(attrs.get(NFTA_OBJ_NAME)) or ""))
        return out

    def rules(self, table: str, chain: Optional[str] = None) -> Iterator[Tuple[str, Optional[int], str]]:
        """(chain, packets of its counter or None, comment) of every rule (of `chain`
        only, if given), in order."""
        extra = [] if chain is None else [(NFTA_RULE_CHAIN, chain.encode() + b"\0")]
        for attrs in self._of_table(NFT_MSG_GETRULE, NFTA_RULE_TABLE, table, extra):
            yield (string(attrs.get(NFTA_RULE_CHAIN)) or "",
                   counter_packets(attrs.get(NFTA_RULE_EXPRESSIONS, b"")), rule_comment(attrs))

    def element_count(self, table: str, name: str) -> int:
        count = 0
        for part in self.dump(NFT_MSG_GETSETELEM, [(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0"),
                                                   (NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")]):
            count += len(attribute_list(attributes(part).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")))
        return count

    def rule_counters(self, table: str, chains: Optional[List[str]] = None) -> Dict[str, List[int]]:
        """{chain: [packets of each rule that has a counter, in order]} of `inet table`:
        one dump of every rule, or with `chains`, one small dump per chain (each taken
        again on its own when writes interrupt it; a chain that is gone is left out)."""
        out: Dict[str, List[int]] = {}
        if chains is None:
            found = list(self.rules(table))
        else:
            found = []
            for name in chains:
                try:
                    found.extend(self.rules(table, name))
                except FileNotFoundError:
                    continue
        for chain, packets, _comment in found:
            if packets is not None:
                out.setdefault(chain, []).append(packets)
        return out

    def element_counters(self, table: str, name: str, attempts: int = DUMP_ATTEMPTS,
                         partial: bool = False) -> Iterator[Tuple[bytes, int]]:
        """(key bytes, packets) of every element of a set/map with per-element counters
        (`dump`'s `attempts` and `partial`). 100,000 elements are ~300 messages of
        32 KiB, decoded in ~0.3 s."""
        for part in self.dump(NFT_MSG_GETSETELEM, [(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0"),
                                                   (NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")],
                              attempts, partial):
            yield from _element_counters(attributes(part).get(NFTA_SET_ELEM_LIST_ELEMENTS, b""))

    def element_packets(self, table: str, name: str, keys: List[bytes], batch: int = 256) -> Dict[bytes, int]:
        """{key: packets} of the given elements, by one get request each (sent `batch`
        at a time, one reply each: the element, or an error for a key the set does not
        hold, which is left out)."""
        out: Dict[bytes, int] = {}
        head = [(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0"), (NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")]
        for start in range(0, len(keys), batch):
            chunk = keys[start:start + batch]
            first = self.seq + 1
            self.sock.send(b"".join(self._request(NFT_MSG_GETSETELEM, NLM_F_REQUEST, head + [(
                NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, attr(NFTA_LIST_ELEM | NLA_F_NESTED, attr(
                    NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(NFTA_DATA_VALUE, key))))]) for key in chunk))
            answered = 0
            while answered < len(chunk):
                data = memoryview(self.sock.recv(RECV_SIZE))
                offset = 0
                while offset + 16 <= len(data):
                    length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                    if length < 16:
                        break
                    if first <= seq <= self.seq:
                        answered += 1
                        if mtype != NLMSG_ERROR:
                            out.update(_element_counters(attributes(data[offset + 20:offset + length]).get(
                                NFTA_SET_ELEM_LIST_ELEMENTS, b"")))
                    offset += (length + 3) & ~3
        return out


# An element's counter expression as this kernel writes it (64-bit, no padding
# attributes): NAME "counter", DATA { BYTES u64, PACKETS u64 }. The headers before
# BYTES' value, and PACKETS' header, checked as bytes; anything else takes
# _inline_counter's walk.
_COUNTER_HEAD = struct.pack("=HH", 12, NFTA_EXPR_NAME) + b"counter\0" + struct.pack("=HHHH", 28, NFTA_EXPR_DATA, 12, 1)
_COUNTER_PACKETS = struct.pack("=HH", 12, NFTA_COUNTER_PACKETS)


def _counted_element_pattern(key_len: int, data_len: int) -> Tuple[int, "re.Pattern[bytes]"]:
    """(its length, a pattern capturing (key, packets)) of an element of a map with a
    counter, as this kernel dumps it: KEY { VALUE }, DATA { VALUE }, EXPR counter."""
    def head(length: int, kind: int) -> bytes:
        return re.escape(struct.pack("=HH", length, kind))
    length = 4 + (8 + key_len) + (8 + data_len) + 44
    return length, re.compile(
        head(length, NFTA_LIST_ELEM) + head(8 + key_len, NFTA_SET_ELEM_KEY) + head(4 + key_len, NFTA_DATA_VALUE)
        + b"(.{%d})" % key_len + head(8 + data_len, NFTA_SET_ELEM_DATA) + head(4 + data_len, NFTA_DATA_VALUE)
        + b".{%d}" % data_len + head(44, NFTA_SET_ELEM_EXPR) + re.escape(_COUNTER_HEAD) + b".{8}"
        + re.escape(_COUNTER_PACKETS) + b"(.{8})", re.S)


# The direct PORTFW maps' elements, by their length: ipv4 and ipv6 key . proto . port
# -> address . port.
_COUNTED_ELEMENTS = dict(_counted_element_pattern(key, data) for key, data in ((12, 8), (24, 20)))


def _element_counters(elements: bytes) -> Iterator[Tuple[bytes, int]]:
    """(key, packets) of each element of an NFTA_SET_ELEM_LIST_ELEMENTS payload.

    A payload that is all elements of one _COUNTED_ELEMENTS layout (matches that tile
    it) is read by one regular-expression scan, in C: 10x faster than the walk below,
    which reads any other layout, attribute by attribute."""
    if len(elements) >= 4:
        pattern = _COUNTED_ELEMENTS.get(struct.unpack_from("=H", elements)[0])
        if pattern is not None:
            found = pattern.findall(elements)
            if len(found) * struct.unpack_from("=H", elements)[0] == len(elements):
                return ((key, int.from_bytes(packets, "big")) for key, packets in found)
    return _walk_element_counters(elements)


def _walk_element_counters(elements: bytes) -> Iterator[Tuple[bytes, int]]:
    """_element_counters of any layout. The loop is written out (no dict per
    attribute): it runs once per element."""
    unpack = struct.unpack_from
    offset, end = 0, len(elements)
    while offset + 4 <= end:  # NFTA_LIST_ELEM
        length = unpack("=H", elements, offset)[0]
        if length < 4:
            break
        key, packets = None, 0
        pos, stop = offset + 4, offset + length
        while pos + 4 <= stop:
            alen, kind = unpack("=HH", elements, pos)
            if alen < 4:
                break
            kind &= NLA_TYPE_MASK
            if kind == NFTA_SET_ELEM_KEY:  # { NFTA_DATA_VALUE }
                key = bytes(elements[pos + 8:pos + 4 + unpack("=H", elements, pos + 4)[0]])
            elif kind == NFTA_SET_ELEM_EXPR:  # { NAME "counter", DATA { BYTES, PACKETS } }
                if elements[pos + 4:pos + 24] == _COUNTER_HEAD and elements[pos + 32:pos + 36] == _COUNTER_PACKETS:
                    packets = unpack(">Q", elements, pos + 36)[0]
                else:
                    packets = _inline_counter(elements, pos + 4, pos + alen)
            elif kind == NFTA_SET_ELEM_EXPRESSIONS:
                packets = counter_packets(elements[pos + 4:pos + alen]) or 0
            pos += (alen + 3) & ~3
        if key is not None:
            yield key, packets
        offset += (length + 3) & ~3


def _inline_counter(data: bytes, pos: int, stop: int) -> int:
    """expression_packets without copies, for the element loop."""
    unpack = struct.unpack_from
    packets = 0
    counter = False
    while pos + 4 <= stop:
        alen, kind = unpack("=HH", data, pos)
        if alen < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == NFTA_EXPR_NAME:
            counter = data[pos + 4:pos + alen].rstrip(b"\0") == b"counter"
        elif kind == NFTA_EXPR_DATA:
            inner, end = pos + 4, pos + alen
            while inner + 4 <= end:
                ilen, ikind = unpack("=HH", data, inner)
                if ilen < 4:
                    break
                if ikind & NLA_TYPE_MASK == NFTA_COUNTER_PACKETS:
                    packets = unpack(">Q", data, inner + 4)[0]
                inner += (ilen + 3) & ~3
        pos += (alen + 3) & ~3
    return packets if counter else 0


def address_bytes(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def address_proto_port_key(address: str, protocol: str, port: int) -> bytes:
    """The key bytes address_proto_port_text reads (each part in a 4-byte register)."""
    return address_bytes(address) + PROTOCOL_REGISTERS[protocol] + port.to_bytes(2, "big") + b"\0\0"


def address_proto_port_text(key: bytes) -> str:
    """nft's text of an `ipvN_addr . inet_proto . inet_service` key (each part in a
    4-byte register): "198.51.100.1 . tcp . 80", as `list` prints it."""
    family = socket.AF_INET6 if len(key) == 24 else socket.AF_INET
    size = 16 if family == socket.AF_INET6 else 4
    proto = key[size]
    port = (key[size + 4] << 8) | key[size + 5]
    return "%s . %s . %d" % (socket.inet_ntop(family, key[:size]), PROTOCOLS.get(proto, str(proto)), port)
