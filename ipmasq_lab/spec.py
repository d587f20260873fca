"""Lab specs: load a topology (path, dict or shipped name) and validate it.

Pure logic, no kernel access: everything a lab would create is checked here, before
anything is created. `validate()` returns the normalized spec that `Lab.spec` holds:

    {"name": str, "description": str,
     "hosts": {host: {"interfaces": {ifname: {"addresses": ["10.16.0.1/24", ...]}},
                      "routes": [{"to": "default"|cidr, "via": ip|None, "dev": ifname|None,
                                  "family": 4|6}],
                      "sysctls": {"net.ipv4.ip_forward": "1"}}},
     "links": [["client:eth0", "gateway:eth0"], ...],
     "bridges": {bridge: ["gateway:eth1", "web1:eth0", ...]}}

The format is documented in docs/lab.md.
"""

import ipaddress
import os
import re

try:
    import yaml
except ImportError:  # the lab modules name the missing library (missing_required_lib)
    yaml = None

from .booted_spec import BOOTED_KEYS, validate_kinds
from .errors import LabSpecError

TOPOLOGIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topologies")

# The only networks a lab may use (TEST-NETs, private v4, documentation and ULA v6).
LAB_RANGES = tuple(ipaddress.ip_network(n) for n in (
    "198.51.100.0/24", "203.0.113.0/24", "10.0.0.0/8", "2001:db8::/32", "fd00::/8"))
# The machine's own uplink: never part of a lab, named explicitly in the error.
UPLINK = ipaddress.ip_network("192.0.2.0/24")
RANGES_TEXT = ", ".join(str(n) for n in LAB_RANGES)

HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
IFNAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")  # kernel IFNAMSIZ: 15 characters
BRIDGE_RE = re.compile(r"^[a-z][a-z0-9_]{0,9}$")  # leaves room for "-NNN" port names
SYSCTL_RE = re.compile(r"^net(\.[A-Za-z0-9_-]+)+$")
SYSCTL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/ -]{1,64}$")
# Names that mean "the machine itself": a lab host never is the root namespace.
ROOT_NAMES = frozenset(("root", "host", "init", "default", "self", "localhost"))
# The per-lab namespace that holds the bridges is <prefix>-switch.
SWITCH_HOST = "switch"
# sysctl subtrees whose fourth component is an interface name.
PER_INTERFACE_SYSCTLS = ("net.ipv4.conf.", "net.ipv6.conf.", "net.ipv4.neigh.", "net.ipv6.neigh.")

TOP_KEYS = ("name", "description", "hosts", "links", "bridges")
HOST_KEYS = ("interfaces", "routes", "sysctls") + BOOTED_KEYS  # kind: docs/hosts.md
INTERFACE_KEYS = ("addresses",)
ROUTE_KEYS = ("to", "via", "dev", "family", "virtual")


# ---------------------------------------------------------------------------------
# Loading


def shipped_topologies():
    """Names of the topologies shipped in ipmasq_lab/topologies."""
    try:
        files = os.listdir(TOPOLOGIES_DIR)
    except FileNotFoundError:
        return []
    return sorted(f[:-4] for f in files if f.endswith(".yml"))


def _check_duplicate_keys(node, path=""):
    # PyYAML silently keeps the last of two equal keys; a lab refuses them instead.
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            sub = "%s.%s" % (path, key) if path else str(key)
            if key in seen:
                raise LabSpecError(sub, key, "duplicate key %r (line %d)"
                                   % (key, key_node.start_mark.line + 1))
            seen.add(key)
            _check_duplicate_keys(value_node, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, "%s[%d]" % (path, i))


def parse_yaml(text, origin="spec"):
    """YAML text -> dict, refusing duplicate keys."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_duplicate_keys(node)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LabSpecError("", origin, "%s is not valid YAML: %s" % (origin, exc)) from None
    if not isinstance(data, dict):
        raise LabSpecError("", origin, "%s must be a mapping with a 'hosts' key" % origin)
    return data


def load(source):
    """A spec source -> raw dict: a dict, a path to a YAML file, or a shipped name."""
    if isinstance(source, dict):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise LabSpecError("", source, "a spec is a dict, a YAML file path or a shipped "
                           "topology name, not %s" % type(source).__name__)
    source = os.fspath(source)
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            data = parse_yaml(handle.read(), source)
        data.setdefault("name", os.path.splitext(os.path.basename(source))[0])
        return data
    if re.match(r"^[a-z0-9_-]+$", source) and source in shipped_topologies():
        return load(os.path.join(TOPOLOGIES_DIR, source + ".yml"))
    raise LabSpecError("", source, "%r is neither a spec file nor a shipped topology (%s)"
                       % (source, ", ".join(shipped_topologies()) or "none"))


def load_and_validate(source):
    return validate(load(source))


# ---------------------------------------------------------------------------------
# Validation


def _mapping(value, path, what):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LabSpecError(path, value, "%s must be a mapping, not %s"
                           % (what, type(value).__name__))
    return value


def _sequence(value, path, what):
    if value is None:
        return []
    if not isinstance(value, list):
        raise LabSpecError(path, value, "%s must be a list, not %s"
                           % (what, type(value).__name__))
    return value


def _known_keys(mapping, allowed, path):
    for key in mapping:
        if key not in allowed:
            sub = "%s.%s" % (path, key) if path else str(key)
            if key == "netns":
                raise LabSpecError(sub, mapping[key], "a host is always its own lab "
                                   "namespace; 'netns' (e.g. the root namespace) is refused")
            raise LabSpecError(sub, mapping[key], "unknown key %r (allowed: %s)"
                               % (key, ", ".join(allowed)))


def _host_name(name, path):
    if not isinstance(name, str) or not HOST_RE.match(name):
        raise LabSpecError(path, name, "%r is not a host name (lowercase letters, digits, "
                           "'-', starting with a letter, at most 32 characters)" % (name,))
    if name in ROOT_NAMES:
        raise LabSpecError(path, name, "%r names the root namespace; a lab never "
                           "includes the machine's own namespace" % name)
    if name == SWITCH_HOST:
        raise LabSpecError(path, name, "'switch' is reserved for the namespace that "
                           "holds the lab's bridges")


def _address(value, path):
    text = str(value)
    if "/" not in text:
        raise LabSpecError(path, value, "%s needs a prefix length (e.g. 10.16.0.1/24)" % text)
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise LabSpecError(path, value, "%s is not an IPv4/IPv6 address with prefix "
                           "length" % text) from None
    if iface.version == 4 and iface.network.overlaps(UPLINK):
        raise LabSpecError(path, value, "%s is in 192.0.2.0/24, the machine's uplink, which "
                           "a lab never uses (lab ranges: %s)" % (text, RANGES_TEXT))
    if not any(iface.version == r.version and iface.network.subnet_of(r) for r in LAB_RANGES):
        raise LabSpecError(path, value, "%s is outside the lab ranges (%s)"
                           % (text, RANGES_TEXT))
    net = iface.network
    if iface.version == 4 and net.prefixlen < 31 and \
            iface.ip in (net.network_address, net.broadcast_address):
        raise LabSpecError(path, value, "%s is the network or broadcast address of %s"
                           % (text, net))
    return iface


def _endpoint(value, path, hosts):
    """'host:ifname' -> (host, ifname), both known."""
    if not isinstance(value, str) or value.count(":") != 1:
        raise LabSpecError(path, value, "%r is not an endpoint 'host:interface'" % (value,))
    host, ifname = value.split(":")
    if host in ROOT_NAMES:
        raise LabSpecError(path, value, "%s names the root namespace; a lab never links "
                           "to the machine's own namespace" % value)
    if host not in hosts:
        raise LabSpecError(path, value, "%s: unknown host %r (hosts: %s)"
                           % (value, host, ", ".join(sorted(hosts))))
    if ifname not in hosts[host]["interfaces"]:
        raise LabSpecError(path, value, "%s: host %s has no interface %r (interfaces: %s)"
                           % (value, host, ifname,
                              ", ".join(hosts[host]["interfaces"]) or "none"))
    return host, ifname


def _validate_interfaces(host, raw, path):
    interfaces = {}
    for ifname, iface in _mapping(raw, path, "interfaces").items():
        ipath = "%s.%s" % (path, ifname)
        if not isinstance(ifname, str) or not IFNAME_RE.match(ifname) or ifname == "lo":
            raise LabSpecError(ipath, ifname, "%r is not an interface name (1-15 lowercase "
                               "letters, digits, '-', '_', starting with a letter; not 'lo')"
                               % (ifname,))
        iface = _mapping(iface, ipath, "an interface")
        _known_keys(iface, INTERFACE_KEYS, ipath)
        addresses = []
        apath = ipath + ".addresses"
        for i, addr in enumerate(_sequence(iface.get("addresses"), apath, "addresses")):
            addresses.append(_address(addr, "%s[%d]" % (apath, i)))
        interfaces[ifname] = {"addresses": addresses}
    return interfaces


def _validate_sysctls(raw, path, interfaces):
    sysctls = {}
    for name, value in _mapping(raw, path, "sysctls").items():
        spath = "%s.%s" % (path, name)
        if not isinstance(name, str) or not SYSCTL_RE.match(name):
            raise LabSpecError(spath, name, "%r is not a network sysctl name (net.*, dotted "
                               "words, e.g. net.ipv4.ip_forward); only per-namespace net.* "
                               "sysctls can be set in a lab" % (name,))
        for subtree in PER_INTERFACE_SYSCTLS:
            if name.startswith(subtree):
                ifname = name[len(subtree):].split(".")[0]
                if ifname not in ("all", "default", "lo") and ifname not in interfaces:
                    raise LabSpecError(spath, name, "%s names interface %r, which this "
                                       "host does not have" % (name, ifname))
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, str)) or not SYSCTL_VALUE_RE.match(str(value)):
            raise LabSpecError(spath, value, "%r is not a sysctl value (a number or a short "
                               "word)" % (value,))
        sysctls[name] = str(value)
    return sysctls


def _segments(links, bridges):
    """(host, ifname) -> segment id: the link or bridge the interface is plugged into."""
    segment_of = {}
    for i, (a, b) in enumerate(links):
        segment_of[a] = segment_of[b] = ("link", i)
    for name, ports in bridges.items():
        for port in ports:
            segment_of[port] = ("bridge", name)
    return segment_of


def _validate_route(host, route, path, hosts, owner_of, segment_of):
    route = _mapping(route, path, "a route")
    _known_keys(route, ROUTE_KEYS, path)
    interfaces = hosts[host]["interfaces"]
    to = route.get("to")
    if to is None:
        raise LabSpecError(path + ".to", None, "a route needs 'to' (default or a network)")
    family = None
    if str(to) != "default":
        try:
            net = ipaddress.ip_network(str(to))
        except ValueError:
            raise LabSpecError(path + ".to", to, "%s is not 'default' or a network "
                               "(e.g. 10.20.0.0/16) with its host bits clear" % to) from None
        if not any(net.version == r.version and net.subnet_of(r) for r in LAB_RANGES):
            raise LabSpecError(path + ".to", to, "%s is outside the lab ranges (%s): a "
                               "lab route never points out of the lab" % (to, RANGES_TEXT))
        family = net.version
        to = str(net)
    # "family" is optional (normalized specs carry it); it must agree with to/via.
    declared = route.get("family")
    if declared not in (None, 4, 6):
        raise LabSpecError(path + ".family", declared, "%r is not 4 or 6" % (declared,))
    dev = route.get("dev")
    if dev is not None and dev not in interfaces:
        raise LabSpecError(path + ".dev", dev, "%s has no interface %r" % (host, dev))
    via = route.get("via")
    if via is None:
        if dev is None:
            raise LabSpecError(path, route, "a route needs 'via' (a lab address) or 'dev'")
        if family is None:
            raise LabSpecError(path + ".to", to, "a default route needs 'via' (a lab "
                               "address); a default route out of a device is refused")
        if declared not in (None, family):
            raise LabSpecError(path + ".family", declared, "family %s does not match 'to' "
                               "%s" % (declared, to))
        return {"to": to, "via": None, "dev": dev, "family": family}
    try:
        gw = ipaddress.ip_address(str(via))
    except ValueError:
        raise LabSpecError(path + ".via", via, "%s is not an IP address" % via) from None
    if family is not None and gw.version != family:
        raise LabSpecError(path + ".via", via, "%s is IPv%d but 'to' %s is IPv%d"
                           % (via, gw.version, to, family))
    if declared not in (None, gw.version):
        raise LabSpecError(path + ".family", declared, "family %s does not match 'via' %s"
                           % (declared, via))
    owner = owner_of.get(gw)
    if route.get("virtual") is True and owner is None:
        # A virtual address (VRRP, docs/ha.md): no host holds it in the spec, a daemon
        # moves it between hosts; it must still be on one of this host's networks.
        if not any(gw in a.network for iface in interfaces.values() for a in iface["addresses"]):
            raise LabSpecError(path + ".via", via, "virtual %s is not on a network of %s's "
                               "interfaces" % (via, host))
        return {"to": to, "via": str(gw), "dev": dev, "family": gw.version, "virtual": True}
    if owner is None:
        raise LabSpecError(path + ".via", via, "%s is not an address of any lab interface; "
                           "a lab route only points at lab hosts" % via)
    if owner[0] == host:
        raise LabSpecError(path + ".via", via, "%s is %s's own address" % (via, host))
    local = [ifname for ifname, iface in interfaces.items()
             if (dev is None or ifname == dev)
             and any(gw in a.network for a in iface["addresses"])]
    if not local:
        raise LabSpecError(path + ".via", via, "%s is not on a network of %s's interfaces"
                           % (via, host))
    if not any(segment_of.get((host, ifname)) == segment_of.get(owner) for ifname in local):
        raise LabSpecError(path + ".via", via, "%s belongs to %s:%s, which is not on the "
                           "same link or bridge as %s:%s"
                           % (via, owner[0], owner[1], host, local[0]))
    return {"to": to, "via": str(gw), "dev": dev, "family": gw.version}


def validate(raw):
    """Raw spec dict -> normalized spec; raises LabSpecError naming the first bad entry."""
    raw = _mapping(raw, "", "a spec")
    _known_keys(raw, TOP_KEYS, "")
    name = str(raw.get("name") or "custom")
    description = str(raw.get("description") or "")
    raw_hosts = _mapping(raw.get("hosts"), "hosts", "hosts")
    if not raw_hosts:
        raise LabSpecError("hosts", raw.get("hosts"), "a lab needs at least one host")

    hosts = {}
    owner_of = {}  # ip -> (host, ifname): every address is unique in the lab
    for host, rhost in raw_hosts.items():
        hpath = "hosts.%s" % host
        _host_name(host, hpath)
        rhost = _mapping(rhost, hpath, "a host")
        _known_keys(rhost, HOST_KEYS, hpath)
        interfaces = _validate_interfaces(host, rhost.get("interfaces"), hpath + ".interfaces")
        for ifname, iface in interfaces.items():
            for i, addr in enumerate(iface["addresses"]):
                if addr.ip in owner_of:
                    raise LabSpecError("%s.interfaces.%s.addresses[%d]" % (hpath, ifname, i),
                                       str(addr), "%s is already the address of %s:%s"
                                       % (addr, *owner_of[addr.ip]))
                owner_of[addr.ip] = (host, ifname)
        hosts[host] = {"interfaces": interfaces, "raw": rhost}

    used = {}  # (host, ifname) -> path of the link/bridge that plugs it in

    def plug(endpoint, path):
        if endpoint in used:
            raise LabSpecError(path, "%s:%s" % endpoint, "%s:%s is already plugged into %s"
                               % (endpoint[0], endpoint[1], used[endpoint]))
        used[endpoint] = path

    links = []
    for i, link in enumerate(_sequence(raw.get("links"), "links", "links")):
        lpath = "links[%d]" % i
        if not isinstance(link, list) or len(link) != 2:
            raise LabSpecError(lpath, link, "a link is a pair [host:interface, "
                               "host:interface]")
        ends = [_endpoint(e, "%s[%d]" % (lpath, j), hosts) for j, e in enumerate(link)]
        if ends[0][0] == ends[1][0]:
            raise LabSpecError(lpath, link, "a link joins two different hosts")
        for j, end in enumerate(ends):
            plug(end, "%s[%d]" % (lpath, j))
        links.append(ends)

    bridges = {}
    for bname, ports in _mapping(raw.get("bridges"), "bridges", "bridges").items():
        bpath = "bridges.%s" % bname
        if not isinstance(bname, str) or not BRIDGE_RE.match(bname):
            raise LabSpecError(bpath, bname, "%r is not a bridge name (1-10 lowercase "
                               "letters, digits, '_', starting with a letter)" % (bname,))
        ports = _sequence(ports, bpath, "a bridge's ports")
        if not ports:
            raise LabSpecError(bpath, ports, "a bridge needs at least one host:interface")
        ends = [_endpoint(p, "%s[%d]" % (bpath, j), hosts) for j, p in enumerate(ports)]
        for j, end in enumerate(ends):
            plug(end, "%s[%d]" % (bpath, j))
        bridges[bname] = ends

    for host, h in hosts.items():
        for ifname in h["interfaces"]:
            if (host, ifname) not in used:
                raise LabSpecError("hosts.%s.interfaces.%s" % (host, ifname), ifname,
                                   "%s:%s is not plugged into any link or bridge"
                                   % (host, ifname))

    segment_of = _segments(links, bridges)
    validate_kinds(raw_hosts, hosts, segment_of)
    for host, h in hosts.items():
        rhost = h.pop("raw")
        rpath = "hosts.%s.routes" % host
        routes = []
        seen = {}
        for i, route in enumerate(_sequence(rhost.get("routes"), rpath, "routes")):
            path = "%s[%d]" % (rpath, i)
            route = _validate_route(host, route, path, hosts, owner_of, segment_of)
            key = (route["to"], route["family"])
            if key in seen:
                raise LabSpecError(path, route["to"], "%s already has a route to %s (%s)"
                                   % (host, route["to"], seen[key]))
            seen[key] = path
            routes.append(route)
        h["routes"] = routes
        h["sysctls"] = _validate_sysctls(rhost.get("sysctls"), "hosts.%s.sysctls" % host,
                                         h["interfaces"])

    for h in hosts.values():
        for iface in h["interfaces"].values():
            iface["addresses"] = [str(a) for a in iface["addresses"]]
    return {
        "name": name,
        "description": description,
        "hosts": hosts,
        "links": [["%s:%s" % end for end in ends] for ends in links],
        "bridges": {b: ["%s:%s" % end for end in ends] for b, ends in bridges.items()},
    }


def endpoint(text):
    """'host:ifname' -> (host, ifname) for a validated spec."""
    host, ifname = text.split(":")
    return host, ifname
