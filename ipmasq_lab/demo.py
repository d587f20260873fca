"""`ipmasq-lab demo`: the seed lab, proven with bounded pings, then torn down."""

import sys

from .lab import lab

FORWARDING = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def _ping(the_lab, source, target, family):
    address = the_lab.address(target, family)
    argv = ["ping", "-%d" % family, "-n", "-c", "1", "-W", "1", address]
    return the_lab.run(source, argv, timeout=5).returncode == 0


def run(out=sys.stdout):
    """Ping client -> web1 through the gateway, forwarding on and off; 0 if all as expected."""
    rows = []
    with lab("seed") as the_lab:
        out.write("seed lab %s is up: %s\n\n" % (the_lab.prefix, ", ".join(the_lab.hosts)))
        for forwarding in (True, False):
            for family in (4, 6):
                the_lab.set_sysctl("gateway", FORWARDING[family], int(forwarding))
                replied = _ping(the_lab, "client", "web1", family)
                rows.append(("client -> web1 (%s)" % the_lab.address("web1", family),
                             "on" if forwarding else "off",
                             "reply" if forwarding else "no reply",
                             "reply" if replied else "no reply",
                             replied == forwarding))
        prefix = the_lab.prefix
    header = ("ping (1 packet, 1 s)", "gateway forwarding", "expected", "seen", "")
    table = [header] + [row[:4] + ("ok" if row[4] else "UNEXPECTED",) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for row in table:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    out.write("\nlab %s torn down\n" % prefix)
    return 0 if all(row[4] for row in rows) else 1
