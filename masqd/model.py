"""masqd's rule tables: validation and canonical entries.

Every entry that reaches the renderer went through `normalize_entry`, which checks each
field, fills defaults and returns the canonical JSON form of docs/agent-api.md. Bad
input raises ValidationError naming the field path and the offending value.
"""

import functools
import ipaddress
import re
import socket

TABLES = ("portfw", "autofw", "mfw", "marks", "masquerade")

# Table-size caps (documented in docs/architecture.md). They bound memory, the size of
# one kernel transaction and the O(n) work of whole-table operations.
MAX_ENTRIES = {
    "portfw": 200000,
    "autofw": 1024,
    "mfw": 4096,
    "marks": 1024,
    "masquerade": 1024,
}
MAX_BACKENDS = 64
MAX_PREF = 65535
MAX_PORTS_PER_LIST = 64
MAX_NAME_LEN = 64
MAX_TIMEOUT = 86400
DEFAULT_PREF = 10
DEFAULT_AUTOFW_TIMEOUT = 15
MAX_POOL = 64

# Kernel conntrack helpers a masquerade rule may enable, with the (kernel helper type,
# protocol, well-known port) pairs each one needs. Checked against this kernel: every
# type below loads as an nftables `ct helper` object (docs/architecture.md, "Helpers").
HELPERS = {
    "amanda": (("amanda", "udp", 10080),),
    "ftp": (("ftp", "tcp", 21),),
    "h323": (("RAS", "udp", 1719), ("Q.931", "tcp", 1720)),
    "irc": (("irc", "tcp", 6667),),
    "netbios-ns": (("netbios-ns", "udp", 137),),
    "pptp": (("pptp", "tcp", 1723),),
    "sane": (("sane", "tcp", 6566),),
    "sip": (("sip", "udp", 5060), ("sip", "tcp", 5060)),
    "snmp": (("snmp", "udp", 161),),
    "tftp": (("tftp", "udp", 69),),
}
MARK_MAX = 2 ** 32 - 1

FORWARD_PROTOCOLS = ("tcp", "udp")
MATCH_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_RANGE_RE = re.compile(r"^(\d{1,5})-(\d{1,5})$")


class ValidationError(Exception):
    """Bad input: `field` is the path of the offending field, `value` its value."""

    def __init__(self, field, value, message):
        super().__init__("%s: %s (got %r)" % (field, message, value))
        self.field = field
        self.value = value
        self.message = message

    def to_dict(self):
        value = self.value
        if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = repr(value)
        return {"field": self.field, "value": value, "message": self.message}


def _path(prefix, name):
    return "%s.%s" % (prefix, name) if prefix else name


# --- scalar validators: each returns the canonical value or raises ------------------

def _int(value, field, low, high, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, value, "%s must be an integer %d-%d" % (what, low, high))
    if not low <= value <= high:
        raise ValidationError(field, value, "%s must be %d-%d" % (what, low, high))
    return value


def port(value, field):
    return _int(value, field, 1, 65535, "port")


def pref(value, field):
    return _int(value, field, 0, MAX_PREF, "pref")


def mark(value, field):
    return _int(value, field, 1, MARK_MAX, "mark")


def boolean(value, field):
    if not isinstance(value, bool):
        raise ValidationError(field, value, "must be true or false")
    return value


def protocol(value, field, allowed=FORWARD_PROTOCOLS):
    if value not in allowed:
        raise ValidationError(field, value, "protocol must be one of %s" % ", ".join(allowed))
    return value


def address(value, field):
    """An IPv4/IPv6 host address; returns (canonical string, family 4|6)."""
    if not isinstance(value, str):
        raise ValidationError(field, value, "must be an IPv4 or IPv6 address")
    parsed = _parse_address(value)
    if parsed is None:
        raise ValidationError(field, value, "must be an IPv4 or IPv6 address")
    if parsed[0] is None:
        raise ValidationError(field, value, "must be a unicast address")
    if parsed[0] == "mapped":
        raise ValidationError(field, value, "is an IPv4-mapped IPv6 address: give the IPv4 address")
    return parsed


@functools.lru_cache(maxsize=65536)
def _parse_address(value):
    """(canonical, family), (None, family) for a non-unicast address, or None.
    IPv4 takes a fast path (inet_pton is ~10x faster than ipaddress): 100,000-key
    tables are validated on every `set`."""
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except (OSError, ValueError):  # ValueError: an embedded NUL byte
        packed = None
    if packed is not None:
        if packed == b"\0\0\0\0" or 224 <= packed[0] <= 239:
            return None, 4
        return socket.inet_ntop(socket.AF_INET, packed), 4
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if addr.version == 4:  # forms inet_pton refuses but ipaddress takes: none today
        return None
    if addr.is_unspecified or addr.is_multicast:
        return None, 6
    if addr.ipv4_mapped is not None:
        return "mapped", 6
    return str(addr), 6


def network(value, field):
    """A CIDR (or bare address = host route); returns (canonical string, family)."""
    if not isinstance(value, str):
        raise ValidationError(field, value, "must be an IPv4 or IPv6 network (CIDR)")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        msg = "has host bits set" if "host bits" in str(exc) else "must be an IPv4 or IPv6 network (CIDR)"
        raise ValidationError(field, value, msg) from None
    return str(net), net.version


def interface(value, field):
    """A network interface name as the kernel accepts it (dev_valid_name) and nft can
    quote: 1-15 printable ASCII characters, no '/', ':', whitespace, quote or backslash;
    not '.' or '..'. A trailing '*' is nft's prefix wildcard ("ppp*")."""
    ok = (isinstance(value, str) and 0 < len(value) <= 15 and value not in (".", "..")
          and all(33 <= ord(c) <= 126 and c not in "/:\"\\" for c in value)
          and "*" not in value[:-1])
    if not ok:
        raise ValidationError(field, value, "must be an interface name: 1-15 printable "
                              "characters, no '/', ':', quote, backslash or whitespace")
    return value


def port_list(value, field):
    """A list of ports and "low-high" ranges; returns the canonical list."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValidationError(field, value, "must be a non-empty list of ports or \"low-high\" ranges")
    if len(value) > MAX_PORTS_PER_LIST:
        raise ValidationError(field, value, "at most %d ports or ranges" % MAX_PORTS_PER_LIST)
    out = []
    for i, item in enumerate(value):
        f = "%s[%d]" % (field, i)
        if isinstance(item, str):
            m = _RANGE_RE.match(item)
            if not m:
                raise ValidationError(f, item, "must be a port or a \"low-high\" range")
            low, high = port(int(m.group(1)), f), port(int(m.group(2)), f)
            if low > high:
                raise ValidationError(f, item, "range is reversed (low > high)")
            out.append("%d-%d" % (low, high))
        else:
            out.append(port(item, f))
    return out


def port_intervals(ports):
    """Sorted, merged (low, high) intervals of a canonical port list."""
    spans = []
    for item in ports:
        if isinstance(item, int):
            spans.append((item, item))
        else:
            low, high = item.split("-")
            spans.append((int(low), int(high)))
    spans.sort()
    merged = []
    for low, high in spans:
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def name(value, field):
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LEN or not _NAME_RE.fullmatch(value):
        raise ValidationError(field, value, "must be 1-%d characters of letters, digits, "
                              "'_', '.', ':', '-' starting with a letter or digit" % MAX_NAME_LEN)
    return value


# --- entries --------------------------------------------------------------------------

def _fields(raw, field, required, optional):
    if not isinstance(raw, dict):
        raise ValidationError(field or "entry", raw, "must be an object")
    for key in raw:
        if key not in required and key not in optional:
            raise ValidationError(_path(field, str(key)), raw[key], "unknown field")
    for key in required:
        if key not in raw:
            raise ValidationError(_path(field, key), None, "is required")


def _same_family(families, field, value):
    if len(set(f for f in families if f)) > 1:
        raise ValidationError(field, value, "mixes IPv4 and IPv6")


def _backends(raw, field, family, with_port, port_optional, require=True):
    if not isinstance(raw, list) or (require and not raw):
        raise ValidationError(field, raw, "must be a non-empty list of backends")
    if len(raw) > MAX_BACKENDS:
        raise ValidationError(field, len(raw), "at most %d backends per entry" % MAX_BACKENDS)
    out, seen = [], set()
    for i, b in enumerate(raw):
        f = "%s[%d]" % (field, i)
        optional = ("pref", "port") if port_optional else ("pref",)
        _fields(b, f, ("address", "port") if (with_port and not port_optional) else ("address",), optional)
        addr, fam = address(b["address"], f + ".address")
        if family is None:
            family = fam
        elif fam != family:
            raise ValidationError(f + ".address", b["address"], "mixes IPv4 and IPv6 in one entry")
        p = b.get("port")
        if p is not None or not port_optional:
            p = port(p, f + ".port")
        backend = {"address": addr, "port": p, "pref": pref(b.get("pref", DEFAULT_PREF), f + ".pref")}
        if (addr, p) in seen:
            raise ValidationError(f, b, "duplicate backend %s port %s" % (addr, p))
        seen.add((addr, p))
        out.append(backend)
    return out


_PORTFW_FIELDS = frozenset(("protocol", "local_address", "local_port", "backends"))
_CANONICAL_PROTOCOL = {p: p for p in FORWARD_PROTOCOLS}  # shared strings, not one per entry


def _portfw_fast(raw):
    """The canonical entry of a well-formed PORTFW entry with backends, or None.

    A `set` of 100,000 keys validates every entry; this path takes the common shape
    with a few type checks and cached address canonicalisation. Anything unusual (a
    missing or unknown field, a wrong type, a bad value, a duplicate) returns None, and
    normalize_portfw's full validator runs and names the field. Exact type checks on
    purpose: bool is an int subclass, and isinstance would let `true` through as a port."""
    # pylint: disable=unidiomatic-typecheck
    try:
        if type(raw) is not dict or len(raw) != 4 or raw.keys() != _PORTFW_FIELDS:
            return None
        proto = _CANONICAL_PROTOCOL.get(raw["protocol"])
        lport = raw["local_port"]
        laddr = raw["local_address"]
        backends = raw["backends"]
        if (proto is None or type(lport) is not int or not 0 < lport <= 65535 or type(laddr) is not str
                or type(backends) is not list or not 0 < len(backends) <= MAX_BACKENDS):
            return None
        laddr, fam = _parse_address(laddr)
        if laddr is None or laddr == "mapped":
            return None
        out = []
        for b in backends:
            if type(b) is not dict:
                return None
            n = len(b)
            if "pref" in b:
                pr = b["pref"]
                n -= 1
                if type(pr) is not int or not 0 <= pr <= MAX_PREF:
                    return None
            else:
                pr = DEFAULT_PREF
            addr, p = b.get("address"), b.get("port")
            if n != 2 or type(addr) is not str or type(p) is not int or not 0 < p <= 65535:
                return None
            addr, bfam = _parse_address(addr)
            if bfam != fam or addr is None or addr == "mapped":
                return None
            out.append({"address": addr, "port": p, "pref": pr})
        if len(out) > 1 and len({(b["address"], b["port"]) for b in out}) != len(out):
            return None
    except (TypeError, ValueError):  # unhashable values, _parse_address returning None
        return None
    return {"protocol": proto, "local_address": laddr, "local_port": lport, "backends": out}


def normalize_portfw(raw, field=""):
    entry = _portfw_fast(raw)
    if entry is not None:
        return entry
    _fields(raw, field, ("protocol", "local_address", "local_port"), ("backends",))
    proto = _CANONICAL_PROTOCOL[protocol(raw["protocol"], _path(field, "protocol"))]
    laddr, fam = address(raw["local_address"], _path(field, "local_address"))
    lport = port(raw["local_port"], _path(field, "local_port"))
    backends = _backends(raw.get("backends", []), _path(field, "backends"), fam, True, False, require=False)
    return {"protocol": proto, "local_address": laddr, "local_port": lport, "backends": backends}


def normalize_autofw(raw, field=""):
    _fields(raw, field, ("protocol", "low_port", "high_port"),
            ("hidden_host", "control_protocol", "control_port", "timeout", "keyed_by_peer"))
    proto = protocol(raw["protocol"], _path(field, "protocol"))
    low = port(raw["low_port"], _path(field, "low_port"))
    high = port(raw["high_port"], _path(field, "high_port"))
    if low > high:
        raise ValidationError(_path(field, "high_port"), high, "range is reversed (low_port > high_port)")
    entry = {"protocol": proto, "low_port": low, "high_port": high,
             "hidden_host": None, "control_protocol": None, "control_port": None,
             "timeout": _int(raw.get("timeout", DEFAULT_AUTOFW_TIMEOUT), _path(field, "timeout"),
                             1, MAX_TIMEOUT, "timeout"),
             "keyed_by_peer": boolean(raw.get("keyed_by_peer", False), _path(field, "keyed_by_peer"))}
    hidden = raw.get("hidden_host")
    control = raw.get("control_protocol"), raw.get("control_port")
    if hidden is not None and control != (None, None):
        raise ValidationError(_path(field, "hidden_host"), hidden,
                              "give either hidden_host or control_protocol/control_port, not both")
    if hidden is not None:
        entry["hidden_host"] = address(hidden, _path(field, "hidden_host"))[0]
    elif control != (None, None):
        entry["control_protocol"] = protocol(control[0], _path(field, "control_protocol"))
        entry["control_port"] = port(control[1], _path(field, "control_port"))
    else:
        raise ValidationError(_path(field, "hidden_host"), None,
                              "one of hidden_host or control_protocol/control_port is required")
    if entry["keyed_by_peer"] and hidden is not None:
        raise ValidationError(_path(field, "keyed_by_peer"), True,
                              "needs control_protocol/control_port (a hidden_host has no peers)")
    return entry


def normalize_mfw(raw, field=""):
    _fields(raw, field, ("mark",), ("backends",))
    m = mark(raw["mark"], _path(field, "mark"))
    backends = _backends(raw.get("backends", []), _path(field, "backends"), None, True, True, require=False)
    return {"mark": m, "backends": backends}


def _criteria(raw, field, entry):
    """Shared match criteria of marks and masquerade rules."""
    families = []
    for key in ("source", "destination"):
        value = raw.get(key)
        entry[key] = None
        if value is not None:
            entry[key], fam = network(value, _path(field, key))
            families.append(fam)
        entry[key + "_invert"] = boolean(raw.get(key + "_invert", False), _path(field, key + "_invert"))
        if entry[key + "_invert"] and entry[key] is None:
            raise ValidationError(_path(field, key + "_invert"), True, "needs %s" % key)
    _same_family(families, _path(field, "destination"), raw.get("destination"))
    proto = raw.get("protocol")
    entry["protocol"] = None if proto is None else protocol(proto, _path(field, "protocol"), MATCH_PROTOCOLS)
    if proto == "icmp" and 6 in families or proto == "icmpv6" and 4 in families:
        raise ValidationError(_path(field, "protocol"), proto, "does not match the address family")
    for key in ("source_ports", "destination_ports"):
        entry[key] = port_list(raw.get(key), _path(field, key))
        if entry[key] is not None and proto not in (None, "tcp", "udp"):
            raise ValidationError(_path(field, key), raw.get(key), "ports need protocol tcp or udp")
    return entry


_CRITERIA = ("source", "source_invert", "destination", "destination_invert", "protocol",
             "source_ports", "destination_ports")


def normalize_marks(raw, field=""):
    _fields(raw, field, ("name", "mark"), _CRITERIA + ("input_interface",))
    entry = {"name": name(raw["name"], _path(field, "name")), "mark": mark(raw["mark"], _path(field, "mark"))}
    _criteria(raw, field, entry)
    iface = raw.get("input_interface")
    entry["input_interface"] = None if iface is None else interface(iface, _path(field, "input_interface"))
    return entry


def _pool(value, field, entry):
    """Masquerade address pool: distinct unicast addresses of one family, matching
    the rule's own family. Returns (canonical list or None, family or None)."""
    if value is None:
        return None, None
    if not isinstance(value, list) or not value:
        raise ValidationError(field, value, "must be a non-empty list of addresses")
    if len(value) > MAX_POOL:
        raise ValidationError(field, value, "at most %d addresses" % MAX_POOL)
    out, family = [], None
    for i, item in enumerate(value):
        addr, fam = address(item, "%s[%d]" % (field, i))
        if family is not None and fam != family:
            raise ValidationError("%s[%d]" % (field, i), item, "mixes IPv4 and IPv6 in one pool")
        if addr in out:
            raise ValidationError("%s[%d]" % (field, i), item, "duplicate pool address")
        family = fam
        out.append(addr)
    for key in ("source", "destination"):
        if entry[key] is not None and ipaddress.ip_network(entry[key]).version != family:
            raise ValidationError(field, value, "pool family does not match %s %s" % (key, entry[key]))
    if entry["protocol"] == ("icmpv6" if family == 4 else "icmp"):
        raise ValidationError(field, value, "pool family does not match protocol %s" % entry["protocol"])
    return out, family


def _helpers(value, field, entry):
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValidationError(field, value, "must be a non-empty list of helper names")
    out = []
    for i, item in enumerate(value):
        f = "%s[%d]" % (field, i)
        if item not in HELPERS:
            raise ValidationError(f, item, "helper must be one of %s" % ", ".join(sorted(HELPERS)))
        if item in out:
            raise ValidationError(f, item, "duplicate helper")
        protocols = {proto for _type, proto, _port in HELPERS[item]}
        if entry["protocol"] is not None and entry["protocol"] not in protocols:
            raise ValidationError(f, item, "helper %s works on %s, the rule matches protocol %s"
                                  % (item, "/".join(sorted(protocols)), entry["protocol"]))
        out.append(item)
    return sorted(out)


def normalize_masquerade(raw, field=""):
    _fields(raw, field, ("name",), _CRITERIA + ("output_interface", "pool", "pool_ports", "helpers"))
    entry = {"name": name(raw["name"], _path(field, "name"))}
    _criteria(raw, field, entry)
    iface = raw.get("output_interface")
    entry["output_interface"] = None if iface is None else interface(iface, _path(field, "output_interface"))
    entry["pool"], _family = _pool(raw.get("pool"), _path(field, "pool"), entry)
    entry["pool_ports"] = port_list(raw.get("pool_ports"), _path(field, "pool_ports"))
    if entry["pool_ports"] is not None:
        if entry["pool"] is None:
            raise ValidationError(_path(field, "pool_ports"), raw.get("pool_ports"), "needs pool")
        if entry["protocol"] not in (None, "tcp", "udp"):
            raise ValidationError(_path(field, "pool_ports"), raw.get("pool_ports"),
                                  "ports need protocol tcp or udp")
    entry["helpers"] = _helpers(raw.get("helpers"), _path(field, "helpers"), entry)
    return entry


_NORMALIZERS = {
    "portfw": normalize_portfw,
    "autofw": normalize_autofw,
    "mfw": normalize_mfw,
    "marks": normalize_marks,
    "masquerade": normalize_masquerade,
}


def table_name(value, field="table"):
    if value not in TABLES:
        raise ValidationError(field, value, "table must be one of %s" % ", ".join(TABLES))
    return value


def normalize_entry(table, raw, field="entry"):
    return _NORMALIZERS[table](raw, field)


def entry_key(table, entry):
    """The identity of an entry within its table (see docs/agent-api.md)."""
    if table == "portfw":
        return (entry["protocol"], entry["local_address"], entry["local_port"])
    if table == "autofw":
        return (entry["protocol"], entry["low_port"], entry["high_port"])
    if table == "mfw":
        return entry["mark"]
    return entry["name"]


def key_fields(table):
    return {"portfw": ("protocol", "local_address", "local_port"),
            "autofw": ("protocol", "low_port", "high_port"),
            "mfw": ("mark",), "marks": ("name",), "masquerade": ("name",)}[table]


def check_table(table, entries, field="entries"):
    """Cross-entry rules of a whole table: size cap, and AUTOFW ranges that overlap."""
    if len(entries) > MAX_ENTRIES[table]:
        raise ValidationError(field, len(entries), "table %s holds at most %d entries"
                              % (table, MAX_ENTRIES[table]))
    if table == "masquerade":
        owner = {}
        for i, e in enumerate(entries):
            for addr in e.get("pool") or ():
                if addr in owner:
                    raise ValidationError("%s[%d].pool" % (field, i), e["pool"],
                                          "address %s is already in the pool of rule %s" % (addr, owner[addr]))
                owner[addr] = e["name"]
    if table == "autofw":
        spans = sorted((e["protocol"], e["low_port"], e["high_port"], i) for i, e in enumerate(entries))
        for a, b in zip(spans, spans[1:]):
            if a[0] == b[0] and b[1] <= a[2]:
                raise ValidationError("%s[%d]" % (field, b[3]), entries[b[3]],
                                      "port range overlaps another autofw entry")


def normalize_table(table, raw_entries, field="entries", consume=False):
    """Validate a whole table (for `set`/`plan`): returns {key: entry} in order.
    `consume`: the caller hands the list over, and each raw entry is dropped from it
    once validated, so the canonical entries reuse its memory (loading the state file)."""
    if not isinstance(raw_entries, list):
        raise ValidationError(field, raw_entries, "must be a list of entries")
    if table == "portfw":
        out = _portfw_table(raw_entries, field, consume)
    else:
        out = {}
        for i, raw in enumerate(raw_entries):
            f = "%s[%d]" % (field, i)
            entry = normalize_entry(table, raw, f)
            key = entry_key(table, entry)
            if key in out:
                raise ValidationError(f, raw, "duplicate entry for key %s" % (key,))
            if table == "mfw" and not entry["backends"]:
                raise ValidationError(f + ".backends", [], "must be a non-empty list of backends")
            out[key] = entry
    check_table(table, list(out.values()), field)
    return out


def _portfw_table(raw_entries, field, consume):
    """normalize_table for PORTFW, the one table that grows to 100,000s of entries: the
    fast path per entry, the full validator (and its field path) only when it declines."""
    out = {}
    fast = _portfw_fast
    for i, raw in enumerate(raw_entries):
        if consume:
            raw_entries[i] = None
        entry = fast(raw)
        if entry is None:
            f = "%s[%d]" % (field, i)
            entry = normalize_portfw(raw, f)
            if not entry["backends"]:
                raise ValidationError(f + ".backends", [], "must be a non-empty list of backends")
        key = (entry["protocol"], entry["local_address"], entry["local_port"])
        if key in out:
            raise ValidationError("%s[%d]" % (field, i), raw, "duplicate entry for key %s" % (key,))
        out[key] = entry
    return out
