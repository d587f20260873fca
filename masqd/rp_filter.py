"""Warnings for source classifiers (FWMARK `marks` entries) that a spoofed source can
satisfy.

A `marks` entry that matches by source address and names no input interface marks
whatever packet claims that source, from any side. Only strict reverse-path filtering
(rp_filter 1: the source must route back out of the interface the packet came in on)
drops a spoofed source before the classifier; loose mode (2) accepts any source that
routes anywhere, off (0) accepts all. The kernel uses max(conf/all, conf/IFACE) per
interface. IPv6 has no rp_filter at all, so an IPv6 source classifier needs an
input interface. See docs/modules.md (masq_fwmark) and the role's gateway_rp_filter.
"""

import os
from typing import Any, Dict, Iterable, List, Optional

CONF_DIR = "/proc/sys/net/ipv4/conf"
STRICT = 1
MODES = {0: "off", 1: "strict", 2: "loose"}


def read_rp_filter(conf_dir: str = CONF_DIR) -> Dict[str, int]:
    """{interface or "all": rp_filter} of this network namespace ("default" and "lo"
    left out: neither receives forwarded traffic)."""
    values: Dict[str, int] = {}
    try:
        names = os.listdir(conf_dir)
    except OSError:
        return values
    for name in names:
        if name in ("default", "lo"):
            continue
        try:
            with open(os.path.join(conf_dir, name, "rp_filter")) as handle:
                values[name] = int(handle.read().strip())
        except (OSError, ValueError):
            continue
    return values


def not_strict(values: Dict[str, int]) -> Dict[str, int]:
    """{interface: effective rp_filter} for every interface where it is not strict."""
    base = values.get("all", 0)
    interfaces = {name: value for name, value in values.items() if name != "all"}
    if not interfaces:
        return {} if base == STRICT else {"all": base}
    return {name: max(base, value) for name, value in sorted(interfaces.items()) if max(base, value) != STRICT}


def rp_filter_warnings(marks: Iterable[Dict[str, Any]], values: Optional[Dict[str, int]] = None) -> List[str]:
    """One warning per `marks` entry matching a source, with no input_interface, that
    spoofing can satisfy: IPv4 while rp_filter is not strict on some interface, IPv6
    always. `values`: read_rp_filter() output (read now when None)."""
    if values is None:
        values = read_rp_filter()
    weak = not_strict(values)
    warnings = []
    for entry in marks:
        source = entry.get("source")
        if source is None or entry.get("source_invert") or entry.get("input_interface") is not None:
            continue
        where = "marks entry %s (source %s, mark %s)" % (entry.get("name"), source, entry.get("mark"))
        if ":" in source:
            warnings.append("%s has no input_interface: IPv6 has no reverse-path filter, a spoofed source gets "
                            "the mark; set input_interface" % where)
        elif weak:
            warnings.append("%s has no input_interface and rp_filter is not strict on %s: a spoofed source "
                            "gets the mark; set input_interface or net.ipv4.conf.all.rp_filter=1"
                            % (where, ", ".join("%s (%s)" % (n, MODES.get(v, v)) for n, v in weak.items())))
    return warnings
