"""masqd's rule tables: validation and canonical entries.

Every entry that reaches the renderer went through `normalize_entry`, which checks each
field, fills defaults and returns the canonical JSON form of docs/agent-api.md. Bad
input raises ValidationError naming the field path and the offending value.
"""

import functools
import ipaddress
import math
import re
import socket

TABLES = ("portfw", "autofw", "mfw", "marks", "masquerade")

# Table-size caps (documented in docs/architecture.md). They bound memory, the size of
# one kernel transaction and the O(n) work of whole-table operations.
MAX_ENTRIES = {
    "portfw": 1000000,
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
_RANGE_RE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")  # ASCII digits: int("٨١") is 81 in Python

# Addresses no field of masqd can mean, with the reason given back: (network, reason).
# A host address (backend, local_address, hidden_host, pool) in any of them is refused;
# a network (source, destination) is refused when it lies inside one of them.
_NOT_UNICAST = (
    (ipaddress.ip_network("0.0.0.0/32"), "the unspecified address"),
    (ipaddress.ip_network("127.0.0.0/8"), "a loopback address (127.0.0.0/8): it never crosses a gateway"),
    (ipaddress.ip_network("224.0.0.0/4"), "a multicast address (224.0.0.0/4)"),
    (ipaddress.ip_network("255.255.255.255/32"), "the limited broadcast address"),
    (ipaddress.ip_network("240.0.0.0/4"), "a reserved address (240.0.0.0/4): not routable"),
    (ipaddress.ip_network("::/128"), "the unspecified address"),
    (ipaddress.ip_network("::1/128"), "the loopback address"),
    (ipaddress.ip_network("ff00::/8"), "a multicast address (ff00::/8)"),
    (ipaddress.ip_network("::ffff:0:0/96"), "an IPv4-mapped IPv6 address (::ffff:0:0/96): give the IPv4 form"),
)
# A destination may be multicast (matching multicast traffic is meaningful); a source never.
_DESTINATION_OK = frozenset(("224.0.0.0/4", "ff00::/8"))


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
    """An IPv4/IPv6 host address; returns (canonical string, family 4|6). Refused with
    the reason: no zone id, nothing that cannot be meant (_NOT_UNICAST)."""
    if not isinstance(value, str):
        raise ValidationError(field, value, "must be an IPv4 or IPv6 address")
    parsed = _parse_address(value)
    if parsed is None:
        if "%" in value:
            raise ValidationError(field, value, "has a zone id ('%...'): masqd takes addresses without one")
        raise ValidationError(field, value, "must be an IPv4 or IPv6 address")
    if parsed[0] is None:
        raise ValidationError(field, value, _reason(value))
    return parsed


def _reason(value):
    """Why an address parsed by _parse_address as not unicast cannot be meant."""
    addr = ipaddress.ip_address(value)
    for net, what in _NOT_UNICAST:
        if addr.version == net.version and addr in net:
            return "is " + what
    return "must be a unicast address"


@functools.lru_cache(maxsize=65536)
def _parse_address(value):
    """(canonical, family), (None, family) for an address that cannot be meant (see
    _reason), or None when it is not an address (zone ids included).
    IPv4 takes a fast path (inet_pton is ~10x faster than ipaddress): 100,000-key
    tables are validated on every `set`."""
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except (OSError, ValueError):  # ValueError: an embedded NUL byte
        packed = None
    if packed is not None:
        if packed == b"\0\0\0\0" or packed[0] == 127 or packed[0] >= 224:
            return None, 4
        return socket.inet_ntop(socket.AF_INET, packed), 4
    if "%" in value or not value.isascii():  # ipaddress takes "fe80::1%<anything>" (a zone id)
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if addr.version == 4:  # forms inet_pton refuses but ipaddress takes: none today
        return None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.ipv4_mapped is not None:
        return None, 6
    return str(addr), 6


def network(value, field, role="source"):
    """A CIDR (or bare address = host route); returns (canonical string, family).
    0.0.0.0/0 and ::/0 mean any; a network inside a range no packet of `role`
    (source or destination) can come from or go to is refused with the reason."""
    if not isinstance(value, str):
        raise ValidationError(field, value, "must be an IPv4 or IPv6 network (CIDR)")
    if "%" in value:
        raise ValidationError(field, value, "has a zone id ('%...'): masqd takes networks without one")
    if not value.isascii():
        raise ValidationError(field, value, "must be an IPv4 or IPv6 network (CIDR)")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        msg = "has host bits set" if "host bits" in str(exc) else "must be an IPv4 or IPv6 network (CIDR)"
        raise ValidationError(field, value, msg) from None
    for bad, what in _NOT_UNICAST:
        if net.version == bad.version and net.subnet_of(bad):
            if role == "destination" and str(bad) in _DESTINATION_OK:
                continue
            if net.num_addresses == 1:
                raise ValidationError(field, value, "is %s" % what)
            raise ValidationError(field, value, "cannot be meant as %s: every address in it is %s" % (role, what))
    return str(net), net.version


def interface(value, field):
    """A network interface name as the kernel accepts it (dev_valid_name: not empty,
    under IFNAMSIZ, not '.' or '..', no '/', ':' or whitespace) and nft can quote: 1-15
    printable ASCII characters, no quote or backslash either. A trailing '*' is nft's
    prefix wildcard ("ppp*"); a lone '*' (every interface) is refused: leave the field out."""
    if value == "*":
        raise ValidationError(field, value, "a lone '*' matches every interface: leave the field out instead")
    ok = (isinstance(value, str) and 0 < len(value) <= 15 and value not in (".", "..")
          and all(33 <= ord(c) <= 126 and c not in "/:\"\\" for c in value)
          and "*" not in value[:-1])
    if not ok:
        raise ValidationError(field, value, "must be an interface name: 1-15 printable ASCII "
                              "characters, no '/', ':', quote, backslash or whitespace ('*' only at the end)")
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
            m = _RANGE_RE.fullmatch(item) if len(item) <= 11 else None
            if not m:
                raise ValidationError(f, item, "must be a port or a \"low-high\" range")
            low, high = int(m.group(1)), int(m.group(2))
            if not (0 < low <= 65535 and 0 < high <= 65535):
                raise ValidationError(f, item, "port must be 1-65535")
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
        optional = ("pref", "port", "check") if port_optional else ("pref", "check")
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
        if b.get("check") is not None:  # health check (docs/health.md)
            backend_check(b["check"], f + ".check", backend, fam)
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
    _fields(raw, field, ("protocol", "local_address", "local_port"), ("backends",) + HEALTH_OPTIONS)
    proto = _CANONICAL_PROTOCOL[protocol(raw["protocol"], _path(field, "protocol"))]
    laddr, fam = address(raw["local_address"], _path(field, "local_address"))
    lport = port(raw["local_port"], _path(field, "local_port"))
    backends = _backends(raw.get("backends", []), _path(field, "backends"), fam, True, False, require=False)
    entry = {"protocol": proto, "local_address": laddr, "local_port": lport, "backends": backends}
    return health_options(raw, field, entry, fam, port_optional=False)


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
    _fields(raw, field, ("mark",), ("backends",) + HEALTH_OPTIONS)
    m = mark(raw["mark"], _path(field, "mark"))
    backends = _backends(raw.get("backends", []), _path(field, "backends"), None, True, True, require=False)
    fam = (6 if ":" in backends[0]["address"] else 4) if backends else None
    return health_options(raw, field, {"mark": m, "backends": backends}, fam, port_optional=True)


def _criteria(raw, field, entry):
    """Shared match criteria of marks and masquerade rules."""
    families = []
    for key in ("source", "destination"):
        value = raw.get(key)
        entry[key] = None
        if value is not None:
            entry[key], fam = network(value, _path(field, key), role=key)
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
        if not isinstance(item, str) or item not in HELPERS:
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


# --- health checks (docs/health.md) -----------------------------------------------------

CHECK_TYPES = ("none", "tcp", "http", "icmp")
CHECK_DEFAULTS = {"interval": 2.0, "fall": 3, "rise": 2}
CHECK_INTERVAL = (0.05, 3600.0)  # seconds
CHECK_TIMEOUT = (0.01, 60.0)
MAX_FALL_RISE = 100
MAX_CHECK_PATH = 256
ALL_DOWN = ("forward", "fallback", "reject")
# Entry fields about what health checks do to the key; absent = the default, so an
# entry without checks is exactly what it was before health checks existed.
HEALTH_OPTIONS = ("failback", "all_down", "fallback", "flush_on_down")
_CHECK_FIELDS = ("type", "port", "path", "status", "interval", "timeout", "fall", "rise")
_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")  # visible ASCII: it goes into a request line


def _seconds(value, field, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValidationError(field, value, "must be a number of seconds %g-%g" % (low, high))
    if not low <= value <= high:
        raise ValidationError(field, value, "must be %g-%g seconds" % (low, high))
    return float(value)


def _statuses(value, field):
    """Expected HTTP statuses: a code (200) or a list of codes; default 200-399."""
    codes = value if isinstance(value, list) else [value]
    if not codes or len(codes) > 32:
        raise ValidationError(field, value, "must be an HTTP status code or a list of 1-32 codes")
    return sorted(set(_int(c, field, 100, 599, "HTTP status") for c in codes))


def backend_check(raw, field, backend, family):
    """Validate a backend's `check` and store its canonical form in backend["check"]
    (nothing for type none). `port` None means the backend's own port."""
    if isinstance(raw, dict):  # a field given as null is a field not given (modules)
        raw = {k: v for k, v in raw.items() if v is not None}
    _fields(raw, field, ("type",), _CHECK_FIELDS)
    kind = raw["type"]
    if kind not in CHECK_TYPES:
        raise ValidationError(field + ".type", kind, "must be one of %s" % ", ".join(CHECK_TYPES))
    if kind == "none":
        extra = [k for k in raw if k != "type"]
        if extra:
            raise ValidationError("%s.%s" % (field, extra[0]), raw[extra[0]], "a check of type none takes no options")
        return backend
    out = {"type": kind}
    if kind == "icmp":
        for k in ("port", "path", "status"):
            if k in raw:
                raise ValidationError("%s.%s" % (field, k), raw[k], "an icmp check takes no %s" % k)
    else:
        p = raw.get("port")
        if p is not None:
            p = port(p, field + ".port")
        elif backend["port"] is None:
            raise ValidationError(field + ".port", None, "is required: the backend has no port (or use type icmp)")
        out["port"] = p
    if kind == "http":
        path = raw.get("path", "/")
        if not isinstance(path, str) or len(path) > MAX_CHECK_PATH or not _PATH_RE.fullmatch(path):
            raise ValidationError(field + ".path", path, "must be an absolute path of visible ASCII "
                                  "characters (no spaces), at most %d" % MAX_CHECK_PATH)
        out["path"] = path
        if raw.get("status") is not None:
            out["status"] = _statuses(raw["status"], field + ".status")
    else:
        for k in ("path", "status"):
            if k in raw:
                raise ValidationError("%s.%s" % (field, k), raw[k], "only an http check takes %s" % k)
    out["interval"] = _seconds(raw.get("interval", CHECK_DEFAULTS["interval"]), field + ".interval", *CHECK_INTERVAL)
    timeout = raw.get("timeout")
    out["timeout"] = (min(out["interval"], CHECK_TIMEOUT[1]) if timeout is None
                      else _seconds(timeout, field + ".timeout", *CHECK_TIMEOUT))
    for k in ("fall", "rise"):
        out[k] = _int(raw.get(k, CHECK_DEFAULTS[k]), "%s.%s" % (field, k), 1, MAX_FALL_RISE, k)
    backend["check"] = out
    return backend


def health_options(raw, field, entry, family, port_optional):
    """The entry-level health fields (HEALTH_OPTIONS), added to `entry` when not the
    default: failback (mfw pref-0 lists), all_down (forward | fallback | reject) with
    its `fallback` backend, flush_on_down."""
    for k in ("failback", "flush_on_down"):
        if raw.get(k) is not None and boolean(raw[k], _path(field, k)):
            entry[k] = True
    mode = "forward" if raw.get("all_down") is None else raw["all_down"]
    if mode not in ALL_DOWN:
        raise ValidationError(_path(field, "all_down"), mode, "must be one of %s" % ", ".join(ALL_DOWN))
    fallback = raw.get("fallback")
    if mode == "fallback" and fallback is None:
        raise ValidationError(_path(field, "fallback"), None, "is required with all_down: fallback")
    if fallback is not None:
        if mode != "fallback":
            raise ValidationError(_path(field, "fallback"), fallback, "needs all_down: fallback")
        f = _path(field, "fallback")
        _fields(fallback, f, ("address",) if port_optional else ("address", "port"), ("port",))
        addr, fam = address(fallback["address"], f + ".address")
        if family is not None and fam != family:
            raise ValidationError(f + ".address", fallback["address"], "mixes IPv4 and IPv6 in one entry")
        p = fallback.get("port")
        entry["fallback"] = {"address": addr, "port": None if p is None else port(p, f + ".port")}
    if mode != "forward":
        entry["all_down"] = mode
    return entry


def checked(entry):
    """Does any backend of the entry carry a health check? (A loop, not any() over a
    generator: this runs for every key of a whole-table set.)"""
    for backend in entry.get("backends", ()):
        if "check" in backend:
            return True
    return False
