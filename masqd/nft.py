"""Backends that apply render.Transactions: the kernel via libnftables, and a fake.

Both offer the same interface, which masqd.service.Service uses:
  apply(txn, dry_run=False)  one atomic transaction; raises NftError(kernel message)
                             (LibNftables: a PORTFW transaction as masqd.portfw_batch's
                             netlink batch, anything else through libnftables)
  generation()               the ruleset's generation; `committed_generation` is the one
                             right after this backend's last commit (None: unknown)
  read_counters(direct_keys=None, counted_chains=None)
                             (rule counters {chain: [packets, ...]},
                              element counters {map: {key text: packets}})
  read_elements(names)       {map: {key text: {"value": text, "expires": seconds}}} of
                             timed maps (the AUTOFW recipients the kernel expires)
  read_table(shape=True)     KernelTable: what a full re-sync carries over (rule
                             counters and phase comments, timed elements) and the
                             table's shape (for drift verification; element counts
                             only with `shape`); None if absent
"""

import contextlib
import copy
import ctypes
import json
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from masqd import nfnetlink, portfw_batch, render

# The maps whose elements carry counters (render.BASE_MAPS): PORTFW keys with one
# target, in render.DIRECT_SHARDS maps per family; read_counters gives each family's
# elements as one map, "portfw_direct_v4" and "portfw_direct_v6".
DIRECT_MAPS = {family: render.direct_maps(family[-2:]) for family in ("portfw_direct_v4", "portfw_direct_v6")}


class NftError(Exception):
    """The kernel (or libnftables) refused a transaction; the message is nft's."""


class KernelTable:
    """One reading of masqd's tables (render.TABLES) from the kernel, by object name."""

    __slots__ = ("rules", "comments", "timed", "shape", "kinds", "misplaced")

    def __init__(self) -> None:
        self.rules: Dict[str, List[int]] = {}     # chain -> [counter packets of each rule with a counter]
        self.comments: Dict[str, str] = {}  # chain -> comment of its first rule ("" if none)
        # map -> {key text: (value text, timeout s, expires s)}
        self.timed: Dict[str, Dict[str, Tuple[Optional[str], Optional[int], Optional[int]]]] = {}
        # ("chain", name) -> rule count, ("map", name) -> element count (timed maps: 0,
        # their elements are runtime), (kind, name) -> 0
        self.shape: Dict[Tuple[str, str], int] = {}
        self.kinds: Dict[str, str] = {}  # map, set or object name -> "map", "set" or the object's kind
        # "TABLE NAME" of objects in another of masqd's tables than the one their name
        # says (render.table_of): only a re-sync of every table removes them. In `shape`
        # as ("misplaced", "TABLE NAME"), which no rendering has.
        self.misplaced: List[str] = []

    def place(self, table: str, name: str) -> bool:
        """Whether `name` belongs in `table`; if not, it is recorded as misplaced."""
        if render.table_of(name) == table:
            return True
        where = "%s %s" % (table, name)
        if ("misplaced", where) not in self.shape:
            self.misplaced.append(where)
            self.shape[("misplaced", where)] = 0
        return False


def shape_of(chains: Dict[str, render.Chain], maps: Dict[str, render.MapDef],
             elements: Dict[str, Dict[str, Optional[str]]]) -> Dict[Tuple[str, str], int]:
    """The shape (see KernelTable) of a rendering: render.Ruleset.objects()."""
    shape = {("chain", name): len(c.rules) for name, c in chains.items()}
    for name, m in maps.items():
        if m.kind in ("map", "set"):
            timed = "timeout" in m.spec
            shape[("map", name)] = 0 if timed else len(elements.get(name) or {})
        else:
            shape[(m.kind, name)] = 0
    return shape


class LibNftables:
    """The real kernel, through libnftables (Debian's libnftables1 + pip-nftables).

    Text commands via `cmd`: measured 2-3x faster than `json_cmd` for 100,000 keys on
    this machine; safe because render builds text only from validated values."""

    def __init__(self) -> None:
        import nftables  # imported here so unit tests never need the library
        self._nft = nftables.Nftables()
        self._nft.set_handle_output(False)
        lib = ctypes.CDLL("libnftables.so.1")
        self._set_dry_run = lib.nft_ctx_set_dry_run
        self._set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self._ctx = self._nft._Nftables__ctx  # pip-nftables does not wrap dry run
        self._batches = portfw_batch.BatchWriter()
        # RulesetMonitor.events_off, when a monitor runs (masqd.daemon sets it)
        self.events_off: Optional[Callable[[Callable[[], int]], Any]] = None
        # The ruleset's generation right after this handle's last commit (None: unknown)
        self.committed_generation: Optional[int] = None

    def apply(self, txn: render.Transaction, dry_run: bool = False, alongside: Any = None) -> None:
        """One transaction. `alongside.start()` is called just before the kernel
        runs it (without the GIL: work started then overlaps the kernel's).

        A PORTFW transaction (chains, cascade rules, map elements: what a change of
        PORTFW keys diffs to) goes to the kernel as one nfnetlink batch of masqd's own
        (masqd.portfw_batch); everything else, and every dry run, through libnftables."""
        if not txn:
            return
        if dry_run:
            self._run(txn, dry_run, alongside)
            return
        self.committed_generation = None  # unknown until this transaction is in
        ops = portfw_batch.batch_ops(txn)
        if ops is None:
            self._run(txn, dry_run, alongside)
        else:
            self._commit_batch(ops, alongside)
        try:
            self.committed_generation = self.generation()
        except OSError:
            pass

    def generation(self) -> int:
        """The ruleset's generation (one more for every batch anyone commits)."""
        return self._batches.generation()

    def _commit_batch(self, ops: List[Tuple[render.Op, Optional[bytes]]], alongside: Any) -> None:
        events_off = self.events_off
        if events_off is None or sum(len(op.arg) if op.kind == "element" else 1
                                     for op, _rule in ops) < portfw_batch.QUIET_AFTER:
            events_off = _events_on
        try:
            with events_off(self._batches.generation):
                sent = self._batches.commit(ops, alongside)
        except portfw_batch.BatchError as exc:
            raise NftError(str(exc)) from None
        if sent > TRIM_AFTER:
            trim_heap()  # the batch's ~100,000 encoded pieces, freed

    def _run(self, txn: render.Transaction, dry_run: bool = False, alongside: Any = None) -> None:
        """One transaction through libnftables."""
        if not txn:
            return
        text = txn.to_text()
        self._set_dry_run(self._ctx, bool(dry_run))
        if alongside is not None:
            alongside.start()
        try:
            rc, _out, err = self._nft.cmd(text)
        finally:
            self._set_dry_run(self._ctx, False)
            if len(text) > TRIM_AFTER:
                # libnftables parses a 100,000-element transaction into ~250 MB of
                # small allocations; freed, they stay in glibc's heap (RSS) unless
                # trimmed. ~10 ms, only after whole-table transactions.
                trim_heap()
        if rc != 0:
            raise NftError(_first_error(err))

    def list_table(self) -> Optional[List[Dict[str, Any]]]:
        """The tables (render.TABLES) as nft JSON objects, or None when the main one
        does not exist."""
        objects: List[Dict[str, Any]] = []
        self._nft.set_json_output(True)
        try:
            for table in render.TABLES:
                rc, out, _err = self._nft.cmd("list table %s %s" % (render.FAMILY, table))
                if rc != 0 and table == render.TABLE:
                    return None
                if rc == 0:
                    objects += json.loads(out)["nftables"]
        finally:
            self._nft.set_json_output(False)
        return objects

    def list_text(self) -> str:
        """`nft list table` of each of render.TABLES the kernel holds, one after another."""
        texts = []
        for table in render.TABLES:
            rc, out, err = self._nft.cmd("list table %s %s" % (render.FAMILY, table))
            if rc != 0 and table == render.TABLE:
                raise NftError(_first_error(err))
            texts.append(out if rc == 0 else "")
        return "".join(texts)

    def read_elements(self, names: List[str]) -> Dict[str, Dict[str, Dict[str, Any]]]:
        out: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self._nft.set_json_output(True)
        try:
            for name in names:
                rc, text, _err = self._nft.cmd("list map %s %s %s" % (render.FAMILY, render.table_of(name), name))
                if rc != 0:
                    continue
                for obj in json.loads(text)["nftables"]:
                    for item in obj.get("map", {}).get("elem", []):
                        key, value = item if isinstance(item, list) else (item, None)
                        meta = key.get("elem", {}) if isinstance(key, dict) else {}
                        val = meta.get("val", key)
                        out.setdefault(name, {})[_key_text(val)] = {
                            "value": None if value is None else str(value), "expires": meta.get("expires")}
        finally:
            self._nft.set_json_output(False)
        return out

    def read_table(self, shape: bool = True) -> Optional[KernelTable]:
        """By netlink dumps (chains, sets, objects, rules, element counts) and
        libnftables' listing of each timed map alone (filtered to that map, so fast):
        libnftables fills its cache with every element for anything else, 4.5 s at
        100,000 keys. The whole-table listing when a dump fails. Element counts only
        with `shape` (verification): counting dumps every element, and the kernel
        walks a map from its start for every message of a dump (0.8 s at 100,000
        elements, ~90 s at 1,000,000); a re-sync needs none."""
        try:
            with nfnetlink.Dumper() as dumper:
                present = dumper.tables()
                if render.TABLE not in present:
                    return None
                table = KernelTable()
                for of, chain in dumper.chains():
                    if of in render.TABLES and table.place(of, chain):
                        table.shape[("chain", chain)] = 0
                timed: List[Tuple[str, str]] = []
                for name in render.TABLES:
                    if name in present:
                        self._read_one(dumper, name, table, timed, shape)
        except (OSError, nfnetlink.DumpInterrupted):
            return self._listed_table()
        for kind, name in timed:
            table.timed[name] = self._timed_elements(kind, name)
        return table

    @staticmethod
    def _read_one(dumper: nfnetlink.Dumper, name: str, table: KernelTable, timed: List[Tuple[str, str]],
                  shape: bool) -> None:
        """read_table's reading of one of the tables, into `table` (names are unique
        across them, render.table_of)."""
        for chain, packets, comment in dumper.rules(name):
            if not table.place(name, chain):
                continue
            if chain not in table.comments:
                table.comments[chain] = comment
            table.shape[("chain", chain)] = table.shape.get(("chain", chain), 0) + 1
            if packets is not None:
                table.rules.setdefault(chain, []).append(packets)
        for set_name, flags in dumper.sets(name).items():
            if not table.place(name, set_name):
                continue
            table.kinds[set_name] = "map" if flags & nfnetlink.NFT_SET_MAP else "set"
            if flags & nfnetlink.TIMED:
                table.shape[("map", set_name)] = 0
                timed.append(("map" if flags & nfnetlink.NFT_SET_MAP else "set", set_name))
            else:
                table.shape[("map", set_name)] = dumper.element_count(name, set_name) if shape else 0
        for kind, obj in dumper.objects(name):
            if not table.place(name, obj):
                continue
            table.shape[(kind, obj)] = 0
            table.kinds[obj] = kind

    def _timed_elements(self, kind: str, name: str) -> Dict[str, Tuple[Optional[str], Optional[int], Optional[int]]]:
        self._nft.set_json_output(True)
        try:
            rc, text, _err = self._nft.cmd("list %s %s %s %s" % (kind, render.FAMILY, render.table_of(name), name))
        finally:
            self._nft.set_json_output(False)
        out: Dict[str, Tuple[Optional[str], Optional[int], Optional[int]]] = {}
        if rc != 0:
            return out
        for obj in json.loads(text)["nftables"]:
            for item in obj.get(kind, {}).get("elem", []):
                key, value = _timed_item(item)
                out[key] = value
        return out

    def _listed_table(self) -> Optional[KernelTable]:
        objects = self.list_table()
        if objects is None:
            return None
        table = KernelTable()
        for obj in objects:
            (body,) = obj.values()
            if not isinstance(body, dict) or "table" not in body:
                continue
            if not table.place(body["table"], body["chain"] if "rule" in obj else body.get("name", "")):
                continue
            if "rule" in obj:
                rule = obj["rule"]
                chain = rule["chain"]
                first = chain not in table.comments
                if first:
                    table.comments[chain] = rule.get("comment", "")
                table.shape[("chain", chain)] = table.shape.get(("chain", chain), 0) + 1
                for expr in rule["expr"]:
                    if "counter" in expr and expr["counter"]:
                        table.rules.setdefault(chain, []).append(expr["counter"]["packets"])
            elif "chain" in obj:
                table.shape.setdefault(("chain", obj["chain"]["name"]), 0)
            elif "map" in obj or "set" in obj:
                kind = "map" if "map" in obj else "set"
                m = obj[kind]
                table.kinds[m["name"]] = kind
                timed = "timeout" in m.get("flags", []) or "dynamic" in m.get("flags", [])
                table.shape[("map", m["name"])] = 0 if timed else len(m.get("elem", []))
                if timed:
                    out = table.timed.setdefault(m["name"], {})
                    for item in m.get("elem", []):
                        key, value = _timed_item(item)
                        out[key] = value
            else:
                for kind in ("ct helper",):
                    if kind in obj:
                        table.shape[(kind, obj[kind]["name"])] = 0
                        table.kinds[obj[kind]["name"]] = kind
        return table

    def read_counters(self, direct_keys: Optional[Callable[[str], List[bytes]]] = None,
                      counted_chains: Optional[Callable[[], List[str]]] = None,
                      ) -> Tuple[Dict[str, List[int]], Dict[str, Dict[bytes, int]]]:
        """(rule counters {chain: [packets, ...]}, element counters {family's direct map:
        {key bytes (nfnetlink.address_proto_port_key): packets}}).

        By netlink dump of the rules and of the direct PORTFW maps (nfnetlink: 5x
        less than libnftables' listing of the table at 100,000 keys); the listing when
        the dumps fail.

        Writers commit every few ms, and a reader that shares the GIL with them takes
        longer than that to walk a big dump: retried, it may never finish. Given
        `direct_keys(map)` (the keys the map should hold, nfnetlink bytes), a map's dump
        is taken once, and the keys its interrupted walk missed are read one by one.
        Given `counted_chains()` (the chains whose counters matter), rules whose dump
        stays interrupted are read chain by chain."""
        try:
            with nfnetlink.Dumper() as dumper:
                rules: Dict[str, List[int]] = {}
                for table in render.TABLES:
                    try:
                        rules.update(dumper.rule_counters(table))
                    except nfnetlink.DumpInterrupted:
                        if counted_chains is None:
                            raise
                        rules.update(dumper.rule_counters(
                            table, [name for name in counted_chains() if render.table_of(name) == table]))
                elements: Dict[str, Dict[bytes, int]] = {}
                for family, names in DIRECT_MAPS.items():
                    got: Dict[bytes, int] = {}
                    for name in names:
                        if direct_keys is None:
                            got.update(dumper.element_counters(render.TABLE, name))
                            continue
                        got.update(dumper.element_counters(render.TABLE, name, attempts=1, partial=True))
                        if dumper.interrupted:
                            got.update(dumper.element_packets(
                                render.TABLE, name, [k for k in direct_keys(name) if k not in got]))
                    elements[family] = got
            return rules, elements
        except (OSError, nfnetlink.DumpInterrupted):  # table gone (ENOENT) or no netlink
            return self._listed_counters()

    def _listed_counters(self) -> Tuple[Dict[str, List[int]], Dict[str, Dict[bytes, int]]]:
        rules: Dict[str, List[int]] = {}
        elements: Dict[str, Dict[bytes, int]] = {}
        for obj in self.list_table() or []:
            if "rule" in obj:
                rule = obj["rule"]
                for expr in rule["expr"]:
                    if "counter" in expr and expr["counter"]:
                        rules.setdefault(rule["chain"], []).append(expr["counter"]["packets"])
            elif "map" in obj:
                m = obj["map"]
                for item in m.get("elem", []):
                    key = item[0] if isinstance(item, list) else item
                    if isinstance(key, dict) and "elem" in key:
                        counter = key["elem"].get("counter")
                        if counter is not None:
                            address, protocol, port = key["elem"]["val"]["concat"]
                            elements.setdefault(m["name"].rpartition("_")[0], {})[
                                nfnetlink.address_proto_port_key(address, protocol, port)] = counter["packets"]
        return rules, elements


_CHAIN_TARGET = re.compile(r"(?:jump|goto) ([a-z0-9_]+)")  # FakeNft: the chains a rule refers to


def _events_on(_generation: Callable[[], int]) -> Any:
    """events_off's stand-in for small batches or without a monitor."""
    return contextlib.nullcontext()


TRIM_AFTER = 1 << 20  # transaction text bytes (~10,000 elements)


def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


_LIBC = _libc()
M_ARENA_MAX = -8  # mallopt(3)


def trim_heap() -> None:
    """Hand glibc's free heap memory back to the system: after a large request, list
    or transaction its many freed objects would otherwise stay in the agent's RSS."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def one_malloc_arena() -> None:
    """glibc's allocator in one arena for every thread of the agent. By default each
    thread that allocates while another does gets an arena of its own, and what a
    request's thread frees there stays mapped: a 100,000-key list served while keys are
    added left the agent at 153-167 MiB after the next whole-table set, 130 MiB with one
    arena. The agent's threads mostly take turns at the interpreter lock anyway."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, 1)


def _timed_item(item: Any) -> Tuple[str, Tuple[Optional[str], Optional[int], Optional[int]]]:
    """(key text, (value text, timeout s, expires s)) of one element of a timed map or
    set in nft's JSON."""
    key, value = item if isinstance(item, list) else (item, None)
    meta = key.get("elem", {}) if isinstance(key, dict) else {}
    shown = None if value is None else _key_text(value)
    return _key_text(meta.get("val", key)), (shown, meta.get("timeout"), meta.get("expires"))


def _key_text(val: Any) -> str:
    if isinstance(val, dict) and "concat" in val:
        return " . ".join(_key_text(v) for v in val["concat"])
    if isinstance(val, dict) and "range" in val:
        return "%s-%s" % tuple(val["range"])
    return str(val)


def _first_error(err: Optional[str]) -> str:
    """nft's error text without the echoed (possibly 100,000-line) command buffer."""
    lines = [l for l in (err or "").splitlines() if l.startswith("Error:")]
    if not lines:
        return (err or "nft failed").strip()[:500]
    return "; ".join(dict.fromkeys(lines))[:500]


class FakeNftables:
    """In-memory stand-in for the kernel table, for unit tests: applies ops with the
    kernel's checks (missing chain/element -> ENOENT, existing element with another
    value -> EEXIST, deleting a referenced chain -> EBUSY), atomically, and records
    every transaction. `reject` (a callable(op) -> message or None) simulates the
    kernel refusing something."""

    def __init__(self):
        self.tables = frozenset()  # of render.TABLES
        self.chains, self.maps, self.elements = {}, {}, {}
        self.transactions = []  # (Transaction, dry_run)
        self.reject = None
        self.commits = 0  # the generation: one more for every applied transaction
        self.committed_generation = None
        self.rule_counters, self.element_counters = {}, {}
        self.clock = time.monotonic
        self.expiry = {}  # (map, key) -> clock time: elements added with "KEY timeout Ns"
        self.timeouts = {}  # (map, key) -> N of that "timeout Ns"

    def apply(self, txn, dry_run=False, alongside=None):
        if not txn:
            return
        if alongside is not None:
            alongside.start()  # as LibNftables: the kernel's part runs beside it
        self.transactions.append((txn, dry_run))
        state = copy.deepcopy((self.tables, self.chains, self.maps, self.elements))
        for op in txn.ops:
            msg = self.reject(op) if self.reject else None
            if msg:
                raise NftError("Error: " + msg)
            state = self._apply_op(state, op)
        if not dry_run:
            self.tables, self.chains, self.maps, self.elements = state
            self.commits += 1
            self.committed_generation = self.commits

    def _expire(self, elements):
        now = self.clock()
        for (name, key), deadline in list(self.expiry.items()):
            if deadline <= now:
                elements.get(name, {}).pop(key, None)
                del self.expiry[(name, key)]

    def _apply_op(self, state, op):
        tables, chains, maps, elements = state
        if op.kind == "table":
            table = op.name or render.TABLE
            if op.verb == "add":
                return tables | {table}, chains, maps, elements
            if table not in tables:
                raise NftError("Error: No such file or directory (table)")

            def kept(objects):
                return {name: v for name, v in objects.items() if render.table_of(name) != table}
            return tables - {table}, kept(chains), kept(maps), kept(elements)
        if render.table_of(op.name) not in tables:
            raise NftError("Error: No such file or directory (table)")
        if op.kind == "map":
            if op.verb == "add":
                if op.name not in maps:
                    maps[op.name] = op.arg
                    elements[op.name] = {}
            elif op.verb == "flush":
                self._need(maps, op.name)
                elements[op.name] = {}
            else:
                self._need(maps, op.name)
                del maps[op.name], elements[op.name]
        elif op.kind == "chain":
            if op.verb == "add":
                chains.setdefault(op.name, render.Chain(op.name, op.arg.hook, ()))
            elif op.verb == "flush":
                self._need(chains, op.name)
                chains[op.name] = chains[op.name]._replace(rules=())
            else:
                self._need(chains, op.name)
                if self._referenced(chains, elements, op.name):
                    raise NftError("Error: Could not process rule: Device or resource busy")
                del chains[op.name]
        elif op.kind == "rule":
            self._need(chains, op.name)
            for target in _CHAIN_TARGET.findall(op.arg):
                self._need(chains, target)
            chains[op.name] = chains[op.name]._replace(rules=chains[op.name].rules + (op.arg,))
        elif op.kind == "element":
            self._need(maps, op.name)
            self._expire(elements)
            elems = elements[op.name]
            if op.verb == "add":
                for k, v in op.arg:
                    k, _sep, timeout = k.partition(" timeout ")
                    if timeout:  # like the kernel: re-adding the same value refreshes it
                        if k not in elems or elems[k] == v:
                            words = timeout.split()
                            self.timeouts[(op.name, k)] = int(words[0].rstrip("s"))
                            self.expiry[(op.name, k)] = self.clock() + int(words[-1].rstrip("s"))
                    if v is not None and v.startswith("goto "):
                        self._need(chains, v[5:])
                    if k in elems and elems[k] != v:
                        raise NftError("Error: Could not process rule: File exists")
                    elems[k] = v
            else:
                for k in op.arg:
                    self._need(elems, k)
                    del elems[k]
                    self.expiry.pop((op.name, k), None)
        return tables, chains, maps, elements

    @staticmethod
    def _need(container, name):
        if name not in container:
            raise NftError("Error: Could not process rule: No such file or directory (%s)" % name)

    @staticmethod
    def _referenced(chains, elements, name):
        target = "goto " + name
        if any(target == v for elems in elements.values() for v in elems.values()):
            return True
        return any(name in _CHAIN_TARGET.findall(r) for c in chains.values() for r in c.rules)

    def dump(self):
        if render.TABLE not in self.tables:
            return ""
        return render.dump(self.chains, self.maps, self.elements, [t for t in render.TABLES if t in self.tables])

    def read_counters(self, direct_keys=None, counted_chains=None):
        return copy.deepcopy(self.rule_counters), copy.deepcopy(self.element_counters)

    def generation(self):
        return self.commits

    def read_table(self, shape=True):
        if render.TABLE not in self.tables:
            return None
        self._expire(self.elements)
        table = KernelTable()
        table.shape = shape_of(self.chains, self.maps, self.elements)
        table.kinds = {name: m.kind for name, m in self.maps.items()}
        table.rules = copy.deepcopy(self.rule_counters)
        for name, chain in self.chains.items():
            first = chain.rules[0] if chain.rules else ""
            table.comments[name] = first.split(' comment "', 1)[1][:-1] if ' comment "' in first else ""
        now = self.clock()
        for (name, key), deadline in self.expiry.items():
            value = self.elements.get(name, {}).get(key)
            table.timed.setdefault(name, {})[key] = (value, self.timeouts.get((name, key)), int(deadline - now))
        return table

    def read_elements(self, names):
        self._expire(self.elements)
        now = self.clock()
        out = {}
        for name in names:
            for key, value in self.elements.get(name, {}).items():
                deadline = self.expiry.get((name, key))
                out.setdefault(name, {})[key] = {
                    "value": value, "expires": None if deadline is None else int(deadline - now)}
        return out
