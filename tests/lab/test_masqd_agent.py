"""masqd as a real agent in a lab namespace, driven by masqctl over its socket:
the kernel table it programs, restarts, refusals, peer credentials."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import PYTHON, VENV_BIN, Agent, table_objects, unprivileged_user  # noqa: E402

from masqd import render  # noqa: E402

pytestmark = pytest.mark.lab


@pytest.fixture
def workdir():
    """A private directory non-root test users can traverse (pytest's tmp_path cannot)."""
    path = tempfile.mkdtemp(prefix="masqd-lab-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(seed_lab, workdir):
    running = Agent(seed_lab, workdir)
    running.start()
    yield running
    running.stop()


def without_counters(ruleset):
    return re.sub(r"counter packets \d+ bytes \d+", "counter", ruleset)


SEED_PORTFW = [
    "portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15",
    "portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5",
    "masq -A -p tcp -s 10.16.0.27/32 80 -j MASQ",
    "masq -A -p tcp -s 10.16.0.28/32 80 -j MASQ",
]


def test_seed_portfw_lines_program_the_namespace(agent):
    for line in SEED_PORTFW:
        agent.masqctl(*line.split())
    listing = agent.masqctl("portfw", "-l", "-n").stdout.splitlines()
    assert listing[0].split() == ["prot", "localaddr", "rediraddr", "lport", "rport", "pcnt", "pref"]
    assert [row.split() for row in listing[1:]] == [
        ["TCP", "198.51.100.1", "10.16.0.27", "80", "80", "15", "15"],
        ["TCP", "198.51.100.1", "10.16.0.28", "80", "80", "5", "5"]]
    table = agent.table()
    assert "10.16.0.27" in table and "10.16.0.28" in table
    # the root namespace has no masqd table: the agent only touched its own namespace
    root = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10,
                          check=True).stdout
    assert "masqd" not in root
    status = agent.masqctl("status").stdout
    assert "portfw:     1 entries" in status and "masquerade: 2 entries" in status
    assert "socket:     %s" % agent.socket in status


def test_extip_from_etc_hosts_is_resolved_when_the_rule_is_added(agent, workdir):
    hosts = os.path.join(workdir, "hosts")
    with open(hosts, "w") as handle:
        handle.write("127.0.0.1 localhost\n198.51.100.1 extip\n10.16.0.27 web1\n")
    # A private mount namespace shows the lab its own /etc/hosts; the machine's is untouched.
    script = ('mount --bind "$1" /etc/hosts && "$2" -m masqd.masqctl --socket "$3" '
              'portfw -a -P tcp -L extip 80 -R web1 80 -p 15 && '
              '"$2" -m masqd.masqctl --socket "$3" portfw -l')
    result = agent.lab.run("gateway", ["unshare", "--mount", "sh", "-c", script, "sh", hosts, PYTHON,
                                       agent.socket], timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["TCP", "extip", "web1", "http", "http", "15", "15"]
    assert agent.masqctl("portfw", "-l", "-n").stdout.splitlines()[1].split()[:3] == [
        "TCP", "198.51.100.1", "10.16.0.27"]


def test_seed_fwmark_script_runs_through_masqctl(agent):
    script = """set -e
MARK_FRIEND=1
MARK_NEUTRAL=3
FRIEND=203.0.113.0/24
FRIEND_SVR=10.16.0.3/32
NEUTRAL_SVR=10.16.0.46/32

# mark packets as they enter the system
masqctl mark -I input -s ${FRIEND} -m ${MARK_FRIEND}
masqctl mark -I input -s ! ${FRIEND} -m ${MARK_NEUTRAL}

# establish forward/redir rules based on marks
masqctl mfw -I -m ${MARK_NEUTRAL} -r ${NEUTRAL_SVR}
masqctl mfw -I -m ${MARK_FRIEND} -r ${FRIEND_SVR}

# make sure that the replies are masqueraded too
masqctl masq -I forward -d ${FRIEND} -s ${FRIEND_SVR} -j MASQ
masqctl masq -I forward -s ${NEUTRAL_SVR} -j MASQ
"""
    env = dict(os.environ, PATH=VENV_BIN + ":" + os.environ["PATH"], MASQD_SOCKET=agent.socket)
    result = agent.lab.run("gateway", ["bash", "-c", script], timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    mfw = [row.split() for row in agent.masqctl("mfw", "-L", "-n").stdout.splitlines()[1:]]
    # fwmark, rediraddr, rport, pref (pcnt moves with the lab's background traffic)
    assert sorted(m[:3] + m[4:] for m in mfw) == [["1", "10.16.0.3", "any", "10"], ["3", "10.16.0.46", "any", "10"]]
    marks = [row.split() for row in agent.masqctl("mark", "-L", "-n").stdout.splitlines()[1:]]
    # -I puts each rule first, as ipchains -I did
    assert [(m[1], m[3]) for m in marks] == [("3", "!203.0.113.0/24"), ("1", "203.0.113.0/24")]
    masq = [row.split() for row in agent.masqctl("masq", "-L", "-n").stdout.splitlines()[1:]]
    assert [(m[2], m[3]) for m in masq] == [("10.16.0.46", "anywhere"), ("10.16.0.3", "203.0.113.0/24")]
    table = agent.table()
    assert "10.16.0.46" in table and "10.16.0.3" in table and "203.0.113.0/24" in table


def test_kill9_and_restart_keep_one_table_and_the_listing(agent):
    for line in SEED_PORTFW + ["mfw -A -m 1 -r 10.16.0.3 -p 0", "mark -A -s 203.0.113.0/24 -m 1"]:
        agent.masqctl(*line.split())
    listings = {m: agent.masqctl(m, flag, "-n").stdout for m, flag in
                (("portfw", "-l"), ("mfw", "-L"), ("mark", "-L"), ("masq", "-L"))}
    table = agent.table()
    state = agent.state_bytes()
    agent.stop(signal.SIGKILL)
    assert os.path.exists(agent.socket)  # what a crash leaves behind
    agent.start()
    assert "replacing stale socket" in agent.log()
    assert {m: agent.masqctl(m, flag, "-n").stdout for m, flag in
            (("portfw", "-l"), ("mfw", "-L"), ("mark", "-L"), ("masq", "-L"))} == listings
    assert sorted(t for t in agent.nft("list", "tables").splitlines() if "masqd" in t) == sorted(
        "table inet " + name for name in render.TABLES)  # each of masqd's tables once
    assert table_objects(without_counters(agent.table())) == table_objects(without_counters(table))
    assert agent.state_bytes() == state


def test_bad_input_changes_nothing(agent):
    for line in SEED_PORTFW + ["mfw -A -m 1 -r 10.16.0.3"]:
        agent.masqctl(*line.split())
    state, table = agent.state_bytes(), agent.table()
    bad = [
        ("portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 70000", 1, "70000"),
        ("portfw -a -P tcp -L 198.51.100.1 0 -R 10.16.0.27 80", 1, "0"),
        ("portfw -a -P tcp -L 198.51.100.1 80 -R 2001:db8::1 80", 1, "2001:db8::1"),
        ("portfw -a -P icmp -L 198.51.100.1 80 -R 10.16.0.27 80", 2, "'icmp'"),
        ("portfw -a -P tcp -L nosuchhost.invalid 80 -R 10.16.0.27 80", 2, "'nosuchhost.invalid'"),
        ("mfw -A -m 1 -r 10.16.0.0/24", 2, "'10.16.0.0/24'"),
        ("mfw -A -m 0 -r 10.16.0.3", 1, "0"),
        ("mfw -A -m 1 -r 10.16.0.4 -p -3", 1, "-3"),
        ("mfw -S -m 77", 1, "77"),
        ("mark -A -s 203.0.113.0/24 -i 'not an iface!' -m 1", 1, "not an iface!"),
        ("mark -A -s 203.0.113.0/24 -m 4294967296", 1, "4294967296"),
        ("autofw -A -r udp 7170 6970 -h 10.16.0.27", 1, "6970"),
        ("masq -A -s 10.16.0.27 -j ACCEPT", 2, "ACCEPT"),
    ]
    for line, code, named in bad:
        result = agent.masqctl(*shlex.split(line), check=False)
        assert result.returncode == code, (line, result.returncode, result.stderr)
        assert named in result.stderr, (line, result.stderr)
        assert agent.state_bytes() == state, line
        assert agent.table() == table, line


def test_second_agent_on_the_same_socket_refuses_and_sigterm_cleans_up(seed_lab, workdir):
    pidfile = os.path.join(workdir, "masqd.pid")
    agent = Agent(seed_lab, workdir, extra=["--pidfile", pidfile])
    agent.start()
    with open(pidfile) as handle:
        assert int(handle.read()) == agent.proc.pid
    agent.masqctl("mfw", "-A", "-m", "1", "-r", "10.16.0.3")
    table = agent.table()
    second = Agent(seed_lab, workdir)
    second.log_path = agent.log_path + ".second"
    second.start(wait=False)
    assert second.proc.wait(timeout=15) == 1
    assert "another masqd is already running on %s" % agent.socket in second.log()
    assert agent.masqctl("status").returncode == 0  # the first one still serves,
    assert agent.table() == table                   # its kernel table untouched
    assert agent.stop(signal.SIGTERM) == 0
    assert not os.path.exists(agent.socket) and not os.path.exists(pidfile)
    assert "SIGTERM received" in agent.log()
    result = agent.masqctl("status", check=False)
    assert result.returncode == 1 and "masqd is not running at %s: start it" % agent.socket in result.stderr


def masqctl_as(lab, user, socket_path, groups=None):
    setpriv = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid]
    setpriv += ["--groups=%s" % groups] if groups else ["--clear-groups"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    return lab.run("gateway", setpriv + [PYTHON, "-m", "masqd.masqctl", "--socket", socket_path, "status"],
                   timeout=20, env=env, cwd="/")


def test_non_root_is_refused_and_group_members_are_served(seed_lab, workdir):
    with unprivileged_user() as user:
        agent = Agent(seed_lab, workdir)
        agent.start()
        try:
            # 1. the socket's mode keeps the user out
            result = masqctl_as(seed_lab, user, agent.socket)
            assert result.returncode == 1 and "permission denied" in result.stderr, result.stderr
            # 2. with the mode loosened by mistake, SO_PEERCRED still refuses
            os.chmod(os.path.dirname(agent.socket), 0o755)
            os.chmod(agent.socket, 0o666)
            result = masqctl_as(seed_lab, user, agent.socket)
            assert result.returncode == 1
            assert "uid %d may not use masqd" % user.pw_uid in result.stderr, result.stderr
            assert "refused peer" in agent.log()
        finally:
            agent.stop()
        # 3. --group: a process holding the group is served
        grouped = Agent(seed_lab, workdir, group="users")
        grouped.start()
        try:
            assert os.stat(grouped.socket).st_mode & 0o777 == 0o660
            assert os.stat(os.path.dirname(grouped.socket)).st_mode & 0o777 == 0o750
            result = masqctl_as(seed_lab, user, grouped.socket, groups="users")
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("masqd ")
            assert masqctl_as(seed_lab, user, grouped.socket).returncode == 1
        finally:
            grouped.stop()


def test_one_agent_per_namespace_nothing_shared(seed_lab, workdir):
    gateway = Agent(seed_lab, os.path.join(workdir, "gw"))
    friend = Agent(seed_lab, os.path.join(workdir, "friend"), host="friend")
    gateway.start()
    friend.start()
    try:
        gateway.masqctl("portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", "10.16.0.27", "80")
        friend.masqctl("mfw", "-A", "-m", "5", "-r", "10.16.0.46")
        assert "10.16.0.27" in gateway.table() and "10.16.0.46" not in gateway.table()
        assert "10.16.0.46" in friend.table() and "10.16.0.27" not in friend.table()
        assert gateway.masqctl("mfw", "-L", "-n").stdout.count("\n") == 1  # header only
        assert friend.masqctl("portfw", "-l", "-n").stdout.count("\n") == 1
    finally:
        gateway.stop()
        friend.stop()
