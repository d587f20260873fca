"""masqd.portfw_batch without a kernel: which transactions it takes from libnftables
(`batch_ops`), and the bytes of the batch, read back with masqd.nfnetlink's decoder.
tests/lab/test_kernel_apply.py checks the same batches against the kernel and
libnftables' own encoding."""

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqd import nfnetlink, portfw_batch, render
from masqd.render import Chain, Op, Transaction

NEW_CHAIN = Chain("pf_00000000000000aa", None, ("meta l4proto tcp numgen inc mod 20 < 15 counter dnat ip to 10.16.0.27:80",
                                                "meta l4proto tcp counter dnat ip to 10.16.0.28:8080"))


def portfw_txn(*extra):
    return Transaction([Op("add", "chain", NEW_CHAIN.name, NEW_CHAIN)]
                       + [Op("add", "rule", NEW_CHAIN.name, r) for r in NEW_CHAIN.rules] + list(extra) + [
        Op("delete", "element", "portfw_direct_v4_4", ["198.51.100.1 . tcp . 80"]),
        Op("add", "element", "portfw_v4_0", [("198.51.100.1 . tcp . 80", "goto pf_00000000000000aa")]),
        Op("delete", "chain", "pf_00000000000000bb", None)])


def test_a_portfw_transaction_is_taken_whole():
    ops = portfw_batch.batch_ops(portfw_txn(Op("flush", "chain", "pf_00000000000000cc", None)))
    assert ops is not None and len(ops) == 7
    assert [attrs is not None for op, attrs in ops] == [op.kind == "rule" for op, _attrs in ops]


@pytest.mark.parametrize("op", [
    Op("add", "table", None, None),
    Op("add", "map", "mfw_marks", render.MapDef("mfw_marks", "map", "type mark : verdict;")),
    Op("add", "chain", "prerouting", Chain("prerouting", "type nat hook prerouting priority dstnat;", ())),
    Op("add", "element", "mfw_marks", [("3", "goto mfw_3")]),  # not a PORTFW map
    Op("add", "rule", "mfw_3", "meta mark 0x00000003 counter dnat ip to 10.16.0.3"),  # not a PORTFW rule shape
    Op("add", "rule", "pf_1", 'meta l4proto tcp counter dnat ip to 10.0.0.1:80; flush ruleset'),
    Op("add", "rule", "pf_1", "meta l4proto tcp counter dnat ip to [10.0.0.1]:80"),  # family and address disagree
    Op("add", "rule", "pf_1", "meta l4proto tcp counter dnat ip to 10.0.0.1:99999"),
    Op("flush", "map", "mfw_marks", "map"),  # not a PORTFW map
])
def test_anything_else_leaves_the_whole_transaction_to_libnftables(op):
    assert portfw_batch.batch_ops(portfw_txn(op)) is None


def expressions(attrs):
    """[(expression name, {attribute: payload})] and the userdata of a rule's attributes."""
    rule = nfnetlink.attributes(attrs)
    out = []
    for item in nfnetlink.attribute_list(rule[portfw_batch.NFTA_RULE_EXPRESSIONS]):
        expr = nfnetlink.attributes(item)
        out.append((nfnetlink.string(expr[portfw_batch.NFTA_EXPR_NAME]),
                    nfnetlink.attributes(expr.get(portfw_batch.NFTA_EXPR_DATA, b""))))
    return out, rule.get(portfw_batch.NFTA_RULE_USERDATA)


def u32(value):
    return struct.pack(">I", value)


def test_a_cascade_rule_is_nfts_expressions():
    exprs, userdata = expressions(portfw_batch.rule_attrs(
        'meta l4proto udp numgen inc mod 20 < 15 counter dnat ip6 to [fd00::1]:443 comment "phase 3"'))
    names = ["meta", "cmp", "numgen", "byteorder", "cmp", "counter", "immediate", "immediate", "nat"]
    assert [name for name, _attrs in exprs] == names
    assert nfnetlink.attributes(exprs[1][1][portfw_batch.NFTA_CMP_DATA])[1] == bytes((17,))
    assert exprs[2][1][portfw_batch.NFTA_NG_MODULUS] == u32(20)
    assert exprs[4][1][portfw_batch.NFTA_CMP_OP] == u32(portfw_batch.NFT_CMP_LT)
    assert nfnetlink.attributes(exprs[4][1][portfw_batch.NFTA_CMP_DATA])[1] == u32(15)
    assert nfnetlink.attributes(exprs[6][1][2])[1] == socket.inet_pton(socket.AF_INET6, "fd00::1")
    assert nfnetlink.attributes(exprs[7][1][2])[1] == (443).to_bytes(2, "big")
    assert exprs[8][1][portfw_batch.NFTA_NAT_FAMILY] == u32(socket.AF_INET6)
    assert userdata == b"\x00\x08phase 3\x00"
    last, userdata = expressions(portfw_batch.rule_attrs("meta l4proto tcp counter dnat ip to 10.16.0.28:8080"))
    assert [name for name, _attrs in last] == ["meta", "cmp", "counter", "immediate", "immediate", "nat"]
    assert userdata is None
    for text in render.reject_rules():
        exprs, _userdata = expressions(portfw_batch.rule_attrs(text))
        assert exprs[-1][0] == "reject"


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
    for item in nfnetlink.attribute_list(attrs[portfw_batch.NFTA_SET_ELEM_LIST_ELEMENTS]):
        elem = nfnetlink.attributes(item)
        key = nfnetlink.attributes(elem[nfnetlink.NFTA_SET_ELEM_KEY])[nfnetlink.NFTA_DATA_VALUE]
        data = elem.get(portfw_batch.NFTA_SET_ELEM_DATA)
        out.append((key, None if data is None else nfnetlink.attributes(data)))
    return out


def writer():
    out = portfw_batch.BatchWriter.__new__(portfw_batch.BatchWriter)  # no socket needed
    out.seq = 0
    return out


def test_batch_layout_and_one_element_of_each_kind():
    batch = writer().messages(portfw_batch.batch_ops(Transaction([
        Op("add", "chain", NEW_CHAIN.name, NEW_CHAIN),
        Op("add", "rule", NEW_CHAIN.name, NEW_CHAIN.rules[1]),
        Op("delete", "element", "portfw_direct_v6_5", ["2001:db8::1 . udp . 53"]),
        Op("add", "element", "portfw_direct_v4_4", [("198.51.100.1 . tcp . 8080", "10.16.0.10 . 80")]),
        Op("add", "element", "portfw_v4_0", [("203.0.113.1 . udp . 1024", "goto pf_00000000000000aa")]),
        Op("flush", "chain", "pf_00000000000000cc", None),
        Op("delete", "chain", "pf_00000000000000bb", None),
    ])))
    msgs = decode(batch)
    subsys = nfnetlink.NFNL_SUBSYS_NFTABLES << 8
    assert [m[0] & 0xFF if m[0] & subsys else m[0] for m in msgs] == [
        portfw_batch.NFNL_MSG_BATCH_BEGIN, portfw_batch.NFT_MSG_NEWCHAIN, portfw_batch.NFT_MSG_NEWRULE,
        portfw_batch.NFT_MSG_DELSETELEM, portfw_batch.NFT_MSG_NEWSETELEM, portfw_batch.NFT_MSG_NEWSETELEM,
        portfw_batch.NFT_MSG_DELRULE, portfw_batch.NFT_MSG_DELCHAIN, portfw_batch.NFNL_MSG_BATCH_END]
    assert [m[2] for m in msgs] == list(range(1, 10))
    assert [bool(m[1] & portfw_batch.NLM_F_ACK) for m in msgs] == [False] * 7 + [True, False]  # the last one only
    assert msgs[2][1] & portfw_batch.NLM_F_APPEND and msgs[1][1] & portfw_batch.NLM_F_CREATE
    assert batch[0][18:20] == struct.pack(">H", nfnetlink.NFNL_SUBSYS_NFTABLES)  # res_id of BEGIN
    assert nfnetlink.string(msgs[1][3][portfw_batch.NFTA_CHAIN_NAME]) == NEW_CHAIN.name
    assert nfnetlink.string(msgs[6][3][portfw_batch.NFTA_RULE_CHAIN]) == "pf_00000000000000cc"
    (key, data), = elements_of(msgs[3][3])
    assert key == nfnetlink.address_proto_port_key("2001:db8::1", "udp", 53) and data is None
    assert nfnetlink.string(msgs[4][3][nfnetlink.NFTA_SET_ELEM_LIST_SET]) == "portfw_direct_v4_4"
    assert nfnetlink.string(msgs[4][3][nfnetlink.NFTA_SET_ELEM_LIST_TABLE]) == render.TABLE
    # a multi-backend key's element and chains go to its shard's table (render.table_of)
    assert {nfnetlink.string(msgs[i][3][1]) for i in (1, 2, 5, 6, 7)} == {"masqd_portfw_0"}
    (key, data), = elements_of(msgs[4][3])
    assert nfnetlink.address_proto_port_text(key) == "198.51.100.1 . tcp . 8080"
    assert data[nfnetlink.NFTA_DATA_VALUE] == bytes([10, 16, 0, 10, 0, 80, 0, 0])
    (key, data), = elements_of(msgs[5][3])
    verdict = nfnetlink.attributes(data[portfw_batch.NFTA_DATA_VERDICT])
    assert struct.unpack(">i", verdict[portfw_batch.NFTA_VERDICT_CODE]) == (portfw_batch.NFT_GOTO,)
    assert nfnetlink.string(verdict[portfw_batch.NFTA_VERDICT_CHAIN]) == "pf_00000000000000aa"


def test_a_flushed_map_is_a_deletion_that_names_no_element():
    ops = portfw_batch.batch_ops(Transaction([Op("flush", "map", "portfw_direct_v6_7", "map")]))
    (_begin, (msg_type, _flags, _seq, attrs), _end) = decode(writer().messages(ops))
    assert msg_type & 0xFF == portfw_batch.NFT_MSG_DELSETELEM
    assert nfnetlink.string(attrs[nfnetlink.NFTA_SET_ELEM_LIST_SET]) == "portfw_direct_v6_7"
    assert nfnetlink.NFTA_SET_ELEM_LIST_ELEMENTS not in attrs


# nft's (inet_ntop's) text of an address, as render writes it
addresses_v4 = st.integers(0, 2 ** 32 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4, "big")))
addresses_v6 = st.integers(0, 2 ** 128 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")))
ports = st.integers(0, 65535)
protocols = st.sampled_from(sorted(nfnetlink.PROTOCOL_NUMBERS))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(addresses_v4, addresses_v6), protocols, ports, ports), min_size=1, max_size=3000))
def test_generated_elements_read_back_and_messages_stay_under_the_nla_limit(items):
    keys = {"%s . %s . %d" % (a, proto, port): "%s . %d" % (a, to_port) for a, proto, port, to_port in items}
    batch = writer().messages([(Op("add", "element", "portfw_direct_v4_0", sorted(keys.items())), None)])
    read = {}
    for _type, _flags, _seq, attrs in decode(batch)[1:-1]:
        assert len(attrs[portfw_batch.NFTA_SET_ELEM_LIST_ELEMENTS]) + 4 < 1 << 16
        for key, data in elements_of(attrs):
            value = data[nfnetlink.NFTA_DATA_VALUE]
            family = socket.AF_INET6 if len(value) == 20 else socket.AF_INET
            address = socket.inet_ntop(family, value[:-4])
            read[nfnetlink.address_proto_port_text(key)] = "%s . %d" % (address, int.from_bytes(value[-4:-2], "big"))
    assert read == keys


@settings(max_examples=200, deadline=None)
@given(st.one_of(addresses_v4, addresses_v6), ports, st.sampled_from(["tcp", "udp"]), st.integers(1, 65535),
       st.integers(0, 65535), st.one_of(st.none(), st.integers(1, 10 ** 6)))
def test_generated_cascade_rules_encode_their_values(address, port, proto, modulus, below, phase):
    v6 = ":" in address
    target = "[%s]:%d" % (address, port) if v6 else "%s:%d" % (address, port)
    family = "ip6" if v6 else "ip"
    text = "meta l4proto %s numgen inc mod %d < %d counter dnat %s to %s" % (proto, modulus, below, family, target)
    if phase is not None:
        text += ' comment "phase %d"' % phase
    exprs, userdata = expressions(portfw_batch.rule_attrs(text))
    assert exprs[2][1][portfw_batch.NFTA_NG_MODULUS] == u32(modulus)
    assert nfnetlink.attributes(exprs[4][1][portfw_batch.NFTA_CMP_DATA])[1] == u32(below)
    raw = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, address)
    assert nfnetlink.attributes(exprs[6][1][2])[1] == raw
    assert nfnetlink.attributes(exprs[7][1][2])[1] == port.to_bytes(2, "big")
    assert userdata == (None if phase is None else bytes((0, len("phase %d" % phase) + 1)) + b"phase %d\0" % phase)
