"""Spec rules for booted hosts (`kind: debian`): pure logic, called by spec.validate().

    hosts:
      controller: {interfaces: {eth0: {addresses: [10.9.0.1/24]}}}
      gw:
        kind: debian          # a Debian system booted with systemd (default: netns)
        release: bookworm     # bookworm (Debian 12) or trixie (Debian 13)
        controller: controller   # the namespace SSH starts from (default: the first
                                 # plain host sharing a link or bridge with it)
        interfaces: {eth0: {addresses: [10.9.0.2/24]}, ...}

A plain host keeps its normalized form (no new keys); a booted host gains
{"kind": "debian", "release": ..., "controller": ...}; a normalized spec validates to
itself.
"""

from .booted_roots import RELEASES
from .errors import LabSpecError

KINDS = ("netns", "debian")
BOOTED_KEYS = ("kind", "release", "controller")
DEFAULT_RELEASE = "bookworm"


def _shared_address(host, other, hosts, segment_of):
    """host's first address on a segment it shares with `other`, or None."""
    segments = {segment_of.get((other, ifname)) for ifname in hosts[other]["interfaces"]}
    segments.discard(None)
    for ifname, iface in hosts[host]["interfaces"].items():
        if segment_of.get((host, ifname)) in segments and iface["addresses"]:
            return iface["addresses"][0]
    return None


def validate_kinds(raw_hosts, hosts, segment_of):
    """Check kind/release/controller of every host; add the booted hosts' keys to `hosts`.

    `raw_hosts` are the spec's host mappings, `hosts` the normalized ones (addresses
    still ipaddress objects), `segment_of` maps (host, ifname) to its link or bridge.
    """
    kinds = {}
    for host, rhost in raw_hosts.items():
        kind = rhost.get("kind", "netns")
        if kind not in KINDS:
            raise LabSpecError("hosts.%s.kind" % host, kind, "%r is not a host kind (%s)"
                               % (kind, ", ".join(KINDS)))
        kinds[host] = kind
        if kind == "netns":
            for key in ("release", "controller"):
                if key in rhost:
                    raise LabSpecError("hosts.%s.%s" % (host, key), rhost[key],
                                       "'%s' is only for booted hosts (kind: debian)" % key)
    for host, rhost in raw_hosts.items():
        if kinds[host] != "debian":
            continue
        path = "hosts.%s" % host
        release = rhost.get("release", DEFAULT_RELEASE)
        if release not in RELEASES:
            raise LabSpecError(path + ".release", release, "%r is not a supported Debian "
                               "release (%s)" % (release, ", ".join(
                                   "%s = Debian %s" % kv for kv in RELEASES.items())))
        plain = [h for h in raw_hosts if kinds[h] == "netns"
                 and _shared_address(host, h, hosts, segment_of) is not None]
        controller = rhost.get("controller")
        if controller is None:
            if not plain:
                raise LabSpecError(path, host, "booted host %s needs a plain (netns) host "
                                   "on one of its links or bridges to reach it over SSH"
                                   % host)
            controller = plain[0]
        elif controller not in plain:
            raise LabSpecError(path + ".controller", controller, "%r is not a plain (netns) "
                               "host sharing a link or bridge with %s (candidates: %s)"
                               % (controller, host, ", ".join(plain) or "none"))
        hosts[host].update({"kind": "debian", "release": release, "controller": controller})
