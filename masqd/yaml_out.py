"""YAML text of the role's table variables, for `masqctl import` and `masqctl export`.

masqctl runs on gateways that have only the standard library (and python3-nftables),
so PyYAML is not available; the data has one fixed shape (a mapping of variables to
lists of flat entries whose values are scalars, lists of scalars or a list of flat
backends), and this emitter writes exactly that, deterministically: keys in the given
order, block style, one comment block per entry. Strings that are not a plain word are
double-quoted (JSON escapes are valid YAML escapes), so addresses like
2001:1:2:3:4:5:6:7 (a YAML 1.1 sexagesimal number) or values like `yes`/`on` never
load as anything but strings. tests/unit/test_import.py loads the output with PyYAML.
"""

from __future__ import annotations
from typing import Any, List, Tuple

import json
import re

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# Words YAML 1.1 (PyYAML, Ansible) or 1.2 resolve to booleans or null.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "none", "nan", "inf"}


def scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value)
    raise TypeError("no YAML scalar for %r" % (value,))


def _flow(value) -> str:
    if isinstance(value, list):
        return "[%s]" % ", ".join(scalar(item) for item in value)
    return scalar(value)


def comment(text: str) -> str:
    """One comment line; a line break in the text would end the comment."""
    return "# " + " ".join(text.splitlines())


def _entry(entry: dict, indent: str) -> list:
    lines, first = [], True
    for field, value in entry.items():
        lead = indent + ("- " if first else "  ")
        first = False
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append("%s%s:" % (lead, field))
            for item in value:
                lines.append("%s    - {%s}" % (indent, ", ".join("%s: %s" % (k, scalar(v)) for k, v in item.items())))
        else:
            lines.append("%s%s: %s" % (lead, field, _flow(value)))
    return lines


def document(variables: list, header: tuple = ()) -> str:
    """`variables`: [(name, [(entry, [comment, ...]), ...])] in the order to write.
    Each entry is preceded by its comments; an empty list is written as `[]`."""
    lines = ["---"] + [comment(text) for text in header]
    if not variables:
        lines.append("{}")  # no table named: an empty mapping, not an empty document
    for name, entries in variables:
        if not entries:
            lines.append("%s: []" % name)
            continue
        lines.append("%s:" % name)
        for entry, comments in entries:
            lines.extend("  " + comment(text) for text in comments)
            lines.extend(_entry(entry, "  "))
    return "\n".join(lines) + "\n"


IMPORT_HEADER = ("masqctl import: the gateway role's table variables (roles/gateway); the comments",
                 "above each entry are the script lines that made it.")
EXPORT_HEADER = ("masqctl export: the agent's tables as the gateway role's table variables (roles/gateway).",)


def import_document(result) -> str:
    """The YAML of a legacy_import.Result: tables the script names, entries with sources."""
    from masqd.legacy_import import TABLE_VARIABLES

    header = list(IMPORT_HEADER)
    for number, text, reason in result.skipped:
        header.append("line %d not imported (%s): %s" % (number, reason, text))
    variables = []
    for table, name in TABLE_VARIABLES:
        if table in result.tables:
            comments = [["line %d: %s" % source for source in sources] for sources in result.entry_sources(table)]
            variables.append((name, list(zip(result.entries(table), comments))))
    return document(variables, tuple(header))


def export_document(tables: dict) -> str:
    """The YAML of the agent's tables ({table: entries as `get` returns them}); a
    function of the tables alone, so two agents holding the same tables export the
    same bytes."""
    from masqd.legacy_import import TABLE_VARIABLES, compact

    header = list(EXPORT_HEADER)
    variables: List[Tuple[str, List[Tuple[Any, List[Any]]]]] = [
        (name, [(compact(table, entry), []) for entry in tables.get(table, [])]) for table, name in TABLE_VARIABLES]
    return document(variables, tuple(header))
