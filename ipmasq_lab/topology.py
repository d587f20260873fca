"""Build and tear down a validated lab spec in the kernel, with pyroute2.

Everything lives in namespaces named <prefix>-<host> (bridges in <prefix>-switch);
nothing is created in, or linked to, the root namespace. Veth pairs are created in one
lab namespace with the peer placed directly in another, so no interface ever exists in
the root namespace, not even for a moment.
"""

import contextlib
import ctypes
import errno
import os
import signal
import socket
import threading
import time

try:
    from pyroute2 import IPRoute, netns as pr_netns
except ImportError:  # the lab modules name the missing library (missing_required_lib)
    IPRoute = pr_netns = None

from . import nsexec
from .errors import LabError
from .spec import PER_INTERFACE_SYSCTLS, SWITCH_HOST, endpoint

IFA_F_NODAD = 0x02
_libc = ctypes.CDLL(None, use_errno=True)

# Known state for every lab namespace before the spec's own sysctls: usable IPv6
# addresses at once (no DAD) and no forwarding unless the spec asks for it (IPv4
# devconf may be inherited from the root namespace).
BASE_SYSCTLS = (
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv4.ip_forward", "0"),
)
# The switch namespace only bridges: no addresses, no IPv6 chatter of its own.
SWITCH_SYSCTLS = BASE_SYSCTLS + (
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
)


def namespace_names(spec, prefix):
    """{host: namespace} for every host, plus 'switch' when the lab has bridges."""
    names = {host: "%s-%s" % (prefix, host) for host in spec["hosts"]}
    if spec["bridges"]:
        names[SWITCH_HOST] = "%s-%s" % (prefix, SWITCH_HOST)
    return names


def exists(namespace):
    return os.path.lexists(nsexec.netns_path(namespace))


def sysctl_path(name):
    return "/proc/sys/" + name.replace(".", "/")


def missing_sysctls(spec):
    """[(host, name)] of spec sysctls this kernel does not have (checked before building).

    Interface entries are checked through their 'default' twin, since lab interfaces do
    not exist yet; only paths are looked at, nothing is read or written.
    """
    missing = []
    for host, h in spec["hosts"].items():
        for name in h["sysctls"]:
            probe = name
            for subtree in PER_INTERFACE_SYSCTLS:
                if name.startswith(subtree):
                    parts = name[len(subtree):].split(".", 1)
                    if parts[0] in h["interfaces"]:
                        probe = subtree + "default." + parts[1]
            if not os.path.exists(sysctl_path(probe)):
                missing.append((host, name))
    return missing


def _ns_id(namespace):
    st = os.stat(nsexec.netns_path(namespace))
    return st.st_dev, st.st_ino


def write_sysctls(namespace, items):
    """Write (name, value) pairs to /proc/sys as seen from inside `namespace`.

    /proc/sys/net follows the calling thread's namespace, so a short-lived thread joins
    the namespace (setns affects that thread only) and checks it arrived before writing:
    a failed join can never write the root namespace's sysctls.
    """
    errors = []

    def work():
        try:
            fd = os.open(nsexec.netns_path(namespace), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, nsexec.CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, "setns %s: %s" % (namespace, os.strerror(err)))
            finally:
                os.close(fd)
            here = os.stat("/proc/thread-self/ns/net")
            if (here.st_dev, here.st_ino) != _ns_id(namespace):
                raise LabError("could not enter namespace %s" % namespace)
            for name, value in items:
                try:
                    with open(sysctl_path(name), "w", encoding="ascii") as handle:
                        handle.write(str(value))
                except OSError as exc:
                    raise LabError("sysctl %s=%s in %s: %s"
                                   % (name, value, namespace, exc.strerror)) from None
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=work, name="sysctl-" + namespace)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def read_sysctl(namespace, name):
    result = []
    ok = threading.Event()

    def work():
        fd = os.open(nsexec.netns_path(namespace), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, nsexec.CLONE_NEWNET) != 0:
                return
        finally:
            os.close(fd)
        with open(sysctl_path(name), encoding="ascii") as handle:
            result.append(handle.read().strip())
        ok.set()

    worker = threading.Thread(target=work, name="sysctl-" + namespace)
    worker.start()
    worker.join()
    if not ok.is_set():
        raise LabError("could not read sysctl %s in %s" % (name, namespace))
    return result[0]


def _index(ipr, ifname):
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError("interface %s not found" % ifname)
    return found[0]


def build(spec, names):
    """Create the lab `spec` in namespaces `names` (from namespace_names).

    Raises on the first failure, leaving what was built for the caller to tear down.
    """
    for namespace in names.values():
        pr_netns.create(namespace)
    handles = {}
    try:
        for role, namespace in names.items():
            # flags=0: never create a namespace implicitly.
            handles[role] = IPRoute(netns=namespace, flags=0)
        for role, namespace in names.items():
            write_sysctls(namespace, SWITCH_SYSCTLS if role == SWITCH_HOST else BASE_SYSCTLS)
        for a, b in spec["links"]:
            (host_a, if_a), (host_b, if_b) = endpoint(a), endpoint(b)
            handles[host_a].link("add", ifname=if_a, kind="veth",
                                 peer={"ifname": if_b, "net_ns_fd": names[host_b]})
        if spec["bridges"]:
            _build_bridges(spec, names, handles[SWITCH_HOST])
        for host, h in spec["hosts"].items():
            if h["sysctls"]:
                write_sysctls(names[host], sorted(h["sysctls"].items()))
        for role, ipr in handles.items():
            for link in ipr.get_links():
                ipr.link("set", index=link["index"], state="up")
        for host, h in spec["hosts"].items():
            _configure_host(handles[host], h)
        _wait_operational(handles)
    finally:
        for ipr in handles.values():
            ipr.close()


def _wait_operational(handles, timeout=3.0):
    """Wait until every interface is operationally up.

    The kernel's linkwatch work, not `link set up`, turns carrier on into an active
    qdisc; until it has run (up to a second later) a veth drops what it is given, so
    the first packets of a probe would vanish. Polling IFLA_OPERSTATE waits for it.
    """
    deadline = time.monotonic() + timeout
    pending = dict(handles)
    while pending:
        for role, ipr in list(pending.items()):
            states = [link.get("IFLA_OPERSTATE") for link in ipr.get_links()
                      if link.get("ifname") != "lo"]
            if all(state == "UP" for state in states):
                del pending[role]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise LabError("interfaces of %s not operationally up after %.0f s"
                           % (", ".join(sorted(pending)), timeout))
        time.sleep(0.01)


def _build_bridges(spec, names, ipr):
    for bridge, ports in spec["bridges"].items():
        # No STP and no forward delay: ports forward as soon as they are up.
        ipr.link("add", ifname=bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
        master = _index(ipr, bridge)
        for i, port in enumerate(ports):
            host, ifname = endpoint(port)
            switch_port = "%s-%d" % (bridge, i)
            ipr.link("add", ifname=switch_port, kind="veth",
                     peer={"ifname": ifname, "net_ns_fd": names[host]})
            ipr.link("set", index=_index(ipr, switch_port), master=master)


def _configure_host(ipr, host):
    for ifname, iface in host["interfaces"].items():
        index = _index(ipr, ifname)
        for text in iface["addresses"]:
            address, prefixlen = text.split("/")
            if ":" in address:
                ipr.addr("add", index=index, address=address, prefixlen=int(prefixlen),
                         family=socket.AF_INET6, flags=IFA_F_NODAD)
            else:
                ipr.addr("add", index=index, address=address, prefixlen=int(prefixlen),
                         family=socket.AF_INET)
    for route in host["routes"]:
        family = socket.AF_INET if route["family"] == 4 else socket.AF_INET6
        dst = route["to"]
        if dst == "default":
            dst = "0.0.0.0/0" if route["family"] == 4 else "::/0"
        kwargs = {"dst": dst, "family": family}
        if route["via"]:
            kwargs["gateway"] = route["via"]
        if route["dev"]:
            kwargs["oif"] = _index(ipr, route["dev"])
        ipr.route("add", **kwargs)


def read_addresses(namespace):
    """{ifname: ["addr/len", ...]} of global addresses in `namespace`, from the kernel."""
    if not exists(namespace):
        raise LabError("namespace %s does not exist" % namespace)
    with IPRoute(netns=namespace, flags=0) as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        result = {name: [] for name in names.values()}
        for msg in ipr.get_addr():
            if msg["scope"] != 0:  # skip host (lo) and link-local addresses
                continue
            result[names[msg["index"]]].append(
                "%s/%d" % (msg.get("IFA_ADDRESS"), msg["prefixlen"]))
        return {name: addrs for name, addrs in result.items() if addrs}


# ---------------------------------------------------------------------------------
# Teardown


def pids_in(namespaces):
    """PIDs of processes whose network namespace is one of `namespaces` (by inode)."""
    ids = set()
    for namespace in namespaces:
        with contextlib.suppress(OSError):
            ids.add(_ns_id(namespace))
    if not ids:
        return []
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat("/proc/%s/ns/net" % entry)
        except OSError:  # gone, or a zombie
            continue
        if (st.st_dev, st.st_ino) in ids:
            found.append(int(entry))
    return found


def stop_processes(namespaces, pids=(), popens=(), grace=2.0):
    """Kill every process in the lab's namespaces, then reap the ones we started.

    As the kernel selftests' lib.sh does before deleting a namespace: tracked programs
    get SIGTERM to their process group (they were started as group leaders), then every
    process still in a lab namespace gets SIGTERM by PID, and SIGKILL after `grace`.
    """
    inside = set(pids_in(namespaces))
    leaders = {p.pid for p in popens if p.poll() is None}
    leaders |= {pid for pid in pids if pid in inside}
    for pid in leaders:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGTERM)
    signalled = set()
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        for popen in popens:
            popen.poll()
        victims = pids_in(namespaces)
        if not victims:
            break
        now = time.monotonic()
        if now > deadline + grace:
            raise LabError("processes %s survived SIGKILL in %s" % (victims, namespaces))
        if now > deadline:
            sig = signal.SIGKILL
            signalled.clear()
        for pid in victims:
            if pid not in signalled:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
                signalled.add(pid)
        time.sleep(0.01)
    for popen in popens:
        with contextlib.suppress(Exception):
            popen.wait(timeout=grace)


def remove_namespaces(namespaces):
    """Delete the namespaces; links inside them go with them. Missing ones are fine."""
    for namespace in namespaces:
        try:
            pr_netns.remove(namespace)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
