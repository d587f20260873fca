"""masq_tables against a real masqd in a throwaway namespace: several tables in one
transaction (one revision), tables not named untouched, idempotence, check mode and
diff, refused input named and nothing changed, check mode before the agent exists."""

import json

import pytest

from ansible_lab import run, write_inventory
import test_masq_modules
from test_masq_modules import SEED, playbook, task

pytestmark = pytest.mark.lab
agent = test_masq_modules.agent  # the fixture: masqd in the gateway namespace

MASQUERADE = [{"name": "inside", "source": "10.16.0.0/24"}]
MARKS = [{"name": "friends", "mark": 1, "source": "203.0.113.0/24"}]


def gathered(tmp_path, env, inventory, socket_path):
    return playbook(tmp_path, env, inventory, [task("g", "masq_tables", state="gathered")], socket_path)[1]["g"]


def test_tables_in_one_transaction_idempotent_and_untouched(tmp_path, ansible_env, netns_pair, agent):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("marks first", "masq_mark", config=MARKS, state="overridden"),
        task("both", "masq_tables", portfw=SEED, masquerade=MASQUERADE),
        task("again", "masq_tables", portfw=SEED, masquerade=MASQUERADE),
    ], agent["socket"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, both, again = results["marks first"], results["both"], results["again"]
    assert both["changed"] is True and both["changed_tables"] == ["portfw", "masquerade"]
    assert both["before"] == {"portfw": [], "masquerade": []}
    # One transaction: the two tables cost one revision.
    assert both["revision"] == first["revision"] + 1
    assert both["after"]["portfw"] == SEED
    assert again["changed"] is False and again["revision"] == both["revision"] and again["commands"] == []
    now = gathered(tmp_path, ansible_env, inventory, agent["socket"])
    assert now["gathered"]["marks"][0]["name"] == "friends", "a table not named is left alone"
    assert [e["name"] for e in now["gathered"]["masquerade"]] == ["inside"]
    ruleset = run(["ip", "netns", "exec", netns_pair["gw"], "nft", "list", "ruleset"]).stdout
    assert "10.16.0.27" in ruleset and "10.16.0.0/24" in ruleset

    # Check mode with diff: reported per table, nothing applied.
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("empty masquerade", "masq_tables", masquerade=[], portfw=SEED)], agent["socket"], "--check", "--diff")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = results["empty masquerade"]
    assert planned["changed"] is True and planned["changed_tables"] == ["masquerade"]
    assert planned["after"]["masquerade"] == [] and planned["nft"]
    assert [d["before_header"] for d in planned["diff"]] == ["masquerade (before)"]
    still = gathered(tmp_path, ansible_env, inventory, agent["socket"])
    assert still["revision"] == both["revision"] and still["gathered"]["masquerade"]


def test_bad_input_is_named_and_changes_nothing(tmp_path, ansible_env, netns_pair, agent):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    bad_portfw = [dict(SEED[0], backends=[{"address": "10.16.0.27", "port": 70000}])]
    bad_address = [dict(SEED[0], local_port=81, backends=[{"address": "10.16.0.999", "port": 80}])]
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("seed", "masq_tables", portfw=SEED),
        task("range", "masq_tables", ignore_errors=True, portfw=bad_portfw, masquerade=MASQUERADE),
        task("agent", "masq_tables", ignore_errors=True, portfw=SEED + bad_address, masquerade=MASQUERADE),
    ], agent["socket"])
    for name, field, value in (("range", "portfw[0].backends[0].port", 70000),
                               ("agent", "portfw[1].backends[0].address", "10.16.0.999")):
        bad = results[name]
        assert bad["failed"] is True, bad
        assert bad["error"]["field"] == field and bad["error"]["value"] == value, bad["error"]
        assert field in bad["msg"] and json.dumps(value) in bad["msg"]
    after = gathered(tmp_path, ansible_env, inventory, agent["socket"])
    assert after["revision"] == results["seed"]["revision"]
    assert after["gathered"]["masquerade"] == [], "the valid table of a refused request is not applied either"


def test_check_mode_before_the_agent_exists(tmp_path, ansible_env, netns_pair):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("planned", "masq_tables", portfw=SEED, masquerade=MASQUERADE)],
        str(tmp_path / "absent.sock"), "--check", "--diff")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = results["planned"]
    assert planned["changed"] is True and planned["changed_tables"] == ["portfw", "masquerade"]
    assert planned["before"] == {"portfw": [], "masquerade": []}
    assert any("not running" in w for w in planned.get("warnings", []))
    # Without check mode it is a clear failure.
    proc, results = playbook(tmp_path, ansible_env, inventory, [
        task("real", "masq_tables", ignore_errors=True, portfw=SEED)], str(tmp_path / "absent.sock"))
    assert results["real"]["failed"] is True and "absent.sock" in results["real"]["msg"]
