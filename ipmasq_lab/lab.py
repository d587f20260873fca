"""The Lab object: one namespace lab, from spec to teardown.

    with ipmasq_lab.lab("seed") as lab:
        lab.run("client", ["ping", "-c", "1", "-W", "1", lab.address("web1")])

`up()` validates everything first, records the lab in the registry, builds it, and on
any failure (or Ctrl-C) tears down what was built. `down()` kills the lab's processes,
deletes its namespaces and forgets it; it is idempotent. As a context manager the lab
also turns SIGTERM/SIGHUP into an exception while it is up, so teardown runs.
"""

import contextlib
import os
import signal
import threading

from . import booted_host, booted_roots, nsexec, registry, topology
from . import spec as spec_mod
from .errors import LabError, LabSpecError

TEARDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_handler_owner = [0]  # the PID that installed _raise_on_signal


def die_by_default(signum):
    """For signal handlers in a forked child: die of `signum` as if unhandled.

    A forked child (pyroute2 forks helpers) inherits our handlers and our Python stack;
    it must never unwind into the parent's teardown, so its handlers call this.
    """
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def _raise_on_signal(signum, frame):
    if os.getpid() != _handler_owner[0]:
        die_by_default(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    # Exit status as if killed by the signal, once teardown has run.
    raise SystemExit(128 + signum)


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def teardown_on_signals():
    """While inside, SIGINT/SIGTERM/SIGHUP raise (KeyboardInterrupt/SystemExit)."""
    if not _in_main_thread():
        yield
        return
    _handler_owner[0] = os.getpid()
    saved = {sig: signal.signal(sig, _raise_on_signal) for sig in TEARDOWN_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred():
    """Hold teardown signals until the block is done, then deliver the first one."""
    if not _in_main_thread():
        yield
        return
    caught = []
    owner = os.getpid()

    def hold(signum, frame):
        if os.getpid() != owner:
            die_by_default(signum)
        caught.append(signum)

    saved = {sig: signal.signal(sig, hold) for sig in TEARDOWN_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


class Lab:
    """A namespace lab built from a spec (a path, a dict or a shipped topology name)."""

    def __init__(self, spec, prefix=None):
        self.spec = spec_mod.load_and_validate(spec)
        self._explicit_prefix = prefix is not None
        self.prefix = registry.check_prefix(prefix) if prefix else registry.new_prefix()
        self._names = topology.namespace_names(self.spec, self.prefix)
        self._procs = []
        self._pids = []
        self._owned = False  # True once this object has reserved (or attached) the prefix
        self._owner_pid = os.getpid()
        self._signal_guard = None
        self._booted = {}  # host -> BootedHost, for hosts of kind: debian

    @classmethod
    def attach(cls, prefix):
        """The Lab recorded in the registry under `prefix` (built by any process)."""
        record = registry.read(prefix)
        if record is None:
            raise LabError("no lab with prefix %s is recorded in %s"
                           % (prefix, registry.RUN_DIR))
        lab = cls.__new__(cls)
        lab.spec = record["spec"] or {"name": "?", "description": "", "hosts": {},
                                      "links": [], "bridges": {}}
        lab._explicit_prefix = True
        lab.prefix = prefix
        lab._names = topology.namespace_names(lab.spec, prefix)
        lab._recorded_namespaces = list(record.get("namespaces", []))
        lab._procs = []
        lab._pids = list(record.get("pids", []))
        lab._owned = True
        lab._owner_pid = os.getpid()
        lab._signal_guard = None
        lab._booted = {}
        return lab

    # -- naming ---------------------------------------------------------------------

    @property
    def hosts(self):
        return list(self.spec["hosts"])

    @property
    def namespaces(self):
        """Every namespace of the lab (hosts, then the switch when there are bridges)."""
        return list(self._names.values())

    def netns(self, host):
        """The namespace name of `host`."""
        if host not in self.spec["hosts"]:
            raise LabError("lab %s has no host %r (hosts: %s)"
                           % (self.prefix, host, ", ".join(self.hosts)))
        return self._names[host]

    def address(self, host, family=4, interface=None):
        """First IPv`family` address of `host` (of `interface`, if given), no prefix length."""
        self.netns(host)  # refuses unknown hosts
        interfaces = self.spec["hosts"][host]["interfaces"]
        if interface is not None and interface not in interfaces:
            raise LabError("host %s has no interface %r" % (host, interface))
        for ifname, iface in interfaces.items():
            if interface not in (None, ifname):
                continue
            for text in iface["addresses"]:
                address = text.split("/")[0]
                if (":" in address) == (family == 6):
                    return address
        raise LabError("host %s has no IPv%d address%s"
                       % (host, family, " on " + interface if interface else ""))

    def addresses(self, host):
        """{ifname: ["addr/len", ...]} as the kernel has them now (read with pyroute2)."""
        return topology.read_addresses(self.netns(host))

    def booted(self, host):
        """The BootedHost of a `kind: debian` host (SSH, reboot, Ansible variables)."""
        self.netns(host)
        if self.spec["hosts"][host].get("kind") != "debian":
            raise LabError("host %s is a plain namespace, not a booted host" % host)
        if host not in self._booted:
            self._booted[host] = booted_host.BootedHost(self.prefix, host, self.spec,
                                                        self._names)
        return self._booted[host]

    def describe(self):
        """Plain data about the lab: prefix, namespaces, hosts with namespace and addresses."""
        info = self._describe()
        for host in booted_host.booted_hosts(self.spec):
            info["hosts"][host].update(self.booted(host).describe())
        return info

    def _describe(self):
        return {
            "prefix": self.prefix,
            "name": self.spec["name"],
            "namespaces": self.namespaces,
            "hosts": {host: {"netns": self.netns(host),
                             "interfaces": {ifname: list(iface["addresses"])
                                            for ifname, iface in h["interfaces"].items()}}
                      for host, h in self.spec["hosts"].items()},
        }

    # -- processes ------------------------------------------------------------------

    def spawn(self, host, argv, **popen_kwargs):
        """Start `argv` in `host`'s namespace; the process is killed by down()."""
        netns = self.netns(host)
        if not self._owned or registry.read(self.prefix) is None:
            raise LabError("lab %s is not up" % self.prefix)
        proc = nsexec.popen(netns, argv, **popen_kwargs)
        self._procs.append(proc)
        self._pids.append(proc.pid)
        registry.update(self.prefix, pids=[proc.pid])
        return proc

    def run(self, host, argv, timeout=10, check=False, **popen_kwargs):
        """Run `argv` in `host`'s namespace to completion, bounded by `timeout` seconds."""
        return nsexec.run(self.netns(host), argv, timeout=timeout, check=check, **popen_kwargs)

    def set_sysctl(self, host, name, value):
        """Write a net.* sysctl inside `host`'s namespace (e.g. forwarding off/on)."""
        if not spec_mod.SYSCTL_RE.match(name):
            raise LabSpecError("sysctl", name, "%r is not a network sysctl name" % name)
        topology.write_sysctls(self.netns(host), [(name, str(value))])

    def sysctl(self, host, name):
        return topology.read_sysctl(self.netns(host), name)

    # -- life cycle -----------------------------------------------------------------

    def _reserve(self):
        """Record the lab under a free prefix (a fresh one if none was asked for)."""
        if self._explicit_prefix and registry.read(self.prefix) is not None:
            raise LabError("a lab with prefix %s is already up (ipmasq-lab down %s)"
                           % (self.prefix, self.prefix))
        for _attempt in range(16):
            busy = [ns for ns in self.namespaces if topology.exists(ns)]
            if not busy:
                try:
                    registry.reserve(self.prefix, self.spec, self.namespaces)
                    self._owned = True
                    return
                except LabError:
                    if self._explicit_prefix:
                        raise
            elif self._explicit_prefix:
                raise LabError("namespaces of prefix %s already exist: %s"
                               % (self.prefix, ", ".join(busy)))
            self.prefix = registry.new_prefix()
            self._names = topology.namespace_names(self.spec, self.prefix)
        raise LabError("no free lab prefix found")

    def up(self):
        """Build the lab. On any failure, what was built is torn down and the error raised."""
        if self._owned:
            raise LabError("lab %s is already up (or was torn down: make a new Lab)"
                           % self.prefix)
        if booted_host.booted_hosts(self.spec):
            booted_roots.require_tools()
        missing = topology.missing_sysctls(self.spec)
        if missing:
            host, name = missing[0]
            raise LabSpecError("hosts.%s.sysctls.%s" % (host, name), name,
                               "%s does not exist in this kernel" % name)
        self._reserve()
        self._owner_pid = os.getpid()
        try:
            topology.build(self.spec, self._names)
            self._booted = booted_host.start_all(self.prefix, self.spec, self._names,
                                                 self._record_booted)
            registry.update(self.prefix, state="up")
        except BaseException:
            if os.getpid() == self._owner_pid:  # never in a forked child
                self.down()
            raise
        return self

    def _record_booted(self, host, record):
        booted = dict((registry.read(self.prefix) or {}).get("booted") or {})
        booted[host] = record
        registry.update(self.prefix, booted=booted)

    def down(self):
        """Kill the lab's processes, delete its namespaces, forget it. Idempotent."""
        if not self._owned:
            return
        with signals_deferred():
            record = registry.read(self.prefix) or {}
            namespaces = list(dict.fromkeys(
                self.namespaces + getattr(self, "_recorded_namespaces", [])
                + record.get("namespaces", [])))
            pids = set(self._pids) | set(record.get("pids", []))
            booted_host.stop_all(record.get("booted"))  # before their processes are killed
            topology.stop_processes(namespaces, pids, self._procs)
            booted_host.remove_copies(record.get("booted"))
            topology.remove_namespaces(namespaces)
            registry.remove(self.prefix)
            self._procs = []

    def is_up(self):
        return self._owned and registry.read(self.prefix) is not None and \
            all(topology.exists(ns) for ns in self.namespaces)

    def __enter__(self):
        guard = teardown_on_signals()
        guard.__enter__()
        try:
            self.up()
        except BaseException:
            guard.__exit__(None, None, None)
            raise
        self._signal_guard = guard
        return self

    def __exit__(self, *exc_info):
        if os.getpid() != self._owner_pid:  # a forked child unwinding our stack
            return False
        try:
            self.down()
        finally:
            guard, self._signal_guard = self._signal_guard, None
            if guard is not None:
                guard.__exit__(None, None, None)
        return False

    def __repr__(self):
        return "<Lab %s %s hosts=%s>" % (self.prefix, self.spec["name"], ",".join(self.hosts))


def lab(spec, prefix=None):
    """Context manager: a Lab that is up inside the `with` block and down after it."""
    return Lab(spec, prefix)
