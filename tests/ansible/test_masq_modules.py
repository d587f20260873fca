"""The masq_* modules against a real masqd in a throwaway namespace, through the
netns connection: idempotence, check mode, diff, refused input, forced scheduling."""

import json
import os
import signal
import time

import pytest
import yaml

from ansible_lab import PYTHON, REPO, host_results, json_output, run, write_inventory

pytestmark = pytest.mark.lab

MASQD = os.path.join(os.path.dirname(PYTHON), "masqd")
HAVE_MASQD = os.path.exists(os.path.join(REPO, "masqd", "service.py"))


@pytest.fixture
def agent(tmp_path, netns_pair):
    """masqd running inside the gateway namespace, on a socket in tmp."""
    if not HAVE_MASQD:
        pytest.skip("masqd/service.py is not there yet")
    from ipmasq_lab import nsexec

    socket_path = str(tmp_path / "masqd.sock")
    log = open(tmp_path / "masqd.log", "w")
    proc = nsexec.popen(netns_pair["gw"], [MASQD, "--state-dir", str(tmp_path / "state"), "--socket", socket_path],
                        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(socket_path):
            assert proc.poll() is None, "masqd exited: %s" % (tmp_path / "masqd.log").read_text()
            assert time.monotonic() < deadline, "masqd did not listen within 15 s"
            time.sleep(0.05)
        yield {"socket": socket_path, "netns": netns_pair["gw"], "proc": proc}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def playbook(tmp_path, env, inventory, tasks, socket_path, *args):
    """Run `tasks` with module_defaults pointing the masq action group at the socket;
    returns the process and {task name: result}."""
    path = tmp_path / ("play-%d.yml" % time.monotonic_ns())
    play = {"name": "masq modules", "hosts": "all", "gather_facts": False,
            "module_defaults": {"group/ipmasq.gateway.masq": {"socket": socket_path}}, "tasks": tasks}
    path.write_text(yaml.safe_dump([play], sort_keys=False))
    proc = run(["ansible-playbook", "-i", inventory, str(path)] + list(args), env=env, timeout=120, check=False)
    document = json_output(proc)
    return proc, dict(host_results(document, next(iter(document["stats"]))))


def task(name, module, check_mode=None, ignore_errors=None, **params):
    out = {"name": name, "ipmasq.gateway." + module: params}
    if check_mode is not None:
        out["check_mode"] = check_mode
    if ignore_errors is not None:
        out["ignore_errors"] = ignore_errors
    return out


def backends(*triples):
    return [{"address": a, "port": p, "pref": pref} for a, p, pref in triples]


def web(*triples, local_port=80):
    return [{"protocol": "tcp", "local_address": "198.51.100.1", "local_port": local_port,
             "backends": backends(*triples)}]


SEED = web(("10.16.0.27", 80, 15), ("10.16.0.28", 80, 5))
SEED_TABLE = SEED


def gather(tmp_path, env, inventory, socket_path):
    results = playbook(tmp_path, env, inventory, [task("gather", "masq_portfw", state="gathered")], socket_path)[1]
    return results["gather"]


def test_portfw_lifecycle(tmp_path, ansible_env, netns_pair, agent):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("first", "masq_portfw", config=SEED, state="overridden"),
        task("again", "masq_portfw", config=SEED, state="overridden"),
        task("same keys merged", "masq_portfw", config=SEED),
    ], agent["socket"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, again, merged = results["first"], results["again"], results["same keys merged"]
    assert first["changed"] is True
    assert first["before"] == [] and first["after"] == SEED_TABLE
    assert first["commands"] == ["portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15",
                                 "portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5"]
    assert again["changed"] is False and again["commands"] == []
    assert again["revision"] == first["revision"]
    assert merged["changed"] is False
    # The kernel holds it: the namespace's ruleset names both backends.
    ruleset = run(["ip", "netns", "exec", netns_pair["gw"], "nft", "list", "ruleset"]).stdout
    assert "10.16.0.27" in ruleset and "10.16.0.28" in ruleset

    # Check mode reports the change and changes nothing; diff shows before/after.
    round_robin = web(("10.16.0.27", 80, 1), ("10.16.0.28", 80, 1))
    proc, results = playbook(tmp_path, ansible_env, inventory, [task("round robin", "masq_portfw", config=round_robin)],
                             agent["socket"], "--check", "--diff")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = results["round robin"]
    assert planned["changed"] is True and planned["after"] == round_robin
    assert "pref: 15" in planned["diff"]["before"] and "pref: 15" not in planned["diff"]["after"]
    still = gather(tmp_path, ansible_env, inventory, agent["socket"])
    assert still["gathered"] == SEED_TABLE and still["revision"] == first["revision"]

    # A change for real, with --diff.
    proc, results = playbook(tmp_path, ansible_env, inventory,
                             [task("weights", "masq_portfw", config=web(("10.16.0.28", 80, 5)))],
                             agent["socket"], "--diff")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    applied = results["weights"]
    assert applied["changed"] is True and applied["revision"] > first["revision"]
    assert "10.16.0.27" in applied["diff"]["before"] and "10.16.0.27" not in applied["diff"]["after"]
    assert applied["commands"] == ["portfw -d -P tcp -L 198.51.100.1 80",
                                   "portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5"]


@pytest.mark.parametrize("address, port, field, value", [
    ("10.16.0.27", 70000, "config[0].backends[0].port", 70000),
    ("10.16.0.999", 80, "config[0].backends[0].address", "10.16.0.999"),
])
def test_bad_input_names_field_and_value_and_changes_nothing(
        tmp_path, ansible_env, netns_pair, agent, address, port, field, value):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("seed", "masq_portfw", config=SEED, state="overridden"),
        task("bad", "masq_portfw", ignore_errors=True, config=web((address, port, 10), local_port=81)),
    ], agent["socket"])
    bad = results["bad"]
    assert bad["failed"] is True
    assert bad["error"]["field"] == field and bad["error"]["value"] == value
    assert field in bad["msg"] and json.dumps(value) in bad["msg"]
    after = gather(tmp_path, ansible_env, inventory, agent["socket"])
    assert after["gathered"] == SEED_TABLE and after["revision"] == results["seed"]["revision"]


def heads(table):
    return [b["address"] for b in table[0]["backends"]]


def test_mfw_schedule_and_info(tmp_path, ansible_env, netns_pair, agent):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("failover pair", "masq_mfw", state="overridden", config=[
            {"mark": 7, "backends": backends(("10.16.0.10", 443, 0), ("10.16.0.11", 443, 0))}]),
        task("planned schedule", "masq_mfw", check_mode=True, schedule=7),
        task("schedule", "masq_mfw", schedule=7),
        task("info", "masq_info", gather_subset=["status", "mfw"]),
    ], agent["socket"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned, scheduled, info = results["planned schedule"], results["schedule"], results["info"]
    assert planned["changed"] is True and heads(planned["after"]) == ["10.16.0.11", "10.16.0.10"]
    assert planned["revision"] == results["failover pair"]["revision"]  # check mode wrote nothing
    assert scheduled["changed"] is True and heads(scheduled["before"]) == ["10.16.0.10", "10.16.0.11"]
    assert heads(scheduled["after"]) == ["10.16.0.11", "10.16.0.10"]
    # masq_info keeps the configured order and flags the runtime head.
    assert heads(info["mfw"]) == ["10.16.0.10", "10.16.0.11"]
    assert [b["head"] for b in info["mfw"][0]["backends"]] == [False, True]
    assert set(info["mfw"][0]["backends"][0]) >= {"address", "port", "pref", "pcnt", "connections", "head"}
    assert info["status"]["tables"]["mfw"] == 1 and "portfw" not in info


def test_agent_not_running_is_a_clear_message(tmp_path, ansible_env, netns_pair):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    socket_path = str(tmp_path / "absent.sock")
    proc, results = playbook(tmp_path, ansible_env, inventory, [task("no agent", "masq_portfw", state="gathered")],
                             socket_path)
    assert proc.returncode != 0
    assert results["no agent"]["msg"] == (
        "masqd is not running at %s: apply the ipmasq.gateway.gateway role to install and start it" % socket_path)


def test_masq_info_reports_a_repaired_drift(tmp_path, ansible_env, netns_pair, agent):
    from ipmasq_lab import nsexec

    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    proc, _results = playbook(tmp_path, ansible_env, inventory, [
        task("seed", "masq_portfw", state="overridden", config=SEED)], agent["socket"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nsexec.run(netns_pair["gw"], ["nft", "delete", "table", "inet", "masqd"], timeout=10, check=True)
    deadline = time.monotonic() + 2
    while nsexec.run(netns_pair["gw"], ["nft", "list", "table", "inet", "masqd"], timeout=10).returncode != 0:
        assert time.monotonic() < deadline, "table not repaired within 2 s"
        time.sleep(0.05)
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("info", "masq_info", gather_subset=["status"]),
        task("seed again", "masq_portfw", state="overridden", config=SEED)], agent["socket"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    drift = results["info"]["status"]["drift"]
    assert drift["count"] == 1 and drift["last"]["result"] == "repaired", drift
    assert drift["last"]["found"].startswith("delete table inet masqd")
    assert results["info"]["status"]["watchers"]["ruleset"]["running"] is True
    assert results["seed again"]["changed"] is False  # the repair restored what the state says
