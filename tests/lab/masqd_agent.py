"""A real masqd in a lab namespace, for the lab tests: start/stop, masqctl, the
seed's FWMARK script, a test user without privileges."""

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from masqd import render

PYTHON = sys.executable
VENV_BIN = os.path.dirname(PYTHON)
TEST_USER = "masqd-test"


def table_objects(listing):
    """The top-level objects (maps, sets, chains) of `nft list table` texts (one table
    or several, one after another), each with its table's name, whatever their order:
    a re-sync re-creates objects, and the kernel lists them in the order they were
    created. What is inside each (rules in order, elements) stays as listed."""
    blocks, table = [], None
    for line in [l for l in (listing or "").splitlines() if l.strip()]:
        if line.startswith("table "):
            table = line
        elif line.startswith("\t") and not line.startswith("\t\t") and not line.strip() == "}":
            blocks.append([table])
        if line.startswith("\t") and blocks:
            blocks[-1].append(line)
    return sorted("\n".join(b) for b in blocks)


def masqd_tables(ruleset):
    """masqd's tables (render.TABLES) out of an `nft list ruleset` text, in that order."""
    found = {}
    for block in re.split(r"(?m)^(?=table )", ruleset or ""):
        match = re.match(r"table inet (\S+) \{", block)
        if match and match.group(1) in render.TABLES:
            found[match.group(1)] = block
    return "".join(found[name] for name in render.TABLES if name in found)


def masqd_table_json(objects):
    """masqd's objects (of every table in render.TABLES) out of `nft -j list ruleset`."""
    def of(body):
        return body.get("table") if "table" in body else body.get("name")
    return [obj for obj in objects or [] for kind, body in obj.items()
            if kind != "metainfo" and body.get("family") == "inet" and of(body) in render.TABLES]


class Agent:
    """One masqd in `host`'s namespace of `lab`, with its own state dir and socket."""

    def __init__(self, lab, base, host="gateway", group=None, extra=()):
        self.lab, self.host, self.extra = lab, host, list(extra)
        self.state_dir = os.path.join(base, "state")
        self.socket = os.path.join(base, "run", "masqd.sock")
        self.log_path = os.path.join(base, "masqd.log")
        self.group = group
        self.proc = None

    def start(self, wait=True):
        argv = [PYTHON, "-m", "masqd.daemon", "--state-dir", self.state_dir, "--socket", self.socket]
        if self.group is not None:
            argv += ["--group", str(self.group)]
        argv += self.extra
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = self.lab.spawn(self.host, argv, stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_ready()
        return self.proc

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("masqd exited %s:\n%s" % (self.proc.returncode, self.log()))
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(self.socket)
                return
            time.sleep(0.05)
        raise AssertionError("masqd did not listen within %ss:\n%s" % (timeout, self.log()))

    def log(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def masqctl(self, *args, check=True):
        """masqctl in the agent's namespace (so any name lookup stays inside the lab)."""
        result = self.lab.run(self.host, [PYTHON, "-m", "masqd.masqctl", "--socket", self.socket] + list(args),
                              timeout=20)
        if check and result.returncode != 0:
            raise AssertionError("masqctl %s: exit %d\n%s" % (" ".join(args), result.returncode, result.stderr))
        return result

    def nft(self, *args):
        return self.lab.run(self.host, ["nft"] + list(args), timeout=10, check=True).stdout

    def table(self):
        """`nft list table` of each of masqd's tables (render.TABLES)."""
        return masqd_tables(self.nft("list", "ruleset"))

    def state_bytes(self):
        files = {}
        for root, _dirs, names in os.walk(self.state_dir):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    files[os.path.relpath(path, self.state_dir)] = handle.read()
        return files


@contextlib.contextmanager
def running_agent(lab, prefix="masqd-lab-", mode=None, **agent_options):
    """An Agent on `lab`'s gateway in a fresh directory, stopped and removed afterwards."""
    base = tempfile.mkdtemp(prefix=prefix)
    if mode is not None:
        os.chmod(base, mode)
    agent = Agent(lab, base, **agent_options)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def unprivileged_user():
    """A system user for the test; created (and removed again) only if absent."""
    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        TEST_USER], check=True, timeout=30)
        created = True
    try:
        yield pwd.getpwnam(TEST_USER)
    finally:
        if created:
            subprocess.run(["userdel", TEST_USER], check=False, timeout=30)


# The seed's FWMARK script with the lab's addresses; only the program name differs.
FWMARK_SCRIPT = """set -e
MARK_FRIEND=1
MARK_NEUTRAL=3
FRIEND=203.0.113.0/24
FRIEND_SVR=10.16.0.3/32
NEUTRAL_SVR=10.16.0.46/32

masqctl mark -I input -s ${FRIEND} -m ${MARK_FRIEND}
masqctl mark -I input -s ! ${FRIEND} -m ${MARK_NEUTRAL}

masqctl mfw -I -m ${MARK_NEUTRAL} -r ${NEUTRAL_SVR}
masqctl mfw -I -m ${MARK_FRIEND} -r ${FRIEND_SVR}

masqctl masq -I forward -d ${FRIEND} -s ${FRIEND_SVR} -j MASQ
masqctl masq -I forward -s ${NEUTRAL_SVR} -j MASQ
"""


def run_script(agent, script):
    env = dict(os.environ, PATH=VENV_BIN + ":" + os.environ["PATH"], MASQD_SOCKET=agent.socket)
    result = agent.lab.run("gateway", ["bash", "-c", script], timeout=30, env=env)
    assert result.returncode == 0, result.stderr
