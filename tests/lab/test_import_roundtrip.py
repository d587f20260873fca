"""The import round trip, on real agents and the real kernel: a legacy script run line
by line through masqctl against one agent (in the gateway's namespace), and its
`masqctl import` YAML applied with the masq_* modules (state: overridden, real
ansible-playbook over the netns connection) to another agent (in the client's
namespace), give the same `inet masqd` table, handles and counters aside. The export
of either agent is the imported YAML, comments aside."""

import difflib
import os
import re
import shutil
import socket
import sys
import tempfile

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "ansible"))
from ansible_lab import REPO, host_results, json_output, run, write_inventory  # noqa: E402
from masqd_agent import PYTHON, VENV_BIN, Agent  # noqa: E402

pytestmark = pytest.mark.lab

MODULES = {"gateway_portfw": "masq_portfw", "gateway_autofw": "masq_autofw", "gateway_mfw": "masq_mfw",
           "gateway_marks": "masq_mark", "gateway_masquerade": "masq_masquerade"}

# The seed's scripts (kernel-port-forwarding.txt) with the lab's addresses; `extip`
# stays a host name, resolved through the lab's own /etc/hosts (see in_lab_hosts).
SEED_PORTFW = """\
# kernel PORTFW for inbound requests

### set up the port forwarding
# the .27 system gets the bulk of the requests because it
# has the new UltraPANTHEON 4692 HTTP co-processor chip
ipmasqadm portfw -a -P tcp -L extip 80 -R 10.16.0.27 80 -p 15
ipmasqadm portfw -a -P tcp -L extip 80 -R 10.16.0.28 80 -p 5

### need masquerading rules too!
ipchains -A -p tcp -s 10.16.0.27/32 80 -j MASQ
ipchains -A -p tcp -s 10.16.0.28/32 80 -j MASQ
"""

SEED_FWMARK = """\
# kernel firewall mark forwarding for Web access
#
# use these symbolic names to keep everything straight
MARK_FRIEND=1
MARK_NEUTRAL=3
FRIEND=203.0.113.0/24
FRIEND_SVR=10.16.0.3/32
NEUTRAL_SVR=10.16.0.46/32

# mark packets as they enter the system
ipchains -I input -s ${FRIEND} -m ${MARK_FRIEND}
ipchains -I input -s ! ${FRIEND} -m ${MARK_NEUTRAL}

# establish forward/redir rules based on marks
ipmasqadm mfw -I -m ${MARK_NEUTRAL} -r ${NEUTRAL_SVR}
ipmasqadm mfw -I -m ${MARK_FRIEND} -r ${FRIEND_SVR}

# make sure that the replies are masqueraded too
ipchains -I forward -d ${FRIEND} -s ${FRIEND_SVR} -j MASQ
ipchains -I forward -s ${NEUTRAL_SVR} -j MASQ
"""

# The seed's two AUTOFW forms: a fixed hidden host, and a control connection.
SEED_AUTOFW = """\
# masquerade the outgoing (control) connection as you normally would
ipchains -A forward -s 10.16.0.0/24 -j MASQ
ipmasqadm autofw -A -r udp 6970 7170 -h 10.16.0.27 -u
ipmasqadm autofw -A -r udp 8000 8100 -c tcp 554 -u
"""

# IP-Masquerade-HOWTO era rc.firewall forms: the programs behind variables, quoted
# values, dotted masks and 0/0, `-i` on the forward chain (the output interface),
# flushes first, RealAudio's AUTOFW pair, load balancing.
HOWTO_VARIANTS = """\
#!/bin/sh
# rc.firewall-2.2.x style
IPCHAINS=ipchains
IPMASQADM=ipmasqadm
EXTIF="eth0"
EXTIP="198.51.100.1"
INTLAN="10.16.0.0/255.255.255.0"

$IPMASQADM portfw -f
$IPMASQADM mfw -F
$IPMASQADM autofw -F
$IPCHAINS -F forward

$IPCHAINS -A forward -i $EXTIF -s $INTLAN -d 0/0 -j MASQ

# mail and DNS to the inside
$IPMASQADM portfw -a -P tcp -L $EXTIP 25 -R 10.16.0.27 25
$IPMASQADM portfw -a -P udp -L $EXTIP 53 -R 10.16.0.28 53 -p 1
$IPMASQADM portfw -a -P udp -L $EXTIP 53 -R 10.16.0.27 53 -p 1
$IPMASQADM portfw -a -P tcp -L "$EXTIP" 8000 -R 10.16.0.46 80
$IPMASQADM portfw -d -P tcp -L $EXTIP 8000

# web on a second port, chosen by mark
$IPCHAINS -I input -p tcp -d $EXTIP/32 8080 -m 2
$IPMASQADM mfw -A -m 2 -r 10.16.0.27 80 -p 3
$IPMASQADM mfw -A -m 2 -r 10.16.0.28 80 -p 1
$IPMASQADM mfw -E -m 2 -r 10.16.0.28 80 -p 2

# RealAudio
$IPMASQADM autofw -A -r tcp 7070 7070 -c tcp 7070
$IPMASQADM autofw -A -r udp 6970 7170 -c tcp 7070 -u
"""

SCRIPTS = {"portfw": SEED_PORTFW, "fwmark": SEED_FWMARK, "autofw": SEED_AUTOFW, "howto": HOWTO_VARIANTS}

HOSTS = "127.0.0.1 localhost\n198.51.100.1 extip\n"

# The seed's programs, each line handed to masqctl by a real shell (which does the
# variable expansion itself): ipchains lines are mark rules (-m) or masq rules (-j MASQ).
SHIMS = {
    "ipmasqadm": '#!/bin/sh\nexec "$MASQCTL_PYTHON" -m masqd.masqctl "$@"\n',
    "ipchains": ('#!/bin/sh\n'
                 '# ipchains -F input|forward is masqctl mark -F | masqctl masq -F\n'
                 'case "$*" in\n'
                 '  "-F input") exec "$MASQCTL_PYTHON" -m masqd.masqctl mark -F ;;\n'
                 '  "-F forward") exec "$MASQCTL_PYTHON" -m masqd.masqctl masq -F ;;\n'
                 'esac\n'
                 'case " $* " in\n  *" MASQ "*) module=masq ;;\n  *) module=mark ;;\nesac\n'
                 'exec "$MASQCTL_PYTHON" -m masqd.masqctl "$module" "$@"\n'),
}


def in_lab_hosts(agent, workdir, command, env):
    """`command` (a shell string) in the agent's namespace, with a private mount
    namespace whose /etc/hosts is the lab's; the machine's file is untouched."""
    script = 'mount --bind "$1" /etc/hosts && shift && eval "$1"'
    return agent.lab.run(agent.host, ["unshare", "--mount", "sh", "-c", script, "sh",
                                      os.path.join(workdir, "hosts"), command],
                         timeout=60, env=env)


def without_handles(table):
    """The table's text without handles and counters, its sets, maps and chains sorted
    by name: nft lists them in creation order, which (like handles) records the
    table's history, not what it does. Rules keep their order inside each chain."""
    table = re.sub(r"counter packets \d+ bytes \d+", "counter", table)
    table = re.sub(r" # handle \d+", "", table)
    lines = table.splitlines()
    blocks, current = [], []
    for line in lines[1:-1]:  # between "table inet masqd {" and its "}"
        if not line.strip():
            continue
        current.append(line)
        if line == "\t}":
            blocks.append("\n".join(current))
            current = []
    assert not current, table
    return "\n".join([lines[0]] + sorted(blocks) + [lines[-1]])


def assert_same_table(left, right):
    a, b = without_handles(left.table()), without_handles(right.table())
    assert a == b, "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), "%s (%s)" % (left.host, "A"),
                                                  "%s (%s)" % (right.host, "B"), lineterm=""))


def without_comments(text):
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def ansible_env(workdir):
    collections = os.path.join(workdir, "collections", "ansible_collections", "ipmasq")
    os.makedirs(collections)
    os.symlink(REPO, os.path.join(collections, "gateway"))
    home = os.path.join(workdir, "ansible-home")
    env = dict(os.environ)
    env.update({
        "PATH": VENV_BIN + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "ANSIBLE_COLLECTIONS_PATH": os.path.join(workdir, "collections"),
        "ANSIBLE_PYTHON_INTERPRETER": PYTHON,
        "ANSIBLE_HOME": home,
        "ANSIBLE_LOCAL_TEMP": os.path.join(home, "tmp"),
        "ANSIBLE_REMOTE_TEMP": os.path.join(workdir, "remote-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_STDOUT_CALLBACK": "json_results",
        "ANSIBLE_CALLBACK_PLUGINS": os.path.join(os.path.dirname(HERE), "ansible", "callback_plugins"),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.pop("ANSIBLE_CONFIG", None)
    return env


def apply_with_modules(lab, agent, workdir, yaml_path, variables):
    """ansible-playbook: each imported table with its masq_* module, state overridden."""
    env = ansible_env(workdir)
    inventory = write_inventory(_Path(os.path.join(workdir, "inventory")), [lab.netns(agent.host)])
    tasks = [{"name": variable, "ipmasq.gateway." + MODULES[variable]:
              {"config": "{{ %s }}" % variable, "state": "overridden", "socket": agent.socket}}
             for variable in variables]
    play = [{"name": "imported tables", "hosts": "all", "gather_facts": False,
             "vars_files": [yaml_path], "tasks": tasks}]
    path = os.path.join(workdir, "apply.yml")
    with open(path, "w") as handle:
        handle.write(yaml.safe_dump(play, sort_keys=False))
    proc = run(["ansible-playbook", "-i", inventory, path], env=env, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(host_results(json_output(proc), lab.netns(agent.host)))


def parsed_and_gathered(lab, agent, workdir, script_text, variables):
    """state=parsed of every imported table (running_config: the script) next to
    state=gathered of the agent it was applied to, and state=rendered of the imported
    config. parsed and rendered get a socket that listens but never answers, and no
    connection may arrive on it: they never contact an agent."""
    env = ansible_env(workdir)
    spy_path = os.path.join(workdir, "spy.sock")
    spy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    spy.bind(spy_path)
    spy.listen(16)
    spy.setblocking(False)
    inventory = write_inventory(_Path(os.path.join(workdir, "inventory")), [lab.netns(agent.host)])
    tasks = []
    for variable in variables:
        module = "ipmasq.gateway." + MODULES[variable]
        tasks += [{"name": "parsed " + variable, module: {"running_config": script_text, "state": "parsed",
                                                          "socket": spy_path}},
                  {"name": "gathered " + variable, module: {"state": "gathered", "socket": agent.socket}},
                  {"name": "rendered " + variable, module: {"config": variables[variable], "state": "rendered",
                                                            "socket": spy_path}}]
    play = [{"name": "parsed", "hosts": "all", "gather_facts": False, "tasks": tasks}]
    path = os.path.join(workdir, "parsed.yml")
    with open(path, "w") as handle:
        handle.write(yaml.safe_dump(play, sort_keys=False))
    try:
        proc = run(["ansible-playbook", "-i", inventory, path], env=env, timeout=180, check=False)
        with pytest.raises(BlockingIOError):
            spy.accept()  # nothing connected
    finally:
        spy.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(host_results(json_output(proc), lab.netns(agent.host)))


class _Path(str):
    """write_inventory wants a pathlib-like object with write_text."""

    def write_text(self, text):
        with open(self, "w") as handle:
            handle.write(text)


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="masqd-import-lab-")
    os.chmod(path, 0o755)
    with open(os.path.join(path, "hosts"), "w") as handle:
        handle.write(HOSTS)
    bin_dir = os.path.join(path, "bin")
    os.makedirs(bin_dir)
    for name, text in SHIMS.items():
        with open(os.path.join(bin_dir, name), "w") as handle:
            handle.write(text)
        os.chmod(os.path.join(bin_dir, name), 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agents(seed_lab, workdir):
    """Agent A in the gateway's namespace, agent B in the client's: nothing shared."""
    started = []
    try:
        for name, host in (("a", "gateway"), ("b", "client")):
            agent = Agent(seed_lab, os.path.join(workdir, name), host=host)
            agent.start()
            started.append(agent)
        yield started
    finally:
        for agent in started:
            agent.stop()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_through_masqctl_equals_imported_yaml_through_modules(name, seed_lab, workdir, agents):
    by_masqctl, by_modules = agents
    script_path = os.path.join(workdir, "rc.%s" % name)
    with open(script_path, "w") as handle:
        handle.write("set -e\n" + SCRIPTS[name])
    env = dict(os.environ, PATH=os.path.join(workdir, "bin") + ":" + VENV_BIN + ":" + os.environ["PATH"],
               MASQCTL_PYTHON=PYTHON, MASQD_SOCKET=by_masqctl.socket)

    # 1. The script, line by line through masqctl, by a real shell.
    ran = in_lab_hosts(by_masqctl, workdir, 'sh "%s"' % script_path, env)
    assert ran.returncode == 0, ran.stderr

    # 2. The import (no agent needed: it runs with a socket that does not exist).
    yaml_path = os.path.join(workdir, "imported.yml")
    imported = in_lab_hosts(by_masqctl, workdir, '"%s" -m masqd.masqctl --socket /nonexistent import "%s" > "%s"'
                            % (PYTHON, script_path, yaml_path), env)
    assert imported.returncode == 0, imported.stderr
    with open(yaml_path) as handle:
        text = handle.read()
    variables = yaml.safe_load(text)
    assert variables and set(variables) <= set(MODULES)

    # 3. The YAML through the modules, into the other agent; a second run changes nothing.
    results = apply_with_modules(seed_lab, by_modules, workdir, yaml_path, variables)
    assert any(result["changed"] for result in results.values())
    assert not any(result["changed"] for result in
                   apply_with_modules(seed_lab, by_modules, os.path.join(workdir, "again"), yaml_path,
                                      variables).values())

    # The same kernel table in both namespaces.
    assert_same_table(by_masqctl, by_modules)
    assert "10.16.0." in by_modules.table()

    # The modules' parsed state reads the same script to the same tables (host names
    # resolved on the gateway, which has no `extip`: the address is written instead).
    results = parsed_and_gathered(seed_lab, by_modules, os.path.join(workdir, "parsed"),
                                  SCRIPTS[name].replace("extip", "198.51.100.1"), variables)
    for variable in variables:
        assert results["parsed " + variable]["parsed"] == results["gathered " + variable]["gathered"], variable
        assert results["rendered " + variable]["rendered"] == results["gathered " + variable]["gathered"], variable
        assert results["parsed " + variable]["changed"] is False

    # export of either agent is the import, comments aside; tables the script never
    # names are empty on both.
    exports = [agent.masqctl("export").stdout for agent in agents]
    assert exports[0] == exports[1]
    expected = dict({variable: [] for variable in MODULES}, **variables)
    assert yaml.safe_load(exports[0]) == expected
    named_only = [line for line in without_comments(exports[0])
                  if not (line.endswith(": []") and line[:-len(": []")] not in variables)]
    assert named_only == without_comments(text)


def test_export_script_rebuilds_the_table_and_imports_to_the_export(seed_lab, workdir, agents):
    """A gateway configured by hand: `masqctl export --script` run against an empty
    agent rebuilds the same kernel table, and its import is the export."""
    by_hand, rebuilt = agents
    env = dict(os.environ, PATH=os.path.join(workdir, "bin") + ":" + VENV_BIN + ":" + os.environ["PATH"],
               MASQCTL_PYTHON=PYTHON, MASQD_SOCKET=by_hand.socket)
    script_path = os.path.join(workdir, "rc.howto")
    with open(script_path, "w") as handle:
        handle.write("set -e\n" + HOWTO_VARIANTS + SEED_FWMARK)
    ran = in_lab_hosts(by_hand, workdir, 'sh "%s"' % script_path, env)
    assert ran.returncode == 0, ran.stderr
    exported = by_hand.masqctl("export").stdout
    script = by_hand.masqctl("export", "--script").stdout
    export_path = os.path.join(workdir, "export.sh")
    with open(export_path, "w") as handle:
        handle.write(script)
    env["MASQD_SOCKET"] = rebuilt.socket
    ran = rebuilt.lab.run(rebuilt.host, ["sh", export_path], timeout=60, env=env)
    assert ran.returncode == 0, ran.stderr
    assert_same_table(by_hand, rebuilt)
    reimported = by_hand.masqctl("import", export_path).stdout
    assert without_comments(reimported) == without_comments(exported)


# An nftables gateway written by hand: web load-balanced round robin, and the seed's
# FWMARK policy on port 8080 (mark rules in the order nft needs: the last match wins).
FOREIGN_RULESET = """\
table ip nat {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip daddr 198.51.100.1 tcp dport 80 dnat to numgen inc mod 2 map { 0 : 10.16.0.27, 1 : 10.16.0.28 }
\t\tmeta mark 0x1 dnat to 10.16.0.3
\t\tmeta mark 0x3 dnat to 10.16.0.46
\t}
}
table ip mangle {
\tchain prerouting {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\ttcp dport 8080 meta mark set 3
\t\tip saddr 203.0.113.0/24 tcp dport 8080 meta mark set 1
\t}
}
"""


def probe_all(lab):
    from ipmasq_lab import probes

    servers = [probes.serve_identity(lab, "web1", 80), probes.serve_identity(lab, "web2", 80),
               probes.serve_identity(lab, "friendsrv", 8080), probes.serve_identity(lab, "neutralsrv", 8080)]
    try:
        runs = {"client:80": probes.connect_many(lab, "client", "198.51.100.1", 80, count=6),
                "client:8080": probes.connect_many(lab, "client", "198.51.100.1", 8080, count=3),
                "friend:8080": probes.connect_many(lab, "friend", "203.0.113.1", 8080, count=3)}
    finally:
        for server in servers:
            server.stop()
    for name, answers in runs.items():
        assert all(a.ok for a in answers), (name, [a.error for a in answers if not a.ok])
    return {name: [a.backend for a in answers] for name, answers in runs.items()}


def test_nft_ruleset_import_forwards_the_same_connections(seed_lab, workdir):
    """Real packets: the hand-written ruleset, then masqd with its import, send the
    same connections to the same backends, in the same order."""
    from masqd.client import Client

    path = os.path.join(workdir, "foreign.nft")
    with open(path, "w") as handle:
        handle.write(FOREIGN_RULESET)
    seed_lab.run("gateway", ["nft", "-f", path], timeout=10, check=True)
    by_nft = probe_all(seed_lab)
    assert by_nft == {"client:80": ["web1", "web2"] * 3, "client:8080": ["neutralsrv"] * 3,
                      "friend:8080": ["friendsrv"] * 3}
    listed = seed_lab.run("gateway", ["nft", "list", "ruleset"], timeout=10, check=True).stdout
    listed_path = os.path.join(workdir, "listed.nft")
    with open(listed_path, "w") as handle:
        handle.write(listed)
    imported = seed_lab.run("gateway", [PYTHON, "-m", "masqd.masqctl", "import", listed_path], timeout=20)
    assert imported.returncode == 0, imported.stderr
    variables = yaml.safe_load(imported.stdout)
    for table in ("nat", "mangle"):
        seed_lab.run("gateway", ["nft", "delete", "table", "ip", table], timeout=10, check=True)

    agent = Agent(seed_lab, os.path.join(workdir, "agent"))
    agent.start()
    try:
        with Client(agent.socket) as client:
            for variable, entries in variables.items():
                table = {"gateway_portfw": "portfw", "gateway_mfw": "mfw", "gateway_marks": "marks"}[variable]
                client.request("set", table=table, entries=entries)
        by_masqd = probe_all(seed_lab)
    finally:
        agent.stop()
    assert by_masqd == by_nft
