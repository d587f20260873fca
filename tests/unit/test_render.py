"""Rendering: golden rulesets of the seed's scenarios, the kernel's schedule, and
incremental diffs ("after this change the table holds exactly this").

Regenerate the goldens with MASQD_REGEN_GOLDEN=1 after an intended change, and
review the diff of tests/unit/golden/."""

import os
import re

import pytest

from masqd import model, portfw_batch, render
from masqd.nft import FakeNftables, NftError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def tables(**raw):
    out = {t: {} for t in model.TABLES}
    for table, entries in raw.items():
        out[table] = model.normalize_table(table, entries)
    return out


WEB = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
       "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15},
                    {"address": "10.16.0.28", "port": 80, "pref": 5}]}

SCENARIOS = {
    # ipmasqadm portfw -a -P tcp -L extip 80 -R .27 80 -p 15 / -R .28 80 -p 5, + MASQ replies
    "portfw_web_15_5": tables(portfw=[WEB], masquerade=[
        {"name": "web27", "source": "10.16.0.27/32", "protocol": "tcp", "source_ports": [80]},
        {"name": "web28", "source": "10.16.0.28/32", "protocol": "tcp", "source_ports": [80]}]),
    # ipchains -I input -s FRIEND -m 1 / -s ! FRIEND -m 3; mfw -I -m 3 -r NEUTRAL; -m 1 -r FRIEND_SVR
    "fwmark_friend_neutral": tables(
        marks=[{"name": "friend", "mark": 1, "source": "203.0.113.0/24"},
               {"name": "neutral", "mark": 3, "source": "203.0.113.0/24", "source_invert": True}],
        mfw=[{"mark": 3, "backends": [{"address": "10.16.15.46"}]},
             {"mark": 1, "backends": [{"address": "10.16.17.3"}]}],
        masquerade=[{"name": "friend-replies", "source": "10.16.17.3/32", "destination": "203.0.113.0/24"},
                    {"name": "neutral-replies", "source": "10.16.15.46/32"}]),
    # failover: every pref 0, the head keeps every connection until `schedule`
    "mfw_failover_pref0": tables(mfw=[{"mark": 7, "backends": [
        {"address": "10.16.0.27", "pref": 0}, {"address": "10.16.0.28", "pref": 0}]}]),
    # ipmasqadm autofw -A -r udp 6970 7170 -h .27 ; plus one control-port entry (its maps, chain and refresh)
    "autofw_hidden_host": tables(autofw=[
        {"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27"},
        {"protocol": "tcp", "low_port": 7000, "high_port": 7000, "hidden_host": "fd00::27"},
        {"protocol": "udp", "low_port": 9000, "high_port": 9100, "control_protocol": "tcp", "control_port": 7070}]),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden(name):
    text = render.render(SCENARIOS[name]).dump()
    path = os.path.join(GOLDEN, name + ".nft")
    if os.environ.get("MASQD_REGEN_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()


# --- the kernel's per-connection schedule, simulated from the rendered rules ------------

_NUMGEN = re.compile(r"numgen inc mod (\d+) < (\d+)")
_TARGET = re.compile(r"dnat ip6? to (\S+)")


def simulate(rules, connections):
    """What `numgen inc` does: a counter per rule, bumped when the rule is evaluated."""
    counters = [0] * len(rules)
    picked = []
    for _connection in range(connections):
        for i, rule in enumerate(rules):
            m = _NUMGEN.search(rule)
            if m:
                value = counters[i] % int(m.group(1))
                counters[i] += 1
                if value >= int(m.group(2)):
                    continue
            picked.append(_TARGET.search(rule).group(1))
            break
    return picked


def portfw_rules(backends):
    entry = model.normalize_entry("portfw", dict(WEB, backends=backends))
    frag = render.portfw_fragment(entry)
    (chain,) = frag.chains.values()
    return chain.rules


def test_schedule_15_5():
    picked = simulate(portfw_rules(WEB["backends"]), 40)
    assert picked == (["10.16.0.27:80"] * 15 + ["10.16.0.28:80"] * 5) * 2


def test_schedule_round_robin_three():
    backends = [{"address": "10.0.0.%d" % i, "port": 80, "pref": 1} for i in (1, 2, 3)]
    assert simulate(portfw_rules(backends), 6) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"] * 2


def test_schedule_weights_three():
    backends = [{"address": "10.0.0.1", "port": 80, "pref": 3}, {"address": "10.0.0.2", "port": 80, "pref": 1},
                {"address": "10.0.0.3", "port": 80, "pref": 2}]
    assert simulate(portfw_rules(backends), 12) == (["10.0.0.1:80"] * 3 + ["10.0.0.2:80"] + ["10.0.0.3:80"] * 2) * 2


def test_single_backend_uses_direct_map_without_chain():
    entry = model.normalize_entry("portfw", dict(WEB, backends=WEB["backends"][:1]))
    frag = render.portfw_fragment(entry)
    assert frag.chains == {}
    assert frag.elements == {"portfw_direct_v4_4": {"198.51.100.1 . tcp . 80": "10.16.0.27 . 80"}}  # .1, port 80: 1 . 0


def test_pref0_settles_on_first_pref0():
    entry = model.normalize_entry("mfw", {"mark": 5, "backends": [
        {"address": "10.0.0.1", "pref": 5}, {"address": "10.0.0.2", "pref": 0}, {"address": "10.0.0.3", "pref": 0}]})
    assert render.mfw_fragment(entry).chains["mfw_5"].rules == ("counter dnat ip to 10.0.0.2",)
    moved = render.mfw_fragment(entry, head={"address": "10.0.0.3", "port": None})
    assert moved.chains["mfw_5"].rules == ("counter dnat ip to 10.0.0.3",)


def test_chain_names_never_contain_user_strings():
    frag = render.portfw_fragment(model.normalize_entry("portfw", WEB))
    (name,) = frag.chains
    assert re.fullmatch(r"pf_[0-9a-f]{16}", name)


# --- incremental diffs against the fake kernel -------------------------------------------

def key_entry(i, backends=2):
    return {"protocol": "tcp", "local_address": "198.51.100.%d" % (i + 1), "local_port": 80,
            "backends": [{"address": "10.0.%d.%d" % (i, b + 1), "port": 80, "pref": 1} for b in range(backends)]}


def loaded(n):
    state = tables(portfw=[key_entry(i) for i in range(n)])
    rs = render.render(state)
    fake = FakeNftables()
    fake.apply(render.full_sync(rs))
    return state, rs, fake


def test_full_sync_equals_render():
    _state, rs, fake = loaded(20)
    assert fake.dump() == rs.dump()


def test_add_one_key_touches_only_its_objects():
    state, rs, fake = loaded(50)
    entry = model.normalize_entry("portfw", key_entry(60))
    key = model.entry_key("portfw", entry)
    new = rs.replace({("portfw", key): render.portfw_fragment(entry)})
    txn = render.diff(rs, new, {("portfw", key)})
    chain = render.portfw_chain_name(key)
    assert [(op.verb, op.kind, op.name) for op in txn.ops] == [
        ("add", "chain", chain), ("add", "rule", chain), ("add", "rule", chain),
        ("add", "element", render.cascade_map("v4", render.shard_of(chain)))]
    assert txn.ops[-1].arg == [("198.51.100.61 . tcp . 80", "goto " + chain)]
    fake.apply(txn)
    assert fake.dump() == new.dump()


def test_remove_and_change_key():
    state, rs, fake = loaded(10)
    keys = list(state["portfw"])
    changed = model.normalize_entry("portfw", key_entry(3, backends=1))
    new = rs.replace({("portfw", keys[2]): None, ("portfw", keys[3]): render.portfw_fragment(changed)})
    txn = render.diff(rs, new, {("portfw", keys[2]), ("portfw", keys[3])})
    ops = [(op.verb, op.kind, op.name) for op in txn.ops]
    gone = sorted({render.cascade_map("v4", render.shard_of(render.portfw_chain_name(k))) for k in keys[2:4]})
    assert ops == [("delete", "element", name) for name in gone] + [("add", "element", render.direct_map(
        changed["local_address"], changed["local_port"]))] + sorted(
        ("delete", "chain", render.portfw_chain_name(k)) for k in keys[2:4])
    fake.apply(txn)
    assert fake.dump() == new.dump()
    assert render.diff(new, new, None).ops == []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sync_in_place_leaves_what_a_full_sync_leaves(scenario):
    """From an older table with other keys, other marks and junk, the two steps of
    sync_in_place give the full sync's table; the first leaves every PORTFW element and
    cascade chain as it was (they keep forwarding), and the second is one PORTFW batch."""
    old_state = tables(portfw=[key_entry(i, backends=1 + i % 2) for i in range(12)],
                       mfw=[{"mark": 9, "backends": [{"address": "10.16.0.9"}]}])
    old = render.render(old_state)
    fake = FakeNftables()
    fake.apply(render.full_sync(old))
    fake.apply(render.Transaction([render.Op("add", "chain", "junk", render.Chain("junk", None, ())),
                                   render.Op("add", "rule", "junk", "counter")]))
    new = render.render(SCENARIOS[scenario])
    kernel = fake.read_table()
    rest, keys = render.sync_in_place(new, kernel.kinds, [name for kind, name in kernel.shape if kind == "chain"])
    portfw_before = {n: e for n, e in fake.elements.items() if n in render.PORTFW_MAPS}
    cascades_before = {n: c for n, c in fake.chains.items() if n.startswith("pf_")}
    fake.apply(rest)
    assert {n: e for n, e in fake.elements.items() if n in render.PORTFW_MAPS} == portfw_before
    assert {n: c for n, c in fake.chains.items() if n.startswith("pf_")} == cascades_before
    assert portfw_batch.batch_ops(keys) is not None
    fake.apply(keys)
    whole = FakeNftables()
    whole.apply(render.full_sync(new))
    assert fake.dump() == whole.dump()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sync_in_two_from_no_table_leaves_what_a_full_sync_leaves(scenario):
    ruleset = render.render(SCENARIOS[scenario])
    rest, keys = render.sync_in_two(ruleset, None, ())
    assert portfw_batch.batch_ops(keys) is not None or not keys
    fake, whole = FakeNftables(), FakeNftables()
    fake.apply(rest)
    fake.apply(keys)
    whole.apply(render.full_sync(ruleset))
    assert fake.dump() == whole.dump()


def test_sync_in_place_needs_the_portfw_maps():
    _state, rs, fake = loaded(3)
    kernel = fake.read_table()
    del kernel.kinds["portfw_direct_v4_0"]
    assert render.sync_in_place(rs, kernel.kinds, ["prerouting"]) is None


def test_fake_kernel_is_atomic_and_strict():
    _state, rs, fake = loaded(3)
    before = fake.dump()
    bad = render.Transaction([render.Op("add", "element", "portfw_v4", [("198.51.100.99 . tcp . 1", "goto nope")])])
    ok_then_bad = render.Transaction([render.Op("add", "chain", "x", render.Chain("x", None, ()))] + bad.ops)
    for txn in (bad, ok_then_bad):
        with pytest.raises(NftError):
            fake.apply(txn)
        assert fake.dump() == before


def test_text_of_transaction():
    entry = model.normalize_entry("portfw", WEB)
    new = render.Ruleset().replace({"x": render.portfw_fragment(entry)})
    text = render.diff(render.Ruleset(), new).to_text()
    name = render.portfw_chain_name(model.entry_key("portfw", entry))
    shard = render.shard_of(name)
    assert text == (
        "add chain inet masqd_portfw_%d %s\n"
        "add rule inet masqd_portfw_%d %s meta l4proto tcp numgen inc mod 20 < 15 counter dnat ip to 10.16.0.27:80\n"
        "add rule inet masqd_portfw_%d %s meta l4proto tcp counter dnat ip to 10.16.0.28:80\n"
        "add element inet masqd_portfw_%d portfw_v4_%d { 198.51.100.1 . tcp . 80 : goto %s }\n"
        % (shard, name, shard, name, shard, name, shard, shard, name))


def test_marks_render_criteria_and_restore_rule():
    state = tables(marks=[{"name": "web", "mark": 9, "protocol": "tcp", "destination_ports": [443, "80-81", 82],
                           "destination": "2001:db8::/32", "destination_invert": True, "input_interface": "lan0"}])
    frag = render.marks_fragment(list(state["marks"].values()))
    assert frag.chains["mark_classify"].rules == (
        'iifname "lan0" ip6 daddr != 2001:db8::/32 meta l4proto tcp th dport { 80-82, 443 } '
        'counter meta mark set 9 ct mark set 9 return',)
    assert frag.elements == {"mark_values": {"9": None}}


def _simulate(segments, n):
    """Backends the kernel's cascade picks for n connections: rule i has its own
    numgen counter and takes `numgen mod rest < pref` of what reaches it."""
    counters = [0] * len(segments)
    out = []
    for _connection in range(n):
        rest = sum(b["pref"] for b in segments)
        for i, b in enumerate(segments):
            if i == len(segments) - 1:
                out.append(b["address"])
                break
            hit = counters[i] % rest < b["pref"]
            counters[i] += 1
            if hit:
                out.append(b["address"])
                break
            rest -= b["pref"]
    return out


@pytest.mark.parametrize("prefs", [(15, 5), (1, 1, 1), (3, 1, 2), (7,), (2, 9, 4, 1)])
def test_a_rotated_cascade_continues_the_sequence_exactly(prefs):
    backends = [{"address": "10.0.0.%d" % (i + 1), "port": 80, "pref": p} for i, p in enumerate(prefs)]
    total = sum(prefs)
    reference = _simulate(backends, 3 * total + 50)
    for phase in range(total):
        rotated = render.rotate(backends, phase)
        assert _simulate(rotated, 2 * total) == reference[phase:phase + 2 * total], phase
        assert render.cycle_position(backends, phase, [0] * len(rotated)) == phase


def test_the_seeds_15_5_rebuilt_after_8_connections():
    backends = [{"address": "10.16.0.27", "port": 80, "pref": 15}, {"address": "10.16.0.28", "port": 80, "pref": 5}]
    rules = render.cascade_rules(backends, lambda b: "meta l4proto tcp", phase=8)
    assert rules == [
        'meta l4proto tcp numgen inc mod 20 < 7 counter dnat ip to 10.16.0.27:80 comment "phase 8"',
        "meta l4proto tcp numgen inc mod 13 < 5 counter dnat ip to 10.16.0.28:80",
        "meta l4proto tcp counter dnat ip to 10.16.0.27:80"]
    # 7 more connections (all to .27) put the cycle at 15: the head is .28.
    assert render.cycle_position(backends, 8, [7, 0, 0]) == 15
    assert render.cycle_position(backends, 8, [7, 0]) is None  # not this cascade's rules


def test_multi_backend_keys_live_in_their_shard_tables():
    """A cascade chain, the verdict map that jumps to it and that map's prerouting chain
    are in one table (a `goto` stays inside its table), the keys reach every shard, and
    a full sync replaces every table; everything else is in the main table."""
    rs = render.render(tables(portfw=[key_entry(i, backends=1 + i % 2) for i in range(200)]))
    chains, maps, elements = rs.objects()
    gotos = [(name, value[5:]) for name, elems in elements.items() for value in elems.values()
             if value and value.startswith("goto ")]
    assert gotos and all(render.table_of(name) == render.table_of(chain) for name, chain in gotos)
    assert {render.table_of(name) for name, _chain in gotos if name.startswith("portfw_")} == set(render.SHARD_TABLES)
    for n in range(render.PORTFW_SHARDS):
        hook = chains["portfw_prerouting_%d" % n]
        assert render.table_of(hook.name) == render.SHARD_TABLES[n] and "priority dstnat - 1" in hook.hook
        assert all("@portfw_v%s_%d" % (fam, n) in rule for fam, rule in zip("46", hook.rules))
    assert all(render.table_of(name) == render.TABLE for name in list(maps) + list(chains)
               if not name.startswith(("pf_", "portfw_v4_", "portfw_v6_", "portfw_prerouting_")))
    text = render.full_sync(rs).to_text()
    assert all("add table inet %s\ndelete table inet %s\nadd table inet %s\n" % (t, t, t) in text
               for t in render.TABLES)
