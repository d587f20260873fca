"""Text listings of masqd's tables, in the shape of ipmasqadm's output.

`ipmasqadm portfw -l` printed /proc/net/ip_masq/portfw as
    "%-4s %-20s %-20s %8s %8s %5s %5s"  prot localaddr rediraddr lport rport pcnt pref
and `mfw -L` printed /proc/net/ip_masq/mfw as
    "%-8s %-20s %8s %5s %5s"            fwmark rediraddr rport pcnt pref
one line per backend, head of each list first; these are kept column for column.
autofw (whose /proc file was hex only), marks and masquerade get equivalents in the
same style. Without -n, addresses and ports are shown as names where they resolve.
"""

import ipaddress
import socket

PORTFW_ROW = "%-4s %-20s %-20s %8s %8s %5s %5s"
MFW_ROW = "%-8s %-20s %8s %5s %5s"
AUTOFW_ROW = "%-4s %5s %5s %-20s %7s  %s"
MARKS_ROW = "%-20s %10s %-4s %-22s %-22s %-12s %-12s %s"
MASQ_ROW = "%-20s %-4s %-22s %-22s %-12s %-12s %s"


def _reverse_lookup(address):
    return socket.gethostbyaddr(address)[0]


def _service_lookup(port, protocol):
    return socket.getservbyport(port, protocol)


class Names:
    """Address and port names for a listing; numeric=True (-n) shows numbers only."""

    def __init__(self, numeric=False, host_name=_reverse_lookup, service_name=_service_lookup):
        self.numeric = numeric
        self.host_name = host_name
        self.service_name = service_name
        self._hosts = {}

    def host(self, address):
        if address is None:
            return "-"
        if self.numeric:
            return address
        if address not in self._hosts:
            try:
                self._hosts[address] = self.host_name(address)
            except (OSError, LookupError, UnicodeError):
                self._hosts[address] = address
        return self._hosts[address]

    def service(self, port, protocol="tcp"):
        if port is None:
            return "any"
        if self.numeric or protocol not in ("tcp", "udp"):
            return str(port)
        try:
            return self.service_name(int(port), protocol)
        except (OSError, LookupError, ValueError, OverflowError):
            return str(port)

    def network(self, value, invert=False):
        """A rule's source/destination: names only for single hosts, like ipchains."""
        if value is None:
            return "!anywhere" if invert else "anywhere"
        shown = value
        try:
            net = ipaddress.ip_network(value, strict=False)
            if net.prefixlen == net.max_prefixlen:
                shown = self.host(str(net.network_address))
        except ValueError:
            pass
        return ("!" if invert else "") + shown

    def ports(self, ports, protocol):
        if not ports:
            return "any"
        return ",".join(self.service(p, protocol or "tcp") if isinstance(p, int) else str(p)
                        for p in ports)


def scheduling_order(backends):
    """Backends head first, as the kernel's list was: the agent reports them in
    configured order with `head` marking the one new connections go to now."""
    for index, backend in enumerate(backends):
        if backend.get("head"):
            return backends[index:] + backends[:index]
    return list(backends)


def _count(backend, name):
    value = backend.get(name)
    return backend.get("pref", 10) if value is None and name == "pcnt" else value


def health_text(backend):
    """A checked backend's state after its columns: `  tcp up`, `  http down since
    2026-12-01T20:55:21Z (Connection refused)`; nothing for an unchecked backend."""
    health = backend.get("health")
    if not health:
        return ""
    text = "  %s %s" % ((backend.get("check") or {}).get("type", "check"), health.get("state", "unknown"))
    if health.get("state") == "down" and health.get("since"):
        text += " since " + health["since"]
    if health.get("state") == "down" and health.get("last_error"):
        text += " (%s)" % health["last_error"]
    if health.get("checker") == "not running":
        text += " (checks not running)"
    return text


def format_portfw(entries, names):
    lines = [PORTFW_ROW % ("prot", "localaddr", "rediraddr", "lport", "rport", "pcnt", "pref")]
    for entry in entries:
        protocol = entry["protocol"]
        for backend in scheduling_order(entry.get("backends", [])):
            lines.append(PORTFW_ROW % (
                protocol.upper(), names.host(entry["local_address"]), names.host(backend["address"]),
                names.service(entry["local_port"], protocol), names.service(backend["port"], protocol),
                _count(backend, "pcnt"), backend.get("pref", 10)) + health_text(backend))
    return "\n".join(lines) + "\n"


def format_mfw(entries, names):
    lines = [MFW_ROW % ("fwmark", "rediraddr", "rport", "pcnt", "pref")]
    for entry in entries:
        for backend in scheduling_order(entry.get("backends", [])):
            lines.append(MFW_ROW % (
                entry["mark"], names.host(backend["address"]), names.service(backend.get("port")),
                _count(backend, "pcnt"), backend.get("pref", 10)) + health_text(backend))
    return "\n".join(lines) + "\n"


def _detected(recipient, names):
    """A detected recipient: `10.16.0.27 (12s left)`, keyed `198.51.100.10: 10.16.0.27
    (...)`, plus the conflict it won: `, replaced 10.16.0.28 at 2026-...Z`."""
    text = names.host(recipient["address"])
    if recipient.get("peer"):
        text = "%s: %s" % (names.host(recipient["peer"]), text)
    if recipient.get("expires") is not None:
        text += " (%ss left)" % recipient["expires"]
    replaced = recipient.get("replaced")
    if replaced:
        text += ", replaced %s at %s" % (names.host(replaced["address"]), replaced["at"])
    return text


def format_autofw(entries, names):
    lines = [AUTOFW_ROW % ("prot", "low", "high", "forward to", "timeout", "recipient")]
    for entry in entries:
        if entry.get("hidden_host"):
            target = "host " + names.host(entry["hidden_host"])
        else:
            target = "ctl %s/%s" % (entry.get("control_protocol"),
                                    names.service(entry.get("control_port"), entry.get("control_protocol")))
            if entry.get("keyed_by_peer"):
                target += " by peer"
        detected = entry.get("recipients") if not entry.get("hidden_host") else None
        if detected:
            for recipient in detected:  # one line per recipient (per peer when keyed)
                lines.append(AUTOFW_ROW % (
                    entry["protocol"].upper(), entry["low_port"], entry["high_port"], target,
                    entry.get("timeout", 15), _detected(recipient, names)))
            continue
        recipient = entry.get("recipient")
        if isinstance(recipient, dict):  # {"address": ..., "expires": seconds}
            recipient = recipient.get("address")
        shown = names.host(recipient) if recipient else "-"
        status = entry.get("status")
        if not recipient and status and status != "active":
            shown = "- (%s)" % status.split(":")[0]  # e.g. detection not running
        lines.append(AUTOFW_ROW % (
            entry["protocol"].upper(), entry["low_port"], entry["high_port"], target,
            entry.get("timeout", 15), shown))
    return "\n".join(lines) + "\n"


def format_marks(entries, names):
    """One line per rule; the kernel's hit count (packets the rule classified) last,
    when the listing has it."""
    lines = [MARKS_ROW % ("name", "mark", "prot", "source", "destination", "sports", "dports", "iface")]
    for entry in entries:
        protocol = entry.get("protocol")
        lines.append(MARKS_ROW % (
            entry["name"], entry["mark"], protocol or "all",
            names.network(entry.get("source"), entry.get("source_invert")),
            names.network(entry.get("destination"), entry.get("destination_invert")),
            names.ports(entry.get("source_ports"), protocol), names.ports(entry.get("destination_ports"), protocol),
            entry.get("input_interface") or "any"))
    if any("hits" in e for e in entries):
        width = max(len(line) for line in lines)
        counts = ["hits"] + [str(e.get("hits", "-")) for e in entries]
        lines = ["%-*s  %s" % (width, line, count) for line, count in zip(lines, counts)]
    return "\n".join(lines) + "\n"


def _masq_extras(entry, names):
    """Pool and helpers, appended to a masquerade line only when the rule has them."""
    words = []
    if entry.get("pool"):
        words.append("pool " + ",".join(entry["pool"]))
        if entry.get("pool_ports"):
            words.append("inbound " + names.ports(entry["pool_ports"], entry.get("protocol")))
    if entry.get("helpers"):
        words.append("helpers " + ",".join(entry["helpers"]))
    return ("  " + " ".join(words)) if words else ""


def format_masquerade(entries, names):
    lines = [MASQ_ROW % ("name", "prot", "source", "destination", "sports", "dports", "oface")]
    for entry in entries:
        protocol = entry.get("protocol")
        lines.append(MASQ_ROW % (
            entry["name"], protocol or "all",
            names.network(entry.get("source"), entry.get("source_invert")),
            names.network(entry.get("destination"), entry.get("destination_invert")),
            names.ports(entry.get("source_ports"), protocol), names.ports(entry.get("destination_ports"), protocol),
            entry.get("output_interface") or "any") + _masq_extras(entry, names))
    return "\n".join(lines) + "\n"


FORMATS = {"portfw": format_portfw, "mfw": format_mfw, "autofw": format_autofw,
           "marks": format_marks, "masquerade": format_masquerade}


def format_table(table, entries, names):
    return FORMATS[table](entries, names)


def format_status(result):
    lines = ["masqd %s, revision %s" % (result.get("version", "?"), result.get("revision", "?"))]
    if result.get("socket"):
        lines.append("socket:     %s" % result["socket"])
    if result.get("state_file"):
        lines.append("state file: %s" % result["state_file"])
    tables = result.get("tables") or {}
    for name in ("portfw", "autofw", "mfw", "marks", "masquerade"):
        if name in tables:
            lines.append("%-11s %d entries" % (name + ":", tables[name]))
    for name in sorted(set(tables) - {"portfw", "autofw", "mfw", "marks", "masquerade"}):
        lines.append("%-11s %s" % (name + ":", tables[name]))
    for name, stats in sorted((result.get("watchers") or {}).items()):
        lines.append("%-11s %s%s" % ("watcher:", name, " running" if stats.get("running")
                                     else " NOT running: %s" % (stats.get("error") or "stopped")))
    drift = result.get("drift")
    if drift is not None:
        last = drift.get("last")
        lines.append("drift:      %d found%s" % (drift.get("count", 0), ", none yet" if not last else ""))
        if last:
            took = last.get("detected_to_repaired_seconds")
            took_text = "" if took is None else " (%.0f ms)" % (took * 1000)
            lines.append("  last:     %s %s: %s%s" % (last.get("at"), last.get("result"), last.get("found"), took_text))
    for warning in result.get("warnings") or []:
        lines.append("warning:    %s" % warning)
    return "\n".join(lines) + "\n"
