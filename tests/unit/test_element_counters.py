"""nfnetlink's reading of the direct maps' element counters: the one-scan path for the
kernel's own layout reads exactly what the attribute walk reads, and anything else
goes to the walk."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from masqd import nfnetlink
from masqd.nfnetlink import (NFTA_DATA_VALUE, NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM, NFTA_SET_ELEM_DATA,
                             NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_KEY)

NFTA_SET_ELEM_FLAGS = 3


def nla(kind, payload):
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def element(key, data, packets, extra=b""):
    """An element as the kernel dumps one of a map with `counter` (no NESTED flags)."""
    data_attrs = nla(1, struct.pack(">Q", packets * 60)) + nla(2, struct.pack(">Q", packets))  # BYTES, PACKETS
    counter = nla(NFTA_EXPR_NAME, b"counter\0") + nla(NFTA_EXPR_DATA, data_attrs)
    return nla(NFTA_LIST_ELEM, nla(NFTA_SET_ELEM_KEY, nla(NFTA_DATA_VALUE, key))
               + nla(NFTA_SET_ELEM_DATA, nla(NFTA_DATA_VALUE, data)) + nla(NFTA_SET_ELEM_EXPR, counter) + extra)


def one_family(key_size, data_size):
    return st.lists(st.tuples(st.binary(min_size=key_size, max_size=key_size),
                              st.binary(min_size=data_size, max_size=data_size), st.integers(0, 2 ** 64 // 60 - 1)),
                    min_size=1, max_size=300)


# address . proto . port -> address . port, IPv4 and IPv6
elements = st.one_of(one_family(12, 8), one_family(24, 20))


@settings(max_examples=300, deadline=None)
@given(elements)
def test_the_scan_reads_what_the_walk_reads(items):
    payload = b"".join(element(key, data, packets) for key, data, packets in items)
    assert len(nfnetlink._COUNTED_ELEMENTS[len(payload) // len(items)].findall(payload)) == len(items)  # scanned
    scanned = list(nfnetlink._element_counters(payload))
    assert scanned == list(nfnetlink._walk_element_counters(payload))
    assert scanned == [(key, packets) for key, _data, packets in items]


@settings(max_examples=100, deadline=None)
@given(elements, st.integers(0, 299))
def test_another_layout_anywhere_goes_to_the_walk(items, where):
    where %= len(items)
    parts = [element(key, data, packets, extra=nla(NFTA_SET_ELEM_FLAGS, b"\0\0\0\1") if i == where else b"")
             for i, (key, data, packets) in enumerate(items)]
    assert list(nfnetlink._element_counters(b"".join(parts))) == [(key, packets) for key, _data, packets in items]


def test_the_layout_is_the_kernels():
    """The bytes of one element of `portfw_direct_v4` (198.51.100.1 . tcp . 80 counter
    packets 5 : 10.16.0.27 . 80) as a 6.x kernel dumped it."""
    dumped = bytes.fromhex("54000100 14000100 10000100 c6336401 06000000 00500000 10000200 0c000100 0a10001b"
                           "00500000 2c000700 0c000100 636f756e 74657200 1c000200 0c000100 00000000 0000012c"
                           "0c000200 00000000 00000005".replace(" ", ""))
    assert dumped == element(nfnetlink.address_proto_port_key("198.51.100.1", "tcp", 80),
                             bytes((10, 16, 0, 27, 0, 80, 0, 0)), 5)
    assert list(nfnetlink._element_counters(dumped)) == [(nfnetlink.address_proto_port_key("198.51.100.1", "tcp", 80), 5)]
