"""The agent's core: the ops of docs/agent-api.md over state, kernel and store.

A write goes: validate -> compute the new state -> render only the fragments it
touches -> apply their diff to the kernel in one transaction -> persist. If applying
fails, nothing is persisted (and a transaction is atomic, so the kernel is as before).
If persisting fails, the kernel is rolled back to the previous rendering. One lock
serialises every request, so the daemon may call `handle` from many threads.
"""

import contextlib
import copy
import gc
import itertools
import queue
import logging
import threading
import time
from typing import Any, Callable, Optional

from masqd import __version__, autofw_runtime, model, nfnetlink, render
from masqd.model import TABLES, ValidationError
from masqd.nft import NftError, shape_of
from masqd.rp_filter import rp_filter_warnings
from masqd.store import JOURNAL_MAX, Store
from masqd.watchers.ruleset import PERIODIC

_REQUEST_FIELDS = ("op", "table", "tables", "entry", "entries", "revision", "mark", "echo", "stream")
_WRITE_OPS = ("add", "insert", "edit", "delete", "flush", "set", "schedule")
_READ_OPS = ("status", "get", "list")
_BACKEND_TABLES = ("portfw", "mfw")
_WHOLE_TABLE_FRAGMENTS = ("marks", "masquerade")
AUTOFW_CONTROL_STATUS = autofw_runtime.WAITING
AUTOFW_NO_WATCHER = autofw_runtime.NO_WATCHER

log = logging.getLogger("masqd.service")


class KernelRejected(Exception):
    pass


class Alongside:
    """One call run in a thread of its own from `start()` (or in the caller's, if its
    result is asked for first): work that overlaps a long call without the GIL."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn, self._args = fn, args
        self._thread: Optional[threading.Thread] = None
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._done = False

    def start(self) -> None:
        if self._thread is None and not self._done:
            self._thread = threading.Thread(target=self._run, name="masqd-alongside", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # pylint: disable=broad-except  # re-raised by result()
            self._error = exc
        self._done = True

    def result(self) -> Any:
        if self._thread is not None:
            self._thread.join()
        elif not self._done:
            self._run()
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self, undo: Callable[[Any], None]) -> None:
        """Wait for a started call and `undo(its value)`; a call not started never runs."""
        if self._thread is None:
            self._done = True
            return
        self._thread.join()
        if self._error is None:
            undo(self._value)


class Service:
    def __init__(self, state_dir, nft=None):
        self.store = Store(state_dir)
        self.nft = nft
        self.socket_path = None  # set by the daemon, reported by `status`
        self._lock = threading.RLock()
        self._consume = False  # the request being handled is the Service's to consume
        self._tables = {t: {} for t in TABLES}
        self._checked = {t: frozenset() for t in _BACKEND_TABLES}  # keys with a checked backend
        self._mfw_heads = {}
        self._revision = 0
        self._ruleset = None
        # Backends health checks found down: {(table, key): frozenset((address, port))}.
        # Runtime only (docs/health.md): never persisted, empty after a restart.
        self._down = {}
        self._health_quiet = False  # render.health_fragment in the table (health_quiet)
        # AUTOFW control-port detection: who receives each range (runtime only).
        self.autofw = autofw_runtime.AutofwRecipients(self._kernel, self._now)
        self.watchers = {}  # name -> running watcher (masqd.watchers), for status
        self.clock = time.monotonic
        self.drift = DriftRecord()
        self.full_syncs = 0  # whole-table transactions: start, drift repair, failed incremental apply
        self.verifications_skipped = 0  # periodic ones: the ruleset's generation had not moved
        self._verified_generation = None  # the generation of the last comparison that matched
        self._readers = _Readers(self._kernel)  # kernel handles for reads off the lock
        self._seen_timed = None  # (clock, KernelTable.timed) of the last verification

    def _kernel(self):
        return self.nft

    def _now(self):
        return self.clock()  # looked up at each call: tests replace the clock

    @property
    def health(self):
        """The health-check watcher (masqd.watchers.health), if one runs."""
        return self.watchers.get("health")

    @property
    def watcher(self):
        """The AUTOFW conntrack watcher, if one runs."""
        return self.watchers.get("autofw")

    @watcher.setter
    def watcher(self, watcher):
        self.watchers["autofw"] = watcher

    # --- lifecycle --------------------------------------------------------------------

    def start(self):
        """Load the stored state and make the kernel hold exactly its table (full
        re-sync: whatever a killed predecessor left behind is replaced)."""
        with self._lock, gc_paused():
            if self.nft is None:
                from masqd.nft import LibNftables
                self.nft = LibNftables()
            self.store.ensure_dir()
            doc = self.store.load()
            tables = {}
            for table in TABLES:
                raw = doc["tables"].pop(table, [])
                tables[table] = model.normalize_table(table, raw, "state.tables.%s" % table, consume=True)
                del raw
            self._checked = {t: frozenset(k for k, e in tables[t].items() if model.checked(e))
                             for t in _BACKEND_TABLES}
            self._tables = tables
            self._mfw_heads = {int(k): v for k, v in doc.get("mfw_heads", {}).items()}
            self._revision = doc["revision"]
            self._full_sync(self.nft.read_table(shape=False))

    def stop(self):
        for watcher in self.watchers.values():
            if watcher is not None:
                watcher.stop()

    # --- full re-sync, carrying over what the kernel had ----------------------------------

    def _full_sync(self, kernel, deleted_rules=None):
        """Replace the kernel's table with the rendering of the state, in one transaction,
        continuing what the kernel had (`kernel`, a KernelTable read just before, or None
        when the table is gone): the position of every PORTFW/mfw schedule (from its
        rules' counters and phase comment, or from `deleted_rules` {chain: [(packets,
        comment)]} when someone else deleted them), the AUTOFW recipients with their
        remaining time (from the kernel, else from the agent's own records) and the
        address-pool bindings (from the kernel, else from the last verification's reading)."""
        previous = self._ruleset
        phases = self._carried_phases(kernel, deleted_rules or {})
        ruleset = render.render(self._tables, self._mfw_heads, phases, self._down)
        if self._health_quiet:
            ruleset.fragments["health"] = render.health_fragment()
        carried = self.autofw.carried(self._tables["autofw"], kernel)
        bindings = self._carried_pool_bindings(ruleset, kernel)
        self._sync_in_two(ruleset, kernel, carried + bindings)
        self._ruleset = ruleset
        self.full_syncs += 1
        if previous is not None:
            log.info("full re-sync: %d schedules continued, %d AUTOFW recipients and %d pool bindings kept",
                     len(phases), len(carried) // 2, len(bindings))

    def _sync_in_two(self, ruleset, kernel, extra_ops):
        """full_sync as two transactions (render.sync_in_two), so that the PORTFW keys go
        by netlink batch (portfw_batch) rather than through libnftables' parser: a start
        with 100,000 keys in ~1.7 s instead of ~2.4 s. First everything else, by
        libnftables (with `extra_ops`), then the keys, in one batch. Should either step
        be refused, the whole table goes again in one transaction, and so it does
        when the kernel holds objects in the wrong one of masqd's tables."""
        if kernel is None:
            steps = render.sync_in_two(ruleset, None, ())
        elif kernel.misplaced:
            steps = None
        else:
            steps = render.sync_in_two(ruleset, kernel.kinds, [n for kind, n in kernel.shape if kind == "chain"])
        if steps is not None:
            first, keys = steps
            first.ops += extra_ops
            try:
                self.nft.apply(first)
                self.nft.apply(keys)
                return
            except NftError as exc:
                log.warning("full re-sync in two steps refused (%s): loading the table whole", exc)
        txn = render.full_sync(ruleset)
        txn.ops += extra_ops
        self.nft.apply(txn)

    def _carried_pool_bindings(self, ruleset, kernel):
        """Ops re-creating the pool maps' host <-> address elements (render._pool_rules),
        so an inside host keeps its pool address over a restart or a repair."""
        if kernel is not None:
            timed, age = kernel.timed, 0
        elif self._seen_timed is not None:  # the table is gone: what the last reading saw
            seen_at, timed = self._seen_timed
            age = int(self.clock() - seen_at)
        else:
            return []
        ops = []
        masquerade = ruleset.fragments.get("masquerade", render.EMPTY)
        for name in sorted(n for n in masquerade.maps if n.startswith("pool_")):
            for key, (value, timeout, expires) in sorted(timed.get(name, {}).items()):
                left = (expires or 0) - age
                if value and left > 0:
                    ops.append(render.Op("add", "element", name, [
                        ("%s timeout %ds expires %ds" % (key, timeout or render.POOL_HOLD, left), value)]))
        return ops

    def _cascades(self):
        """(fid, chain name, backends in schedule order) of every multi-backend schedule."""
        down = self._down
        for key, entry in self._tables["portfw"].items():
            if len(entry["backends"]) > 1:
                live = render.live_backends(entry, entry["backends"], down.get(("portfw", key)))
                how, order = render.schedule(live) if live else ("reject", None)
                if how == "cascade":
                    yield ("portfw", key), render.portfw_chain_name(key), order
        for mark, entry in self._tables["mfw"].items():
            live = render.live_backends(entry, render.mfw_order(entry, self._mfw_heads.get(mark)),
                                        down.get(("mfw", mark)))
            how, order = render.schedule(live) if live else ("reject", None)
            if how == "cascade":
                yield ("mfw", mark), render.mfw_chain_name(mark), order

    def _carried_phases(self, kernel, deleted_rules):
        phases = {}
        for fid, chain, order in self._cascades():
            if kernel is not None and chain in kernel.rules:
                counts, comment = kernel.rules[chain], kernel.comments.get(chain, "")
            elif chain in deleted_rules:
                counts = [packets for packets, _comment in deleted_rules[chain]]
                comment = deleted_rules[chain][0][1] if deleted_rules[chain] else ""
            else:
                continue
            old = _phase_of(comment)
            position = render.cycle_position(order, old, counts)
            if position:
                phases[fid] = position
        return phases

    # --- drift: somebody else changed the table (masqd.watchers.ruleset) ----------------

    def repair_drift(self, report):
        """A foreign change to the table ended (RulesetMonitor): re-sync in full."""
        with self._lock, gc_paused():
            if self._ruleset is None:
                return
            started = self.clock()
            kernel = None if report.table_deleted else self.nft.read_table(shape=False)
            try:
                self._full_sync(kernel, report.deleted_rules)
            except NftError as exc:
                self.drift.failed(report.summary(), str(exc))
                log.error("drift repair failed: %s", exc)
                return
            self.drift.repaired(report.summary(), self.clock() - report.received if report.received else None,
                                self.clock() - started)

    def verify_kernel(self, reason):
        """The backstop: does the kernel's table have the shape of the rendering? Read
        off the lock with a second kernel handle; repair (under the lock) if not.

        A periodic verification is skipped while the ruleset's generation is the one
        of the agent's own last commit or of the last matching comparison: nobody has
        committed since (events would have said so anyway; lost ones set off a
        verification that is never skipped). Counting a map's elements takes a dump of
        all of them: ~90 s at 1,000,000 keys, so every 60 s would never end."""
        if self._ruleset is None:
            return
        ruleset = self._ruleset
        with self._readers.borrow() as reader:
            try:
                now = reader.generation()
            except OSError:
                now = None
            if (reason == PERIODIC and now is not None
                    and now in (self.nft.committed_generation, self._verified_generation)):
                self.verifications_skipped += 1
                return
            want = shape_of(*ruleset.objects())
            kernel = reader.read_table()
        if kernel is not None:
            self._seen_timed = (self.clock(), kernel.timed)
        if kernel is not None and kernel.shape == want:
            self._verified_generation = now
            return
        with self._lock, gc_paused():
            kernel = self.nft.read_table()  # again, under the lock: our own change may have been in flight
            want = shape_of(*self._ruleset.objects())
            if kernel is not None and kernel.shape == want:
                return
            found = _shape_difference(want, None if kernel is None else kernel.shape)
            started = self.clock()
            try:
                self._full_sync(kernel)
            except NftError as exc:
                self.drift.failed("%s: %s" % (reason, found), str(exc))
                return
            self.drift.repaired("%s: %s" % (reason, found), None, self.clock() - started)

    # --- request dispatch ---------------------------------------------------------------

    def handle(self, request, owned=False):
        """The response envelope of one request. `owned`: the caller hands the request
        over (the server, which parsed it), so a set may drop its raw entries as it
        validates them; otherwise the caller's objects are left as they were."""
        try:
            if isinstance(request, dict) and request.get("op") in _READ_OPS:
                # Reads run on a snapshot, off the lock, with a kernel handle of their
                # own: a long `list` never holds up writers or other readers.
                with self._lock:
                    self._need_started(request)
                    view = copy.copy(self)
                    view.autofw = self.autofw.snapshot()
                # The collector paused here too: a 100,000-key list's objects would
                # otherwise set off a full collection (a pause of every thread).
                with self._readers.borrow() as reader, gc_paused():
                    view.nft = reader
                    return view._handle(request)
            with self._lock, gc_paused():
                self._need_started(request)
                self._consume = owned
                try:
                    return self._handle(request)
                finally:
                    self._consume = False
        except ValidationError as exc:
            return {"ok": False, "error": exc.to_dict()}
        except KernelRejected as exc:
            return {"ok": False, "error": exc.args[0]}
        except Exception as exc:  # never let one request take the agent down
            return {"ok": False, "error": {"field": None, "value": None,
                                           "message": "internal error: %s: %s" % (type(exc).__name__, exc)}}

    def _need_started(self, request):
        if self._ruleset is None:
            raise ValidationError("op", request.get("op") if isinstance(request, dict) else None,
                                  "the agent is not started")

    def _handle(self, request):
        if not isinstance(request, dict):
            raise ValidationError("request", request, "must be a JSON object")
        for key in request:
            if key not in _REQUEST_FIELDS:
                raise ValidationError(str(key), request[key], "unknown field")
        op = request.get("op")
        method = getattr(self, "_op_" + op, None) if isinstance(op, str) else None
        if method is None:
            raise ValidationError("op", op, "unknown op")
        if "echo" in request and op != "set":
            raise ValidationError("echo", request["echo"], "only a set takes echo")
        if "stream" in request:  # the entries come as EntryParts, which the server sends one by one
            if op != "list":
                raise ValidationError("stream", request["stream"], "only a list takes stream")
            if not isinstance(request["stream"], bool):
                raise ValidationError("stream", request["stream"], "must be true or false")
        if op in _WRITE_OPS and "revision" in request:
            rev = request["revision"]
            if isinstance(rev, bool) or not isinstance(rev, int):
                raise ValidationError("revision", rev, "must be an integer")
            if rev != self._revision:
                raise ValidationError("revision", rev, "stale: the current revision is %d" % self._revision)
        changed, result = method(request)
        return {"ok": True, "revision": self._revision, "changed": changed, "result": result}

    # --- reads --------------------------------------------------------------------------

    def _op_status(self, request):
        watcher = self.watcher.stats() if self.watcher is not None else {"running": False}
        return False, {"version": __version__, "revision": self._revision,
                       "tables": {t: len(self._tables[t]) for t in TABLES},
                       "socket": self.socket_path, "state_file": self.store.path,
                       "autofw_watcher": watcher,
                       "watchers": {name: w.stats() for name, w in self.watchers.items() if w is not None},
                       "drift": self.drift.as_dict(), "full_syncs": self.full_syncs,
                       "verifications_skipped": self.verifications_skipped,
                       "warnings": rp_filter_warnings(self._tables["marks"].values())}

    def _op_get(self, request):
        if request.get("table") is None:
            return False, {"tables": {t: list(self._tables[t].values()) for t in TABLES}}
        table = model.table_name(request["table"])
        return False, {"entries": list(self._tables[table].values())}

    def _op_list(self, request):
        if request.get("stream") and request.get("table") is None:
            raise ValidationError("stream", True, "a streamed list is of one table: give table")
        tables = TABLES if request.get("table") is None else (model.table_name(request["table"]),)
        counted = any(t in _BACKEND_TABLES or t == "marks" for t in tables)
        counters = self.nft.read_counters(self._direct_keys, self._counted_chains) if counted else ({}, {})
        if "autofw" in tables:
            counters = counters + (self.nft.read_elements(self.autofw.map_names(self._tables["autofw"])),)
        if request.get("stream") and tables == ("portfw",):  # rows built part by part as they are sent
            return False, {"entries": EntryParts(self._portfw_rows(counters))}
        out = {t: list(self._portfw_rows(counters)) if t == "portfw" else
               [self._runtime(t, key, e, counters) for key, e in self._tables[t].items()] for t in tables}
        if "marks" in out:
            # The classifier chain has one counted rule per marks rule, in table order
            # (render.marks_fragment); a chain that does not match (being repaired) gives none.
            hits = counters[0].get("mark_classify", [])
            if len(hits) == len(out["marks"]):
                for rule, count in zip(out["marks"], hits):
                    rule["hits"] = count
        if request.get("table") is None:
            return False, {"tables": out}
        entries = out[tables[0]]
        return False, {"entries": EntryParts(iter(entries)) if request.get("stream") else entries}

    def _direct_keys(self, name):
        """The nfnetlink keys of the PORTFW keys direct map `name` holds if they have one
        target (keys with several live backends are not in it, and are simply not found)."""
        direct_map = render.direct_map
        return [nfnetlink.address_proto_port_key(address, protocol, port)
                for protocol, address, port in self._tables["portfw"] if direct_map(address, port) == name]

    def _counted_chains(self):
        """The chains whose rule counters a listing reads: cascades, mfw, the classifier."""
        return ([name for _fid, name, _order in self._cascades()]
                + [render.mfw_chain_name(mark) for mark in self._tables["mfw"]] + ["mark_classify"])

    def _portfw_rows(self, counters):
        """_runtime of every PORTFW key, one by one, with most keys' case written out:
        one unchecked backend, nothing down (its direct map element's counter is the
        connection count: backend_runtime's "single" case)."""
        v4, v6 = (counters[1].get(name, {}) for name in ("portfw_direct_v4", "portfw_direct_v6"))
        down = self._ruleset.down
        packed = {}  # address -> its bytes, once per address
        protocols = nfnetlink.PROTOCOL_REGISTERS
        for key, entry in self._tables["portfw"].items():
            backends = entry["backends"]
            if len(backends) != 1 or "check" in backends[0] or ("portfw", key) in down:
                yield self._runtime("portfw", key, entry, counters)
                continue
            protocol, address, port = key
            raw = packed.get(address)
            if raw is None:
                raw = packed[address] = nfnetlink.address_bytes(address)
            total = (v6 if len(raw) == 16 else v4).get(raw + protocols[protocol] + port.to_bytes(2, "big") + b"\0\0", 0)
            pref = backends[0]["pref"]
            row = dict(entry)
            row["backends"] = [dict(backends[0], pcnt=pref - total % pref if pref else 0, connections=total, head=True)]
            yield row

    def _runtime(self, table, key, entry, counters):
        entry = dict(entry)
        if table == "autofw":
            watcher = self.watcher
            return self.autofw.runtime(key, entry, counters[2], None if watcher is None else watcher.running)
        elif table in _BACKEND_TABLES:
            entry["backends"] = backend_runtime(table, entry, self._mfw_heads.get(key), *counters[:2],
                                                phase=self._ruleset.phases.get((table, key), 0),
                                                down=self._ruleset.down.get((table, key)))
            if model.checked(entry):
                self._health_runtime(table, key, entry)
        return entry

    def _health_runtime(self, table, key, entry):
        """Each checked backend's `health` (state, since, last error) for listings."""
        health = self.health
        down = self._ruleset.down.get((table, key), ())
        for b in entry["backends"]:
            if "check" not in b:
                continue
            state = health.state_of(table, key, b["address"], b["port"]) if health is not None else None
            if state is None:
                state = {"state": "down" if (b["address"], b["port"]) in down else "unknown",
                         "since": None, "last_error": None,
                         "checker": "running" if health is not None and health.running else "not running"}
            b["health"] = state
        if down and len(down) >= len(entry["backends"]) and entry.get("all_down", "forward") != "forward":
            entry["all_down_active"] = entry.get("all_down")

    # --- writes -------------------------------------------------------------------------

    def _entry(self, request, table):
        if "entry" not in request:
            raise ValidationError("entry", None, "is required")
        entry = model.normalize_entry(table, request["entry"], "entry")
        if table in _BACKEND_TABLES and not entry["backends"]:
            raise ValidationError("entry.backends", [], "must be a non-empty list of backends")
        return entry

    def _table(self, request, allowed=TABLES):
        table = model.table_name(request.get("table"))
        if table not in allowed:
            raise ValidationError("table", table, "op %s works on table %s only"
                                  % (request["op"], " or ".join(allowed)))
        return table

    def _op_add(self, request):
        return self._add(request, at_head=False)

    def _op_insert(self, request):
        return self._add(request, at_head=True)

    def _add(self, request, at_head):
        table = self._table(request, ("mfw",) if at_head else TABLES)
        entry = self._entry(request, table)
        key = model.entry_key(table, entry)
        current = self._tables[table].get(key)
        if table in _BACKEND_TABLES:
            if current is not None:
                entry = dict(current, backends=_merge_backends(current, entry, at_head))
        elif current is not None:
            if current == entry:
                return False, {"entry": current}
            raise ValidationError("entry.%s" % model.key_fields(table)[0], request["entry"].get(
                model.key_fields(table)[0]), "an entry with this key already exists")
        if current is None:
            self._check_size(table, 1)
            if table in ("autofw", "masquerade"):
                try:
                    model.check_table(table, list(self._tables[table].values()) + [entry], "entries")
                except ValidationError as exc:
                    raise ValidationError("entry", request["entry"], exc.message) from None
        return self._put(table, {key: entry}, ()), {"entry": entry}

    def _op_edit(self, request):
        table = self._table(request, _BACKEND_TABLES)
        entry = self._entry(request, table)
        key = model.entry_key(table, entry)
        current = self._need(table, key, request["entry"])
        prefs = {(b["address"], b["port"]): b["pref"] for b in entry["backends"]}
        known = {(b["address"], b["port"]) for b in current["backends"]}
        for i, b in enumerate(entry["backends"]):
            if (b["address"], b["port"]) not in known:
                raise ValidationError("entry.backends[%d]" % i, request["entry"]["backends"][i],
                                      "no such backend for this key")
        backends = [dict(b, pref=prefs.get((b["address"], b["port"]), b["pref"])) for b in current["backends"]]
        # A backend given with `check` gets that check (type none removes it).
        checks = {(b["address"], b["port"]): b.get("check") for i, b in enumerate(entry["backends"])
                  if isinstance(request["entry"]["backends"][i], dict) and "check" in request["entry"]["backends"][i]}
        for b in backends:
            if (b["address"], b["port"]) in checks:
                b.pop("check", None)
                if checks[(b["address"], b["port"])] is not None:
                    b["check"] = checks[(b["address"], b["port"])]
        new = dict(current, backends=backends)
        return self._put(table, {key: new}, ()), {"entry": new}

    def _op_delete(self, request):
        table = self._table(request)
        raw = request.get("entry")
        key, backends = self._parse_key(table, raw)
        current = self._need(table, key, raw)
        if not backends:
            return self._put(table, {}, (key,)), {"entry": current}
        keep = list(current["backends"])
        for i, b in enumerate(backends):
            match = [k for k in keep if k["address"] == b["address"] and k["port"] == b["port"]]
            if not match:
                raise ValidationError("entry.backends[%d]" % i, raw["backends"][i], "no such backend for this key")
            keep.remove(match[0])
        if not keep:
            return self._put(table, {}, (key,)), {"entry": current}
        new = dict(current, backends=keep)
        return self._put(table, {key: new}, ()), {"entry": new}

    def _op_flush(self, request):
        table = self._table(request)
        return self._replace(table, {}), {"entries": []}

    def _op_set(self, request):
        # echo: false answers with the entry counts only: a 100,000-key table sent back
        # costs the agent and the caller about a second of JSON for what the caller sent.
        echo = request.get("echo", True)
        if not isinstance(echo, bool):
            raise ValidationError("echo", echo, "must be true or false")
        if "tables" in request:
            news = self._tables_arg(request)
            changed = self._replace_many(news)
            if not echo:
                return changed, {"counts": {t: len(e) for t, e in news.items()}}
            return changed, {"tables": {t: list(e.values()) for t, e in news.items()}}
        table = self._table(request)
        # An owned request's raw entries are dropped as they are validated: at 100,000
        # keys they and the canonical entries would otherwise be alive together.
        new = model.normalize_table(table, request.get("entries"), "entries", consume=self._consume)
        changed = self._replace(table, new)
        return changed, {"entries": list(new.values())} if echo else {"count": len(new)}

    def _op_plan(self, request):
        if "tables" in request:
            news = self._tables_arg(request)
        else:
            table = self._table(request)
            news = {table: model.normalize_table(table, request.get("entries"), "entries", consume=self._consume)}
        changes, heads = self._changes_for_replace(news)
        new_rs, fids = self._render_changes(changes, heads)
        txn = render.diff(self._ruleset, new_rs, fids)
        if txn:
            try:
                self.nft.apply(txn, dry_run=True)
            except NftError as exc:
                raise KernelRejected(_kernel_error("tables" if "tables" in request else "entries", exc)) from None
        before = {t: list(self._tables[t].values()) for t in news}
        after = {t: list(new.values()) for t, new in news.items()}
        result = {"changed": before != after, "nft": txn.to_text()}
        if "tables" in request:
            result.update(before=before, after=after)
        else:
            result.update(before=before[table], after=after[table])
        return False, result

    def _tables_arg(self, request):
        """`tables` of a multi-table set/plan: {table: entries}, each validated."""
        if "table" in request or "entries" in request:
            raise ValidationError("tables", None, "give either table and entries, or tables")
        raw = request["tables"]
        if not isinstance(raw, dict) or not raw:
            raise ValidationError("tables", raw, "must be an object {table: [entries]} naming at least one table")
        news = {}
        for name, entries in raw.items():
            table = model.table_name(name, "tables")
            news[table] = model.normalize_table(table, entries, "tables.%s" % table, consume=self._consume)
        return news

    def _op_schedule(self, request):
        if "mark" not in request:
            raise ValidationError("mark", None, "is required")
        mark = model.mark(request["mark"], "mark")
        entry = self._need("mfw", mark, request["mark"], field="mark")
        order = render.mfw_order(entry, self._mfw_heads.get(mark))
        rules, _elements = self.nft.read_counters()
        head = current_head(order, rules.get(render.mfw_chain_name(mark)), self._ruleset.phases.get(("mfw", mark), 0))
        new_head = order[(order.index(head) + 1) % len(order)]
        heads = dict(self._mfw_heads)
        heads[mark] = {"address": new_head["address"], "port": new_head["port"]}
        if current_head(render.mfw_order(entry, heads[mark]), None) is head:
            # One backend, or a mixed list that settles on the same pref-0 backend.
            return False, {"head": {"address": head["address"], "port": head["port"]}}
        changed = self._commit({"mfw": (dict(self._tables["mfw"]), [mark])}, heads, {"put": [], "delete": []})
        return changed, {"head": heads[mark]}

    # --- write helpers --------------------------------------------------------------------

    def _parse_key(self, table, raw, field="entry"):
        """The key (and, for portfw/mfw, the backends to remove) of a delete."""
        if not isinstance(raw, dict):
            raise ValidationError(field, raw, "must be an object")
        key_only = set(raw) <= set(model.key_fields(table)) | {"backends"}
        if table in _BACKEND_TABLES or not key_only:
            entry = model.normalize_entry(table, raw, field)
            return model.entry_key(table, entry), entry.get("backends") if "backends" in raw else None
        for k in model.key_fields(table):
            if k not in raw:
                raise ValidationError("%s.%s" % (field, k), None, "is required")
        if "backends" in raw:
            raise ValidationError(field + ".backends", raw["backends"], "unknown field")
        if table == "autofw":
            model.protocol(raw["protocol"], field + ".protocol")
            model.port(raw["low_port"], field + ".low_port")
            model.port(raw["high_port"], field + ".high_port")
            return (raw["protocol"], raw["low_port"], raw["high_port"]), None
        return model.name(raw["name"], field + ".name"), None

    def _need(self, table, key, raw, field="entry"):
        current = self._tables[table].get(key)
        if current is None:
            raise ValidationError(field, raw, "no such %s entry" % table)
        return current

    def _check_size(self, table, extra):
        if len(self._tables[table]) + extra > model.MAX_ENTRIES[table]:
            raise ValidationError("entry", None, "table %s holds at most %d entries"
                                  % (table, model.MAX_ENTRIES[table]))

    def _put(self, table, puts, deletes):
        """Commit a change of a few keys: `puts` {key: entry}, `deletes` keys."""
        old = self._tables[table]
        if all(old.get(k) == e for k, e in puts.items()) and not deletes:
            return False
        new = dict(old)
        new.update(puts)
        heads = self._mfw_heads
        for key in deletes:
            new.pop(key, None)
            if table == "mfw" and key in heads:
                heads = {k: v for k, v in heads.items() if k != key}
        keys = list(puts) + list(deletes)
        record = {"put": list(puts.values()), "delete": [list(k) if isinstance(k, tuple) else k for k in deletes]}
        return self._commit({table: (new, keys)}, heads, record)

    def _changes_for_replace(self, news):
        """{table: (new table, keys that differ)} and the mfw heads of replacing tables."""
        changes = {}
        for table, new in news.items():
            old = self._tables[table]
            if list(old.items()) != list(new.items()):
                changes[table] = (new, [k for k in old if k not in new]
                                  + [k for k, e in new.items() if old.get(k) != e])
        heads = self._mfw_heads
        if "mfw" in changes:
            heads = {k: v for k, v in heads.items() if k in news["mfw"]}
        return changes, heads

    def _replace(self, table, new):
        return self._replace_many({table: new})

    def _replace_many(self, news):
        changes, heads = self._changes_for_replace(news)
        if not changes:
            return False
        return self._commit(changes, heads, None)

    def _render_changes(self, changes, heads, down=None):
        """The Ruleset after `changes` ({table: (new table, keys)}) and the fragment ids
        they touch, in order (a list: the transaction's text follows the keys' order).
        `down`: the health map to render with (default: the current one)."""
        down = self._down if down is None else down
        tables = dict(self._tables)
        for table, (new_table, _keys) in changes.items():
            tables[table] = new_table
        fragments, fids, portfw = {}, [], None
        for table, (new_table, keys) in changes.items():
            fids += new_rs_ids(table, keys)
            if table == "portfw":  # rendered on demand from the entries (render.Ruleset)
                portfw = new_table
                continue
            for key in [None] if table in _WHOLE_TABLE_FRAGMENTS else keys:
                fid, frag = render.fragment_for(table, key, tables, heads, down)
                fragments[fid] = frag
            if table == "autofw":
                fragments["autofw_control"] = render.autofw_control_fragment(new_table.values())
        return self._ruleset.replace(fragments, portfw=portfw, touched=fids, down=down), fids

    def _commit(self, changes, heads, record, down=None):
        """Apply and persist `changes` ({table: (new table, keys)}) in one transaction.
        `record` is the journal record of a one-table change, or None for a snapshot.
        `down`: a new health map (health_changed); either way, backends whose check
        went away or changed leave it."""
        down = self._down_after(changes, self._down if down is None else down)
        new_rs, fids = self._render_changes(changes, heads, down)
        txn = render.diff(self._ruleset, new_rs, fids)
        field = "entries" if record is None else "entry"
        if record is None and len(changes) > 1:
            field = "tables"
        revision = self._revision + 1
        tables = dict(self._tables)
        for table, (new_table, _keys) in changes.items():
            tables[table] = new_table
        journaled = record is not None and self.store.journal_records < JOURNAL_MAX
        snapshot = None
        if not journaled:
            # A snapshot is encoded and written while the kernel commits: libnftables
            # runs without the GIL (0.4 s of a 100,000-key set); installed only after.
            snapshot = Alongside(self.store.prepare, {
                "revision": revision, "tables": {t: list(tables[t].values()) for t in TABLES},
                "mfw_heads": {str(k): v for k, v in heads.items()}})
        try:
            self._apply(txn, new_rs, field, snapshot)
        except BaseException:
            if snapshot is not None:
                snapshot.cancel(self.store.discard)
            raise
        try:
            if journaled:
                (table,) = changes
                record = dict(record, revision=revision, table=table)
                if heads is not self._mfw_heads:
                    record["mfw_heads"] = {str(k): v for k, v in heads.items()}
                self.store.append(record)
            else:
                self.store.install(snapshot.result())
        except OSError as exc:
            self._rollback(new_rs, fids)
            raise KernelRejected({"field": "state_dir", "value": self.store.state_dir,
                                  "message": "could not persist the state, change rolled back: %s" % exc})
        old_autofw = self._tables["autofw"]
        # _checked and _tables before _revision: whoever sees the new revision (the
        # health watcher) reads both new
        self._checked, self._tables, self._mfw_heads, self._revision, self._ruleset = (
            self._checked_after(changes), tables, heads, revision, new_rs)
        self._down = down
        if "autofw" in changes:
            new_autofw = changes["autofw"][0]
            self.autofw.forget(old_autofw, [k for k in changes["autofw"][1] if old_autofw.get(k) != new_autofw.get(k)])
        return True

    def _apply(self, txn, new_rs, field, alongside=None):
        """Incremental apply; on failure a full re-sync, if the kernel accepts it.
        `alongside` (an Alongside) is started as the kernel call begins."""
        if not txn:
            return
        try:
            self.nft.apply(txn, alongside=alongside)
            return
        except NftError as exc:
            first = exc
        full = render.full_sync(new_rs)
        try:  # The kernel drifted (or the change is bad): does the whole table load?
            self.nft.apply(full, dry_run=True)
        except NftError:
            raise KernelRejected(_kernel_error(field, first)) from None
        self.nft.apply(full)
        self.full_syncs += 1
        self.autofw.live = {}  # the re-created table holds no detected recipients

    def _rollback(self, new_rs, fids):
        try:
            self.nft.apply(render.diff(new_rs, self._ruleset, fids))
        except NftError:
            self.nft.apply(render.full_sync(self._ruleset))

    # --- health checks (fed by masqd.watchers.health, docs/health.md) -------------------

    def _checked_after(self, changes):
        """_checked once `changes` ({table: (new table, keys)}) are in."""
        checked = dict(self._checked)
        for table, (new_table, keys) in changes.items():
            if table in checked:
                now = set(checked[table])
                for key in keys:
                    entry = new_table.get(key)
                    if entry is not None and model.checked(entry):
                        now.add(key)
                    else:
                        now.discard(key)
                checked[table] = frozenset(now)
        return checked

    def health_targets(self):
        """{(table, key, address, port): check} of every checked backend (lock-free:
        tables are swapped whole, never mutated). Only the keys with a check are
        looked at: after every change, at 1,000,000 keys a scan would cost seconds."""
        tables, checked = self._tables, self._checked
        out = {}
        for table in _BACKEND_TABLES:
            for key in checked[table]:
                entry = tables[table].get(key)
                if entry is None:
                    continue
                for b in entry["backends"]:
                    check = b.get("check")
                    if check is not None:
                        out[(table, key, b["address"], b["port"])] = check
        return out

    def health_changed(self, table, key, address, port, up):
        """A checked backend went down (`fall` failures) or up (`rise` successes):
        re-render its key over the live backends, in one transaction. An mfw pref-0
        list whose serving backend went down moves its head to the next live backend
        (as `schedule` would, persisted like it); without `failback` a recovering
        backend does not take over again. Returns the entry's flush_on_down when the
        change was applied (the caller flushes conntrack), None if nothing changed."""
        with self._lock, gc_paused():
            if self._ruleset is None:
                return None
            entry = self._tables[table].get(key)
            if entry is None or not any(b["address"] == address and b["port"] == port and "check" in b
                                        for b in entry["backends"]):
                return None  # the configuration moved on since the check started
            fid, member = (table, key), (address, port)
            cur = self._down.get(fid, frozenset())
            new = cur - {member} if up else cur | {member}
            if new == cur:
                return None
            down = dict(self._down)
            if new:
                down[fid] = frozenset(new)
            else:
                down.pop(fid, None)
            heads = self._mfw_heads
            if table == "mfw" and not entry.get("failback"):
                heads = _failover_heads(heads, key, entry, cur, new)
            started = self.clock()
            if heads is not self._mfw_heads:
                self._commit({"mfw": (self._tables["mfw"], [key])}, heads, {"put": [], "delete": []}, down)
            else:
                new_rs, fids = self._render_changes({table: (self._tables[table], [key])}, heads, down)
                self._apply(render.diff(self._ruleset, new_rs, fids), new_rs, "health")
                self._ruleset, self._down = new_rs, down
            log.info("health: %s %s backend %s port %s %s (%.1f ms to re-render)", table, key, address, port,
                     "up" if up else "down", (self.clock() - started) * 1000)
            return bool(entry.get("flush_on_down"))

    def health_quiet(self, on):
        """The health watcher has checks to run (on) or none: add or remove the chain
        that silences conntrack events of its probes (render.health_fragment)."""
        with self._lock:
            if self._ruleset is None or bool(on) == self._health_quiet:
                return
            new_rs = self._ruleset.replace({"health": render.health_fragment() if on else None})
            self._apply(render.diff(self._ruleset, new_rs, ["health"]), new_rs, "health")
            self._ruleset, self._health_quiet = new_rs, bool(on)

    def _down_after(self, changes, down):
        """The health map after `changes`: a backend leaves it when it, or its check,
        is no longer in its key's entry (a re-added backend starts unknown)."""
        if not down:
            return down
        out = down
        for table in _BACKEND_TABLES:
            if table not in changes:
                continue
            new_table, keys = changes[table]
            for key in keys:
                fid = (table, key)
                if fid not in down:
                    continue
                old_e, new_e = self._tables[table].get(key), new_table.get(key)
                keep = frozenset(m for m in down[fid]
                                 if _check_of(new_e, m) is not None and _check_of(new_e, m) == _check_of(old_e, m))
                if keep != down[fid]:
                    if out is down:
                        out = dict(down)
                    if keep:
                        out[fid] = keep
                    else:
                        del out[fid]
        return out

    # --- AUTOFW control-port detection (fed by masqd.watchers.conntrack) ----------------

    def control_ports(self):
        """{(protocol, port)} the watcher must report (lock-free: tables are swapped whole)."""
        return {(e["control_protocol"], e["control_port"])
                for e in self._tables["autofw"].values() if e["control_port"]}

    def autofw_control_seen(self, protocol, source, destination, port, kind="new"):
        """A control connection from internal host `source` to `destination`:`port`;
        see masqd.autofw_runtime. Returns [(entry key, "set" | "replaced" | "refreshed")]."""
        with self._lock:
            if self._ruleset is None:
                return []
            return self.autofw.seen(self._tables["autofw"], protocol, source, destination, port, kind)


class _Readers:
    """A pool of kernel handles for reads off the service lock (libnftables contexts
    are not thread-safe). With another backend (the fake kernel of the unit tests) the
    service's own handle is used."""

    MAX_IDLE = 4

    def __init__(self, backend):
        self._backend = backend
        self._idle = queue.SimpleQueue()

    @contextlib.contextmanager
    def borrow(self):
        from masqd.nft import LibNftables
        backend = self._backend()
        if not isinstance(backend, LibNftables):
            yield backend
            return
        try:
            handle = self._idle.get_nowait()
        except queue.Empty:
            handle = LibNftables()
        try:
            yield handle
        finally:
            if self._idle.qsize() < self.MAX_IDLE:
                self._idle.put(handle)


class DriftRecord:
    """What `status` says about foreign changes: how many, when, what, how fast repaired."""

    HISTORY = 8

    def __init__(self):
        self.count = 0
        self.failures = 0
        self.last = None  # {"at", "found", "repair_seconds", "detected_to_repaired_seconds"}
        self.history = []

    def repaired(self, found, since_detected, took):
        self.count += 1
        self.last = {"at": _iso(time.time()), "found": found, "result": "repaired",
                     "repair_seconds": round(took, 4),
                     "detected_to_repaired_seconds": None if since_detected is None else round(since_detected, 4)}
        self._remember()

    def failed(self, found, error):
        self.count += 1
        self.failures += 1
        self.last = {"at": _iso(time.time()), "found": found, "result": "repair failed: %s" % error,
                     "repair_seconds": None, "detected_to_repaired_seconds": None}
        self._remember()

    def _remember(self):
        self.history = (self.history + [self.last])[-self.HISTORY:]

    def as_dict(self):
        return {"count": self.count, "failures": self.failures, "last": self.last,
                "recent": list(self.history)}


def _phase_of(comment):
    if comment.startswith(render.PHASE_COMMENT):
        try:
            return int(comment[len(render.PHASE_COMMENT):])
        except ValueError:
            return 0
    return 0


def _shape_difference(want, have):
    if have is None:
        return "table inet masqd missing"
    missing = sorted("%s %s" % k for k in want if k not in have)
    extra = sorted("%s %s" % k for k in have if k not in want)
    changed = sorted("%s %s (%d, want %d)" % (k[0], k[1], have[k], want[k])
                     for k in want if k in have and have[k] != want[k])
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("changed", changed)):
        if items:
            parts.append("%s: %s%s" % (label, ", ".join(items[:5]), " ..." if len(items) > 5 else ""))
    return "; ".join(parts)


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector paused while a request runs: a 100,000-key `set`
    allocates ~400,000 containers, and the collections they trigger (each traversing
    every live entry) cost about a third of the request; a `list` or a metrics
    exposition as many, and a full collection stops every thread meanwhile. Requests
    create no reference cycles worth collecting early; the collector resumes
    afterwards (with overlapping uses, when the one that found it enabled ends).

    When more than FREEZE_AFTER containers outlive the pause (a whole-table `set` or
    start: the new state), they are frozen first (gc.freeze: never traversed again;
    still freed by reference counting). Else the first collection after the pause
    would traverse them all: 5.5 s after a 1,000,000-key `set`, and every later full
    collection as long again. A reference cycle made during such a request is never
    collected; requests make none on purpose."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_count()[0] > FREEZE_AFTER:
                gc.freeze()
            gc.enable()


FREEZE_AFTER = 100000  # containers, see gc_paused
STREAM_ENTRIES = 5000  # entries per part of a streamed `list` (~800 KB of JSON)


class EntryParts:
    """The entries of a `list` with "stream": true: lists of up to STREAM_ENTRIES
    entries, each built (collector paused) when the server asks for it, so a client
    decodes one part while the next is built and encoded. Made from the read's
    snapshot and counters: what a writer does meanwhile does not show."""

    def __init__(self, rows):
        self._rows = rows

    def __iter__(self):
        while True:
            with gc_paused():
                part = list(itertools.islice(self._rows, STREAM_ENTRIES))
            if not part:
                return
            yield part


def _iso(wall):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def new_rs_ids(table, keys):
    if table in _WHOLE_TABLE_FRAGMENTS:
        return [table]
    fids = list(dict.fromkeys((table, k) for k in keys))
    return fids + ["autofw_control"] if table == "autofw" else fids


def _kernel_error(field, exc):
    return {"field": field, "value": None, "message": "the kernel refused the change: %s" % exc}


def _check_of(entry, member):
    """The check of backend `member` (address, port) of an entry, or None."""
    if entry is None:
        return None
    for b in entry["backends"]:
        if (b["address"], b["port"]) == member:
            return b.get("check")
    return None


def _serving(entry, order, down):
    """The backend a pref-0 list sends everything to with `down` out, or None (a
    cycling list, or every backend down)."""
    live = [b for b in order if (b["address"], b["port"]) not in down]
    if not live:
        return None
    how, target = render.schedule(live)
    return target if how == "single" else None


def _failover_heads(heads, mark, entry, before_down, after_down):
    """mfw heads after a health change without failback: the serving backend of a
    pref-0 list changes only when it goes down (the next live one becomes head, as
    `schedule` would); a backend coming back does not take over."""
    order = render.mfw_order(entry, heads.get(mark))
    before, after = _serving(entry, order, before_down), _serving(entry, order, after_down)
    if before is None or after is None or before is after:
        return heads
    target = after if (before["address"], before["port"]) in after_down else before
    head = {"address": target["address"], "port": target["port"]}
    if heads.get(mark) == head:
        return heads
    heads = dict(heads)
    heads[mark] = head
    return heads


def _merge_backends(current, entry, at_head):
    have = {(b["address"], b["port"]) for b in current["backends"]}
    families = {":" in b["address"] for b in current["backends"]}
    for i, b in enumerate(entry["backends"]):
        if (b["address"], b["port"]) in have:
            raise ValidationError("entry.backends[%d]" % i, b, "already a backend of this key")
        if families and (":" in b["address"]) not in families:
            raise ValidationError("entry.backends[%d].address" % i, b["address"], "mixes IPv4 and IPv6 in one entry")
    merged = entry["backends"] + current["backends"] if at_head else current["backends"] + entry["backends"]
    if len(merged) > model.MAX_BACKENDS:
        raise ValidationError("entry.backends", len(merged), "at most %d backends per entry" % model.MAX_BACKENDS)
    return merged


# --- runtime view: pcnt and connections from kernel counters ------------------------------

def _at_position(order, position):
    """(head backend, its pcnt) of a cascade `position` connections into its cycle."""
    offset = 0
    for b in order:
        if position < offset + b["pref"]:
            return b, offset + b["pref"] - position
        offset += b["pref"]
    return order[0], order[0]["pref"]  # not reached


def _cascade_view(order, phase, counts):
    """(head, its pcnt, {id(backend): connections}) of a cascade built at `phase` whose
    rules counted `counts` (the rules of render.rotate(order, phase), in order)."""
    segments = render.rotate(order, phase)
    position = render.cycle_position(order, phase, counts)
    if position is None:  # counters not (yet) of this cascade: a fresh cycle
        counts, position = [0] * len(segments), phase % sum(b["pref"] for b in order)
    by_backend = {(b["address"], b["port"]): b for b in order}
    conns = {}
    for segment, count in zip(segments, counts):
        b = by_backend[(segment["address"], segment["port"])]
        conns[id(b)] = conns.get(id(b), 0) + count
    head, pcnt = _at_position(order, position)
    return head, pcnt, conns


def current_head(order, chain_counts, phase=0):
    how, target = render.schedule(order)
    if how == "single":
        return target
    return _cascade_view(order, phase, chain_counts)[0]


def backend_runtime(table, entry, head, rule_counters, element_counters, phase=0, down=None):
    """Backends (configured order) with pcnt, connections and head, like the seed's
    /proc/net/ip_masq/portfw listing. `down`: backends out of the schedule (health)."""
    portfw = table == "portfw"
    order = render.live_backends(entry, entry["backends"] if portfw else render.mfw_order(entry, head), down)
    if not order:  # all down, all_down reject
        return [dict(b, pcnt=0, connections=0, head=False) for b in entry["backends"]]
    how, target = render.schedule(order)
    conns, pcnt = {}, {}
    if portfw:
        key = (entry["protocol"], entry["local_address"], entry["local_port"])
        chain = None if how == "single" else render.portfw_chain_name(key)
    else:
        chain = render.mfw_chain_name(entry["mark"])
    if how == "single":
        if portfw:  # the direct map's element counter (no chain)
            fam = "v6" if ":" in entry["local_address"] else "v4"
            elem_key = nfnetlink.address_proto_port_key(entry["local_address"], entry["protocol"], entry["local_port"])
            total = element_counters.get("portfw_direct_" + fam, {}).get(elem_key, 0)
        else:
            total = sum(rule_counters.get(chain, [0]))
        pref = target["pref"]
        if len(entry["backends"]) == 1:  # most keys: their one backend is the target
            return [dict(entry["backends"][0], pcnt=pref - total % pref if pref else 0,
                         connections=total, head=True)]
        conns[id(target)] = total
        pcnt[id(target)] = pref - total % pref if pref else 0
        head_b = target
    else:
        head_b, pcnt[id(head_b)], conns = _cascade_view(target, phase, rule_counters.get(chain))
        pcnt = {id(head_b): pcnt[id(head_b)]}
    out = []
    for b in entry["backends"]:
        src = next((o for o in order if o["address"] == b["address"] and o["port"] == b["port"]), None)
        if src is None:  # down: out of the schedule (or all down, to the fallback)
            out.append(dict(b, pcnt=b["pref"], connections=0, head=False))
            continue
        out.append(dict(b, pcnt=pcnt.get(id(src), b["pref"]), connections=conns.get(id(src), 0),
                        head=src is head_b))
    return out
