# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Resource-module state logic for the masqd tables: pure functions, no I/O.

Given the table the agent holds and the module's `config` and `state`, compute the
whole table the gateway should hold afterwards; the module then writes it with one
compare-and-set `set`. Field names and defaults are those of docs/agent-api.md.
Standard library only (runs on the gateway, Python 3.8+).
"""

from __future__ import annotations

import copy
import ipaddress
import json

STATES = ("merged", "replaced", "overridden", "deleted", "gathered", "rendered", "parsed")

# Per table: the key fields (in order), every field with its default (in the API's
# order), the fields that hold addresses, and whether entries carry `backends`.
_ADDRESS_FIELDS = ("local_address", "hidden_host", "address")
# Health checks (docs/health.md): the entry fields and their defaults; the agent
# leaves a field at its default out of the entry, complete() fills it back in.
_HEALTH_FIELDS = (("failback", False), ("all_down", "forward"), ("fallback", None), ("flush_on_down", False))
_CHECK_DEFAULTS = {"interval": 2.0, "fall": 3, "rise": 2}

TABLES = {
    "portfw": {
        "key": ("protocol", "local_address", "local_port"),
        "fields": (("protocol", None), ("local_address", None), ("local_port", None), ("backends", None))
        + _HEALTH_FIELDS,
        "backend": (("address", None), ("port", None), ("pref", 10), ("check", None)),
        "required": ("backends",),
    },
    "autofw": {
        "key": ("protocol", "low_port", "high_port"),
        "fields": (("protocol", None), ("low_port", None), ("high_port", None), ("hidden_host", None),
                   ("control_protocol", None), ("control_port", None), ("timeout", 15),
                   ("keyed_by_peer", False)),
        "backend": None,
        "required": (),
    },
    "mfw": {
        "key": ("mark",),
        "fields": (("mark", None), ("backends", None)) + _HEALTH_FIELDS,
        "backend": (("address", None), ("port", None), ("pref", 10), ("check", None)),
        "required": ("backends",),
    },
    "marks": {
        "key": ("name",),
        "fields": (("name", None), ("mark", None), ("protocol", None), ("source", None), ("source_invert", False),
                   ("destination", None), ("destination_invert", False), ("source_ports", None),
                   ("destination_ports", None), ("input_interface", None)),
        "backend": None,
        "required": ("mark",),
    },
    "masquerade": {
        "key": ("name",),
        "fields": (("name", None), ("source", None), ("source_invert", False), ("destination", None),
                   ("destination_invert", False), ("protocol", None), ("source_ports", None),
                   ("destination_ports", None), ("output_interface", None), ("pool", None),
                   ("pool_ports", None), ("helpers", None)),
        "backend": None,
        "required": (),
    },
}

# AUTOFW's recipient is either a fixed hidden host or the control-port watcher.
_AUTOFW_RECIPIENT = (("hidden_host",), ("control_protocol", "control_port", "keyed_by_peer"))


class ConfigError(ValueError):
    """Bad `config`: names the field (as config[i].field) and the value."""

    def __init__(self, field, value, message):
        super(ConfigError, self).__init__("%s: %s (value: %s)" % (field, message, _json(value)))
        self.field = field
        self.value = value
        self.message = message

    def to_dict(self):
        return {"field": self.field, "value": self.value, "message": self.message}


def _json(value):
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


# ---------------------------------------------------------------- normal form

def _canonical_address(value):
    """Addresses compare in their canonical text form; invalid ones pass through
    unchanged for the agent to refuse with its own message."""
    if not isinstance(value, str):
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def _canonical_ports(value):
    if not isinstance(value, list):
        return value
    return [int(p) if isinstance(p, str) and p.strip().isdigit() else p for p in value]


def _canonical_value(field, value):
    if field in _ADDRESS_FIELDS:
        return _canonical_address(value)
    if field in ("source_ports", "destination_ports", "pool_ports"):
        return _canonical_ports(value)
    if field == "pool" and isinstance(value, list):
        return [_canonical_address(a) for a in value]
    if field == "helpers" and isinstance(value, list) and all(isinstance(h, str) for h in value):
        return sorted(value)  # the agent keeps helpers sorted: order carries no meaning
    if field == "check":
        return _canonical_check(value)
    if field == "fallback" and isinstance(value, dict):
        return {"address": _canonical_address(value.get("address")), "port": value.get("port")}
    return value


def _canonical_check(value):
    """A backend's check as the agent keeps it (model.backend_check): defaults filled,
    None for type none, so a task that gives the defaults reports no change."""
    if not isinstance(value, dict):
        return value
    check = dict((k, v) for k, v in value.items() if v is not None)
    kind = check.get("type")
    if kind == "none":
        return None
    if kind not in ("tcp", "http", "icmp"):
        return check  # the agent names the bad value
    out = {"type": kind}
    if kind != "icmp":
        out["port"] = check.get("port")
    if kind == "http":
        out["path"] = check.get("path", "/")
        if check.get("status") is not None:
            status = check["status"] if isinstance(check["status"], list) else [check["status"]]
            out["status"] = sorted(set(status))
    for k in ("interval", "timeout"):
        if isinstance(check.get(k), int) and not isinstance(check.get(k), bool):
            check[k] = float(check[k])
    out["interval"] = check.get("interval", _CHECK_DEFAULTS["interval"])
    out["timeout"] = check.get("timeout", min(out["interval"], 60.0) if isinstance(out["interval"], float)
                               else out["interval"])
    out["fall"] = check.get("fall", _CHECK_DEFAULTS["fall"])
    out["rise"] = check.get("rise", _CHECK_DEFAULTS["rise"])
    for k, v in check.items():
        out.setdefault(k, v)  # unknown fields reach the agent, which names them
    return out


def _complete_backend(spec, backend):
    out = {}
    for field, default in spec:
        value = backend.get(field)
        out[field] = default if value is None else _canonical_value(field, value)
    if out.get("check", 0) is None:
        del out["check"]  # no check: the backend as it was before health checks
    return out


def complete(table, entry):
    """The entry with every field of the API, defaults filled, addresses canonical."""
    spec = TABLES[table]
    out = {}
    for field, default in spec["fields"]:
        value = entry.get(field)
        if field == "backends":
            value = [_complete_backend(spec["backend"], b) for b in (value or [])]
        elif value is None:
            value = copy.deepcopy(default)
        else:
            value = _canonical_value(field, value)
        if (field, value) in _HEALTH_FIELDS:
            continue  # the agent leaves a health field at its default out of the entry
        out[field] = value
    return out


def entry_key(table, entry):
    return tuple(_canonical_value(f, entry.get(f)) for f in TABLES[table]["key"])


def normalize_table(table, entries):
    return [complete(table, e) for e in (entries or [])]


def tables_equal(table, a, b):
    return normalize_table(table, a) == normalize_table(table, b)


# ---------------------------------------------------------------- states

def _check_keys(table, config):
    """Every config entry names its key; no key twice."""
    seen = {}
    for index, entry in enumerate(config):
        for field in TABLES[table]["key"]:
            if entry.get(field) is None:
                raise ConfigError("config[%d].%s" % (index, field), None, "required: it is part of the %s key" % table)
        key = entry_key(table, entry)
        if key in seen:
            raise ConfigError("config[%d]" % index, list(key),
                              "duplicate %s key, also given in config[%d]" % (table, seen[key]))
        seen[key] = index


def _check_new_entry(table, index, entry):
    for field in TABLES[table]["required"]:
        if not entry.get(field):
            raise ConfigError("config[%d].%s" % (index, field), entry.get(field),
                              "required for a %s entry that does not exist yet" % table)
    if table == "autofw" and entry.get("hidden_host") is None and entry.get("control_protocol") is None:
        raise ConfigError("config[%d]" % index, None, "needs hidden_host or control_protocol and control_port")


def _merge_entry(table, current, given):
    """`merged` for one key: the given fields win, fields not given keep their value;
    a given backends list replaces the key's list whole (its order is the schedule)."""
    out = dict(current)
    for field, value in given.items():
        if value is not None:
            out[field] = value
    if table == "autofw":
        # Naming one recipient mode drops the other.
        for mode in _AUTOFW_RECIPIENT:
            if any(given.get(f) is not None for f in mode):
                for other in _AUTOFW_RECIPIENT:
                    if other is not mode:
                        for f in other:
                            out[f] = None
    return complete(table, out)


def desired_table(table, state, config, current):
    """The whole table after applying `config` with `state` to `current`.

    merged:     given keys are added or updated field by field (backends lists replaced whole)
    replaced:   given keys are replaced whole (fields not given take their defaults)
    overridden: the table becomes exactly `config`, in its order
    deleted:    given keys are removed; an empty `config` removes every entry
    Entries keep their position; new keys are appended in `config` order.
    """
    if table not in TABLES:
        raise ValueError("unknown table %r" % table)
    config = config or []
    current = normalize_table(table, current)
    if state == "deleted":
        if not config:
            return []
        _check_keys(table, config)
        drop = set(entry_key(table, e) for e in config)
        return [e for e in current if entry_key(table, e) not in drop]
    if state not in ("merged", "replaced", "overridden", "rendered"):
        raise ValueError("state %r does not compute a table" % state)
    _check_keys(table, config)
    if state in ("overridden", "rendered"):
        for index, entry in enumerate(config):
            _check_new_entry(table, index, entry)
        return [complete(table, e) for e in config]
    out = list(current)
    position = dict((entry_key(table, e), i) for i, e in enumerate(out))
    for index, entry in enumerate(config):
        key = entry_key(table, entry)
        if key in position:
            existing = out[position[key]]
            out[position[key]] = _merge_entry(table, existing, entry) if state == "merged" else complete(table, entry)
            if state == "replaced":
                _check_new_entry(table, index, entry)
        else:
            _check_new_entry(table, index, entry)
            position[key] = len(out)
            out.append(complete(table, entry))
    return out


def config_path(table, config, desired, agent_field):
    """Translate the agent's `entries[i]...` field path into the `config[j]...`
    the user wrote, when entry i came from config; otherwise return it unchanged."""
    if not agent_field or not agent_field.startswith("entries["):
        return agent_field
    try:
        index = int(agent_field[len("entries["):agent_field.index("]")])
        key = entry_key(table, desired[index])
    except (ValueError, IndexError):
        return agent_field
    for j, entry in enumerate(config or []):
        if entry_key(table, entry) == key:
            return "config[%d]%s" % (j, agent_field[agent_field.index("]") + 1:])
    return agent_field


def schedule_order(listed):
    """The mfw table of a `list` answer in scheduling order: each list starts at its
    current head (runtime state the agent keeps apart from the configured order)."""
    out = []
    for entry in listed:
        backends = entry["backends"]
        at = next((i for i, backend in enumerate(backends) if backend.get("head")), 0)
        out.append(dict(entry, backends=backends[at:] + backends[:at]))
    return normalize_table("mfw", out)


def scheduled(entries, mark):
    """The mfw table after forcing scheduling of `mark` (`mfw -S`): head to the back."""
    out = normalize_table("mfw", entries)
    for entry in out:
        if entry["mark"] == mark:
            if entry["backends"]:
                entry["backends"] = entry["backends"][1:] + entry["backends"][:1]
            return out
    raise ConfigError("schedule", mark, "no mfw entry for this mark")


# ---------------------------------------------------------------- presentation

def _ports_text(ports):
    return ",".join(str(p) for p in ports)


def _criteria(entry):
    """masqctl's ipchains-style criteria (`masqctl mark|masq -A ...`)."""
    words = []
    if entry.get("protocol"):
        words += ["-p", entry["protocol"]]
    for field, flag in (("source", "-s"), ("destination", "-d")):
        if entry.get(field):
            words += [flag] + (["!"] if entry.get(field + "_invert") else []) + [entry[field]]
    for field, flag in (("source_ports", "--sport"), ("destination_ports", "--dport")):
        if entry.get(field):
            words += [flag, _ports_text(entry[field])]
    for field, flag in (("input_interface", "-i"), ("output_interface", "-o")):
        if entry.get(field):
            words += [flag, entry[field]]
    return words


def _add_lines(table, e):
    if table == "portfw":
        return ["portfw -a -P %s -L %s %s -R %s %s -p %s" % (
            e["protocol"], e["local_address"], e["local_port"], b["address"], b["port"], b["pref"])
            for b in e["backends"]]
    if table == "mfw":
        return ["mfw -A -m %s -r %s%s -p %s" % (
            e["mark"], b["address"], "" if b["port"] is None else " %s" % b["port"], b["pref"])
            for b in e["backends"]]
    if table == "autofw":
        if e.get("hidden_host"):
            recipient = "-h %s" % e["hidden_host"]
        else:
            recipient = "-c %s %s" % (e["control_protocol"], e["control_port"])
        if e.get("keyed_by_peer"):
            recipient += " --keyed-by-peer"
        return ["autofw -A -r %s %s %s %s -t %s" % (e["protocol"], e["low_port"], e["high_port"],
                                                    recipient, e["timeout"])]
    if table == "marks":
        return [" ".join(["mark", "-A"] + _criteria(e) + ["-m", str(e["mark"]), "--name", e["name"]])]
    extras = []
    if e.get("pool"):
        extras += ["--pool", ",".join(e["pool"])]
    if e.get("pool_ports"):
        extras += ["--pool-ports", _ports_text(e["pool_ports"])]
    if e.get("helpers"):
        extras += ["--helper", ",".join(e["helpers"])]
    return [" ".join(["masq", "-A"] + _criteria(e) + extras + ["--name", e["name"], "-j", "MASQ"])]


def _delete_line(table, e):
    if table == "portfw":
        return "portfw -d -P %s -L %s %s" % (e["protocol"], e["local_address"], e["local_port"])
    if table == "mfw":
        return "mfw -D -m %s" % e["mark"]
    if table == "autofw":
        return "autofw -D -r %s %s %s" % (e["protocol"], e["low_port"], e["high_port"])
    if table == "marks":
        return "mark -D --name %s" % e["name"]
    return "masq -D --name %s" % e["name"]


def table_commands(table, before, after):
    """masqctl-style lines that summarise the change from `before` to `after`: removed
    keys are deleted, new or changed keys are (re)added. The agent applies the whole
    table in one transaction; these lines are for people reading the result."""
    before = normalize_table(table, before)
    after = normalize_table(table, after)
    old = dict((entry_key(table, e), e) for e in before)
    new_keys = set(entry_key(table, e) for e in after)
    lines = [_delete_line(table, e) for e in before if entry_key(table, e) not in new_keys]
    for entry in after:
        previous = old.get(entry_key(table, entry))
        if previous == entry:
            continue
        if previous is not None:
            lines.append(_delete_line(table, previous))
        lines.extend(_add_lines(table, entry))
    return lines


def _scalar(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value and all(c.isalnum() or c in ".:/-_" for c in value) \
            and value not in ("null", "true", "false", "yes", "no", "on", "off") and not value[0] in "-:":
        return value
    if isinstance(value, list):
        return "[%s]" % ", ".join(_scalar(v) for v in value)
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (k, _scalar(v)) for k, v in value.items())
    return json.dumps(value)


def table_text(table, entries):
    """The table as YAML text, one key per line, for --diff."""
    lines = []
    for entry in normalize_table(table, entries):
        prefix = "- "
        for field, value in entry.items():
            if field == "backends":
                lines.append("%sbackends:" % prefix)
                lines.extend("  - %s" % _scalar(b) for b in value)
            else:
                lines.append("%s%s: %s" % (prefix, field, _scalar(value)))
            prefix = "  "
    return "\n".join(lines) + "\n" if lines else "[]\n"
