"""The booted-host kind of the lab harness: a Debian system with systemd as PID 1 in
its own lab namespace, reached over real SSH, gone after teardown on every path."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ipmasq_lab import booted_host, registry
from ipmasq_lab.errors import LabError
from ipmasq_lab.lab import Lab

from conftest import RELEASES, gateway_spec

NFT_VERSIONS = {"bookworm": "1.0.6", "trixie": "1.1.3"}
SYSTEMD_VERSIONS = {"bookworm": "252", "trixie": "257"}


def leftovers(prefix, records):
    """What of a lab still exists: namespaces, supervisors, root copies, registry record."""
    found = []
    found += [ns for ns in os.listdir("/run/netns") if ns.startswith(prefix + "-")]
    for rec in records.values():
        if os.path.lexists(rec["copy"]):
            found.append(rec["copy"])
        marker = "%s %s" % (booted_host.SUPERVISOR_NAME, rec["machine"])
        if booted_host._alive(rec["supervisor_pid"], marker):
            found.append("supervisor %d" % rec["supervisor_pid"])
    if registry.read(prefix) is not None:
        found.append("registry record")
    return found


@pytest.mark.parametrize("release", RELEASES)
def test_a_booted_host_runs_systemd_is_reached_over_ssh_and_has_only_lab_links(lab_factory, release):
    lab = lab_factory(gateway_spec(release))
    gw = lab.booted("gw")
    out = gw.ssh("ps -o comm= -p 1; systemctl is-system-running; systemctl --version | head -1;"
                 " cat /etc/debian_version; ls /var/cache/apt/archives", check=True).stdout.split()
    assert out[0] == "systemd"
    assert out[1] in ("running", "degraded"), gw.ssh("systemctl --failed").stdout
    assert out[2:4] == ["systemd", SYSTEMD_VERSIONS[release]]
    assert out[5].startswith({"bookworm": "12.", "trixie": "13."}[release])
    # The role's packages wait in apt's cache (the role installs them; no route out).
    assert any(name.startswith("nftables_" + NFT_VERSIONS[release]) for name in out[6:]), out[6:]
    assert gw.ssh("command -v nft").returncode != 0
    # Its links are the lab's veths and nothing else; no route out of the lab.
    links = json.loads(gw.ssh("ip -j link show", check=True).stdout)
    assert sorted(link["ifname"] for link in links) == ["eth0", "eth1", "eth2", "lo"]
    assert all(link.get("link_type") in ("loopback", "ether") for link in links)
    routes = json.loads(gw.ssh("ip -j route show; ", check=True).stdout)
    assert all(r["dst"] != "default" for r in routes)
    assert gw.ssh("ip -6 route show default", check=True).stdout.strip() == ""
    # The host sees its lab namespace: the same interfaces as the machine sees there.
    assert lab.addresses("gw")["eth1"] == ["198.51.100.1/24"]
    record = registry.read(lab.prefix)["booted"]
    assert os.path.isdir(record["gw"]["copy"])
    lab.down()
    assert leftovers(lab.prefix, record) == []


def test_a_boot_that_misses_its_timeout_is_torn_down_with_a_clear_error(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # A zero budget: fast machines boot the cached root in under a second.
    monkeypatch.setattr(booted_host, "BOOT_TIMEOUT", 0)
    lab = Lab(gateway_spec("bookworm"))
    with pytest.raises(LabError, match=r"gw \(Debian bookworm\) not reachable over SSH at "
                                       r"10\.9\.0\.2 within 0 s"):
        lab.up()
    # up() recorded the host before it existed, so down() found it.
    assert [ns for ns in os.listdir("/run/netns") if ns.startswith(lab.prefix + "-")] == []
    assert not os.path.lexists(os.path.join(booted_host.HOSTS_DIR, lab.prefix + "-gw"))
    assert registry.read(lab.prefix) is None


OWNER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[2])
    from conftest import gateway_spec
    from ipmasq_lab.lab import Lab
    with Lab(gateway_spec("bookworm")) as lab:
        print(lab.prefix, flush=True)
        time.sleep(120)
""")


def start_owner(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    proc = subprocess.Popen([sys.executable, str(script), "x", os.path.dirname(__file__)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    prefix = proc.stdout.readline().strip()
    assert prefix, "the owner process did not bring its lab up"
    record = registry.read(prefix)["booted"]
    return proc, prefix, record


def test_ctrl_c_in_the_owner_stops_the_host_and_removes_its_copy(tmp_path):
    proc, prefix, record = start_owner(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        assert leftovers(prefix, record) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ipmasq-lab"), "down",
                        prefix], check=False, capture_output=True, timeout=120)


def test_a_killed_owner_leaves_a_host_that_ipmasq_lab_down_removes(tmp_path):
    proc, prefix, record = start_owner(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    time.sleep(0.2)
    assert record["gw"]["copy"] in leftovers(prefix, record)  # nothing tore it down
    down = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ipmasq-lab"), "down",
                           prefix], capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert leftovers(prefix, record) == []
