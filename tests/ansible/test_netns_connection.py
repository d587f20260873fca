"""The ipmasq.gateway.netns connection plugin runs real modules inside a namespace."""

import json
import textwrap

import pytest

from ansible_lab import host_results, json_output, run, write_inventory

pytestmark = pytest.mark.lab


def ansible(env, inventory, *args, timeout=60):
    return run(["ansible", "all", "-i", inventory] + list(args), env=env, timeout=timeout, check=False)


def test_setup_sees_the_namespace_addresses(tmp_path, ansible_env, netns_pair):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    proc = ansible(ansible_env, inventory, "-m", "ansible.builtin.setup", "-a", "gather_subset=network")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    facts = json_output(proc)["plays"][0]["tasks"][0]["hosts"][netns_pair["gw"]]["ansible_facts"]
    # Only the namespace's own address: not the root namespace's uplink.
    assert facts["ansible_all_ipv4_addresses"] == [netns_pair["gw_address"]]
    assert sorted(facts["ansible_interfaces"]) == ["lo", "veth0"]


def test_command_runs_in_the_namespace_named_by_ansible_netns_name(tmp_path, ansible_env, netns_pair):
    # The inventory host name is not a namespace; the variable names the peer namespace.
    inventory = write_inventory(tmp_path / "inv", ["peer-gateway"], ansible_netns_name=netns_pair["peer"])
    proc = ansible(ansible_env, inventory, "-m", "ansible.builtin.command", "-a", "ip -j addr show dev veth0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json_output(proc)["plays"][0]["tasks"][0]["hosts"]["peer-gateway"]
    links = json.loads(result["stdout"])
    assert [a["local"] for a in links[0]["addr_info"] if a["family"] == "inet"] == [netns_pair["peer_address"]]


def test_ansible_host_names_the_namespace(tmp_path, ansible_env, netns_pair):
    inventory = tmp_path / "inv.yml"
    inventory.write_text(textwrap.dedent("""\
        all:
          hosts:
            gw: {ansible_host: %s}
          vars:
            ansible_connection: ipmasq.gateway.netns
            ansible_python_interpreter: %s
        """ % (netns_pair["gw"], ansible_env["ANSIBLE_PYTHON_INTERPRETER"])))
    proc = ansible(ansible_env, str(inventory), "-m", "ansible.builtin.command", "-a", "ip -4 -o addr show dev veth0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert netns_pair["gw_address"] + "/24" in json_output(proc)["plays"][0]["tasks"][0]["hosts"]["gw"]["stdout"]


@pytest.mark.parametrize("pipelining", ["0", "1"])
def test_copy_puts_the_file_on_the_shared_filesystem(tmp_path, ansible_env, netns_pair, pipelining):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    dest = tmp_path / "copied.txt"
    env = dict(ansible_env, ANSIBLE_PIPELINING=pipelining)
    proc = ansible(env, inventory, "-m", "ansible.builtin.copy", "-a", "content='hello netns\n' dest=%s mode=0644" % dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert dest.read_text() == "hello netns\n"
    again = ansible(env, inventory, "-m", "ansible.builtin.copy", "-a", "content='hello netns\n' dest=%s mode=0644" % dest)
    assert json_output(again)["plays"][0]["tasks"][0]["hosts"][netns_pair["gw"]]["changed"] is False


def test_playbook_with_facts_and_become_reaches_the_peer(tmp_path, ansible_env, netns_pair):
    inventory = write_inventory(tmp_path / "inv", [netns_pair["gw"]])
    playbook = tmp_path / "play.yml"
    playbook.write_text(textwrap.dedent("""\
        - name: Inside the gateway namespace
          hosts: all
          gather_facts: true
          gather_subset: [network]
          tasks:
            - name: Ping the peer over the veth (one packet, bounded)
              ansible.builtin.command: ping -c 1 -W 2 {peer}
              changed_when: false
            - name: Run as root through become (su)
              ansible.builtin.command: id -u
              become: true
              become_method: ansible.builtin.su
              changed_when: false
              register: whoami
            - name: Facts are the namespace's
              ansible.builtin.assert:
                that:
                  - ansible_facts.all_ipv4_addresses == ['{gw}']
                  - whoami.stdout == '0'
        """).format(peer=netns_pair["peer_address"], gw=netns_pair["gw_address"]))
    proc = run(["ansible-playbook", "-i", inventory, str(playbook)], env=ansible_env, timeout=90, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = host_results(json_output(proc), netns_pair["gw"])
    assert [result[0] for result in results] == [
        "Gathering Facts", "Ping the peer over the veth (one packet, bounded)",
        "Run as root through become (su)", "Facts are the namespace's"]
    assert " 0% packet loss" in results[1][1]["stdout"]


def test_a_missing_namespace_fails_clearly(tmp_path, ansible_env, netns_pair):
    missing = netns_pair["prefix"] + "-absent"
    inventory = write_inventory(tmp_path / "inv", [missing])
    proc = ansible(ansible_env, inventory, "-m", "ansible.builtin.command", "-a", "true")
    assert proc.returncode != 0
    assert missing in proc.stdout + proc.stderr
