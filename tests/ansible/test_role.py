"""The gateway role (roles/gateway) and the fleet rollout (playbooks/site.yml) against
seed labs' gateways, through the netns connection: idempotence, check mode on a fresh
gateway, the agent running inside the gateway's namespace, a restart when the agent's
files change, and a rollout that stops at the first gateway whose check fails."""

import json
import os
import shutil
import zipfile

import pytest
import yaml

from ansible_lab import REPO, json_output, run

pytestmark = pytest.mark.lab

HAVE_MASQD = os.path.exists(os.path.join(REPO, "masqd", "service.py"))
LAB_INVENTORY = os.path.join(REPO, "inventory", "lab.yml")
ROLE_PLAY = [{"name": "gateway role", "hosts": "gateways", "gather_facts": False,
              "roles": ["ipmasq.gateway.gateway"]}]


@pytest.fixture
def gateway_lab(seed_lab):
    """A seed lab whose gateway has forwarding off (the role must turn it on); the
    role's files under /run/ipmasq-lab/<prefix>/ go with it."""
    if not HAVE_MASQD:
        pytest.skip("masqd/service.py is not there yet")
    seed_lab.set_sysctl("gateway", "net.ipv4.ip_forward", 0)
    yield seed_lab
    run_dir = "/run/ipmasq-lab/%s" % seed_lab.prefix
    seed_lab.down()  # kills the agent with every other process of the lab
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def env(ansible_env):
    return dict(ansible_env, ANSIBLE_PIPELINING="true")


def playbook(tmp_path, env, plays, prefix, *args, inventory=LAB_INVENTORY):
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(plays, sort_keys=False))
    proc = run(["ansible-playbook", "-i", inventory, "-e", "lab_prefix=" + prefix, str(path)] + list(args),
               env=env, timeout=180, check=False)
    return proc, json_output(proc)


def stats(document, host="gateway"):
    return document["stats"][host]


def agent_pid(prefix, host="gateway"):
    with open("/run/ipmasq-lab/%s/%s/masqd.pid" % (prefix, host)) as handle:
        return int(handle.read())


def alive(pid):
    """Running, not a zombie waiting for its reaper (PID 1 reaps the agent late here)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_role_is_idempotent_runs_the_agent_in_the_namespace_and_restarts_it(tmp_path, env, gateway_lab):
    prefix = gateway_lab.prefix
    proc, first = playbook(tmp_path, env, ROLE_PLAY, prefix)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert stats(first)["changed"] > 0

    proc, second = playbook(tmp_path, env, ROLE_PLAY, prefix)
    assert proc.returncode == 0, proc.stdout[-4000:]
    changed = [(task["task"]["name"]) for play in second["plays"] for task in play["tasks"]
               if task["hosts"].get("gateway", {}).get("changed")]
    assert stats(second)["changed"] == 0, changed

    pid = agent_pid(prefix)
    with open("/proc/%d/cmdline" % pid, "rb") as handle:
        argv = handle.read().split(b"\0")
    # The interpreter runs the executable zip application through its masqd link.
    assert argv[1].endswith(b"/bin/masqd"), argv
    # Same network namespace inode as the gateway's: the agent programs that namespace.
    assert os.stat("/proc/%d/ns/net" % pid).st_ino == os.stat("/run/netns/%s-gateway" % prefix).st_ino
    assert gateway_lab.sysctl("gateway", "net.ipv4.ip_forward") == "1"
    listing = gateway_lab.run("gateway", ["nft", "list", "table", "inet", "masqd"], timeout=10)
    assert listing.returncode == 0, listing.stderr
    # ... and not in the client's namespace (nor anywhere else of the lab).
    assert gateway_lab.run("client", ["nft", "list", "table", "inet", "masqd"], timeout=10).returncode != 0

    # A changed agent (one zip application of masqd/) is put back and the agent
    # restarted (the handler).
    before = agent_pid(prefix)
    deployed = "/run/ipmasq-lab/%s/gateway/lib/masqd.pyz" % prefix
    with zipfile.ZipFile(deployed) as archive, open(os.path.join(REPO, "masqd", "daemon.py"), "rb") as source:
        assert archive.read("masqd/daemon.py") == source.read()
    with open(deployed, "rb") as handle:
        shipped = handle.read()
    with open(deployed, "ab") as handle:
        handle.write(b"# local edit\n")

    proc, _document = playbook(tmp_path, env, ROLE_PLAY, prefix)
    assert proc.returncode == 0, proc.stdout[-4000:]
    after = agent_pid(prefix)
    assert after != before
    assert not alive(before)
    with open(deployed, "rb") as handle:
        assert handle.read() == shipped
    # The restarted agent answers.
    status = gateway_lab.run("gateway", [os.path.dirname(deployed) + "/../bin/masqctl", "--socket",
                                         "/run/ipmasq-lab/%s/gateway/masqd.sock" % prefix, "--json", "status"],
                             timeout=10)
    assert status.returncode == 0, status.stderr
    assert "revision" in json.dumps(json.loads(status.stdout))


def test_check_mode_on_a_fresh_gateway_changes_nothing(tmp_path, env, gateway_lab):
    prefix = gateway_lab.prefix
    plays = [dict(ROLE_PLAY[0], vars={"gateway_portfw": [
        {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
         "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15}]}]})]
    proc, document = playbook(tmp_path, env, plays, prefix, "--check", "--diff")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert stats(document)["failures"] == 0
    assert stats(document)["changed"] > 0  # it reports what it would do
    assert not os.path.exists("/run/ipmasq-lab/%s/gateway" % prefix)
    assert gateway_lab.sysctl("gateway", "net.ipv4.ip_forward") == "0"


def test_rollout_stops_at_the_first_gateway_whose_check_fails(tmp_path, env, lab_factory):
    """Two gateways in two labs, one a batch: the first one's PORTFW backend does not
    answer, so its post-change check fails and the second gateway is never touched."""
    if not HAVE_MASQD:
        pytest.skip("masqd/service.py is not there yet")
    labs = [lab_factory("seed"), lab_factory("seed")]
    try:
        gateway_vars = yaml.safe_load(open(LAB_INVENTORY))["all"]["children"]["lab"]["children"]["gateways"]["vars"]
        hosts = {}
        for name, lab in zip(("gwa", "gwb"), labs):
            hosts[name] = {"ansible_host": lab.netns("gateway"),
                           "lab_run_dir": "/run/ipmasq-lab/%s/gateway" % lab.prefix}
        inventory = {"all": {"children": {"gateways": {"hosts": hosts, "vars": dict(gateway_vars, **{
            "ansible_connection": "ipmasq.gateway.netns",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "rollout_check_timeout": 2,
            "gateway_portfw": [{"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
                                "backends": [{"address": "10.16.0.27", "port": 80}]}]})}}}}
        inventory_path = tmp_path / "fleet.yml"
        inventory_path.write_text(yaml.safe_dump(inventory))
        proc = run(["ansible-playbook", "-i", str(inventory_path), "-e", '{"rollout_serial": 1}',
                    os.path.join(REPO, "playbooks", "site.yml")], env=env, timeout=180, check=False)
        document = json_output(proc)
        assert proc.returncode != 0
        assert document["stats"]["gwa"]["failures"] == 1
        assert "gwb" not in document["stats"]
        assert not os.path.exists("/run/ipmasq-lab/%s/gateway/masqd.pid" % labs[1].prefix)
    finally:
        for lab in labs:
            lab.down()
            shutil.rmtree("/run/ipmasq-lab/%s" % lab.prefix, ignore_errors=True)
