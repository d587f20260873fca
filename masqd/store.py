"""Persisted desired state: a versioned JSON snapshot beside a checked journal.

Snapshot `state.json`: {"format": 2, "revision": N, "tables": {table: [entry, ...]},
"mfw_heads": {mark: {"address", "port"}}}, written as tmp + fsync + rename + fsync(dir),
mode 0600, so a crash leaves the old or the new file (never a mix).

Journal `state.journal`: rewriting a 100,000-key snapshot costs ~0.3 s, so single-key
changes are appended instead, one fsync'd line per change:

    <length> <crc32, 8 hex digits> <JSON record>\\n

where length and CRC-32 are those of the JSON bytes, and the record is {"revision",
"table", "put": [entries], "delete": [keys], optional "mfw_heads"}. A change is
acknowledged only once its whole line is on disk.

Loading is honest (docs/state.md): the only damage it forgives is a torn *last* line,
the trace of a crash mid-append that was never acknowledged (no newline, a short line,
or zero-filled blocks). It is ignored, and cut off before the next append. Anything
else -- a bad line in the middle, a checksum mismatch, revisions out of sequence, a
journal whose snapshot is missing, a malformed entry -- raises DamagedState naming the
file, the line and the problem, and no file is touched. `salvage()` is the operator's
explicit way out: it copies the damaged files aside, keeps what is valid up to the
first damage and writes a clean snapshot.

The directory is created 0700 if missing; an existing one is never re-moded, and one
that is group- or world-writable (or owned by another user) is refused.
"""

import datetime
import errno
import json
import operator
import os
import re
import shutil
import stat
import zlib
from typing import Any, Dict, List, Optional, Tuple

FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: same snapshot layout, unchecked journal lines
STATE_FILE = "state.json"
JOURNAL_FILE = "state.journal"
JOURNAL_MAX = 5000
DAMAGED_SUFFIX = ".damaged-"

Doc = Dict[str, Any]


class StoreError(Exception):
    pass


class DamagedState(StoreError):
    """Stored state that cannot be proven complete: `path`, `line` (1-based, or None
    for the whole file) and `problem`."""

    def __init__(self, path: str, line: Optional[int], problem: str):
        where = "%s line %d" % (path, line) if line is not None else path
        super().__init__("%s: %s; refusing to start, no file was changed (run `masqd --salvage-state` "
                         "to keep a copy and load what is valid, see docs/state.md)" % (where, problem))
        self.path, self.line, self.problem = path, line, problem


class _Bad(Exception):
    """A problem in one place of a document (internal, becomes DamagedState)."""


def encode_record(record: Doc) -> bytes:
    payload = json.dumps(record, separators=(",", ":")).encode("utf-8")
    return b"%d %08x %s\n" % (len(payload), zlib.crc32(payload), payload)


def decode_line(line: bytes) -> Tuple[Optional[Doc], Optional[str], bool]:
    """(record, problem, torn) for one journal line without its newline. `torn`: zero
    bytes, what a crash mid-append leaves when the file grew but a block of the write
    never reached the disk (forgivable on the last line only)."""
    if b"\0" in line:
        return None, "zero bytes in the record (blocks of an append that never reached the disk)", True
    if line.startswith(b"{"):  # format 1: an unchecked JSON record (read once, for upgrade)
        try:
            return json.loads(line), None, False
        except ValueError as exc:
            return None, "unchecked (format 1) record is not valid JSON: %s" % exc, False
    head = line.split(b" ", 2)
    if len(head) != 3 or not head[0].isdigit() or len(head[1]) != 8:
        return None, "not a journal record (expected '<length> <crc32> <json>')", False
    length, payload = int(head[0]), head[2]
    try:
        crc = int(head[1], 16)
    except ValueError:
        return None, "checksum field %r is not hexadecimal" % head[1].decode("ascii", "replace"), False
    if len(payload) != length:
        return None, "record is %d bytes, its header says %d" % (len(payload), length), False
    if zlib.crc32(payload) != crc:
        return None, "checksum mismatch (stored %08x, computed %08x)" % (crc, zlib.crc32(payload)), False
    try:
        return json.loads(payload), None, False
    except ValueError as exc:
        return None, "checksum matches but the record is not valid JSON: %s" % exc, False


# --- validation of what was read: problems named by field, never a Python message ------

def _check_revision(value: Any, field: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _Bad("%s must be an integer >= %d (got %r)" % (field, low, value))
    return value


def _check_heads(heads: Any, field: str) -> None:
    from masqd import model
    if not isinstance(heads, dict):
        raise _Bad("%s must be an object {mark: {address, port}} (got %r)" % (field, heads))
    for key, head in heads.items():
        where = "%s[%r]" % (field, key)
        if not (key.isascii() and key.isdigit() and 1 <= int(key) <= model.MARK_MAX and str(int(key)) == key):
            raise _Bad("%s: the key must be a mark, a decimal integer 1-%d" % (where, model.MARK_MAX))
        if not isinstance(head, dict) or set(head) != {"address", "port"}:
            raise _Bad("%s must be an object with exactly address and port (got %r)" % (where, head))
        try:
            model.address(head["address"], where + ".address")
            if head["port"] is not None:
                model.port(head["port"], where + ".port")
        except model.ValidationError as exc:
            raise _Bad(str(exc)) from None


def _check_key(table: str, key: Any, field: str) -> Any:
    """A `delete` key as written by the service: a list for the tuple keys, a mark, a name."""
    from masqd import model
    try:
        if table in ("portfw", "autofw"):
            if not isinstance(key, list) or len(key) != 3:
                raise _Bad("%s must be a list [%s] (got %r)" % (field, ", ".join(model.key_fields(table)), key))
            entry = dict(zip(model.key_fields(table), key))
            if table == "portfw":
                model.protocol(entry["protocol"], field + "[0]")
                model.address(entry["local_address"], field + "[1]")
                model.port(entry["local_port"], field + "[2]")
            else:
                model.protocol(entry["protocol"], field + "[0]")
                model.port(entry["low_port"], field + "[1]")
                model.port(entry["high_port"], field + "[2]")
            return tuple(key)
        if table == "mfw":
            return model.mark(key, field)
        return model.name(key, field)
    except model.ValidationError as exc:
        raise _Bad(str(exc)) from None


def _check_entry(table: str, entry: Any, field: str) -> Any:
    """The entry's key; the whole entry is validated as the service will (model)."""
    from masqd import model
    try:
        norm = model.normalize_entry(table, entry, field)
    except model.ValidationError as exc:
        raise _Bad(str(exc)) from None
    return model.entry_key(table, norm)


def _snapshot_key(table: str, entry: Any, field: str) -> Any:
    """An entry's key for replay, cheaply (the service validates snapshot entries in
    full); a hopeless entry is refused here with its field, not as a KeyError."""
    from masqd import model
    if not isinstance(entry, dict):
        raise _Bad("%s must be an entry object (got %r)" % (field, entry))
    try:
        key = tuple(entry[f] for f in model.key_fields(table))
    except KeyError as exc:
        raise _Bad("%s.%s: missing" % (field, exc.args[0])) from None
    for f, v in zip(model.key_fields(table), key):
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise _Bad("%s.%s must be a string or an integer (got %r)" % (field, f, v))
    return key if len(key) > 1 else key[0]


def _check_record(rec: Any) -> None:
    from masqd.model import TABLES
    if not isinstance(rec, dict):
        raise _Bad("record must be a JSON object (got %r)" % (rec,))
    unknown = sorted(set(rec) - {"revision", "table", "put", "delete", "mfw_heads"})
    if unknown:
        raise _Bad("unknown field %r" % unknown[0])
    _check_revision(rec.get("revision"), "revision", 1)
    if rec.get("table") not in TABLES:
        raise _Bad("table must be one of %s (got %r)" % (", ".join(TABLES), rec.get("table")))
    for name in ("put", "delete"):
        if not isinstance(rec.get(name), list):
            raise _Bad("%s must be a list (got %r)" % (name, rec.get(name)))
    for i, entry in enumerate(rec["put"]):
        _check_entry(rec["table"], entry, "put[%d]" % i)
    for i, key in enumerate(rec["delete"]):
        _check_key(rec["table"], key, "delete[%d]" % i)
    if "mfw_heads" in rec:
        _check_heads(rec["mfw_heads"], "mfw_heads")


def _check_snapshot(doc: Any) -> None:
    from masqd.model import TABLES
    if not isinstance(doc, dict):
        raise _Bad("must be a JSON object (got %s)" % type(doc).__name__)
    if doc.get("format") not in READABLE_FORMATS:
        raise _Bad("unknown format %r (this agent reads %s)" % (doc.get("format"), ", ".join(map(str, READABLE_FORMATS))))
    unknown = sorted(set(doc) - {"format", "revision", "tables", "mfw_heads"})
    if unknown:
        raise _Bad("unknown field %r" % unknown[0])
    _check_revision(doc.get("revision"), "revision", 0)
    tables = doc.get("tables", {})
    if not isinstance(tables, dict):
        raise _Bad("tables must be an object {table: [entries]} (got %r)" % (tables,))
    for table, entries in tables.items():
        if table not in TABLES:
            raise _Bad("tables.%s: unknown table (known: %s)" % (table, ", ".join(TABLES)))
        if not isinstance(entries, list):
            raise _Bad("tables.%s must be a list of entries (got %r)" % (table, entries))
    _check_heads(doc.get("mfw_heads", {}), "mfw_heads")


class Store:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self.journal_path = os.path.join(state_dir, JOURNAL_FILE)
        self.journal_records = 0
        self._journal_end: Optional[int] = None  # byte length of the valid journal, known after load()
        self._dir_checked = False

    # --- the directory -------------------------------------------------------------------

    def ensure_dir(self) -> None:
        """Create the state directory 0700 if it is missing. An existing directory is
        never re-moded (`--state-dir /tmp` must not break the host); one that others
        could write to, or that belongs to another user, is refused."""
        try:
            os.mkdir(self.state_dir, 0o700)
            os.chmod(self.state_dir, 0o700)  # ours: whatever the umask took away
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(os.path.dirname(os.path.abspath(self.state_dir)), exist_ok=True)
            os.mkdir(self.state_dir, 0o700)
            os.chmod(self.state_dir, 0o700)
        st = os.stat(self.state_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError("state_dir %s: not a directory" % self.state_dir)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise StoreError("state_dir %s: mode %04o lets %s write to it; use a private directory "
                             "(masqd creates a missing one 0700), it is not changed"
                             % (self.state_dir, mode, "everyone" if mode & 0o002 else "its group"))
        if st.st_uid not in (os.geteuid(), 0):
            raise StoreError("state_dir %s: owned by uid %d, not by this agent (uid %d) or root"
                             % (self.state_dir, st.st_uid, os.geteuid()))
        self._dir_checked = True

    def _ready_dir(self) -> None:
        if not self._dir_checked:
            self.ensure_dir()

    # --- loading -------------------------------------------------------------------------

    def _read_snapshot(self) -> Tuple[Doc, bool]:
        """(document, present)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {"format": FORMAT, "revision": 0, "tables": {}, "mfw_heads": {}}, False
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise DamagedState(self.path, None, "not valid JSON (%s)" % exc) from None
        try:
            _check_snapshot(doc)
        except _Bad as exc:
            raise DamagedState(self.path, None, str(exc)) from None
        doc.setdefault("tables", {})
        doc.setdefault("mfw_heads", {})
        return doc, True

    def _read_journal(self) -> Tuple[List[Tuple[int, Doc]], int, Optional[Tuple[int, str, bool]]]:
        """([(line number, record)], byte length of the valid part, first damage as
        (line, problem, forgivable) or None)."""
        try:
            with open(self.journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], 0, None
        records: List[Tuple[int, Doc]] = []
        pos, number, checked = 0, 0, False
        while pos < len(data):
            number += 1
            nl = data.find(b"\n", pos)
            if nl < 0:  # no newline: an append cut short, never acknowledged
                return records, pos, (number, "incomplete last record (no newline)", True)
            line = data[pos:nl]
            is_last = nl + 1 == len(data)
            rec, problem, torn = decode_line(line)
            if problem is None:
                legacy = line.startswith(b"{")
                if legacy and checked:
                    problem, torn = "unchecked (format 1) record after checked records", False
                else:
                    checked = checked or not legacy
                    try:
                        _check_record(rec)
                    except _Bad as exc:
                        problem, torn = str(exc), False
            if problem is not None or rec is None:
                return records, pos, (number, problem or "empty record", torn and is_last)
            records.append((number, rec))
            pos = nl + 1
        return records, pos, None

    def load(self) -> Doc:
        """The stored document (an empty one when there is none yet). Raises
        DamagedState, with nothing changed on disk, unless the state is provably
        complete (see the module docstring)."""
        doc, present = self._read_snapshot()
        records, end, damage = self._read_journal()
        if damage is not None and not damage[2]:
            raise DamagedState(self.journal_path, damage[0], damage[1])
        self._replay(doc, records, present, strict=True)
        self.journal_records = len(records)
        self._journal_end = end
        self._remove_stale_tmp()
        return doc

    def _replay(self, doc: Doc, records: List[Tuple[int, Doc]], present: bool, strict: bool) -> int:
        """Apply the records newer than the snapshot to `doc`; returns how many were
        applied. `strict`: a sequence problem raises DamagedState; otherwise replay
        stops there (salvage) and doc["_stopped"] says where and why."""
        base = doc["revision"]
        previous: Optional[int] = None
        tables: Dict[str, Dict[Any, Any]] = {}
        applied = 0
        for number, rec in records:
            revision = rec["revision"]
            expected = max(base, previous or 0) + 1
            problem = None
            if previous is not None and revision <= previous:
                problem = "revision %d after revision %s: out of sequence" % (revision, previous)
            elif revision == base and present:
                problem = "revision %d is the snapshot's own revision: two versions of one change" % revision
            elif revision > base and revision != expected:
                if not present and expected == 1:
                    problem = ("%s is missing and the journal starts at revision %d: %s only in the "
                               "snapshot" % (STATE_FILE, revision, _revisions(1, revision - 1, "was", "were")))
                else:
                    problem = "revision %d where %d was expected: %s missing" % (
                        revision, expected, _revisions(expected, revision - 1, "is", "are"))
            # revision < base: older than the snapshot (a crash between its rename and
            # the journal's unlink), already in it
            if problem is not None:
                if strict:
                    raise DamagedState(self.journal_path, number, problem)
                doc["_stopped"] = (number, problem)
                break
            previous = revision
            if revision <= base:
                continue
            table = rec["table"]
            entries = tables.get(table)
            if entries is None:
                entries = tables[table] = self._snapshot_entries(table, doc["tables"].get(table, []))
            from masqd.model import entry_key
            for key in rec["delete"]:
                entries.pop(_hashable(key), None)
            for e in rec["put"]:
                entries[entry_key(table, e)] = e
            if "mfw_heads" in rec:
                doc["mfw_heads"] = rec["mfw_heads"]
            doc["revision"] = revision
            applied += 1
        for table, entries in tables.items():
            doc["tables"][table] = list(entries.values())
        return applied

    def _snapshot_entries(self, table: str, listing: List[Any]) -> Dict[Any, Any]:
        """{key: entry} of a snapshot table, for replay: itemgetter on the fast path (0.1 s
        for 100,000 entries); the entry that fails it is named by _snapshot_key."""
        from masqd import model
        getter = operator.itemgetter(*model.key_fields(table))
        entries: Dict[Any, Any] = {}
        try:
            for e in listing:
                entries[getter(e)] = e
        except (TypeError, KeyError):
            entries = {}
            for i, e in enumerate(listing):
                try:
                    _snapshot_key(table, e, "tables.%s[%d]" % (table, i))
                    entries[getter(e)] = e
                except _Bad as exc:
                    raise DamagedState(self.path, None, str(exc)) from None
                except TypeError:
                    raise DamagedState(self.path, None, "tables.%s[%d]: a key field is not a string or an integer"
                                       % (table, i)) from None
        return entries

    def _remove_stale_tmp(self) -> None:
        """Snapshot temporaries of an agent killed mid-save: never renamed, never
        acknowledged, and otherwise left behind by every such crash."""
        prefix = os.path.basename(self.path) + ".tmp."
        try:
            names = os.listdir(self.state_dir)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join(self.state_dir, name))
                except OSError:
                    pass

    # --- salvage -------------------------------------------------------------------------

    def salvage(self, now: Optional[datetime.datetime] = None) -> Dict[str, Any]:
        """The operator's way out of DamagedState: copy the damaged files aside
        (`<file>.damaged-<UTC time>`), keep what is valid up to the first damage,
        write a clean snapshot (dropping the journal). Returns a report:
        {"damaged": bool, "copies": [...], "dropped": [...], "revision": N, "entries": {...}}.
        An intact state is left alone (damaged False)."""
        from masqd import model
        try:
            loaded = self.load()
            for table in model.TABLES:  # what the service would refuse at start, too
                model.normalize_table(table, list(loaded["tables"].get(table, [])), "tables.%s" % table)
            return {"damaged": False, "copies": [], "dropped": [], "revision": loaded["revision"],
                    "entries": {t: len(loaded["tables"].get(t, [])) for t in model.TABLES}}
        except (DamagedState, model.ValidationError):
            pass
        dropped: List[str] = []
        try:
            doc, present = self._read_snapshot()
        except DamagedState as exc:
            dropped.append("%s: %s: the whole snapshot" % (self.path, exc.problem))
            doc, present = {"format": FORMAT, "revision": 0, "tables": {}, "mfw_heads": {}}, False
        for table in model.TABLES:  # snapshot entries the service would refuse
            kept, seen = [], set()
            for i, e in enumerate(doc["tables"].get(table, [])):
                field = "tables.%s[%d]" % (table, i)
                try:
                    key = _check_entry(table, e, field)
                    if table in ("portfw", "mfw") and not e["backends"]:
                        raise _Bad("%s.backends: must be a non-empty list of backends" % field)
                    if key in seen:
                        raise _Bad("%s: duplicate entry for key %s" % (field, key))
                except _Bad as exc:
                    dropped.append("%s: %s: entry dropped" % (self.path, exc))
                    continue
                seen.add(key)
                kept.append(e)
            doc["tables"][table] = kept
        base = doc["revision"]
        records, _end, damage = self._read_journal()
        total_lines = self._journal_lines()
        self._replay(doc, records, present, strict=False)
        stopped = doc.pop("_stopped", None)
        if stopped is None and damage is not None:
            stopped = damage[:2]
        if stopped is not None:
            dropped.append("%s line %d: %s: this line and the %d after it dropped"
                           % (self.journal_path, stopped[0], stopped[1], max(total_lines - stopped[0], 0)))
        for table in model.TABLES:  # the result must load: table-level rules too
            try:
                model.normalize_table(table, list(doc["tables"].get(table, [])), "tables.%s" % table)
            except model.ValidationError as exc:
                raise StoreError("salvage: %s: %s; nothing was changed, fix or remove the entry by hand"
                                 % (self.path, exc)) from None
        stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        copies = []
        for path in (self.path, self.journal_path):
            if os.path.exists(path):
                copy = path + DAMAGED_SUFFIX + stamp
                shutil.copy2(path, copy)
                os.chmod(copy, 0o600)
                copies.append(copy)
        self._fsync_dir()
        # A revision above any the damaged files may have acknowledged, so that a client
        # holding one of them is refused as stale and re-reads.
        revision = max(doc["revision"], base + total_lines, self._highest_revision_seen()) + 1
        heads = {k: v for k, v in doc.get("mfw_heads", {}).items()
                 if any(e["mark"] == int(k) for e in doc["tables"].get("mfw", []))}
        self.save({"revision": revision, "tables": {t: doc["tables"].get(t, []) for t in model.TABLES},
                   "mfw_heads": heads})
        return {"damaged": True, "copies": copies, "dropped": dropped, "revision": revision,
                "entries": {t: len(doc["tables"].get(t, [])) for t in model.TABLES}}

    def _highest_revision_seen(self) -> int:
        highest = 0
        for path in (self.path, self.journal_path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            for match in re.finditer(rb'"revision":\s*(\d{1,18})', data):
                highest = max(highest, int(match.group(1)))
        return highest

    def _journal_lines(self) -> int:
        try:
            with open(self.journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0
        return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)

    # --- writing -------------------------------------------------------------------------

    def append(self, record: Doc) -> None:
        """Append one change record (checked, fsync'd) to the journal."""
        self._ready_dir()
        data = encode_record(record)
        created = not os.path.exists(self.journal_path)
        if created and record.get("revision") == 1 and not os.path.exists(self.path):
            # A journal always has a snapshot beside it, so an agent that cannot read
            # this format refuses the directory (unknown format) instead of misreading it.
            self.save({"revision": 0, "tables": {}, "mfw_heads": {}})
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            end = os.fstat(fd).st_size
            if self._journal_end is not None and end > self._journal_end:
                os.ftruncate(fd, self._journal_end)  # drop a torn tail found by load()
                end = self._journal_end
            try:
                written = 0
                while written < len(data):
                    n = os.write(fd, data[written:])
                    if n <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += n
                os.fsync(fd)
            except OSError:
                try:  # never leave half a record (or an unsynced one) to be acknowledged later
                    os.ftruncate(fd, end)
                    os.fsync(fd)
                except OSError:
                    pass
                raise
            self._journal_end = end + len(data)
        finally:
            os.close(fd)
        if created:
            self._fsync_dir()
        self.journal_records += 1

    def save(self, doc: Doc) -> None:
        self.install(self.prepare(doc))

    def prepare(self, doc: Doc) -> str:
        """The first half of `save`: the snapshot encoded, written and synced to a
        temporary file, whose path is returned; `install` makes it the state, `discard`
        drops it. (The Service prepares while the kernel commits.)"""
        self._ready_dir()
        doc = dict(doc, format=FORMAT)
        tmp = "%s.tmp.%d" % (self.path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                # dumps (the C encoder) is ~20x faster than dump for 100,000 entries.
                f.write(json.dumps(doc, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.discard(tmp)
            raise
        return tmp

    def install(self, tmp: str) -> None:
        try:
            os.rename(tmp, self.path)
        except BaseException:
            self.discard(tmp)
            raise
        self._fsync_dir()
        # The snapshot holds everything the journal held (records <= its revision).
        try:
            os.unlink(self.journal_path)
            self._fsync_dir()
        except FileNotFoundError:
            pass
        self.journal_records = 0
        self._journal_end = 0

    @staticmethod
    def discard(tmp: str) -> None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass

    def _fsync_dir(self) -> None:
        dfd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _revisions(low: int, high: int, one: str, many: str) -> str:
    return "revision %d %s" % (low, one) if low == high else "revisions %d-%d %s" % (low, high, many)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
