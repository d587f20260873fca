"""The gateway role over real SSH on booted Debian hosts (systemd as PID 1), per release:
Debian's packages installed by the role's apt task, the hardened Type=notify unit,
real connections forwarded through the host, recovery from SIGKILL, from
`systemctl restart nftables` and from a reboot, idempotence, check mode on a fresh host.

The lab (conftest.gateway_spec): client 198.51.100.10 -- gw 198.51.100.1 / 10.16.0.1 --
server 10.16.0.28, and the controller 10.9.0.1 from which SSH reaches gw at 10.9.0.2.
"""

import pytest

from ipmasq_lab import probes
from ipmasq_lab.lab import Lab

from conftest import ALL, RELEASES, gateway_spec
from hostlab import (PORTFW, ansible_env, changed_tasks, exposure, failures, playbook,
                     role_play, task_result, unit_property, wait_for, write_inventory)

MAX_EXPOSURE = 2.5
# Debian's versions of the agent's libraries, as the role installs them.
DEBIAN_VERSIONS = {"bookworm": {"nftables": "1.0.6", "python3-pyroute2": "0.7.2"},
                   "trixie": {"nftables": "1.1.3", "python3-pyroute2": "0.7.7"}}


class Gateway:
    def __init__(self, lab, tmp, release):
        self.lab = lab
        self.release = release
        self.host = lab.booted("gw")
        self.tmp = tmp
        self.env = ansible_env(tmp)
        self.inventory = write_inventory(tmp / "inventory.yml", lab)

    def role(self, *args, **role_vars):
        return playbook(self.tmp, self.env, self.inventory,
                        role_play(gateway_portfw=PORTFW, **role_vars), *args)

    def connections(self, count=3):
        return probes.connect_many(self.lab, "client", "198.51.100.1", 8080, count=count,
                                   timeout=2.0)

    def forwards(self, count=3):
        results = self.connections(count)
        return [r.backend for r in results] == ["server"] * count and \
            {r.seen_source_address for r in results} == {"198.51.100.10"}


@pytest.fixture(scope="module", params=RELEASES)
def gateway(request, tmp_path_factory):
    """A booted gateway host on which the role has run once (the run is gateway.first)."""
    release = request.param
    lab = Lab(gateway_spec(release))
    lab.up()
    try:
        gw = Gateway(lab, tmp_path_factory.mktemp("hostgw-" + release), release)
        probes.serve_identity(lab, "server", 8080, lifetime=900)
        gw.first_proc, gw.first = gw.role()
        yield gw
    finally:
        lab.down()


def test_first_run_installs_debians_packages_and_starts_the_hardened_unit(gateway):
    assert gateway.first_proc.returncode == 0, failures(gateway.first)
    assert gateway.first["stats"]["gw"]["changed"] > 0
    # The apt path: the role's own task installed Debian's packages on the host.
    assert task_result(gateway.first, "Install nftables and the agent's Python libraries")["changed"]
    versions = dict(line.split() for line in gateway.host.ssh(
        "dpkg-query -W -f '${Package} ${Version}\\n' nftables python3-nftables python3-pyroute2",
        check=True).stdout.splitlines())
    for package, version in DEBIAN_VERSIONS[gateway.release].items():
        assert versions[package].startswith(version), versions
    assert gateway.host.ssh("systemctl is-enabled masqd", check=True).stdout.strip() == "enabled"
    assert unit_property(gateway.host, "ActiveState") == "active"
    assert unit_property(gateway.host, "Type") == "notify"
    # READY=1 came from masqd itself once its socket served (masqd.sdnotify).
    assert unit_property(gateway.host, "StatusText") == "serving /run/masqd/masqd.sock"
    assert unit_property(gateway.host, "NRestarts") == "0"
    assert gateway.host.ssh("cat /proc/sys/net/ipv4/ip_forward", check=True).stdout.strip() == "1"


def test_a_rerun_changes_nothing(gateway):
    proc, document = gateway.role()
    assert proc.returncode == 0, failures(document)
    assert changed_tasks(document) == []


def test_real_connections_are_forwarded_through_the_host(gateway):
    results = gateway.connections(3)
    assert [r.backend for r in results] == ["server"] * 3, [r.error for r in results]
    assert {r.seen_source_address for r in results} == {"198.51.100.10"}
    assert {r.seen_destination_address for r in results} == {"10.16.0.28"}


def test_the_unit_is_hardened_and_masqd_works_under_it(gateway):
    report = gateway.host.ssh("systemd-analyze security --no-pager masqd", check=True).stdout
    assert exposure(report) <= MAX_EXPOSURE, report
    # Everything masqd does still works under the restrictions: its table, its
    # watchers over netlink (conntrack events for AUTOFW, nftables events for drift),
    # its state and its socket.
    status = gateway.host.ssh("masqctl status", check=True).stdout
    assert "watcher:    autofw running" in status, status
    assert "watcher:    ruleset running" in status, status
    assert "portfw:     1 entries" in status, status
    caps = gateway.host.ssh("grep -E '^Cap(Eff|Bnd|Amb)' /proc/$(systemctl show -p MainPID "
                            "--value masqd)/status", check=True).stdout.split()
    net_admin = "%016x" % (1 << 12)
    assert caps == ["CapEff:", net_admin, "CapBnd:", net_admin, "CapAmb:", net_admin]
    errors = gateway.host.ssh("journalctl -b -u masqd -p warning --no-pager -q").stdout
    assert "not running" not in errors, errors


def test_systemd_brings_masqd_back_after_sigkill(gateway):
    before = unit_property(gateway.host, "MainPID")
    gateway.host.ssh("systemctl kill -s KILL masqd", check=True)
    wait_for(lambda: unit_property(gateway.host, "MainPID") not in ("0", before)
             and unit_property(gateway.host, "ActiveState") == "active", 15,
             "masqd active again under a new PID")
    assert unit_property(gateway.host, "NRestarts") == "1"
    assert gateway.forwards()


def test_restarting_nftables_does_not_stop_forwarding_for_long(gateway):
    # Debian's /etc/nftables.conf starts with `flush ruleset`: masqd's table goes with it.
    assert gateway.forwards()
    gateway.host.ssh("systemctl restart nftables", check=True)
    wait_for(lambda: gateway.host.ssh("nft list table inet masqd >/dev/null").returncode == 0,
             10, "table inet masqd repaired after systemctl restart nftables")
    wait_for(gateway.forwards, 10, "forwarding through the host again")
    assert unit_property(gateway.host, "NRestarts") == "1"  # repaired, not restarted


@pytest.mark.skipif(not ALL, reason="reboot tier: MASQD_HOSTS=all (docs/hosts.md)")
def test_after_a_reboot_masqd_is_up_with_its_state_and_forwarding(gateway):
    boot = gateway.host.boot_id()
    gateway.host.reboot()
    assert gateway.host.boot_id() != boot
    wait_for(lambda: unit_property(gateway.host, "ActiveState") == "active", 20, "masqd active")
    # The supervisor cleared the kernel's ruleset and forwarding between the boots:
    # what is there now, the host's own start-up made.
    assert gateway.host.ssh("cat /proc/sys/net/ipv4/ip_forward", check=True).stdout.strip() == "1"
    assert "portfw:     1 entries" in gateway.host.ssh("masqctl status", check=True).stdout
    wait_for(gateway.forwards, 10, "forwarding through the rebooted host")
    proc, document = gateway.role()
    assert proc.returncode == 0, failures(document)
    assert changed_tasks(document) == []


def test_a_changed_agent_file_is_put_back_and_the_unit_restarted(gateway):
    """gateway_agent reports the new file (agent_changed) and the role restarts the
    running unit with it; the sysctl.d file it persists is there."""
    before = unit_property(gateway.host, "MainPID")
    gateway.host.ssh("echo '# local edit' >> /usr/local/lib/masqd/masqd.pyz", check=True)
    proc, document = gateway.role()
    assert proc.returncode == 0, failures(document)
    agent = task_result(document, "Install the agent, set forwarding and reverse path filtering, "
                                  "run it without systemd")
    assert agent["agent_changed"] is True and agent["started"] is False
    assert task_result(document, "Enable and start the masqd unit")["changed"]
    wait_for(lambda: unit_property(gateway.host, "ActiveState") == "active", 15, "masqd active")
    assert unit_property(gateway.host, "MainPID") not in ("0", before)
    assert gateway.host.ssh("grep -qa '# local edit' /usr/local/lib/masqd/masqd.pyz").returncode == 1
    persisted = gateway.host.ssh("cat /etc/sysctl.d/90-ipmasq-gateway.conf", check=True).stdout
    assert "net.ipv4.ip_forward = 1" in persisted and "net.ipv4.conf.*.rp_filter = 1" in persisted
    wait_for(gateway.forwards, 10, "forwarding through the host with the restarted agent")


@pytest.mark.parametrize("release", RELEASES)
def test_check_mode_on_a_fresh_host_then_the_users_tasks_does_not_fail(lab_factory, tmp_path,
                                                                       release):
    """The README's pattern (the role, then masq_* tasks) under --check on a fresh host:
    the role reports what it would do, the modules what they would change."""
    lab = lab_factory(gateway_spec(release))
    gw = Gateway(lab, tmp_path, release)
    plays = [{"name": "README pattern", "hosts": "gateways", "gather_facts": False,
              "roles": ["ipmasq.gateway.gateway"],
              "tasks": [{"name": "The user's PORTFW table",
                         "ipmasq.gateway.masq_portfw": {"config": PORTFW,
                                                        "state": "overridden"}}]}]
    proc, document = playbook(tmp_path, gw.env, gw.inventory, plays, "--check", "--diff")
    assert proc.returncode == 0, failures(document)
    portfw = task_result(document, "The user's PORTFW table")
    assert portfw["changed"] is True
    assert portfw["agent_running"] is False
    assert portfw["before"] == []
    assert [e["local_port"] for e in portfw["after"]] == [8080]
    assert "masqd is not running" in " ".join(portfw.get("warnings", []))
    assert task_result(document, "Install nftables and the agent's Python libraries")["changed"]
    # Nothing was done to the host.
    left = gw.host.ssh("test -e /etc/systemd/system/masqd.service && echo unit; "
                       "dpkg-query -W -f '${Status}\\n' nftables 2>/dev/null | grep -q 'install ok installed'"
                       " && echo nftables; ls /usr/local/sbin").stdout.split()
    assert left == []
