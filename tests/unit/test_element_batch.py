"""masqd.element_batch without a kernel: which transactions may leave libnftables
(`split`), and the bytes of the batch, read back with masqd.nfnetlink's decoder.
tests/lab/test_kernel_apply.py checks the same batches against the kernel."""

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqd import element_batch, nfnetlink, render
from masqd.render import Chain, Op, Transaction

NEW_CHAIN = Chain("pf_00000000000000aa", None, ())


def portfw_txn(before=(), after=()):
    return Transaction(list(before) + [
        Op("delete", "element", "portfw_direct_v4", ["198.51.100.1 . tcp . 80"]),
        Op("add", "element", "portfw_v4", [("198.51.100.1 . tcp . 80", "goto pf_00000000000000aa")]),
    ] + list(after))


def test_split_keeps_new_chains_before_and_deleted_chains_after_the_elements():
    before = [Op("add", "chain", NEW_CHAIN.name, NEW_CHAIN),
              Op("add", "rule", NEW_CHAIN.name, "meta l4proto tcp counter dnat ip to 10.0.0.1:80")]
    after = [Op("delete", "chain", "pf_00000000000000bb", None)]
    parts = element_batch.split(portfw_txn(before, after))
    assert parts is not None
    first, switch, last = parts
    assert first.ops == before and last.ops == after
    assert [op.verb for op in switch] == ["delete", "add"]


@pytest.mark.parametrize("op", [
    Op("add", "table", None, None),
    Op("add", "map", "mfw_marks", render.MapDef("mfw_marks", "map", "type mark : verdict;")),
    Op("flush", "chain", "pf_00000000000000aa", None),  # a live cascade rewritten: not invisible
    Op("add", "rule", "prerouting", "counter"),  # a rule into a chain this transaction did not add
    Op("add", "chain", "prerouting", Chain("prerouting", "type nat hook prerouting priority dstnat;", ())),
    Op("add", "element", "mfw_marks", [("3", "goto mfw_3")]),  # not a PORTFW map
])
def test_split_leaves_everything_else_to_libnftables(op):
    assert element_batch.split(portfw_txn(before=[op])) is None


def test_split_needs_element_changes_and_their_order():
    assert element_batch.split(Transaction([Op("add", "chain", NEW_CHAIN.name, NEW_CHAIN)])) is None
    deleted_first = Transaction([Op("delete", "chain", "pf_1", None)] + portfw_txn().ops)
    assert element_batch.split(deleted_first) is None


def decode(batch):
    """[(message type, flags, seq, attrs)] of a batch's bytes (each message as sent)."""
    out = []
    for raw in batch:
        length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", raw)
        assert length == len(raw)
        out.append((mtype, flags, seq, nfnetlink.attributes(raw, 20)))
    return out


def elements_of(attrs):
    """[(key bytes, data attrs)] of one element message."""
    out = []
    for item in nfnetlink.attribute_list(attrs[element_batch.NFTA_SET_ELEM_LIST_ELEMENTS]):
        elem = nfnetlink.attributes(item)
        key = nfnetlink.attributes(elem[nfnetlink.NFTA_SET_ELEM_KEY])[nfnetlink.NFTA_DATA_VALUE]
        data = elem.get(element_batch.NFTA_SET_ELEM_DATA)
        out.append((key, None if data is None else nfnetlink.attributes(data)))
    return out


def test_batch_layout_and_one_element_of_each_kind():
    writer = element_batch.ElementWriter.__new__(element_batch.ElementWriter)  # no socket needed
    writer.seq = 0
    batch = writer.messages([
        Op("delete", "element", "portfw_direct_v6", ["2001:db8::1 . udp . 53"]),
        Op("add", "element", "portfw_direct_v4", [("198.51.100.1 . tcp . 8080", "10.16.0.10 . 80")]),
        Op("add", "element", "portfw_v4", [("203.0.113.1 . udp . 1024", "goto pf_4f3c27d2b3dd6693")]),
    ])
    msgs = decode(batch)
    subsys = nfnetlink.NFNL_SUBSYS_NFTABLES << 8
    assert [m[0] for m in msgs] == [element_batch.NFNL_MSG_BATCH_BEGIN, subsys | element_batch.NFT_MSG_DELSETELEM,
                                    subsys | element_batch.NFT_MSG_NEWSETELEM,
                                    subsys | element_batch.NFT_MSG_NEWSETELEM, element_batch.NFNL_MSG_BATCH_END]
    assert [m[2] for m in msgs] == [1, 2, 3, 4, 5]
    assert all(m[1] & element_batch.NLM_F_ACK for m in msgs[1:-1])
    assert batch[0][18:20] == struct.pack(">H", nfnetlink.NFNL_SUBSYS_NFTABLES)  # res_id of BEGIN
    (key, data), = elements_of(msgs[1][3])
    assert key == nfnetlink.address_proto_port_key("2001:db8::1", "udp", 53) and data is None
    assert nfnetlink.string(msgs[2][3][nfnetlink.NFTA_SET_ELEM_LIST_SET]) == "portfw_direct_v4"
    assert nfnetlink.string(msgs[2][3][nfnetlink.NFTA_SET_ELEM_LIST_TABLE]) == render.TABLE
    (key, data), = elements_of(msgs[2][3])
    assert nfnetlink.address_proto_port_text(key) == "198.51.100.1 . tcp . 8080"
    assert data[nfnetlink.NFTA_DATA_VALUE] == bytes([10, 16, 0, 10, 0, 80, 0, 0])
    (key, data), = elements_of(msgs[3][3])
    verdict = nfnetlink.attributes(data[element_batch.NFTA_DATA_VERDICT])
    assert struct.unpack(">i", verdict[element_batch.NFTA_VERDICT_CODE]) == (element_batch.NFT_GOTO,)
    assert nfnetlink.string(verdict[element_batch.NFTA_VERDICT_CHAIN]) == "pf_4f3c27d2b3dd6693"


# nft's (inet_ntop's) text of an address, as render writes it
addresses_v4 = st.integers(0, 2 ** 32 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4, "big")))
addresses_v6 = st.integers(0, 2 ** 128 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")))
ports = st.integers(0, 65535)
protocols = st.sampled_from(sorted(nfnetlink.PROTOCOL_NUMBERS))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(addresses_v4, addresses_v6), protocols, ports, ports), min_size=1, max_size=3000))
def test_generated_elements_read_back_and_messages_stay_under_the_nla_limit(items):
    keys = {"%s . %s . %d" % (a, proto, port): "%s . %d" % (a, to_port) for a, proto, port, to_port in items}
    writer = element_batch.ElementWriter.__new__(element_batch.ElementWriter)
    writer.seq = 0
    batch = writer.messages([Op("add", "element", "portfw_direct_v4", sorted(keys.items()))])
    read = {}
    for _type, _flags, _seq, attrs in decode(batch)[1:-1]:
        assert len(attrs[element_batch.NFTA_SET_ELEM_LIST_ELEMENTS]) + 4 < 1 << 16
        for key, data in elements_of(attrs):
            value = data[nfnetlink.NFTA_DATA_VALUE]
            family = socket.AF_INET6 if len(value) == 20 else socket.AF_INET
            address = socket.inet_ntop(family, value[:-4])
            read[nfnetlink.address_proto_port_text(key)] = "%s . %d" % (address, int.from_bytes(value[-4:-2], "big"))
    assert read == keys
