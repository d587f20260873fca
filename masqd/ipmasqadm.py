"""The seed's command lines -> masqd API requests.

`ipmasqadm autofw|portfw|mfw ...` lines are accepted verbatim (as in ipmasqadm 0.4.2,
plus the seed's `mfw -I` and `-r ADDR/32` without a port), and the seed's ipchains
lines for marks (`ipchains -I input -s ! NET -m 3`) and masquerading (`ipchains -A -p
tcp -s HOST/32 80 -j MASQ`) become `masqctl mark ...` / `masqctl masq ...`.

parse(argv) is pure apart from name resolution (done through a Resolver, as
ipmasqadm resolved names when the rule was added) and returns a Command. A Command
either carries the API `request`, or names a table to list, or a usage text to print,
or needs the current table first (`needs_table` + `finish(entries, revision)`).
"""

import hashlib
import ipaddress
import json
import socket
from dataclasses import dataclass, field
from typing import Callable, Optional

MODULES = ("autofw", "portfw", "mfw", "mark", "masq")

AUTOFW_USAGE = """\
Usage:
    ipautofw <command> <options>

Valid commands:
    -A                           add new autoforward entry
    -D                           delete an autoforward entry
    -F                           flush the autoforward table
    -L                           list the autoforward table (masqctl)

Valid options:
    -r <type> <low> <high>       forwarding on ports <low> to <high> using
                                 protocol <type> (tcp or udp)

    -h <host>                    IP address of host to receive forwarded
                                 packets

    -c <type> <port>             specifies a control port and protocol

    -u                           Do _not_ require that a host connect within
                                 15 seconds of triggering the control port

    -t <seconds>                 timeout in seconds (masqctl; default 15)
    --keyed-by-peer              with -c: one recipient per external peer (the
                                 host that last opened the control connection
                                 to that server; masqctl)
    -n                           numbers instead of names in the listing
    -v                           Verbose mode

(-d, -p and -i of ipautofw are not supported by masqd.)
"""

PORTFW_USAGE = """\
Usage: portfw -a -P PROTO -L LADDR LPORT -R RADDR RPORT [-p PREF] [CHECK] add entry
       portfw -d -P PROTO -L LADDR LPORT [-R RADDR RPORT]         delete entry
       portfw -f                                                  clear table
       portfw -l                                                  list table
       portfw <args> -n                                           no names

PROTO is the protocol, can be "tcp" or "udp"
LADDR is the local interface receiving packets to be forwarded
LPORT is the port being redirected
RADDR is the remote address
RPORT is the port being redirected to
PREF  is the preference level (load balancing, default=10)
CHECK is a health check of the backend given (docs/health.md):
      --check tcp[:PORT] | http[:PORT][/PATH] | icmp | none
      --check-interval S  --check-timeout S  --check-fall N  --check-rise N
"""

MFW_USAGE = """\
Usage: mfw -A -m FWMARK -r RADDR RPORT [-p PREF] [CHECK] add entry
       mfw -I -m FWMARK -r RADDR RPORT [-p PREF] [CHECK] insert entry (at the head)
       mfw -D -m FWMARK [-r RADDR RPORT]         delete entry
       mfw -E -m FWMARK [-r RADDR RPORT] [-p PREF] [CHECK] edit entry (pref, check)
       mfw -S -m FWMARK                          force scheduling
       mfw -F                                    clear table
       mfw -L                                    list table
       mfw <args> -n                             no names

FWMARK is the fwmark being redirected.
RADDR is the remote address (RADDR/32 is the same host).
RPORT is the port being redirected to (none: the packet's own port, all protocols).
PREF  is the preference level (load balancing, default=10; 0: never scheduled, see -S)
CHECK is a health check of the backend given (docs/health.md):
      --check tcp[:PORT] | http[:PORT][/PATH] | icmp | none
      --check-interval S  --check-timeout S  --check-fall N  --check-rise N
"""

_CRITERIA_USAGE = """\
    -p [tcp|udp|icmp|icmpv6|all]   protocol
    -s [!] ADDR[/MASK] [PORT[:PORT]]
                                   source (! inverts the address)
    -d [!] ADDR[/MASK] [PORT[:PORT]]
                                   destination
    --sport PORTS, --dport PORTS   ports: 80,443,6000-6010 or 1024:65535
    --name NAME                    rule name (generated from the rule when absent)
    -n                             numbers instead of names in the listing
"""

MARK_USAGE = """\
Usage: mark -A [input] [criteria] -m MARK       append a marking rule
       mark -I [input] [criteria] -m MARK       insert a marking rule (first)
       mark -D [input] NAME | --name NAME       delete a marking rule by name
       mark -D [input] [criteria] -m MARK       delete the rule with these criteria
       mark -F                                  flush the marking rules
       mark -L                                  list the marking rules

The seed's `ipchains -I input -s ! ${FRIEND} -m 3` is `masqctl mark -I input -s ! ${FRIEND} -m 3`.
The first rule matching a connection's first packet sets its mark.

Criteria:
""" + _CRITERIA_USAGE + """\
    -i IFACE                       input interface
    -m MARK                        the mark to set (1..4294967295)
"""

MASQ_USAGE = """\
Usage: masq -A [forward] [criteria] [-j MASQ]   append a masquerading rule
       masq -I [forward] [criteria] [-j MASQ]   insert a masquerading rule (first)
       masq -D [forward] NAME | --name NAME     delete a masquerading rule by name
       masq -D [forward] [criteria] [-j MASQ]   delete the rule with these criteria
       masq -F                                  flush the masquerading rules
       masq -L                                  list the masquerading rules

The seed's `ipchains -A -p tcp -s 192.168.16.27/32 80 -j MASQ` is
`masqctl masq -A -p tcp -s 192.168.16.27/32 80 -j MASQ`.

Criteria:
""" + _CRITERIA_USAGE + """\
    -i IFACE, -o IFACE             output interface
    --pool ADDR[,ADDR...]          SNAT to an address of this pool (local addresses
                                   of the gateway); each host keeps its address
    --pool-ports PORTS             inbound connections to a pool address on these
                                   ports go to the host holding it
    --helper NAME[,NAME...]        conntrack helpers for matching connections:
                                   amanda, ftp, h323, irc, netbios-ns, pptp, sane,
                                   sip, snmp, tftp
"""

USAGES = {"autofw": AUTOFW_USAGE, "portfw": PORTFW_USAGE, "mfw": MFW_USAGE,
          "mark": MARK_USAGE, "masq": MASQ_USAGE}

# The model's key fields of each criteria table (docs/agent-api.md).
MARK_FIELDS = ("mark", "protocol", "source", "source_invert", "destination",
               "destination_invert", "source_ports", "destination_ports", "input_interface")
MASQ_FIELDS = ("protocol", "source", "source_invert", "destination", "destination_invert",
               "source_ports", "destination_ports", "output_interface")

DEFAULT_PREF = 10  # ipmasqadm's IP_PORTFW_DEF_PREF / IP_MARKFW_DEF_PREF

# `autofw -u`: ipautofw's "do not require that a host connect within 15 seconds".
AUTOFW_LONG_TIMEOUT = 3600


class UsageError(Exception):
    """A command line that cannot be run: exit 2, with the module's usage text."""

    def __init__(self, module, message, show_usage=True):
        self.module = module
        self.message = message
        self.usage = USAGES.get(module, "") if show_usage else ""
        super().__init__("%s: %s" % (module, message))


class StateError(Exception):
    """The command needs something the agent's current table does not hold."""


@dataclass
class Command:
    module: str
    request: Optional[dict] = None
    listing: Optional[str] = None        # table to list
    numeric: bool = False
    help: Optional[str] = None            # usage text to print
    verbose: Optional[str] = None         # autofw -v description
    needs_table: Optional[str] = None     # finish() wants this table's entries first
    finish: Optional[Callable] = field(default=None, repr=False)


# -- name resolution ------------------------------------------------------------------

class SystemLookup:
    """The system resolver (nsswitch: /etc/hosts, DNS, /etc/services)."""

    @staticmethod
    def host_address(name):
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        # Like gethostbyname: IPv4 first when the name has both.
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        return infos[0][4][0]

    @staticmethod
    def service_port(name):
        for proto in ("tcp", "udp"):
            try:
                return socket.getservbyname(name, proto)
            except OSError:
                continue
        raise OSError("unknown service")


class Resolver:
    """Addresses and ports of one command line; with -n, names are refused."""

    def __init__(self, module, numeric=False, lookup=None):
        self.module = module
        self.numeric = numeric
        self.lookup = lookup or SystemLookup()

    def error(self, message, show_usage=True):
        return UsageError(self.module, message, show_usage)

    def address(self, value, what):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        if self.numeric:
            raise self.error("%s: %r is not an IP address (-n: no names)" % (what, value))
        try:
            return self.lookup.host_address(value)
        except (OSError, LookupError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise self.error("%s: cannot resolve host name %r: %s" % (what, value, reason),
                             show_usage=False)

    def port(self, value, what):
        if _ascii_digits(value):
            return int(value)
        if self.numeric or not value or value.startswith("-") or not value.isascii():
            raise self.error("%s: %r is not a port number" % (what, value))
        try:
            return self.lookup.service_port(value)
        except (OSError, LookupError):
            raise self.error("%s: unknown service name %r" % (what, value), show_usage=False)


# -- the command-line scanner ---------------------------------------------------------

class Tokens:
    """getopt-like reading of argv: bundles like -ln and -p15 are split first."""

    def __init__(self, module, argv, flags="", with_arg=""):
        self.module = module
        self.items = []
        for token in argv:
            if token.startswith("-") and not token.startswith("--") and len(token) > 2:
                if token[1] in with_arg:
                    self.items += [token[:2], token[2:]]
                    continue
                if all(char in flags for char in token[1:]):
                    self.items += ["-" + char for char in token[1:]]
                    continue
            self.items.append(token)
        self.pos = 0

    def __bool__(self):
        return self.pos < len(self.items)

    def take(self):
        token = self.items[self.pos]
        self.pos += 1
        return token

    def peek(self):
        return self.items[self.pos] if self.pos < len(self.items) else None

    def value(self, option, what):
        if not self or (self.peek().startswith("-") and len(self.peek()) > 1
                        and not _is_number(self.peek())):
            raise UsageError(self.module, "option %s needs %s" % (option, what))
        return self.take()

    def has(self, *options):
        return any(token in options for token in self.items)


def _ascii_digits(text):
    """Only 0-9: str.isdigit() and int() also take '²' and '٨١' (81)."""
    return text.isascii() and text.isdigit()


def _is_number(text):
    if not text.isascii():
        return False
    try:
        int(text)
        return True
    except ValueError:
        return False


def _integer(module, value, what):
    if not value.isascii():
        raise UsageError(module, "%s: %r is not a number" % (what, value))
    try:
        return int(value, 10)
    except ValueError:
        raise UsageError(module, "%s: %r is not a number" % (what, value))


def _protocol(module, value, what, allowed=("tcp", "udp")):
    name = value.lower()
    if name not in allowed:
        raise UsageError(module, "%s: invalid protocol %r (one of %s)" % (what, value, ", ".join(allowed)))
    return name


def _set_command(module, current, new):
    if current is not None:
        raise UsageError(module, "multiple commands specified")
    return new


# -- autofw ---------------------------------------------------------------------------

def parse_autofw(argv, lookup=None):
    module = "autofw"
    if not argv:
        return Command(module, help=AUTOFW_USAGE)
    numeric = "-n" in argv
    resolve = Resolver(module, numeric, lookup)
    tokens = Tokens(module, argv)
    command = None
    entry = {}
    long_timeout = verbose = False
    while tokens:
        token = tokens.take()
        if token in ("-A", "-D", "-F", "-L"):
            command = _set_command(module, command, token)
        elif token == "-r":
            entry["protocol"] = _protocol(module, tokens.value("-r", "<type> <low> <high>"), "-r <type>")
            entry["low_port"] = _integer(module, tokens.value("-r", "<low> <high>"), "-r <low>")
            entry["high_port"] = _integer(module, tokens.value("-r", "<high>"), "-r <high>")
        elif token == "-h":
            entry["hidden_host"] = resolve.address(tokens.value("-h", "<host>"), "-h <host>")
        elif token == "-c":
            entry["control_protocol"] = _protocol(module, tokens.value("-c", "<type> <port>"), "-c <type>")
            entry["control_port"] = resolve.port(tokens.value("-c", "<port>"), "-c <port>")
        elif token == "-u":
            long_timeout = True
        elif token == "--keyed-by-peer":
            entry["keyed_by_peer"] = True
        elif token == "-t":
            entry["timeout"] = _integer(module, tokens.value("-t", "<seconds>"), "-t <seconds>")
        elif token == "-v":
            verbose = True
        elif token == "-n":
            pass
        elif token in ("-d", "-p", "-i"):
            raise UsageError(module, "option %s of ipautofw is not supported by masqd" % token)
        elif token == "--help":
            return Command(module, help=AUTOFW_USAGE)
        else:
            raise UsageError(module, "Invalid option: %s" % token)
    if command is None:
        raise UsageError(module, "Command must be either -A, -D, or -F")
    if command in ("-F", "-L"):
        if entry or long_timeout:
            raise UsageError(module, "The flush command does not take options" if command == "-F"
                             else "The list command does not take options")
        if command == "-L":
            return Command(module, listing="autofw", numeric=numeric)
        return Command(module, request={"op": "flush", "table": "autofw"})
    if "protocol" not in entry:
        raise UsageError(module, "You must select a type of forwarding (-r <type> <low> <high>)")
    key = {name: entry[name] for name in ("protocol", "low_port", "high_port")}
    if command == "-D":
        return Command(module, request={"op": "delete", "table": "autofw", "entry": key})
    if ("hidden_host" in entry) == ("control_port" in entry):
        raise UsageError(module, "give either -h <host> or -c <type> <port>")
    if long_timeout and "timeout" not in entry:
        entry["timeout"] = AUTOFW_LONG_TIMEOUT
    description = None
    if verbose:
        description = "Adding autofwd %s ports %d - %d " % (entry["protocol"], entry["low_port"], entry["high_port"])
        if "hidden_host" in entry:
            description += "to fixed host %s" % entry["hidden_host"]
        else:
            description += "via %s ctl port %d" % (entry["control_protocol"], entry["control_port"])
            if entry.get("keyed_by_peer"):
                description += " keyed by peer"
    return Command(module, request={"op": "add", "table": "autofw", "entry": entry}, verbose=description)


# -- portfw ---------------------------------------------------------------------------

def parse_portfw(argv, lookup=None):
    module = "portfw"
    tokens = Tokens(module, argv, flags="adflnh", with_arg="Pp")
    numeric = tokens.has("-n")
    resolve = Resolver(module, numeric, lookup)
    command = protocol = local = remote = pref = None
    check = {}
    while tokens:
        token = tokens.take()
        if token in ("-a", "-d", "-f", "-l"):
            command = _set_command(module, command, token)
        elif token == "-n":
            pass
        elif token in ("-h", "--help"):
            return Command(module, help=PORTFW_USAGE)
        elif token == "-P":
            if protocol is not None:
                raise UsageError(module, "multiple protocols specified")
            protocol = _protocol(module, tokens.value("-P", "PROTO"), "-P PROTO")
        elif token in ("-L", "-R"):
            if (local if token == "-L" else remote) is not None:
                raise UsageError(module, "multiple local address/port specified" if token == "-L"
                                 else "multiple destinations specified")
            what = "LADDR LPORT" if token == "-L" else "RADDR RPORT"
            address = resolve.address(tokens.value(token, what), "%s %s" % (token, what.split()[0]))
            port = resolve.port(tokens.value(token, what.split()[1]), "%s %s" % (token, what.split()[1]))
            if token == "-L":
                local = (address, port)
            else:
                remote = (address, port)
        elif token == "-p":
            pref = _integer(module, tokens.value("-p", "PREF"), "-p PREF")
        elif _check_option(module, tokens, token, check):
            pass
        elif token.startswith("-"):
            raise UsageError(module, "invalid option %s" % token)
        else:
            raise UsageError(module, "unknown arguments found on commandline: %s" % token)
    if command is None:
        raise UsageError(module, "no command given (-a, -d, -f or -l)")
    if check and command != "-a":
        raise UsageError(module, "incompatible options specified: --check is for -a")
    if command in ("-f", "-l"):
        if protocol or local or remote or pref is not None:
            raise UsageError(module, "incompatible options specified")
        if command == "-l":
            return Command(module, listing="portfw", numeric=numeric)
        return Command(module, request={"op": "flush", "table": "portfw"})
    if protocol is None or local is None or (command == "-a" and remote is None):
        raise UsageError(module, "insufficient options specified")
    if pref is not None and command != "-a":
        raise UsageError(module, "incompatible options specified: -p PREF is for -a")
    entry = {"protocol": protocol, "local_address": local[0], "local_port": local[1]}
    if remote is not None:
        backend = {"address": remote[0], "port": remote[1]}
        if pref is not None:
            backend["pref"] = pref
        if check:
            backend["check"] = _finish_check(module, check)
        entry["backends"] = [backend]
    op = "add" if command == "-a" else "delete"
    return Command(module, request={"op": op, "table": "portfw", "entry": entry})


# -- health checks of the backend given (portfw -a, mfw -A/-I/-E) ---------------------

_CHECK_OPTIONS = {"--check-interval": ("interval", float), "--check-timeout": ("timeout", float),
                  "--check-fall": ("fall", int), "--check-rise": ("rise", int)}


def _check_option(module, tokens, token, check):
    """Consume one --check* option (also as --check=VALUE) into `check`; False if
    `token` is not one. Values are checked by the agent (model.backend_check)."""
    name, eq, inline = token.partition("=")
    if name != "--check" and name not in _CHECK_OPTIONS:
        return False
    value = inline if eq else tokens.value(name, "a value")
    if name == "--check":
        check["spec"] = value
        return True
    field, kind = _CHECK_OPTIONS[name]
    try:
        check[field] = int(value, 10) if kind is int else float(value)
    except ValueError:
        raise UsageError(module, "%s: %r is not a number" % (name, value)) from None
    if kind is float and check[field].is_integer():
        check[field] = int(check[field])
    return True


def _finish_check(module, check):
    """The API's `check` of --check tcp[:PORT] | http[:PORT][/PATH] | icmp | none."""
    spec = check.get("spec")
    if spec is None:
        raise UsageError(module, "--check-interval/-timeout/-fall/-rise need --check TYPE")
    kind, _colon, rest = spec.partition(":")
    out = {"type": kind}
    if _colon:
        port, slash, path = rest.partition("/")
        if port:
            if not _ascii_digits(port):
                raise UsageError(module, "--check %s: %r is not a port number" % (spec, port))
            out["port"] = int(port)
        if slash:
            out["path"] = "/" + path
    out.update((k, v) for k, v in check.items() if k != "spec")
    return out


# -- mfw ------------------------------------------------------------------------------

def _host_address(resolve, module, value, what):
    """RADDR, with an optional host-length /32 (/128) as in the seed's mfw lines."""
    address, _slash, prefix = value.partition("/")
    resolved = resolve.address(address, what)
    if prefix:
        full = 32 if ipaddress.ip_address(resolved).version == 4 else 128
        if prefix != str(full):
            raise UsageError(module, "%s: %r is a network, not a host address" % (what, value))
    return resolved


def _looks_like_port(token):
    return token is not None and not token.startswith("-") and (token.isdigit() or token.isalpha())


def parse_mfw(argv, lookup=None):
    module = "mfw"
    tokens = Tokens(module, argv, flags="AIEDFSLnh", with_arg="mp")
    numeric = tokens.has("-n")
    resolve = Resolver(module, numeric, lookup)
    command = mark = remote = pref = None
    check = {}
    while tokens:
        token = tokens.take()
        if token in ("-A", "-I", "-E", "-D", "-F", "-S", "-L"):
            command = _set_command(module, command, token)
        elif token == "-n":
            pass
        elif token in ("-h", "--help"):
            return Command(module, help=MFW_USAGE)
        elif token == "-m":
            mark = _integer(module, tokens.value("-m", "FWMARK"), "-m FWMARK")
        elif token == "-r":
            if remote is not None:
                raise UsageError(module, "multiple destinations specified")
            address = _host_address(resolve, module, tokens.value("-r", "RADDR [RPORT]"), "-r RADDR")
            port = None
            if _looks_like_port(tokens.peek()):
                port = resolve.port(tokens.take(), "-r RPORT")
                if port == 0:
                    port = None  # ipmasqadm's "nul rport": the packet's own port
            remote = (address, port)
        elif token == "-p":
            pref = _integer(module, tokens.value("-p", "PREF"), "-p PREF")
        elif _check_option(module, tokens, token, check):
            pass
        elif token.startswith("-"):
            raise UsageError(module, "invalid option %s" % token)
        else:
            raise UsageError(module, "unknown arguments found on commandline: %s" % token)
    if command is None:
        raise UsageError(module, "no command given (-A, -I, -D, -E, -S, -F or -L)")
    if check and (command not in ("-A", "-I", "-E") or remote is None):
        raise UsageError(module, "incompatible options specified: --check is for -A, -I and -E with -r RADDR")
    if command in ("-F", "-L"):
        if mark is not None or remote is not None or pref is not None:
            raise UsageError(module, "incompatible options specified")
        if command == "-L":
            return Command(module, listing="mfw", numeric=numeric)
        return Command(module, request={"op": "flush", "table": "mfw"})
    if mark is None:
        raise UsageError(module, "insufficient options specified: -m FWMARK")
    if command == "-S":
        if remote is not None or pref is not None:
            raise UsageError(module, "incompatible options specified: -S takes only -m FWMARK")
        return Command(module, request={"op": "schedule", "mark": mark})
    if command in ("-A", "-I"):
        if remote is None:
            raise UsageError(module, "insufficient options specified: -r RADDR")
        backend = {"address": remote[0], "port": remote[1]}
        if pref is not None:
            backend["pref"] = pref
        if check:
            backend["check"] = _finish_check(module, check)
        op = "add" if command == "-A" else "insert"
        return Command(module, request={"op": op, "table": "mfw",
                                        "entry": {"mark": mark, "backends": [backend]}})
    if command == "-D":
        if pref is not None:
            raise UsageError(module, "incompatible options specified: -p PREF is for -A, -I and -E")
        entry = {"mark": mark}
        if remote is not None:
            entry["backends"] = [{"address": remote[0], "port": remote[1]}]
        return Command(module, request={"op": "delete", "table": "mfw", "entry": entry})
    # -E: a new pref for one backend, or for every backend of the mark. Without -p,
    # ipmasqadm sent its default pref (10), so the seed's `mfw -E -m M -r R` does too.
    if pref is None:
        pref = DEFAULT_PREF
    if remote is not None:
        entry = {"mark": mark, "backends": [{"address": remote[0], "port": remote[1], "pref": pref}]}
        if check:
            entry["backends"][0]["check"] = _finish_check(module, check)
        return Command(module, request={"op": "edit", "table": "mfw", "entry": entry})

    def finish(entries, _revision):
        for current in entries:
            if current.get("mark") == mark:
                backends = [{"address": b["address"], "port": b.get("port"), "pref": pref}
                            for b in current.get("backends", [])]
                return {"op": "edit", "table": "mfw", "entry": {"mark": mark, "backends": backends}}
        raise StateError("mfw -E: fwmark %d has no entries" % mark)

    return Command(module, needs_table="mfw", finish=finish)


# -- mark and masq (the seed's ipchains lines) -------------------------------------------

CHAINS = {"mark": "input", "masq": "forward"}
TABLES = {"mark": "marks", "masq": "masquerade"}
COMMANDS = {"-A": "-A", "--append": "-A", "-I": "-I", "--insert": "-I", "-D": "-D",
            "--delete": "-D", "-F": "-F", "--flush": "-F", "-L": "-L", "--list": "-L"}


def _network(resolve, module, value, what):
    """ADDR[/MASK] (MASK a length or dotted) -> 'addr' or 'addr/len'; 0/0 -> None."""
    address, slash, mask = value.partition("/")
    if value in ("0/0", "0.0.0.0/0", "::/0", "any"):
        return None
    resolved = resolve.address(address, what)
    if not slash:
        return resolved
    if not mask.isdigit():
        try:
            mask = str(ipaddress.ip_network("0.0.0.0/%s" % mask).prefixlen)
        except ValueError:
            raise UsageError(module, "%s: invalid mask in %r" % (what, value))
    try:
        # ipchains masked the host bits off (-s 203.0.113.10/24 is the /24)
        return str(ipaddress.ip_network("%s/%s" % (resolved, mask), strict=False))
    except ValueError:
        raise UsageError(module, "%s: invalid network %r" % (what, value))


def _ports(resolve, module, value, what):
    """'80', '1024:65535', ':1023', '6000-6010', 'www', comma lists -> API port list."""
    ports = []
    for part in value.split(","):
        separator = ":" if ":" in part else ("-" if "-" in part.strip("-") else None)
        if separator is None:
            ports.append(resolve.port(part, what))
            continue
        low, _separator, high = part.partition(separator)
        low = resolve.port(low, what) if low else 1
        high = resolve.port(high, what) if high else 65535
        ports.append(low if low == high else "%d-%d" % (low, high))
    if not ports or "" in value.split(","):
        raise UsageError(module, "%s: invalid port list %r" % (what, value))
    return ports


def _generated_name(module, entry):
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:8]
    if module == "mark":
        return "mark%s-%s" % (entry.get("mark"), digest)
    return "masq-%s" % digest


def _same_rule(fields, wanted, current):
    """Does `current` (a complete entry from the agent) hold exactly `wanted`'s criteria?"""
    for name in fields:
        want, have = wanted.get(name), current.get(name)
        if name in ("source", "destination") and want is not None and have is not None:
            want = ipaddress.ip_network(want, strict=False)
            have = ipaddress.ip_network(have, strict=False)
        elif name.endswith("_ports") and want is not None and have is not None:
            want, have = [str(p) for p in want], [str(p) for p in have]
        if (want or None) != (have or None):
            return False
    return True


def parse_rules(module, argv, lookup=None):
    """`masqctl mark ...` / `masqctl masq ...` in ipchains syntax."""
    table = TABLES[module]
    fields = MARK_FIELDS if module == "mark" else MASQ_FIELDS
    tokens = Tokens(module, argv, flags="AIDFLnhv", with_arg="mpij")
    numeric = tokens.has("-n")
    resolve = Resolver(module, numeric, lookup)
    command = name = None
    entry = {}
    positional = []
    while tokens:
        token = tokens.take()
        if token in COMMANDS:
            command = _set_command(module, command, COMMANDS[token])
            if tokens.peek() == CHAINS[module]:
                tokens.take()
            elif tokens.peek() in ("input", "output", "forward"):
                raise UsageError(module, "chain %r: masqctl %s rules act on %s"
                                 % (tokens.peek(), module, CHAINS[module]))
        elif token in ("-n", "-v"):
            pass
        elif token in ("-h", "--help"):
            return Command(module, help=USAGES[module])
        elif token == "--name":
            name = tokens.value("--name", "NAME")
        elif token in ("-p", "--protocol", "--proto"):
            value = tokens.value(token, "PROTO")
            if value == "!":
                raise UsageError(module, "-p ! PROTO: protocol inversion is not supported")
            value = value.lower()
            if value not in ("tcp", "udp", "icmp", "icmpv6", "all"):
                raise UsageError(module, "-p: invalid protocol %r (tcp, udp, icmp, icmpv6 or all)" % value)
            entry["protocol"] = None if value == "all" else value
        elif token in ("-s", "--source", "--src", "-d", "--destination", "--dst"):
            side = "source" if token in ("-s", "--source", "--src") else "destination"
            value = tokens.value(token, "ADDR[/MASK]")
            invert = False
            if value == "!":
                invert, value = True, tokens.value(token, "ADDR[/MASK] after !")
            elif value.startswith("!"):
                invert, value = True, value[1:]
            entry[side] = _network(resolve, module, value, "%s %s" % (token, value))
            if invert:
                if entry[side] is None:
                    raise UsageError(module, "%s ! %s matches nothing" % (token, value))
                entry[side + "_invert"] = True
            # ipchains' "address then port": -s 192.168.16.27/32 80
            following = tokens.peek()
            if following == "!":
                raise UsageError(module, "%s ADDR ! PORT: port inversion is not supported" % token)
            if following is not None and not following.startswith("-") and following != CHAINS[module]:
                entry[side + "_ports"] = _ports(resolve, module, tokens.take(), "%s PORT" % token)
        elif token in ("--sport", "--source-port", "--dport", "--destination-port"):
            side = "source" if token in ("--sport", "--source-port") else "destination"
            entry[side + "_ports"] = _ports(resolve, module, tokens.value(token, "PORTS"), token)
        elif token in ("-i", "--interface", "--in-interface") and module == "mark":
            entry["input_interface"] = tokens.value(token, "IFACE")
        elif token in ("-i", "-o", "--interface", "--out-interface") and module == "masq":
            entry["output_interface"] = tokens.value(token, "IFACE")
        elif token in ("-m", "--mark") and module == "mark":
            value = tokens.value(token, "MARK")
            try:
                if not value.isascii():
                    raise ValueError(value)
                entry["mark"] = int(value, 0)  # ipchains took 0x... marks too
            except ValueError:
                raise UsageError(module, "-m MARK: %r is not a number" % value)
        elif token == "--pool" and module == "masq":
            entry["pool"] = [resolve.address(a, "--pool") for a in tokens.value(token, "ADDR[,ADDR...]").split(",")]
        elif token == "--pool-ports" and module == "masq":
            entry["pool_ports"] = _ports(resolve, module, tokens.value(token, "PORTS"), token)
        elif token in ("--helper", "--helpers") and module == "masq":
            entry["helpers"] = [h for h in tokens.value(token, "NAME[,NAME...]").split(",") if h]
        elif token in ("-j", "--jump") and module == "masq":
            target = tokens.value(token, "TARGET")
            if target.upper() != "MASQ":
                raise UsageError(module, "-j %s: masqctl masq rules only -j MASQ" % target)
        elif not token.startswith("-") and command == "-D" and name is None:
            name = token
        elif token.startswith("-"):
            raise UsageError(module, "invalid option %s" % token)
        else:
            positional.append(token)
    if positional:
        raise UsageError(module, "unknown arguments found on commandline: %s" % " ".join(positional))
    if command is None:
        raise UsageError(module, "no command given (-A, -I, -D, -F or -L)")
    if command in ("-F", "-L"):
        if entry or name:
            raise UsageError(module, "incompatible options specified")
        if command == "-L":
            return Command(module, listing=table, numeric=numeric)
        return Command(module, request={"op": "flush", "table": table})
    if command == "-D":
        if name is not None:
            if entry:
                raise UsageError(module, "delete either by NAME or by criteria, not both")
            return Command(module, request={"op": "delete", "table": table, "entry": {"name": name}})
        if not entry:
            raise UsageError(module, "insufficient options specified: NAME or the rule's criteria")

        def find_and_delete(entries, _revision):
            for current in entries:
                if _same_rule(fields, entry, current):
                    return {"op": "delete", "table": table, "entry": {"name": current["name"]}}
            raise StateError("%s -D: no rule matches %s" % (module, json.dumps(entry, sort_keys=True)))

        return Command(module, needs_table=table, finish=find_and_delete)
    if module == "mark" and "mark" not in entry:
        raise UsageError(module, "insufficient options specified: -m MARK")
    entry = dict(entry, name=name or _generated_name(module, entry))
    if command == "-A":
        return Command(module, request={"op": "add", "table": table, "entry": entry})

    # -I: ipchains inserts at the head; the agent's tables take a whole ordered list,
    # so the new rule is put first with compare-and-set on the revision read.
    def insert_first(entries, revision):
        rest = [current for current in entries if current.get("name") != entry["name"]]
        return {"op": "set", "table": table, "entries": [entry] + rest, "revision": revision}

    return Command(module, needs_table=table, finish=insert_first)


# -- entry point ----------------------------------------------------------------------

def parse(argv, lookup=None):
    """argv after the program name: MODULE ARGS... -> Command (raises UsageError)."""
    if not argv or argv[0] not in MODULES:
        raise UsageError(argv[0] if argv else "masqctl",
                         "unknown module %r (one of %s)" % (argv[0] if argv else "", ", ".join(MODULES)))
    module, args = argv[0], list(argv[1:])
    if not args:  # like `ipmasqadm mfw` in the seed: the module's usage
        return Command(module, help=USAGES[module])
    if module == "autofw":
        return parse_autofw(args, lookup)
    if module == "portfw":
        return parse_portfw(args, lookup)
    if module == "mfw":
        return parse_mfw(args, lookup)
    return parse_rules(module, args, lookup)
