"""Legacy rc scripts -> the gateway role's table variables.

A shell script of `ipmasqadm autofw|portfw|mfw` lines and the seed's `ipchains` lines
(`-m MARK` rules are marks, `-j MASQ` rules masquerade rules), with comments, blank
lines, `\\` continuations and shell variables (`NAME=value`, `$NAME`, `${NAME}`), is
read line by line. Every command line goes through ipmasqadm.parse, the parser masqctl
runs, and the API request it yields is applied to an in-memory copy of the tables with
the agent's semantics (add appends a backend, `mfw -I` and `ipchains -I` put it first,
`-d`/`-D` remove, `-f`/`-F` flush, `mfw -E` edits prefs). The result is the tables the
script leaves behind, each entry with the source lines that made it.

Used by `masqctl import` (masqd/) and by the masq_* modules' `parsed` state
(plugins/module_utils/ holds a symbolic link to this file and to ipmasqadm.py, so
there is one copy of the code; hence the relative import below and the standard
library only). Pure apart from name resolution (ipmasqadm's Resolver).
"""

from __future__ import annotations

import ipaddress
import os
import re

from . import ipmasqadm

# (agent table, role variable), in the order they are written out.
TABLE_VARIABLES = (
    ("portfw", "gateway_portfw"),
    ("autofw", "gateway_autofw"),
    ("mfw", "gateway_mfw"),
    ("marks", "gateway_marks"),
    ("masquerade", "gateway_masquerade"),
)
VARIABLE_OF = dict(TABLE_VARIABLES)
TABLE_OF_VARIABLE = {variable: table for table, variable in TABLE_VARIABLES}

# Every field of an entry in the API's order (docs/agent-api.md); written in this order.
FIELDS = {
    "portfw": ("protocol", "local_address", "local_port", "backends"),
    "autofw": ("protocol", "low_port", "high_port", "hidden_host", "control_protocol", "control_port",
               "timeout", "keyed_by_peer"),
    "mfw": ("mark", "backends"),
    "marks": ("name", "mark", "protocol", "source", "source_invert", "destination", "destination_invert",
              "source_ports", "destination_ports", "input_interface"),
    "masquerade": ("name", "protocol", "source", "source_invert", "destination", "destination_invert",
                   "source_ports", "destination_ports", "output_interface", "pool", "pool_ports", "helpers"),
}
BACKEND_FIELDS = ("address", "port", "pref")
KEYS = {
    "portfw": ("protocol", "local_address", "local_port"),
    "autofw": ("protocol", "low_port", "high_port"),
    "mfw": ("mark",),
    "marks": ("name",),
    "masquerade": ("name",),
}
BACKEND_TABLES = ("portfw", "mfw")
DEFAULT_AUTOFW_TIMEOUT = 15  # ipautofw's 15 seconds; the agent's default too

_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# ipchains chains the two tables stand for; `ipchains -F CHAIN` flushes the table.
_CHAIN_TABLES = {"input": ("marks",), "forward": ("masquerade",), None: ("marks", "masquerade")}
_NO_CONFIGURATION = ("set", ":", "true")  # shell options and no-ops: nothing to import


class ImportError_(Exception):
    """A line that cannot be translated: `line` is its number, `reason` why."""

    def __init__(self, line: int, text: str, reason: str):
        self.line = line
        self.text = text
        self.reason = reason
        super().__init__("line %d: %s: %s" % (line, reason, text))


# Callers use this name; the underscore keeps the builtin ImportError unshadowed.
TranslateError = ImportError_


class Result:
    """The imported tables (only those the script names), with provenance."""

    def __init__(self) -> None:
        self.tables: dict = {}        # table -> {key: entry} in table order
        self.sources: dict = {}       # table -> {key: [(line, text), ...]}
        self.skipped: list = []       # [(line, text, reason)] with skip_unknown

    def variables(self) -> dict:
        """{role variable: [compact entries]} for the tables the script names."""
        return {VARIABLE_OF[table]: [compact(table, entry) for entry in self.tables[table].values()]
                for table, _variable in TABLE_VARIABLES if table in self.tables}

    def entries(self, table: str) -> list:
        return [compact(table, entry) for entry in self.tables.get(table, {}).values()]

    def entry_sources(self, table: str) -> list:
        return [self.sources[table][key] for key in self.tables.get(table, {})]


# -- canonical and compact entries ------------------------------------------------------

def _network(value):
    return None if value is None else str(ipaddress.ip_network(value, strict=False))


def canonical(table: str, entry: dict) -> dict:
    """The entry as the agent stores it: defaults filled, networks as CIDR, helpers sorted."""
    out = {}
    for field in FIELDS[table]:
        value = entry.get(field)
        if field == "backends":
            value = [{"address": b["address"], "port": b.get("port"),
                      "pref": ipmasqadm.DEFAULT_PREF if b.get("pref") is None else b["pref"]}
                     for b in value or []]
        elif field in ("source", "destination"):
            value = _network(value)
        elif field == "timeout" and value is None:
            value = DEFAULT_AUTOFW_TIMEOUT
        elif field.endswith("_invert") or field == "keyed_by_peer":
            value = bool(value)
        elif field == "helpers" and value:
            value = sorted(value)
        out[field] = value
    return out


def compact(table: str, entry: dict) -> dict:
    """The entry as written in a playbook: the API's field order, without the fields
    that are unset (None, false, empty); prefs and timeouts are always written."""
    entry = canonical(table, entry)
    out = {}
    for field in FIELDS[table]:
        value = entry[field]
        if field == "backends":
            value = [{f: b[f] for f in BACKEND_FIELDS if b.get(f) is not None} for b in value]
        if value is None or value is False or value == []:
            continue
        out[field] = value
    return out


def key_of(table: str, entry: dict) -> tuple:
    return tuple(entry.get(field) for field in KEYS[table])


# -- the tables a script builds, with the agent's semantics ----------------------------

class Tables:
    """In-memory tables: the agent's write ops without the kernel."""

    def __init__(self, result: Result):
        self.result = result

    def _table(self, table):
        self.result.sources.setdefault(table, {})
        return self.result.tables.setdefault(table, {})

    def entries(self, table: str) -> list:
        return list(self._table(table).values())

    def _note(self, table, key, source):
        sources = self.result.sources[table].setdefault(key, [])
        if not sources or sources[-1] != source:  # one line may add several backends
            sources.append(source)

    def apply(self, request: dict, source) -> None:
        op, table = request["op"], request.get("table") or ""
        if op == "schedule":
            raise ValueError("mfw -S forces scheduling at run time; it is not configuration")
        rows = self._table(table)
        if op == "flush":
            rows.clear()
            self.result.sources[table].clear()
            return
        if op == "set":
            old_sources = self.result.sources[table]
            new_rows, new_sources = {}, {}
            for raw in request["entries"]:
                entry = canonical(table, raw)
                key = key_of(table, entry)
                new_rows[key] = entry
                new_sources[key] = list(old_sources.get(key, []))
                if key not in rows or rows[key] != entry:
                    new_sources[key].append(source)
            rows.clear()
            rows.update(new_rows)
            self.result.sources[table] = new_sources
            return
        raw = request["entry"]
        if op in ("add", "insert"):
            self._add(table, rows, canonical(table, raw), op == "insert", source)
        elif op == "delete":
            self._delete(table, rows, raw, source)
        elif op == "edit":
            self._edit(table, rows, canonical(table, raw), source)
        else:
            raise ValueError("op %s has no configuration effect" % op)

    def _add(self, table, rows, entry, at_head, source):
        key = key_of(table, entry)
        current = rows.get(key)
        if table in BACKEND_TABLES and current is not None:
            have = {(b["address"], b["port"]) for b in current["backends"]}
            for backend in entry["backends"]:
                if (backend["address"], backend["port"]) in have:
                    raise ValueError("backend %s%s is already a backend of this key"
                                     % (backend["address"], "" if backend["port"] is None
                                        else " port %s" % backend["port"]))
            backends = entry["backends"] + current["backends"] if at_head else current["backends"] + entry["backends"]
            rows[key] = dict(current, backends=backends)
        elif current is not None and current != entry:
            raise ValueError("an entry with this key already exists (line %d)"
                             % self.result.sources[table][key][0][0])
        else:
            rows[key] = entry
        self._note(table, key, source)

    def _delete(self, table, rows, raw, source):
        if table in ("marks", "masquerade"):
            key = (raw["name"],)
        else:
            key = key_of(table, canonical(table, raw))
        current = rows.get(key)
        if current is None:
            raise ValueError("no such %s entry (nothing before this line adds it)" % table)
        if raw.get("backends"):
            keep = list(current["backends"])
            for backend in raw["backends"]:
                match = [b for b in keep if b["address"] == backend["address"] and b["port"] == backend.get("port")]
                if not match:
                    raise ValueError("no backend %s of this key" % backend["address"])
                keep.remove(match[0])
            if keep:
                rows[key] = dict(current, backends=keep)
                self._note(table, key, source)
                return
        del rows[key]
        del self.result.sources[table][key]

    def _edit(self, table, rows, entry, source):
        key = key_of(table, entry)
        current = rows.get(key)
        if current is None:
            raise ValueError("no such %s entry (nothing before this line adds it)" % table)
        prefs = {(b["address"], b["port"]): b["pref"] for b in entry["backends"]}
        known = {(b["address"], b["port"]) for b in current["backends"]}
        for address, port in prefs:
            if (address, port) not in known:
                raise ValueError("no backend %s of this key" % address)
        rows[key] = dict(current, backends=[dict(b, pref=prefs.get((b["address"], b["port"]), b["pref"]))
                                            for b in current["backends"]])
        self._note(table, key, source)


# -- reading the script ----------------------------------------------------------------

def logical_lines(text: str):
    """(first line number, text) with backslash-newline continuations joined."""
    pending, start = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if start is None:
            start = number
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, " ".join(part.strip() for part in pending).strip()
        pending, start = [], None
    if pending:
        yield start, " ".join(part.strip() for part in pending).strip()


def split(text: str, variables: dict) -> list:
    """The shell words of one line: quotes removed, `#` comments dropped, $NAME and
    ${NAME} expanded outside single quotes (an unquoted expansion is split on blanks,
    as the shell does). An unset name is an error: the shell would silently expand it
    to nothing and the rule would mean something else. Pipes, lists, redirections and
    command substitution have no table equivalent and are refused."""
    words, word, started = [], [], False
    quote = None
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if quote == "'":
            if char == "'":
                quote = None
            else:
                word.append(char)
        elif char == "\\" and index + 1 < length and (quote is None or text[index + 1] in '$"\\`'):
            index += 1
            word.append(text[index])
            started = True
        elif char == "$" and text.startswith("$(", index) or char == "`":
            raise ValueError("command substitution is not translated")
        elif char == "$":
            match = _VARIABLE.match(text, index)
            if match is None:
                word.append(char)
            else:
                name = match.group(1) or match.group(2)
                if name not in variables:
                    raise ValueError("shell variable $%s is not set before this line" % name)
                value = variables[name]
                if quote is None:
                    parts = value.split()
                    if parts and value[:1].isspace() and (word or started):
                        words.append("".join(word))
                        word, started = [], False
                    for part in parts[:-1]:
                        word.append(part)
                        words.append("".join(word))
                        word, started = [], False
                    word.extend(parts[-1:])
                    if parts and value[-1:].isspace():
                        words.append("".join(word))
                        word, started = [], False
                else:
                    word.append(value)
                index = match.end()
                continue
        elif quote == '"':
            if char == '"':
                quote = None
            else:
                word.append(char)
        elif char in "'\"":
            quote, started = char, True
        elif char.isspace():
            if word or started:
                words.append("".join(word))
            word, started = [], False
        elif char == "#" and not word and not started:
            break
        elif char in ";|&<>()":
            raise ValueError("shell construct %r (list, pipe, redirection, subshell) is not translated" % char)
        else:
            word.append(char)
        index += 1
    if quote is not None:
        raise ValueError("no closing quotation (%s)" % quote)
    if word or started:
        words.append("".join(word))
    return words


def _argv(words: list) -> list:
    """masqctl argv (MODULE ARGS...) of a command's words, or ValueError why not."""
    program = os.path.basename(words[0])
    if program == "masqctl":
        argv, rest = [], iter(words[1:])
        for word in rest:
            if word == "--socket":
                next(rest, None)
            elif not word.startswith("--socket=") and word != "--json":
                argv.append(word)
        if not argv or argv[0] not in ipmasqadm.MODULES:
            raise ValueError("masqctl: only the %s modules have tables" % ", ".join(ipmasqadm.MODULES))
        return argv
    if program == "ipmasqadm":
        if len(words) < 2 or words[1] not in ("autofw", "portfw", "mfw"):
            raise ValueError("ipmasqadm: only the autofw, portfw and mfw modules have tables")
        return words[1:]
    if program == "ipchains":
        return _ipchains_argv(words[1:])
    raise ValueError("%s: not an ipmasqadm, ipchains or masqctl command" % program)


def _ipchains_argv(args):
    target = None
    for index, word in enumerate(args):
        if word in ("-j", "--jump") and index + 1 < len(args):
            target = args[index + 1].upper()
    marks = any(word in ("-m", "--mark") for word in args)
    if args and args[0] in ("-P", "--policy", "-N", "--new-chain", "-X", "--delete-chain", "-Z", "--zero"):
        raise ValueError("ipchains %s manages filtering chains, which have no masqd table" % args[0])
    if args and args[0] in ("-F", "--flush"):
        chain = args[1] if len(args) > 1 else None
        if chain not in _CHAIN_TABLES or len(args) > 2:
            raise ValueError("ipchains -F %s: only the input (marks) and forward (masquerade) chains have tables"
                             % chain)
        return ["flush"] + list(_CHAIN_TABLES[chain])
    if target == "MASQ":
        if marks:
            raise ValueError("ipchains: a rule with both -m and -j MASQ has no single table")
        return ["masq"] + list(args)
    if marks:
        if target not in (None, "ACCEPT"):
            raise ValueError("ipchains: a marking rule with -j %s is a filter too; only marks are imported" % target)
        # -j ACCEPT: the mark is the rule's only effect. -y (SYN only): masqd's marks
        # are set on a connection's first packet anyway.
        rest, skip = [], False
        for word in args:
            if skip:
                skip = False
            elif word in ("-j", "--jump"):
                skip = True
            elif word not in ("-y", "--syn"):
                rest.append(word)
        return ["mark"] + rest
    if target is not None:
        raise ValueError("ipchains -j %s: only -m MARK rules (marks) and -j MASQ rules (masquerade) "
                         "have a table" % target)
    raise ValueError("ipchains: only -m MARK rules (marks) and -j MASQ rules (masquerade) have a table")


def translate(text: str, skip_unknown: bool = False, lookup=None, variables=None) -> Result:
    """The tables `text` (a shell script; iptables-save output, masqd/iptables_save.py;
    `nft list ruleset` output, masqd/nft_ruleset.py) leaves behind. Raises TranslateError for the first line it cannot translate, unless
    `skip_unknown` (then the line is recorded in Result.skipped and the rest carries on)."""
    from . import iptables_save, nft_ruleset  # the other sources; they build on this module

    for reader in (iptables_save, nft_ruleset):
        if reader.looks_like(text):
            return reader.translate(text, skip_unknown=skip_unknown, lookup=lookup)
    result = Result()
    tables = Tables(result)
    variables = dict(variables or {})
    for number, line in logical_lines(text):
        source = (number, line)
        try:
            _translate_line(line, variables, tables, lookup, source)
        except ipmasqadm.UsageError as exc:
            _refuse(result, skip_unknown, number, line, "%s: %s" % (exc.module, exc.message))
        except (ValueError, ipmasqadm.StateError) as exc:
            _refuse(result, skip_unknown, number, line, str(exc))
    return result


def _refuse(result, skip_unknown, number, line, reason):
    if not skip_unknown:
        raise TranslateError(number, line, reason)
    result.skipped.append((number, line, reason))


def _translate_line(line, variables, tables, lookup, source):
    words = split(line, variables)
    if words and words[0] in ("export", "readonly"):
        words = words[1:]
    if not words or words[0] in _NO_CONFIGURATION:
        return
    assignment = _ASSIGNMENT.match(words[0])
    if assignment:
        if len(words) > 1:
            raise ValueError("NAME=value before a command (an environment for one command) is not translated")
        variables[assignment.group(1)] = assignment.group(2)
        return
    argv = _argv(words)
    if argv[0] == "flush":
        for table in argv[1:]:
            tables.apply({"op": "flush", "table": table}, source)
        return
    command = ipmasqadm.parse(argv, lookup)
    if command.help or command.listing:
        return  # usage texts and listings change nothing
    request = command.request
    if command.needs_table:
        request = command.finish(tables.entries(command.needs_table), None)
    tables.apply(request, source)
