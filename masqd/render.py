"""Desired state -> the `inet masqd` nftables table (and the PORTFW shard tables of
multi-backend keys, `SHARD_TABLES`), as typed objects, and diffs of them.

knftables-style: a Ruleset is a set of Fragments (one per AUTOFW entry, mfw mark,
plus the whole marks and masquerade tables and the fixed skeleton) and the PORTFW
table. Each Fragment holds Chains, Map definitions and map Elements. PORTFW keys (up to
1,000,000) are not kept rendered: a key renders on demand to one map element, plus a
chain for a multi-backend key (`portfw_items`), so memory holds each key once, as its
canonical entry. `diff(old, new, fids)` turns the difference of some fragments (fid
("portfw", key) for a PORTFW key) into a Transaction: typed ops, applied atomically by
a backend (masqd.nft). A single-key change diffs one fragment, so its cost does not
depend on how many keys are loaded.

Rule text is built only from validated, canonical values (ipaddress strings, ints,
protocol names from a closed list, interface names checked by model.interface), never
from raw user strings. Chain names come from stable ids: a hash of the PORTFW key, the
mfw mark number, or fixed names.
"""

import functools
import hashlib
from collections import namedtuple

FAMILY = "inet"
TABLE = "masqd"

# PORTFW keys with several backends live in PORTFW_SHARDS tables of their own, picked by
# their cascade chain's name (`shard_of`), each with its verdict maps (`portfw_v4_<n>`,
# `portfw_v6_<n>`) and a prerouting hook (`portfw_prerouting_<n>`). Adding a `goto`
# element or a NAT rule makes the kernel validate the whole table at commit, walking
# every chain its verdict maps reach: 85 ms per two-backend add at 100,000 such keys in
# one table, 10 ms in eight (measured with masqd's batch, 2026-12-06). Object names are
# unique across the tables, so a name says its table (`table_of`) and everything else
# (Fragments, diff, the kernel readings) sees one merged set of names.
PORTFW_SHARDS = 8
SHARD_TABLES = tuple("masqd_portfw_%d" % n for n in range(PORTFW_SHARDS))
TABLES = (TABLE,) + SHARD_TABLES
_SHARD_PREFIXES = ("portfw_v4_", "portfw_v6_", "portfw_prerouting_")


def shard_of(chain_name):
    """The shard of a cascade chain (`portfw_chain_name`: "pf_" and 16 hex digits)."""
    return int(chain_name[3:5], 16) % PORTFW_SHARDS


def table_of(name):
    """The table that holds the chain, map or set called `name`."""
    if name.startswith("pf_"):
        return SHARD_TABLES[shard_of(name)]
    if name.startswith(_SHARD_PREFIXES):
        return SHARD_TABLES[int(name.rpartition("_")[2])]
    return TABLE


Chain = namedtuple("Chain", "name hook rules")  # hook: None or "type nat hook ... policy accept"
MapDef = namedtuple("MapDef", "name kind spec")  # kind: "map" | "set"; spec: "type ...; flags ...;"


class Fragment:
    """The nft objects one piece of state owns."""

    __slots__ = ("chains", "maps", "elements")

    def __init__(self, chains=(), maps=(), elements=None):
        self.chains = {c.name: c for c in chains}
        self.maps = {m.name: m for m in maps}
        self.elements = elements or {}  # map name -> {key text: value text or None (sets)}

    def __eq__(self, other):
        return (isinstance(other, Fragment) and self.chains == other.chains
                and self.maps == other.maps and self.elements == other.elements)


EMPTY = Fragment()


class Ruleset:
    """The whole table: fragment id -> Fragment, and `portfw` {key: canonical entry}
    (the service's own PORTFW table, shared, never copied or mutated here). A PORTFW
    key's fid is ("portfw", key); an explicit fragment under that fid wins (tests).

    `phases` {fid: connections into the cycle} holds the schedules that were rebuilt
    mid-cycle (a restart or re-sync continues them, see `rotate`); a fragment that is
    replaced starts its schedule afresh.

    `down` {fid: frozenset of (address, port)}: the backends health checks found down
    (runtime state, docs/health.md); they are left out of the key's schedule."""

    def __init__(self, fragments=None, portfw=None, phases=None, down=None):
        self.fragments = fragments or {}
        self.portfw = portfw if portfw is not None else {}
        self.phases = phases or {}
        self.down = down or {}

    def fragment(self, fid):
        frag = self.fragments.get(fid)
        if frag is None:
            entry = self.portfw.get(fid[1]) if _is_portfw(fid) else None
            return EMPTY if entry is None else portfw_fragment(entry, self.phases.get(fid, 0), self.down.get(fid))
        return frag

    def portfw_items(self, key):
        entry = self.portfw.get(key)
        fid = ("portfw", key)
        return None if entry is None else portfw_items(entry, self.phases.get(fid, 0), self.down.get(fid))

    def replace(self, changes, portfw=None, touched=(), down=None):
        """A new Ruleset with some fragments replaced (None removes one) and, when
        given, another PORTFW table and `down` map. Fragments in `changes` and the fids
        `touched` lose their phase."""
        fragments = dict(self.fragments)
        table = self.portfw if portfw is None else portfw
        phases = self.phases
        if phases and (changes or touched):
            phases = {fid: p for fid, p in phases.items() if fid not in changes and fid not in touched}
        copied = False
        for fid, frag in changes.items():
            if _is_portfw(fid) and fid[1] in table:
                if not copied:
                    table, copied = dict(table), True
                del table[fid[1]]
            if frag is None or frag == EMPTY:
                fragments.pop(fid, None)
            else:
                fragments[fid] = frag
        return Ruleset(fragments, table, phases, self.down if down is None else down)

    def fids(self):
        return set(self.fragments) | {("portfw", key) for key in self.portfw}

    def objects(self):
        """Merged view: (chains, maps, elements) as the kernel would hold them."""
        chains, maps, elements = {}, {}, {}
        pending = True  # PORTFW between the skeleton/marks/masquerade and autofw/mfw, as
        for fid, frag in self.fragments.items():  # render orders them (listing order)
            if pending and isinstance(fid, tuple) and fid[0] in ("autofw", "mfw"):
                self._portfw_objects(chains, elements)
                pending = False
            chains.update(frag.chains)
            maps.update(frag.maps)
            for name, elems in frag.elements.items():
                elements.setdefault(name, {}).update(elems)
        if pending:
            self._portfw_objects(chains, elements)
        return chains, maps, elements

    def _portfw_objects(self, chains, elements):
        phases, down = self.phases, self.down
        for key, entry in self.portfw.items():
            fid = ("portfw", key)
            name, key, value, chain = portfw_items(entry, phases.get(fid, 0) if phases else 0,
                                                   down.get(fid) if down else None)
            elements.setdefault(name, {})[key] = value
            if chain is not None:
                chains[chain.name] = chain

    def dump(self):
        return dump(*self.objects())


def _is_portfw(fid):
    return isinstance(fid, tuple) and fid[0] == "portfw"


# --- transactions ---------------------------------------------------------------------

Op = namedtuple("Op", "verb kind name arg")
# verbs/kinds: add table, delete table (name: the table, None for TABLE), add map (arg MapDef), delete map, add chain
# (arg Chain: declares it), flush chain, add rule (arg rule text), delete chain,
# add element (arg [(key, value)]), delete element (arg [key]).


class Transaction:
    """An ordered list of Ops, applied by a backend as one atomic nft transaction."""

    def __init__(self, ops=None):
        self.ops = ops or []

    def __bool__(self):
        return bool(self.ops)

    def __len__(self):
        return len(self.ops)

    def to_text(self):
        lines = []
        for op in self.ops:
            lines.append(_op_text(op))
        return "\n".join(lines) + ("\n" if lines else "")


def _op_text(op):
    if op.kind == "table":
        return "%s table %s %s" % (op.verb, FAMILY, op.name or TABLE)
    where = "%s %s" % (FAMILY, table_of(op.name))
    if op.kind == "map":
        if op.verb == "add":
            return "add %s %s %s { %s }" % (op.arg.kind, where, op.name, op.arg.spec)
        return "%s %s %s %s" % (op.verb, op.arg, where, op.name)  # delete, or flush (its elements)
    if op.kind == "chain":
        if op.verb == "add" and op.arg.hook:
            return "add chain %s %s { %s }" % (where, op.name, op.arg.hook)
        return "%s chain %s %s" % (op.verb, where, op.name)
    if op.kind == "rule":
        return "add rule %s %s %s" % (where, op.name, op.arg)
    if op.kind == "element":
        if op.verb == "add":
            items = ", ".join(k if v is None else "%s : %s" % (k, v) for k, v in op.arg)
        else:
            items = ", ".join(op.arg)
        return "%s element %s %s { %s }" % (op.verb, where, op.name, items)
    raise ValueError("unknown op %r" % (op,))


def full_sync(ruleset):
    """Delete and recreate the tables in one transaction (start, and after failures)."""
    chains, maps, elements = ruleset.objects()
    ops = [Op(verb, "table", name, None) for name in TABLES for verb in ("add", "delete", "add")]
    ops += [Op("add", "map", m.name, m) for m in maps.values()]
    ops += [Op("add", "chain", c.name, c) for c in chains.values()]
    for c in chains.values():
        ops += [Op("add", "rule", c.name, r) for r in c.rules]
    ops += [Op("add", "element", name, sorted(elems.items()))
            for name, elems in elements.items() if elems]
    return Transaction(ops)


def sync_in_two(ruleset, kernel_kinds, kernel_chains):
    """full_sync as two Transactions: everything but the PORTFW keys (for libnftables),
    then the keys (one PORTFW batch). With no table in the kernel (`kernel_kinds`
    None) nothing of ours forwards yet: the rest of the table, then the keys' diff from
    none. Otherwise sync_in_place."""
    if kernel_kinds is None:
        rest = Ruleset(ruleset.fragments, {}, ruleset.phases, ruleset.down)
        return full_sync(rest), diff(rest, ruleset, [("portfw", key) for key in ruleset.portfw])
    return sync_in_place(ruleset, kernel_kinds, kernel_chains)


def sync_in_place(ruleset, kernel_kinds, kernel_chains):
    """full_sync for a table the kernel holds (its objects `kernel_kinds` {map, set or
    object name: kind} and chains `kernel_chains`) without a moment of PORTFW forwarding
    lost, as two Transactions; None when the kernel lacks one of PORTFW_MAPS.

    `rest` replaces everything but the PORTFW maps and the cascade chains, which keep
    forwarding meanwhile: every other chain flushed and deleted, every other map, set
    and object deleted, then the rendering's added. `keys` (one PORTFW batch) then
    empties the PORTFW maps, flushes the cascade chains to keep (deletes the others),
    adds the new ones, their rules and every key's element, atomically."""
    if not PORTFW_MAPS <= set(kernel_kinds):
        return None
    chains, maps, elements = ruleset.objects()
    cascade = _is_cascade_chain
    others = [name for name in kernel_chains if not cascade(name)]
    rest = [Op("flush", "chain", name, None) for name in others]
    rest += [Op("delete", "map", name, kind) for name, kind in kernel_kinds.items() if name not in PORTFW_MAPS]
    rest += [Op("delete", "chain", name, None) for name in others]
    rest += [Op("add", "map", m.name, m) for m in maps.values() if m.name not in PORTFW_MAPS]
    kept = [c for c in chains.values() if not cascade(c.name)]
    rest += [Op("add", "chain", c.name, c) for c in kept]
    rest += [Op("add", "rule", c.name, r) for c in kept for r in c.rules]
    rest += [Op("add", "element", name, sorted(elems.items()))
             for name, elems in elements.items() if elems and name not in PORTFW_MAPS]
    keys = [Op("flush", "map", name, "map") for name in sorted(PORTFW_MAPS)]
    keys += [Op("flush" if name in chains else "delete", "chain", name, None)
             for name in kernel_chains if cascade(name)]
    built = [c for c in chains.values() if cascade(c.name)]
    keys += [Op("add", "chain", c.name, c) for c in built if c.name not in kernel_chains]
    keys += [Op("add", "rule", c.name, r) for c in built for r in c.rules]
    keys += [Op("add", "element", name, sorted(elems.items()))
             for name, elems in elements.items() if elems and name in PORTFW_MAPS]
    return Transaction(rest), Transaction(keys)


def _is_cascade_chain(name):
    return name.startswith("pf_")  # portfw_chain_name


def diff(old, new, fids=None):
    """Transaction turning `old` into `new`, looking only at fragments `fids` (all if None).

    Order keeps every intermediate reference valid: new maps and chains first, element
    deletions before additions (a changed value is delete+add), chains and maps that
    nothing references any more last. Elements of one map are one statement, in the
    order of `fids` (give a list for a deterministic text)."""
    if fids is None:
        fids = old.fids() | new.fids()
    add_maps, add_chains, rules, del_chains, del_maps = [], [], [], [], []
    del_elems, add_elems = {}, {}
    for fid in fids:
        if _is_portfw(fid) and fid not in old.fragments and fid not in new.fragments:
            a, b = old.portfw.get(fid[1]), new.portfw.get(fid[1])
            if a is not b or old.phases.get(fid) != new.phases.get(fid) or old.down.get(fid) != new.down.get(fid):
                _portfw_diff(old.portfw_items(fid[1]), new.portfw_items(fid[1]),
                             add_chains, rules, del_elems, add_elems, del_chains)
            continue
        a, b = old.fragment(fid), new.fragment(fid)
        if a is b:
            continue
        for name, m in b.maps.items():
            if a.maps.get(name) != m:
                if name in a.maps:
                    del_maps.append(Op("delete", "map", name, a.maps[name].kind))
                add_maps.append(Op("add", "map", name, m))
        for name, m in a.maps.items():
            if name not in b.maps:
                del_maps.append(Op("delete", "map", name, m.kind))
        for name, c in b.chains.items():
            _chain_diff(a.chains.get(name), c, add_chains, rules)
        for name in a.chains:
            if name not in b.chains:
                del_chains.append(Op("delete", "chain", name, None))
        for name in set(a.elements) | set(b.elements):
            ea, eb = a.elements.get(name, {}), b.elements.get(name, {})
            gone = [k for k, v in ea.items() if k not in eb or eb[k] != v]
            new_items = [(k, v) for k, v in eb.items() if k not in ea or ea[k] != v]
            if gone:
                del_elems.setdefault(name, []).extend(sorted(gone))
            if new_items:
                add_elems.setdefault(name, []).extend(sorted(new_items))

    def by_name(op):  # deterministic text whatever the order of `fids`
        return op.name

    rules = [op for _name, ops in sorted(rules, key=lambda item: item[0]) for op in ops]
    return Transaction(sorted(add_maps, key=by_name) + sorted(add_chains, key=by_name) + rules
                       + [Op("delete", "element", name, items) for name, items in sorted(del_elems.items())]
                       + [Op("add", "element", name, items) for name, items in sorted(add_elems.items())]
                       + sorted(del_chains, key=by_name) + sorted(del_maps, key=by_name))


def _chain_diff(prev, c, add_chains, rules):
    if prev == c:
        return
    if prev is None:
        add_chains.append(Op("add", "chain", c.name, c))
        ops = []
    else:
        ops = [Op("flush", "chain", c.name, None)]
    rules.append((c.name, ops + [Op("add", "rule", c.name, r) for r in c.rules]))


def _portfw_diff(a, b, add_chains, rules, del_elems, add_elems, del_chains):
    """Ops of one PORTFW key, from its old and new portfw_items (None: absent)."""
    if a == b:
        return
    if b is not None and b[3] is not None:
        _chain_diff(a[3] if a is not None else None, b[3], add_chains, rules)
    elif a is not None and a[3] is not None:
        del_chains.append(Op("delete", "chain", a[3].name, None))
    if a is not None and (b is None or a[:3] != b[:3]):
        del_elems.setdefault(a[0], []).append(a[1])
    if b is not None and (a is None or a[:3] != b[:3]):
        add_elems.setdefault(b[0], []).append((b[1], b[2]))


# --- dump: canonical text of a table (goldens, the fake backend) ------------------------

def dump(chains, maps, elements, tables=TABLES):
    """The objects as `nft list table` texts of each of `tables`, one after another."""
    out = []
    for table in tables:
        out.append("table %s %s {" % (FAMILY, table))
        for name in sorted(maps):
            if table_of(name) != table:
                continue
            m = maps[name]
            out.append("\t%s %s {" % (m.kind, name))
            out += ["\t\t%s" % part.strip() for part in m.spec.split(";") if part.strip()]
            elems = elements.get(name) or {}
            if elems:
                out.append("\t\telements = {")
                out += ["\t\t\t%s" % (k if v is None else "%s : %s" % (k, v)) for k, v in sorted(elems.items())]
                out.append("\t\t}")
            out.append("\t}")
        for name in sorted(chains):
            if table_of(name) != table:
                continue
            c = chains[name]
            out.append("\tchain %s {" % name)
            if c.hook:
                out.append("\t\t%s" % c.hook)
            out += ["\t\t%s" % r for r in c.rules]
            out.append("\t}")
        out.append("}")
    return "\n".join(out) + "\n"


# --- rendering the state --------------------------------------------------------------

def _fam(address):
    return 6 if ":" in address else 4


def _ipkw(fam):
    return "ip6" if fam == 6 else "ip"


def _suffix(fam):
    return "v6" if fam == 6 else "v4"


def _dnat_target(address, port):
    if port is None:
        return address
    return "[%s]:%d" % (address, port) if _fam(address) == 6 else "%s:%d" % (address, port)


def _map_port(address, port):
    return "%s . %d" % (address, port)


_NAT_PRE = "type nat hook prerouting priority dstnat; policy accept;"
_NAT_POST = "type nat hook postrouting priority srcnat; policy accept;"
_MANGLE_PRE = "type filter hook prerouting priority mangle; policy accept;"
_L4 = "meta l4proto { tcp, udp }"

# One-target PORTFW keys are spread over DIRECT_SHARDS maps per family, picked by the
# low two bits of the key's address and of its port (`direct_map`): the kernel walks a
# map from its start again for every 32 KiB message of a dump, a cost that grows with
# the square of the map (0.6 s at 100,000 elements, 0.02 s at 25,000), and a listing
# dumps these maps for their counters. Masks, not a hash: nft's `jhash` would spread
# any keys evenly but costs ~3 us a key in Python to place; keys differing in their
# port alone (one address, many ports) still use 4 shards, in their address alone 4.
DIRECT_SHARDS = 16


def direct_shard(address, port):
    """The shard of a one-target key: (last two bits of the address) . (of the port),
    as the prerouting dispatch rule computes it in the kernel."""
    if ":" in address:
        tail = address.rpartition(":")[2]
        low = int(tail.rpartition(".")[2]) if "." in tail else int(tail or "0", 16)
    else:
        low = int(address.rpartition(".")[2])
    return (low & 3) << 2 | (port & 3)


@functools.lru_cache(maxsize=4096)
def _direct_maps_of(address):
    """The four direct maps of an address's keys, by port & 3 (keys share few addresses)."""
    suffix = "v6" if ":" in address else "v4"
    return tuple("portfw_direct_%s_%d" % (suffix, direct_shard(address, port)) for port in range(4))


def direct_map(address, port):
    """The portfw_direct map (and chain) of a one-target key."""
    return _direct_maps_of(address)[port & 3]


def direct_maps(suffix):
    return ["portfw_direct_%s_%d" % (suffix, shard) for shard in range(DIRECT_SHARDS)]


def cascade_map(suffix, shard):
    """The verdict map of a shard's multi-backend keys: key -> goto their cascade chain."""
    return "portfw_%s_%d" % (suffix, shard)


BASE_MAPS = []
SHARD_MAPS = []
for _fam_, _addr in ((4, "ipv4_addr"), (6, "ipv6_addr")):
    _s = _suffix(_fam_)
    SHARD_MAPS += [MapDef(cascade_map(_s, n), "map", "type %s . inet_proto . inet_service : verdict;" % _addr)
                   for n in range(PORTFW_SHARDS)]
    # AUTOFW with a fixed hidden host: protocol . port range -> host (port kept).
    BASE_MAPS.append(MapDef("autofw_" + _s, "map", "type inet_proto . inet_service : %s; flags interval;" % _addr))
    # PORTFW keys with one target: key -> address . port, no chain; per-element
    # counter = connections, from which list computes pcnt.
    BASE_MAPS += [MapDef(name, "map", "type %s . inet_proto . inet_service : %s . inet_service; counter;"
                         % (_addr, _addr)) for name in direct_maps(_s)]
# Every PORTFW key is one element of these (and a multi-backend key has a cascade chain).
PORTFW_MAPS = frozenset([m.name for m in SHARD_MAPS] + direct_maps("v4") + direct_maps("v6"))

BASE_MAPS += [
    # AUTOFW control-port entries (-c): range -> the entry's chain (autofw_fragment).
    MapDef("autofw_ranges", "map", "type inet_proto . inet_service : verdict; flags interval;"),
    MapDef("mfw_marks", "map", "type mark : verdict;"),
    # Marks masqd's classifiers assign: only these are restored from the ct mark.
    MapDef("mark_values", "set", "type mark;"),
]


def _direct_dispatch(fam):
    """The prerouting rule that jumps to a key's direct shard chain (`direct_shard`)."""
    ipkw, low = ("ip6", "::%x") if fam == 6 else ("ip", "0.0.0.%d")
    arms = ", ".join("%s . %d : jump portfw_direct_%s_%d" % (low % (shard >> 2), shard & 3, _suffix(fam), shard)
                     for shard in range(DIRECT_SHARDS))
    return "%s %s daddr & %s . th dport & 3 vmap { %s }" % (_L4, ipkw, low % 3, arms)


def _direct_chains():
    """One chain per direct map, holding the map's DNAT."""
    return [Chain(name, None, ("dnat %s to %s daddr . meta l4proto . th dport map @%s" % (kw, kw, name),))
            for fam, kw in ((4, "ip"), (6, "ip6")) for name in direct_maps(_suffix(fam))]


# Before the main table's prerouting (dstnat): multi-backend PORTFW keys come first, as
# they did in one table, and the first chain that NATs a connection ends the hook's walk.
_NAT_PRE_SHARD = "type nat hook prerouting priority dstnat - 1; policy accept;"


def _shard_chains():
    """Each shard table's prerouting chain: its keys' verdict maps."""
    return [Chain("portfw_prerouting_%d" % n, _NAT_PRE_SHARD,
                  (_L4 + " ip daddr . meta l4proto . th dport vmap @" + cascade_map("v4", n),
                   _L4 + " ip6 daddr . meta l4proto . th dport vmap @" + cascade_map("v6", n)))
            for n in range(PORTFW_SHARDS)]


PREROUTING_RULES = (
    _direct_dispatch(4),
    _direct_dispatch(6),
    # mfw acts on to-firewall packets only (ipmasqadm(8)): forwarded traffic that
    # carries a mark passes untouched.
    "fib daddr type local meta mark != 0 meta mark vmap @mfw_marks",
    "fib daddr type local " + _L4 + " dnat ip to meta l4proto . th dport map @autofw_v4",
    "fib daddr type local " + _L4 + " dnat ip6 to meta l4proto . th dport map @autofw_v6",
    "fib daddr type local " + _L4 + " meta l4proto . th dport vmap @autofw_ranges",
)

MARK_RULES = (
    # First packet of a connection, not marked by anyone else: classify.
    "ct state new meta mark 0 ct mark 0 jump mark_classify",
    # Later packets: restore our mark from conntrack. Constant cost per packet.
    "ct state != new meta mark 0 ct mark @mark_values meta mark set ct mark",
)


def base_fragment():
    return Fragment(
        chains=[Chain("prerouting", _NAT_PRE, PREROUTING_RULES),
                Chain("mark_prerouting", _MANGLE_PRE, MARK_RULES)] + _direct_chains() + _shard_chains(),
        maps=BASE_MAPS + SHARD_MAPS)


def schedule(backends):
    """How the kernel picks among `backends` (in current list order, head first).

    Returns ("single", backend) or ("cascade", backends). pref 0 means no scheduling:
    a pref-0 head stays head; a list holding a pref-0 backend further back settles on
    the first pref-0 backend (the 2.2 kernel reached the same state after the backends
    ahead of it used up their pcnt)."""
    for b in backends:
        if b["pref"] == 0:
            return "single", b
    if len(backends) == 1:
        return "single", backends[0]
    return "cascade", backends


def cascade_rules(backends, match, phase=0):
    """One rule per backend, numgen per rule: rule i sees only the connections rules
    0..i-1 passed on, so `numgen inc mod rest < pref` sends exactly pref consecutive
    connections to backend i, then the rest move on: 15/5 gives 15 then 5, repeating.
    A cascade rebuilt `phase` connections into its cycle (restart, re-sync) is the
    rotated cycle (`rotate`); its first rule says so in a comment, which is how the
    next rebuild, even by another agent process, knows where the cycle stood."""
    segments = rotate(backends, phase)
    rules, rest = [], sum(b["pref"] for b in segments)
    for i, b in enumerate(segments):
        target = _dnat_target(b["address"], b["port"])
        verb = "dnat %s to %s" % (_ipkw(_fam(b["address"])), target)
        if i < len(segments) - 1:
            rule = "%s numgen inc mod %d < %d counter %s" % (match(b), rest, b["pref"], verb)
        else:
            rule = "%scounter %s" % (match(b) + " " if match(b) else "", verb)
        if i == 0 and phase:
            rule += ' comment "%s%d"' % (PHASE_COMMENT, phase)
        rules.append(rule)
        rest -= b["pref"]
    return rules


PHASE_COMMENT = "phase "


def rotate(backends, phase):
    """The cascade's segments when its cycle starts `phase` connections in: the backend
    that was serving gets what is left of its pref, the others follow in order, and it
    gets the part it had used at the end. 15/5 at phase 8 is .27 x7, .28 x5, .27 x8:
    the same sequence the unrotated cascade makes from its 9th connection on."""
    total = sum(b["pref"] for b in backends)
    phase = phase % total if total else 0
    if not phase:
        return list(backends)
    offset = 0
    for i, b in enumerate(backends):
        if phase < offset + b["pref"]:
            used = phase - offset
            tail = [dict(b, pref=used)] if used else []
            return [dict(b, pref=b["pref"] - used)] + backends[i + 1:] + backends[:i] + tail
        offset += b["pref"]
    return list(backends)  # not reached


def cycle_position(backends, phase, counts):
    """Connections into the cycle of `backends` after a cascade built at `phase` counted
    `counts` (its rules' counters); None when the counts do not fit that cascade."""
    total = sum(b["pref"] for b in backends)
    if not total or counts is None or len(counts) != len(rotate(backends, phase)):
        return None
    return (phase + sum(counts)) % total


def portfw_chain_name(key):
    digest = hashlib.blake2b(("%s %s %d" % key).encode(), digest_size=8).hexdigest()
    return "pf_" + digest


def live_backends(entry, order, down):
    """The backends of `order` (an entry's backends in list order) that stay in the
    schedule when those in `down` {(address, port)} are down (docs/health.md). All
    down: every backend (all_down forward, the default: degrade rather than vanish),
    the `fallback` backend (all_down fallback), or [] (all_down reject)."""
    if not down:
        return order
    live = [b for b in order if (b["address"], b["port"]) not in down]
    if live:
        return live
    mode = entry.get("all_down", "forward")
    if mode == "fallback":
        return [dict(entry["fallback"], pref=1)]
    return [] if mode == "reject" else order


def reject_rules(protocol=None):
    """A key whose backends are all down with all_down reject: TCP gets a reset, UDP
    (and anything else) an ICMP port unreachable, at once instead of a timeout."""
    tcp = "meta l4proto tcp reject with tcp reset"
    if protocol == "tcp":
        return (tcp,)
    if protocol == "udp":
        return ("reject",)
    return (tcp, "reject")


HEALTH_QUIET_MARK = 0x6D617364  # masqd.watchers.health.QUIET_MARK: the probe sockets' SO_MARK


def health_fragment():
    """While health checks run: no conntrack events for the probes' own connections
    (their sockets carry HEALTH_QUIET_MARK), so 1,000 checks a second do not wake the
    ctnetlink listeners (the AUTOFW watcher) several thousand times a second. The
    connections are still tracked; only their events are off."""
    return Fragment(chains=[Chain("health_output", "type filter hook output priority filter; policy accept;",
                                  ("meta mark 0x%08x ct state new ct event set 0x0" % HEALTH_QUIET_MARK,))])


def portfw_items(entry, phase=0, down=None):
    """What one PORTFW key renders to: (map name, element key, element value, Chain or
    None). A single-target key is one `portfw_direct_*` element; a cascade is a chain
    and a verdict-map element that jumps to it (its schedule `phase` connections in).
    `down`: backends health checks took out of the schedule."""
    laddr, proto = entry["local_address"], entry["protocol"]
    suffix = "v6" if ":" in laddr else "v4"
    elem_key = "%s . %s . %d" % (laddr, proto, entry["local_port"])
    backends = entry["backends"]
    if len(backends) == 1 and not down:  # most keys: one element, no chain
        return (direct_map(laddr, entry["local_port"]), elem_key,
                "%s . %d" % (backends[0]["address"], backends[0]["port"]), None)
    backends = live_backends(entry, backends, down)
    name = portfw_chain_name((proto, laddr, entry["local_port"]))
    if not backends:
        return (cascade_map(suffix, shard_of(name)), elem_key, "goto " + name, Chain(name, None, reject_rules(proto)))
    how, target = schedule(backends)
    if how == "single":
        return (direct_map(laddr, entry["local_port"]), elem_key, "%s . %d" % (target["address"], target["port"]), None)
    match = "meta l4proto " + proto
    chain = Chain(name, None, tuple(cascade_rules(target, lambda b: match, phase)))
    return (cascade_map(suffix, shard_of(name)), elem_key, "goto " + name, chain)


def portfw_fragment(entry, phase=0, down=None):
    name, key, value, chain = portfw_items(entry, phase, down)
    return Fragment(chains=() if chain is None else (chain,), elements={name: {key: value}})


def mfw_order(entry, head):
    """The mark's backends in current list order; `head` = {address, port} or None."""
    backends = entry["backends"]
    for i, b in enumerate(backends):
        if head and b["address"] == head.get("address") and b["port"] == head.get("port"):
            return backends[i:] + backends[:i]
    return list(backends)


def mfw_chain_name(mark):
    return "mfw_%d" % mark


def mfw_fragment(entry, head=None, phase=0, down=None):
    order = live_backends(entry, mfw_order(entry, head), down)
    name = mfw_chain_name(entry["mark"])
    if not order:
        return Fragment(chains=[Chain(name, None, reject_rules())],
                        elements={"mfw_marks": {str(entry["mark"]): "goto " + name}})
    how, target = schedule(order)

    def match(backend):  # dnat to a port needs l4
        return _L4 if backend["port"] is not None else ""

    if how == "single":
        rules = cascade_rules([target], match)
    else:
        rules = cascade_rules(target, match, phase)
    return Fragment(chains=[Chain(name, None, tuple(rules))],
                    elements={"mfw_marks": {str(entry["mark"]): "goto " + name}})


def autofw_range(entry):
    """The `proto . ports` key text of an AUTOFW entry's range."""
    ports = ("%d" % entry["low_port"] if entry["low_port"] == entry["high_port"]
             else "%d-%d" % (entry["low_port"], entry["high_port"]))
    return "%s . %s" % (entry["protocol"], ports)


def autofw_id(entry):
    text = "%s %d %d" % (entry["protocol"], entry["low_port"], entry["high_port"])
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def autofw_recipient_element(entry, family, peer=None):
    """(map name, key text) of a detected recipient in the entry's own timed map:
    keyed by a constant (`meta nfproto`: "ipv4"/"ipv6"), or by the external peer
    (keyed_by_peer)."""
    key = peer if peer is not None else ("ipv6" if family == 6 else "ipv4")
    return "autofw_r%d_%s" % (family, autofw_id(entry)), key


def autofw_holder_element(entry, family, address, peer=None):
    """(set name, key text) of the host whose control traffic may refresh a recipient."""
    key = address if peer is None else "%s . %s" % (address, peer)
    return "autofw_h%d_%s" % (family, autofw_id(entry)), key


def autofw_fragment(entry):
    if entry["hidden_host"] is not None:
        fam = _fam(entry["hidden_host"])
        return Fragment(elements={"autofw_" + _suffix(fam): {autofw_range(entry): entry["hidden_host"]}})
    # Control-port detection (-c): the watcher writes the recipient (conntrack NEW) into
    # the entry's timed map and the holder set; every later control packet of the holder
    # refreshes both in the kernel (autofw_control_fragment), so an active control
    # connection keeps the range and an idle one lets it expire: no event reaches Python.
    ident = autofw_id(entry)
    maps, rules = [], []
    for fam, addr in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        r_name, _k = autofw_recipient_element(entry, fam)
        h_name, _k = autofw_holder_element(entry, fam, "")
        if entry["keyed_by_peer"]:
            maps.append(MapDef(r_name, "map", "type %s : %s; flags dynamic, timeout;" % (addr, addr)))
            maps.append(MapDef(h_name, "set", "type %s . %s; flags dynamic, timeout;" % (addr, addr)))
            rules.append("dnat %s to %s saddr map @%s" % (_ipkw(fam), _ipkw(fam), r_name))
        else:
            maps.append(MapDef(r_name, "map", "type nf_proto : %s; flags dynamic, timeout;" % addr))
            maps.append(MapDef(h_name, "set", "type %s; flags dynamic, timeout;" % addr))
            rules.append("meta nfproto %s dnat %s to meta nfproto map @%s"
                         % ("ipv6" if fam == 6 else "ipv4", _ipkw(fam), r_name))
    chain = Chain("autofw_in_" + ident, None, tuple(rules))
    return Fragment(chains=[chain], maps=maps,
                    elements={"autofw_ranges": {autofw_range(entry): "goto " + chain.name}})


_FILTER_FWD_AUTOFW = "type filter hook forward priority filter - 1; policy accept;"


def autofw_refresh_rules(entry):
    """Rules that refresh an entry's recipient from its holder's control packets."""
    rules = []
    timeout = entry["timeout"]
    for fam in (4, 6):
        ip = _ipkw(fam)
        r_name, _k = autofw_recipient_element(entry, fam)
        h_name, _k = autofw_holder_element(entry, fam, "")
        if entry["keyed_by_peer"]:
            rules.append("%s saddr . %s daddr @%s update @%s { %s saddr . %s daddr timeout %ds } "
                         "update @%s { %s daddr timeout %ds : %s saddr }"
                         % (ip, ip, h_name, h_name, ip, ip, timeout, r_name, ip, timeout, ip))
        else:
            rules.append("%s saddr @%s update @%s { %s saddr timeout %ds } "
                         "update @%s { meta nfproto timeout %ds : %s saddr }"
                         % (ip, h_name, h_name, ip, timeout, r_name, timeout, ip))
    return rules


def autofw_control_fragment(entries):
    """The forward-path refresh of every control-port entry: one chain per control
    protocol/port, dispatched by one verdict map (absent without control entries)."""
    by_port = {}
    for e in entries:
        if e["hidden_host"] is None:
            by_port.setdefault((e["control_protocol"], e["control_port"]), []).extend(autofw_refresh_rules(e))
    if not by_port:
        return EMPTY
    chains, dispatch = [], {}
    for (proto, port), rules in sorted(by_port.items()):
        name = "autofw_control_%s_%d" % (proto, port)
        chains.append(Chain(name, None, tuple(rules)))
        dispatch["%s . %d" % (proto, port)] = "jump " + name
    chains.append(Chain("autofw_forward", _FILTER_FWD_AUTOFW,
                        (_L4 + " meta l4proto . th dport vmap @autofw_controls",)))
    return Fragment(chains=chains,
                    maps=[MapDef("autofw_controls", "map", "type inet_proto . inet_service : verdict;")],
                    elements={"autofw_controls": dispatch})


def _port_set(ports):
    from masqd.model import port_intervals
    items = ["%d" % lo if lo == hi else "%d-%d" % (lo, hi) for lo, hi in port_intervals(ports)]
    return "{ %s }" % ", ".join(items)


_L4_NAMES = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "ipv6-icmp"}


def criteria(entry):
    """Match expressions of a marks/masquerade rule, in evaluation order."""
    parts = []
    for key, kw in (("input_interface", "iifname"), ("output_interface", "oifname")):
        if entry.get(key):
            parts.append('%s "%s"' % (kw, entry[key]))
    for key, field in (("source", "saddr"), ("destination", "daddr")):
        if entry[key]:
            parts.append("%s %s %s%s" % (_ipkw(_fam(entry[key])), field,
                                         "!= " if entry[key + "_invert"] else "", entry[key]))
    if entry["protocol"]:
        parts.append("meta l4proto " + _L4_NAMES[entry["protocol"]])
    elif entry["source_ports"] or entry["destination_ports"]:
        parts.append(_L4)
    for key, field in (("source_ports", "sport"), ("destination_ports", "dport")):
        if entry[key]:
            parts.append("th %s %s" % (field, _port_set(entry[key])))
    return parts


def marks_fragment(entries):
    # The counter is the rule's hit count (masqd_mark_classifier_hits, `mark -L`).
    rules = tuple(" ".join(criteria(e) + ["counter meta mark set %d ct mark set %d return" % (e["mark"], e["mark"])])
                  for e in entries)
    return Fragment(chains=[Chain("mark_classify", None, rules)],
                    elements={"mark_values": {str(e["mark"]): None for e in entries}})


POOL_HOLD = 3600  # seconds a pool address stays with an idle host (refreshed per packet)
_FILTER_FWD = "type filter hook forward priority filter; policy accept;"
_POOL_RECORD = "type filter hook postrouting priority srcnat + 1; policy accept;"
_POOL_PRE = "type nat hook prerouting priority dstnat + 10; policy accept;"


def pool_map_names(entry):
    """(host -> address map, address -> host map) of a pool rule. The name hashes the
    rule name and its pool, so a changed pool starts from fresh assignments."""
    text = "%s %s" % (entry["name"], " ".join(entry["pool"]))
    digest = hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
    return "pool_" + digest, "pool_in_" + digest


def helper_objects(name):
    """(object name, kernel type, protocol, port) of a helper name (model.HELPERS)."""
    from masqd.model import HELPERS
    return [("helper_%s_%s" % (name.replace("-", "_"), proto), kind, proto, port)
            for kind, proto, port in HELPERS[name]]


def _pool_rules(e):
    """SNAT to the host's address from the pool, else the next one round-robin; the
    record chain then remembers host <-> address (per packet, so an active host keeps
    its address), and pool_ports on that address come back to the host."""
    fam = _fam(e["pool"][0])
    ipkw, addr_type = _ipkw(fam), "ipv4_addr" if fam == 4 else "ipv6_addr"
    out_map, in_map = pool_map_names(e)
    match = criteria(e)
    if not e["source"] and not e["destination"]:
        match = ["meta nfproto %s" % ("ipv4" if fam == 4 else "ipv6")] + match
    table = ", ".join("%d : %s" % (i, a) for i, a in enumerate(e["pool"]))
    nat = [" ".join(match + ["snat %s to %s saddr map @%s" % (ipkw, ipkw, out_map)]),
           " ".join(match + ["snat %s to numgen inc mod %d map { %s }" % (ipkw, len(e["pool"]), table)])]
    spec = "type %s : %s; size 65535; flags dynamic, timeout;" % (addr_type, addr_type)
    maps = [MapDef(out_map, "map", spec), MapDef(in_map, "map", spec)]
    record = ("ct direction original %s saddr { %s } ct status snat "
              "update @%s { ct original %s saddr timeout %ds : %s saddr } "
              "update @%s { %s saddr timeout %ds : ct original %s saddr }"
              % (ipkw, ", ".join(e["pool"]), out_map, ipkw, POOL_HOLD, ipkw,
                 in_map, ipkw, POOL_HOLD, ipkw))
    inbound = []
    if e["pool_ports"]:
        l4 = "meta l4proto " + e["protocol"] if e["protocol"] else _L4
        inbound.append("fib daddr type local %s th dport %s dnat %s to %s daddr map @%s"
                       % (l4, _port_set(e["pool_ports"]), ipkw, ipkw, in_map))
    return nat, maps, record, inbound


def _helper_rules(e):
    rules = []
    for obj, _kind, proto, port in [o for name in e["helpers"] for o in helper_objects(name)]:
        if e["protocol"] not in (None, proto):
            continue
        match = dict(e, protocol=proto, source_ports=e["source_ports"],
                     destination_ports=e["destination_ports"] or [port])
        rules.append(" ".join(criteria(match) + ['ct state new ct helper set "%s"' % obj]))
    return rules


def masquerade_fragment(entries):
    nat, maps, record, inbound, helpers, objects = [], [], [], [], [], {}
    for e in entries:
        if e.get("helpers"):
            helpers += _helper_rules(e)
            for name in e["helpers"]:
                for obj, kind, proto, _port in helper_objects(name):
                    objects[obj] = MapDef(obj, "ct helper", 'type "%s" protocol %s; l3proto inet;' % (kind, proto))
        if e.get("pool"):
            rules, pool_maps, rec, inb = _pool_rules(e)
            nat += rules
            maps += pool_maps
            record.append(rec)
            inbound += inb
        else:
            nat.append(" ".join(criteria(e) + ["masquerade"]))
    chains = [Chain("postrouting", _NAT_POST, tuple(nat))]
    if record:
        chains.append(Chain("pool_record", _POOL_RECORD, tuple(record)))
    if inbound:
        chains.append(Chain("pool_prerouting", _POOL_PRE, tuple(inbound)))
    if helpers:
        chains.append(Chain("helpers", _FILTER_FWD, tuple(helpers)))
    return Fragment(chains=chains, maps=maps + [objects[k] for k in sorted(objects)])


def fragment_for(table, key, tables, mfw_heads, down=None):
    """The fragment id and Fragment that entry `key` of `table` renders to (`down`:
    the Ruleset's map of backends that health checks took out)."""
    if table in ("marks", "masquerade"):
        entries = list(tables[table].values())
        frag = marks_fragment(entries) if table == "marks" else masquerade_fragment(entries)
        return table, frag
    entry = tables[table].get(key)
    fid = (table, key)
    if entry is None:
        return fid, None
    if table == "portfw":
        return fid, portfw_fragment(entry)
    if table == "autofw":
        frag = autofw_fragment(entry)
        return fid, None if frag == EMPTY else frag
    return fid, mfw_fragment(entry, mfw_heads.get(key), 0, (down or {}).get(fid))


def render(tables, mfw_heads=None, phases=None, down=None):
    """The whole Ruleset of a state (`tables`: name -> {key: entry}; the PORTFW dict is
    referenced, not copied), with the schedules of `phases` {fid: phase} continued and
    the backends of `down` {fid: {(address, port)}} out of their schedules."""
    down = {fid: d for fid, d in (down or {}).items() if d}
    mfw_heads = mfw_heads or {}
    phases = {fid: p for fid, p in (phases or {}).items() if p}
    fragments = {"base": base_fragment()}
    fragments["marks"] = marks_fragment(list(tables.get("marks", {}).values()))
    fragments["masquerade"] = masquerade_fragment(list(tables.get("masquerade", {}).values()))
    for key, entry in tables.get("autofw", {}).items():
        fragments[("autofw", key)] = autofw_fragment(entry)
    control = autofw_control_fragment(tables.get("autofw", {}).values())
    if control is not EMPTY:
        fragments["autofw_control"] = control
    for key, entry in tables.get("mfw", {}).items():
        fragments[("mfw", key)] = mfw_fragment(entry, mfw_heads.get(key), phases.get(("mfw", key), 0),
                                               down.get(("mfw", key)))
    return Ruleset(fragments, tables.get("portfw", {}), phases, down)
