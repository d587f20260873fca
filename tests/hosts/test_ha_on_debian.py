"""The HA pair on booted Debian hosts: playbooks/ha.yml over real SSH installs Debian's
keepalived and conntrackd with the role's apt task and runs them as Debian's systemd
units with the collection's configuration; the master's death (all its links down)
moves the virtual addresses, and the established flows survive on the backup because
conntrackd carried their conntrack entries (NAT included).

The lab is the `ha` topology (ipmasq_lab/topologies/ha.yml) with gw1 and gw2 booted
(kind: debian); SSH goes from the client's namespace over the outside bridge.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from ipmasq_lab.lab import Lab

from hostlab import REPO, VENV_BIN, ansible_env, wait_for

sys.path.insert(0, os.path.join(REPO, "tests", "lab"))
import ha_pair as hp  # noqa: E402  # the flows, servers and VIP helpers of tests/lab/test_ha.py

RELEASE = "bookworm"
TCP_FLOWS = 20
UNITS = ("masqd", "keepalived", "conntrackd")
PAIR = {"gw1": (150, "10.99.0.1/30"), "gw2": (100, "10.99.0.2/30")}


def ha_spec():
    with open(os.path.join(REPO, "ipmasq_lab", "topologies", "ha.yml"), encoding="utf-8") as handle:
        spec = yaml.safe_load(handle)
    spec["name"] = "hostha"
    for gw in PAIR:
        spec["hosts"][gw].update({"kind": "debian", "release": RELEASE, "controller": "client"})
    return spec


def inventory(lab, path):
    """ha_pair over SSH with the role's defaults (systemd, Debian's packages and paths);
    the tables and HA settings of inventory/ha.yml."""
    with open(os.path.join(REPO, "inventory", "ha.yml"), encoding="utf-8") as handle:
        lab_vars = yaml.safe_load(handle)["all"]["children"]["ha_pair"]["vars"]
    keep = ("gateway_rp_filter", "gateway_ha_router_id", "gateway_ha_sync_interface",
            "gateway_ha_virtual_addresses", "gateway_ha_advert_interval",
            "gateway_ha_preempt_delay", "gateway_portfw")
    hosts = {}
    for gw, (priority, sync) in PAIR.items():
        hosts[gw] = dict(lab.booted(gw).ansible_vars(), gateway_ha_priority=priority,
                         gateway_ha_sync_address=sync)
    doc = {"all": {"children": {"ha_pair": {"hosts": hosts, "vars": {k: lab_vars[k] for k in keep}}}}}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def converge(tmp, env, inventory_path, timeout=900):
    proc = subprocess.run(
        [os.path.join(VENV_BIN, "ansible-playbook"), "-i", inventory_path,
         os.path.join(REPO, "playbooks", "ha.yml")],
        env=env, capture_output=True, text=True, timeout=timeout, check=False)
    text = proc.stdout
    document = json.loads(text[text.find("{"):]) if "{" in text else None
    failed = [(task["task"]["name"], host, result.get("msg"), result.get("stderr"))
              for play in (document or {}).get("plays", []) for task in play["tasks"]
              for host, result in task["hosts"].items() if result.get("failed")]
    assert proc.returncode == 0, "playbooks/ha.yml failed: %s\n%s" % (failed or text[-6000:], proc.stderr[-3000:])
    return document


def changed(document):
    return sorted({task["task"]["name"] for play in document["plays"] for task in play["tasks"]
                   for result in task["hosts"].values() if result.get("changed")})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    lab = Lab(ha_spec())
    lab.up()
    try:
        tmp = tmp_path_factory.mktemp("hostha")
        env = ansible_env(tmp)
        path = inventory(lab, tmp / "inventory.yml")
        first = converge(tmp, env, path)
        yield {"lab": lab, "tmp": tmp, "env": env, "inventory": path, "first": first}
    finally:
        lab.down()


def test_the_pair_runs_debians_units_with_the_collections_configuration(pair):
    lab = pair["lab"]
    assert pair["first"] is not None and changed(pair["first"])
    for gw in PAIR:
        host = lab.booted(gw)
        for unit in UNITS:
            state = host.ssh("systemctl is-active %s; systemctl is-enabled %s" % (unit, unit)).stdout.split()
            assert state == ["active", "enabled"], (gw, unit, state)
        # Debian's packages (the role's apt task), Debian's unit files, our configuration.
        packages = host.ssh("dpkg-query -W -f '${Package} ${Status}\\n' keepalived conntrackd",
                            check=True).stdout
        assert packages.count("install ok installed") == 2, packages
        fragment = host.ssh("systemctl show -p FragmentPath --value keepalived conntrackd",
                            check=True).stdout.split()
        assert fragment == ["/lib/systemd/system/keepalived.service",
                            "/lib/systemd/system/conntrackd.service"], fragment
        conf = host.ssh("cat /etc/keepalived/keepalived.conf", check=True).stdout
        assert "virtual_router_id 51" in conf and "vrrp_version 3" in conf
        assert "10.99.0." in host.ssh("cat /etc/conntrackd/conntrackd.conf", check=True).stdout
    wait_for(lambda: hp.master(lab) == "gw1", 20, "gw1 (priority 150) the only master")


def test_a_rerun_changes_nothing(pair):
    document = converge(pair["tmp"], pair["env"], pair["inventory"])
    assert changed(document) == []


def test_flows_survive_the_masters_death_and_the_backup_takes_new_connections(pair):
    lab = pair["lab"]
    wait_for(lambda: hp.master(lab) == "gw1", 20, "gw1 the only master")
    servers = hp.start_servers(lab)
    try:
        flows = hp.Flows(lab, TCP_FLOWS, seconds=60)
        time.sleep(2.0)  # conntrackd has sent the flows' entries to gw2
        t_dead = time.monotonic()
        hp.set_links(lab, "gw1", up=False)  # a dead box: every link of the master down
        try:
            hp.wait_master(lab, "gw2", timeout=15)
            prober = hp.Prober(lab, seconds=10)
            time.sleep(3.0)
            attempts = prober.finish(timeout=20)
            summary = flows.finish()
        finally:
            hp.set_links(lab, "gw1", up=True)
        took_over = time.monotonic() - t_dead
        survivors = hp.tcp_survivors(summary)
        assert survivors == TCP_FLOWS, (survivors, summary["tcp"][:3])
        assert any(ok for _start, _end, ok, _backend in attempts), attempts[:5]
        assert took_over < 30
        # keepalived's notify script (Debian's unit runs it) logged gw2's transition
        # and drove its conntrackd: the commit of the external cache did not fail.
        log = lab.booted("gw2").ssh("cat /var/log/ha-notify.log", check=True).stdout
        assert " master begin" in log and "conntrackd -c failed" not in log, log
    finally:
        for server in servers:
            server.kill()
            server.wait(5)
