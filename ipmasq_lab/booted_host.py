"""Booted hosts: a Debian system with systemd as its PID 1, inside a lab namespace.

A host of `kind: debian` (docs/hosts.md) is its namespace, built like any other host
(veths, addresses, routes, sysctls: nothing else, so no way out of the lab), plus a
Debian system booted in it with systemd-nspawn:

- its root is a per-lab copy (`cp -a --reflink=auto`) of a cached root
  (booted_roots.py), at HOSTS_DIR/<prefix>-<host>, recorded in the lab's registry
  record before it is made and removed at teardown. nspawn's own `-x` copy was not
  used: it gets a random name, so a killed run would leave it behind unfindable;
- a supervisor (a small sh loop, its own session) runs nspawn and starts it again when
  the system reboots (nspawn exits 133). Between two boots it clears what a power cycle
  clears in the kernel (ruleset, conntrack, forwarding), since the namespace, standing
  in for the machine's network hardware, outlives the boot. A disk that survives the
  reboot is the per-lab copy;
- root logs in over real SSH with the lab's own key pair (made per lab), reached from
  the spec's `controller` host's namespace;
- teardown SIGTERMs the supervisor, which passes it to nspawn (a clean poweroff), waits,
  SIGKILLs what is left, and removes the copy, on every path (lab.py calls stop/remove
  from down(), which also runs on failure, Ctrl-C and `ipmasq-lab down`).
"""

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time

from . import booted_roots, nsexec, registry
from .errors import LabError
from .spec import endpoint

HOSTS_DIR = os.environ.get("IPMASQ_LAB_HOSTS",
                           os.path.join(os.path.dirname(booted_roots.ROOTS_DIR), "hosts"))
BOOT_TIMEOUT = float(os.environ.get("IPMASQ_LAB_BOOT_TIMEOUT", "120"))
STOP_TIMEOUT = 30.0
REBOOT_STATUS = 133  # systemd-nspawn's exit status when the container rebooted
SUPERVISOR_NAME = "ipmasq-lab-supervisor"

# $1: the host's namespace; the rest: the nspawn command line.
SUPERVISOR_SH = r"""
ns=$1; shift
stopping=; child=
trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT HUP
while :; do
    "$@" </dev/null &
    child=$!
    while :; do
        wait "$child"; rc=$?
        kill -0 "$child" 2>/dev/null || break
    done
    child=
    echo "ipmasq-lab: systemd-nspawn exited with status $rc" >&2
    [ -z "$stopping" ] && [ "$rc" -eq 133 ] || exit "$rc"
    ip netns exec "$ns" nft flush ruleset
    ip netns exec "$ns" conntrack -F >/dev/null 2>&1
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
    echo "ipmasq-lab: rebooting $ns (ruleset, conntrack and forwarding cleared)" >&2
done
"""

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "ConnectTimeout=5")


def booted_hosts(spec):
    """Names of the spec's booted hosts, in spec order."""
    return [h for h, v in spec["hosts"].items() if v.get("kind") == "debian"]


def ssh_address(spec, host):
    """`host`'s address on the link or bridge it shares with its controller."""
    controller = spec["hosts"][host]["controller"]
    segments = {}
    for i, (a, b) in enumerate(spec["links"]):
        for end in (a, b):
            segments[end] = ("link", i)
    for name, ports in spec["bridges"].items():
        for port in ports:
            segments[port] = ("bridge", name)
    theirs = {seg for end, seg in segments.items() if endpoint(end)[0] == controller}
    for ifname, iface in spec["hosts"][host]["interfaces"].items():
        if segments.get("%s:%s" % (host, ifname)) in theirs and iface["addresses"]:
            return iface["addresses"][0].split("/")[0]
    raise LabError("%s shares no addressed link with its controller %s" % (host, controller))


def lab_key(prefix):
    """The lab's SSH private key (made by the first booted host of the lab)."""
    return os.path.join(registry.files_dir(prefix), "ssh", "id_ed25519")


def _make_key(prefix):
    key = lab_key(prefix)
    if not os.path.exists(key):
        os.makedirs(os.path.dirname(key), mode=0o700, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        "ipmasq-lab-" + prefix, "-f", key],
                       check=True, stdin=subprocess.DEVNULL, timeout=30)
    return key


def _alive(pid, marker):
    """Is `pid` still the supervisor we started (not a reused PID)?"""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            cmdline = handle.read().split(b"\0")
        with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and marker.encode() in cmdline


class BootedHost:
    """One booted Debian host of a lab: boot, SSH, reboot, stop."""

    def __init__(self, prefix, host, spec, names):
        h = spec["hosts"][host]
        self.prefix = prefix
        self.host = host
        self.release = h["release"]
        self.netns = names[host]
        self.controller = h["controller"]
        self.controller_netns = names[self.controller]
        self.address = ssh_address(spec, host)
        self.machine = "%s-%s" % (prefix, host)
        self.copy = os.path.join(HOSTS_DIR, self.machine)
        self.files = os.path.join(registry.files_dir(prefix), host)
        self.keydir = os.path.join(self.files, "root-ssh")
        self.log = os.path.join(self.files, "nspawn.log")
        self.key = lab_key(prefix)
        self._proc = None

    # -- description ---------------------------------------------------------------

    def record(self, supervisor_pid=None):
        return {"copy": self.copy, "machine": self.machine, "netns": self.netns,
                "supervisor_pid": supervisor_pid, "log": self.log}

    def proxy_command(self):
        """An OpenSSH ProxyCommand: the TCP connection starts in the controller's namespace."""
        return "ip netns exec %s socat STDIO TCP:%%h:%%p" % shlex.quote(self.controller_netns)

    def ansible_vars(self):
        """Inventory variables that reach this host over real SSH from the machine."""
        return {
            "ansible_connection": "ssh",
            "ansible_host": self.address,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": self.key,
            "ansible_ssh_common_args": " ".join(
                [shlex.quote("-o"), shlex.quote("ProxyCommand=" + self.proxy_command())]
                + [shlex.quote(o) for o in SSH_OPTIONS]),
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def describe(self):
        return {"kind": "debian", "release": self.release, "machine": self.machine,
                "ssh": {"address": self.address, "user": "root", "key": self.key,
                        "controller": self.controller,
                        "controller_netns": self.controller_netns,
                        "proxy_command": self.proxy_command()},
                "ansible": self.ansible_vars()}

    # -- boot ------------------------------------------------------------------------

    def nspawn_argv(self):
        return ["systemd-nspawn", "-q", "-D", self.copy, "-b", "--register=no",
                "--keep-unit", "--machine=" + self.machine, "--console=passive",
                "--link-journal=no", "--network-namespace-path=" + nsexec.netns_path(self.netns),
                "--capability=CAP_NET_ADMIN", "--bind-ro=%s:/root/.ssh" % self.keydir]

    def start(self, record_booted):
        """Copy the root and start the supervisor; `record_booted(host, record)` stores
        what teardown needs in the registry before each thing exists."""
        from .lab import signals_deferred  # lab imports this module
        root = booted_roots.ensure(self.release)
        key = _make_key(self.prefix)
        os.makedirs(self.keydir, mode=0o700, exist_ok=True)
        with open(key + ".pub", encoding="ascii") as src, \
                open(os.path.join(self.keydir, "authorized_keys"), "w", encoding="ascii") as dst:
            dst.write(src.read())
        os.chmod(os.path.join(self.keydir, "authorized_keys"), 0o600)
        record_booted(self.host, self.record())
        os.makedirs(HOSTS_DIR, mode=0o700, exist_ok=True)
        if os.path.lexists(self.copy):
            raise LabError("%s already exists (a lab that was not torn down?)" % self.copy)
        with booted_roots.locked(self.release, exclusive=False):
            proc = subprocess.run(["cp", "-a", "--reflink=auto", root, self.copy],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=600, check=False)
        if proc.returncode != 0:
            raise LabError("copying %s to %s: %s" % (root, self.copy, proc.stderr.strip()))
        with signals_deferred(), open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                ["sh", "-c", SUPERVISOR_SH, "%s %s" % (SUPERVISOR_NAME, self.machine),
                 self.netns] + self.nspawn_argv(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env=dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network"))
            record_booted(self.host, self.record(self._proc.pid))

    def _log_tail(self, lines=15):
        with contextlib.suppress(OSError):
            with open(self.log, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:]).strip()
        return ""

    def ssh_argv(self, command):
        """ssh argv (run it in the controller's namespace) for a shell `command`."""
        return ["ssh", "-i", self.key, *SSH_OPTIONS, "root@" + self.address, command]

    def ssh(self, command, timeout=30, check=False):
        """Run a shell command on the host over SSH, from the controller's namespace."""
        result = nsexec.run(self.controller_netns, self.ssh_argv(command), timeout=timeout)
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise LabError("%s: %r failed (%d): %s"
                           % (self.host, command, result.returncode, output))
        return result

    def wait_ready(self, timeout=None, previous_boot=None):
        """Wait until SSH works and systemd has finished booting (running or degraded)."""
        timeout = BOOT_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise LabError("%s: systemd-nspawn ended (status %s) before the host was up:"
                               "\n%s" % (self.host, self._proc.returncode, self._log_tail()))
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError("%s (Debian %s) not reachable over SSH at %s within %.0f s "
                               "(last: %s); nspawn log:\n%s"
                               % (self.host, self.release, self.address, timeout,
                                  last or "no answer", self._log_tail()))
            try:
                result = self.ssh("cat /proc/sys/kernel/random/boot_id; "
                                  "systemctl is-system-running --wait",
                                  timeout=max(1.0, min(left, 60.0)))
            except subprocess.TimeoutExpired:
                last = "timeout"
                continue
            words = result.stdout.split()
            if result.returncode in (0, 1) and len(words) == 2 and words[0] != previous_boot \
                    and words[1] in ("running", "degraded"):
                return words[0]
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            last = last[0]
            time.sleep(0.3)

    def boot_id(self):
        return self.ssh("cat /proc/sys/kernel/random/boot_id", check=True).stdout.strip()

    def reboot(self, timeout=None):
        """`systemctl reboot` on the host; returns when the new boot is up."""
        before = self.boot_id()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ssh("systemctl reboot", timeout=15)  # the connection may drop: fine
        return self.wait_ready(timeout, previous_boot=before)

    def leader_pid(self):
        """The host's PID 1 (its systemd), as seen from the machine (for nsenter)."""
        for pid in _pids_in_netns(self.netns):
            with contextlib.suppress(OSError):
                with open("/proc/%d/status" % pid, encoding="ascii") as handle:
                    for line in handle:
                        if line.startswith("NSpid:") and line.split()[-1] == "1" \
                                and len(line.split()) > 2:
                            return pid
        raise LabError("%s: no booted system found in %s" % (self.host, self.netns))


def _pids_in_netns(netns):
    from .topology import pids_in
    return pids_in([netns])


# -- lab life cycle (called by lab.py) -------------------------------------------------


def start_all(prefix, spec, names, record_booted):
    """Boot every booted host of the spec; all boot in parallel, then all are awaited."""
    hosts = [BootedHost(prefix, h, spec, names) for h in booted_hosts(spec)]
    if not hosts:
        return {}
    booted_roots.require_tools()
    for host in hosts:
        host.start(record_booted)
    for host in hosts:
        host.wait_ready()
    return {host.host: host for host in hosts}


def stop_all(booted, timeout=STOP_TIMEOUT):
    """SIGTERM every recorded supervisor (a clean poweroff), wait, SIGKILL the rest."""
    waiting = {}
    for host, rec in (booted or {}).items():
        pid = rec.get("supervisor_pid")
        marker = "%s %s" % (SUPERVISOR_NAME, rec.get("machine", ""))
        if pid and _alive(pid, marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            waiting[host] = (pid, marker)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for host, (pid, marker) in list(waiting.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            if not _alive(pid, marker):
                del waiting[host]
        time.sleep(0.1)
    for pid, marker in waiting.values():
        # Hung poweroff: kill the supervisor's whole session (nspawn with it); the
        # host's own processes die with the namespace's processes (lab.down()).
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return sorted(waiting)


def remove_copies(booted):
    """Remove the hosts' root copies (after every process of theirs has gone)."""
    for rec in (booted or {}).values():
        copy = rec.get("copy")
        if copy and os.path.dirname(copy) == HOSTS_DIR and os.path.lexists(copy):
            shutil.rmtree(copy, ignore_errors=True)
            if os.path.lexists(copy):
                raise LabError("could not remove %s" % copy)


def all_running(record):
    """Every booted host recorded for a lab still has its supervisor running."""
    for host in booted_hosts(record.get("spec") or {"hosts": {}}):
        rec = (record.get("booted") or {}).get(host) or {}
        pid = rec.get("supervisor_pid")
        if not pid or not _alive(pid, "%s %s" % (SUPERVISOR_NAME, rec.get("machine", ""))):
            return False
    return True
