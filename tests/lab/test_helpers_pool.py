"""Masquerading with an address pool (the seed's "A Better Way to AUTOFW - NAT") and
kernel conntrack helpers (active FTP), with real traffic through the seed lab's
gateway; and the same options through the Ansible modules."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from ipmasq_lab import probes

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import PYTHON, VENV_BIN, running_agent  # noqa: E402

pytestmark = pytest.mark.lab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POOL = ("198.51.100.2", "198.51.100.3")
WEB = {"web1": "10.16.0.27", "web2": "10.16.0.28"}


@pytest.fixture
def gateway(seed_lab):
    with running_agent(seed_lab, "masqd-pool-", mode=0o755) as agent:
        yield agent


def add_pool_addresses(lab):
    """Pool addresses must be local addresses of the gateway: put them on eth0."""
    for address in POOL:
        lab.run("gateway", ["ip", "addr", "add", address + "/24", "dev", "eth0"], timeout=5, check=True)


def check_pool(lab):
    """Each inside host keeps one pool address across its connections, the two hosts
    get different ones, and inbound connections to an address on the pool's port
    reach the host holding it. Returns {host: address}."""
    held = {}
    with probes.serve_identity(lab, "client", 80):
        for host in ("web1", "web2", "web1", "web2"):
            answers = probes.connect_many(lab, host, "198.51.100.10", 80, count=3)
            assert all(a.ok for a in answers), [a.error for a in answers]
            seen = {a.seen_source_address for a in answers}
            assert len(seen) == 1 and seen <= set(POOL), seen
            assert held.setdefault(host, seen.pop()) in POOL
    assert held["web1"] != held["web2"], held
    assert {held["web1"], held["web2"]} == set(held.values())
    with probes.serve_identity(lab, "web1", 5000), probes.serve_identity(lab, "web2", 5000):
        for host, address in held.items():
            answers = probes.connect_many(lab, "client", address, 5000, count=2)
            assert [a.backend for a in answers] == [host] * 2, [a.error for a in answers]
            assert {a.seen_destination_address for a in answers} == {WEB[host]}
        # a port outside pool_ports is not forwarded
        (outside,) = probes.connect_many(lab, "client", held["web1"], 5001, timeout=0.5)
        assert outside.backend is None
    return held


def test_pool_gives_each_host_its_own_stable_address(gateway, seed_lab):
    add_pool_addresses(seed_lab)
    gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "--pool", ",".join(POOL), "--pool-ports", "5000",
                    "--name", "inside", "-j", "MASQ")
    listing = gateway.masqctl("masq", "-L", "-n").stdout
    assert "pool %s" % ",".join(POOL) in listing and "inbound 5000" in listing
    check_pool(seed_lab)


def test_bad_pool_is_refused_and_changes_nothing(gateway, seed_lab):
    before = gateway.table()
    result = gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "--pool", "198.51.100.2,fd00::2",
                             "-j", "MASQ", check=False)
    assert result.returncode == 1
    assert "entry.pool[1]" in result.stderr and "fd00::2" in result.stderr
    result = gateway.masqctl("masq", "-A", "--helper", "gopher", "-j", "MASQ", check=False)
    assert result.returncode == 1 and "entry.helpers[0]" in result.stderr and "gopher" in result.stderr
    assert gateway.table() == before


# -- active FTP through the masquerading gateway --------------------------------------------

# A minimal active-mode FTP server. Like real servers (pyftpdlib's default, vsftpd's
# port_promiscuous=NO) it refuses a PORT naming another address than the control
# connection's peer: without the ftp helper the masqueraded client's PORT carries its
# inside address, and the transfer fails.
FTP_SERVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 21)); srv.listen(4); srv.settimeout(float(sys.argv[1]))
print("ready", flush=True)
while True:
    try:
        conn, peer = srv.accept()
    except socket.timeout:
        break
    conn.settimeout(5)
    f = conn.makefile("rwb", buffering=0)
    say = lambda text: f.write((text + "\r\n").encode())
    say("220 lab ftp")
    port_to = None
    for raw in f:
        verb, _, arg = raw.decode().strip().partition(" ")
        verb = verb.upper()
        if verb == "USER": say("331 password please")
        elif verb == "PASS": say("230 logged in")
        elif verb == "TYPE": say("200 type set")
        elif verb == "PORT":
            parts = arg.split(",")
            address, port = ".".join(parts[:4]), int(parts[4]) * 256 + int(parts[5])
            if address != peer[0]:
                say("500 Illegal PORT command: %s is not %s" % (address, peer[0])); port_to = None
            else:
                port_to = (address, port); say("200 PORT ok")
        elif verb == "RETR":
            if port_to is None:
                say("425 Use PORT first"); continue
            say("150 opening data connection")
            try:
                data = socket.socket(); data.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                data.bind(("0.0.0.0", 20)); data.settimeout(3); data.connect(port_to)
                data.sendall(b"hello through the helper\r\n"); data.close()
                say("226 transfer complete")
            except OSError as exc:
                say("425 cannot open data connection: %s" % exc)
        elif verb == "QUIT":
            say("221 bye"); break
        else: say("502 not implemented")
    conn.close()
"""

FTP_CLIENT = r"""
import ftplib, json, sys
try:
    ftp = ftplib.FTP(); ftp.connect(sys.argv[1], 21, timeout=4); ftp.login("anonymous", "lab@")
    ftp.set_pasv(False)
    lines = []
    ftp.retrlines("RETR hello.txt", lines.append)
    ftp.quit()
    print(json.dumps({"ok": True, "lines": lines}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}))
"""


def active_ftp(lab):
    server = lab.spawn("client", [PYTHON, "-c", FTP_SERVER, "15"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        result = lab.run("web1", [PYTHON, "-c", FTP_CLIENT, "198.51.100.10"], timeout=20, check=True)
        return json.loads(result.stdout)
    finally:
        server.kill()
        server.wait()


def test_active_ftp_works_with_the_ftp_helper_and_fails_without(gateway, seed_lab):
    gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "--name", "inside", "-j", "MASQ")
    without = active_ftp(seed_lab)
    assert not without["ok"] and "Illegal PORT" in without["error"], without
    gateway.masqctl("masq", "-D", "inside")
    gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "--helper", "ftp", "--name", "inside", "-j", "MASQ")
    assert 'ct helper set "helper_ftp_tcp"' in gateway.table()
    assert "helpers ftp" in gateway.masqctl("masq", "-L", "-n").stdout
    with_helper = active_ftp(seed_lab)
    assert with_helper == {"ok": True, "lines": ["hello through the helper"]}, with_helper


def test_every_helper_loads_in_this_kernel(gateway):
    helpers = "amanda,ftp,h323,irc,netbios-ns,pptp,sane,sip,snmp,tftp"
    gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "--helper", helpers, "--name", "all", "-j", "MASQ")
    table = gateway.table()
    for kind in ("amanda", "ftp", "RAS", "Q.931", "irc", "netbios-ns", "pptp", "sane", "sip", "snmp", "tftp"):
        assert 'type "%s" protocol' % kind in table


# -- the same through Ansible ----------------------------------------------------------------

def static(table):
    """The table without what time changes (remaining times of dynamic elements)."""
    return re.sub(r" expires [0-9hms]+", "", table)


def ansible_env(tmp):
    collections = os.path.join(tmp, "collections", "ansible_collections", "ipmasq")
    os.makedirs(collections)
    os.symlink(REPO, os.path.join(collections, "gateway"))
    home = os.path.join(tmp, "ansible-home")
    return dict(os.environ, PATH=VENV_BIN + ":" + os.environ["PATH"],
                ANSIBLE_COLLECTIONS_PATH=os.path.join(tmp, "collections"),
                ANSIBLE_PYTHON_INTERPRETER=PYTHON, ANSIBLE_HOME=home,
                ANSIBLE_LOCAL_TEMP=os.path.join(home, "tmp"),
                ANSIBLE_REMOTE_TEMP=os.path.join(tmp, "remote-tmp"), ANSIBLE_NOCOLOR="1",
                ANSIBLE_DEPRECATION_WARNINGS="0", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
                # the JSON callback the Ansible tests use (ansible.posix is not installed)
                ANSIBLE_STDOUT_CALLBACK="json_results",
                ANSIBLE_CALLBACK_PLUGINS=os.path.join(REPO, "tests", "ansible", "callback_plugins"))


def playbook(lab, agent, tmp, env, tasks):
    inventory = os.path.join(tmp, "inventory.ini")
    with open(inventory, "w") as handle:
        handle.write("[gateways]\n%s\n[gateways:vars]\nansible_connection=ipmasq.gateway.netns\n"
                     "ansible_python_interpreter=%s\n" % (lab.netns("gateway"), PYTHON))
    path = os.path.join(tmp, "play.yml")
    with open(path, "w") as handle:
        yaml.safe_dump([{"name": "streaming", "hosts": "gateways", "gather_facts": False,
                         "module_defaults": {"group/ipmasq.gateway.masq": {"socket": agent.socket}},
                         "tasks": tasks}], handle, sort_keys=False)
    proc = subprocess.run(["ansible-playbook", "-i", inventory, path], env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    assert "{" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    document = json.loads(proc.stdout[proc.stdout.find("{"):])
    results = [(t["task"]["name"], next(iter(t["hosts"].values())))
               for play in document["plays"] for t in play["tasks"]]
    return proc, dict(results)


STREAMING_TASKS = [
    {"name": "pool", "ipmasq.gateway.masq_masquerade": {
        "config": [{"name": "inside", "source": "10.16.0.0/24", "pool": list(POOL),
                    "pool_ports": [5000], "helpers": ["ftp"]}],
        "state": "overridden"}},
    {"name": "autofw", "ipmasq.gateway.masq_autofw": {
        "config": [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "control_protocol": "tcp",
                    "control_port": 7070, "keyed_by_peer": True, "timeout": 30}],
        "state": "overridden"}},
    {"name": "info", "ipmasq.gateway.masq_info": {}},
]


def test_modules_configure_pool_helpers_and_keyed_autofw(gateway, seed_lab):
    tmp = tempfile.mkdtemp(prefix="masqd-ansible-")
    try:
        env = ansible_env(tmp)
        proc, results = playbook(seed_lab, gateway, tmp, env, STREAMING_TASKS)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert results["pool"]["changed"] and results["autofw"]["changed"]
        assert results["pool"]["after"][0]["pool"] == list(POOL)
        assert results["pool"]["after"][0]["helpers"] == ["ftp"]
        assert "--pool %s" % ",".join(POOL) in results["pool"]["commands"][0]
        assert results["autofw"]["after"][0]["keyed_by_peer"] is True
        assert "--keyed-by-peer" in results["autofw"]["commands"][0]
        # idempotent
        proc, again = playbook(seed_lab, gateway, tmp, env, STREAMING_TASKS)
        assert proc.returncode == 0 and not again["pool"]["changed"] and not again["autofw"]["changed"]
        # and it works with real traffic
        add_pool_addresses(seed_lab)
        check_pool(seed_lab)
        # bad input: field and value named, nothing changed
        before = static(gateway.table())
        bad = [dict(STREAMING_TASKS[0], ignore_errors=True)]
        bad[0]["ipmasq.gateway.masq_masquerade"] = {
            "config": [{"name": "inside", "source": "10.16.0.0/24", "pool": ["198.51.100.2", "10.16.0.300"]}],
            "state": "overridden"}
        proc, refused = playbook(seed_lab, gateway, tmp, env, bad)
        assert refused["pool"]["failed"] and "config[0].pool[1]" in refused["pool"]["msg"]
        assert "10.16.0.300" in refused["pool"]["msg"]
        assert static(gateway.table()) == before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def seen_as(lab, host, count=2):
    with probes.serve_identity(lab, "client", 80):
        answers = probes.connect_many(lab, host, "198.51.100.10", 80, count=count)
    assert all(a.ok for a in answers), [a.error for a in answers]
    return {a.seen_source_address for a in answers}


def test_hosts_keep_their_pool_address_across_a_kill_and_restart(gateway, seed_lab):
    add_pool_addresses(seed_lab)
    gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "--pool", ",".join(POOL), "--pool-ports", "5000",
                    "-j", "MASQ")
    held = {host: seen_as(seed_lab, host) for host in ("web1", "web2")}
    assert held["web1"] != held["web2"] and all(len(v) == 1 for v in held.values()), held
    gateway.stop(sig=9)
    gateway.start()
    # web2 first this time: a fresh round robin would give it web1's address
    assert seen_as(seed_lab, "web2") == held["web2"]
    assert seen_as(seed_lab, "web1") == held["web1"]
    with probes.serve_identity(seed_lab, "web2", 5000):
        (address,) = held["web2"]
        assert [a.backend for a in probes.connect_many(seed_lab, "client", address, 5000, count=2)] == ["web2"] * 2
