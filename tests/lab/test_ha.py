"""HA gateway pair (issue 13, docs/ha.md): playbooks/ha.yml converges two gateways in an
`ha` lab (keepalived VRRPv3 with 100 ms adverts, conntrackd FTFW on sync0), then real
flows from the client through the outside VIP to a PORTFW service (round robin over
web1/web2) live through the failures an operator meets.

Default run (~2 min, most of it the playbook): bad input is refused before anything
changes; the master loses all its links and comes back (one failover, one failback)
with a few TCP flows and a UDP stream. The other failure modes run with
IPMASQ_HA_LONG=1 (another ~3 min):

    IPMASQ_HA_LONG=1 .venv/bin/pytest tests/lab/test_ha.py -q

The 100-flow numbers are bench/ha.py's (python -m bench.run --only ha).
"""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import ha_pair as hp  # noqa: E402

from ipmasq_lab.lab import Lab  # noqa: E402

pytestmark = pytest.mark.lab
LONG = os.environ.get("IPMASQ_HA_LONG") == "1"
long_only = pytest.mark.skipif(not LONG, reason="set IPMASQ_HA_LONG=1 for every HA failure mode")

TCP_FLOWS, UDP_RATE = 4, 100


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("namespace labs need root")


@pytest.fixture(scope="module")
def pair():
    """An ha lab, converged once, with echo servers on web1 and web2."""
    _need_root()
    with Lab("ha") as lab:
        hp.converge(lab)
        hp.wait_master(lab, "gw1")
        hp.start_servers(lab)
        yield lab


def _healthy(lab):
    """Both gateways converged, gw1 master, gw2 backup, and settled: no notify script
    has run for 2 s, so the last transition's conntrackd resync is done (what each
    test starts from; a pair that just failed back has flushed its caches)."""
    for host in hp.GATEWAYS:
        hp.set_links(lab, host, True)
    hp.wait_master(lab, "gw1", timeout=20)
    deadline, last, since = time.monotonic() + 20, None, time.monotonic()
    while time.monotonic() < deadline:
        logged = [len(hp.notify_log(lab, host)) for host in hp.GATEWAYS]
        if logged != last:
            last, since = logged, time.monotonic()
        elif time.monotonic() - since >= 2.0:
            break
        time.sleep(0.2)
    assert hp.master(lab) == "gw1"


def _new_connection_time(lab, act):
    """Run `act` (which breaks something) with the prober running: seconds from the start
    of `act` to the first new connection that worked, started after `act` returned."""
    prober = hp.Prober(lab, seconds=20)
    time.sleep(0.3)
    t_start = time.monotonic()
    act()
    t_done = time.monotonic()
    time.sleep(2.5)
    attempts = prober.finish()
    ok = [end for start, end, good, _backend in attempts if good and start >= t_done]
    return round(min(ok) - t_start, 3) if ok else None


def test_bad_input_is_refused_before_anything_changes():
    _need_root()
    with Lab("ha") as lab:
        with pytest.raises(AssertionError) as failed:
            hp.converge(lab, extra={"gateway_ha_router_id": 300}, timeout=120)
        assert "gateway_ha_router_id (VRRP virtual router id 1-255) is" in str(failed.value)
        assert " 300;" in str(failed.value)
        for host in hp.GATEWAYS:
            assert not os.path.exists(os.path.join(hp.run_dir(lab, host), "lib")), \
                "the agent was installed before the HA check"
            assert not os.path.exists(os.path.join(hp.run_dir(lab, host), "ha"))
        with pytest.raises(AssertionError) as failed:
            hp.converge(lab, extra={"gateway_ha_virtual_addresses": [
                {"address": "198.51.100.1", "interface": "eth0"}]}, timeout=120)
        assert "gateway_ha_virtual_addresses[0]" in str(failed.value)
        assert "198.51.100.1" in str(failed.value)


def test_configuration_is_vrrp3_subsecond_and_per_host(pair):
    for host in hp.GATEWAYS:
        ha_dir = os.path.join(hp.run_dir(pair, host), "ha")
        with open(os.path.join(ha_dir, "keepalived.conf"), encoding="utf-8") as handle:
            conf = handle.read()
        assert "vrrp_version 3" in conf and "advert_int 0.1" in conf
        with open(os.path.join(ha_dir, "conntrackd.conf"), encoding="utf-8") as handle:
            conf = handle.read()
        assert "Mode FTFW" in conf and "Interface sync0" in conf
        for name in ("keepalived.pid", "keepalived-vrrp.pid", "conntrackd.pid", "conntrackd.lock",
                     "conntrackd.ctl", "conntrackd.log"):
            assert os.path.exists(os.path.join(ha_dir, name)), name
    assert hp.transitions(pair, "gw1")[-1] == "master"
    assert hp.transitions(pair, "gw2")[-1] == "backup"


def test_master_dies_and_comes_back_flows_survive_both_ways(pair):
    _healthy(pair)
    flows = hp.Flows(pair, TCP_FLOWS, UDP_RATE, seconds=90)
    try:
        time.sleep(1.0)
        # conntrackd carried the flows to the backup's external cache before anything broke
        assert hp.external_cache_size(pair, "gw2") >= TCP_FLOWS + 1
        took = _new_connection_time(pair, lambda: hp.set_links(pair, "gw1", False))
        assert hp.master(pair) == "gw2"
        assert took is not None and took < 1.0, took
        assert hp.transitions(pair, "gw2")[-1] == "master"
        # the old master returns: backup first (resync from gw2), then one failback after
        # the 3 s preemption delay, and no more transitions
        hp.set_links(pair, "gw1", True)
        hp.wait_master(pair, "gw1", timeout=20)
        time.sleep(2.0)
        assert hp.master(pair) == "gw1"
        assert hp.transitions(pair, "gw1")[-3:] == ["fault", "backup", "master"]
    finally:
        summary = flows.finish()
    assert hp.tcp_survivors(summary) == TCP_FLOWS, summary["tcp"]
    udp = summary["udp"]
    assert udp["lost"] <= udp["rate"] * 1.0, udp   # at most 1 s worth of datagrams
    for host in hp.GATEWAYS:
        assert not any("failed" in word for _t, _state, word in hp.notify_log(pair, host)), \
            hp.notify_log(pair, host)


@long_only
def test_master_keepalived_killed(pair):
    """SIGKILL to keepalived (parent and VRRP child): no clean shutdown, so the dead
    master keeps the addresses while the backup takes them too; flows survive, and a
    restarted keepalived (the role's next run; systemd's Restart= on real hosts) drops
    the stale addresses at once and takes over again after the preemption delay."""
    _healthy(pair)
    flows = hp.Flows(pair, TCP_FLOWS, UDP_RATE, seconds=200)
    try:
        time.sleep(1.0)
        took = _new_connection_time(pair, lambda: hp.kill_keepalived(pair, "gw1"))
        assert took is not None and took < 1.0, took
        assert hp.transitions(pair, "gw2")[-1] == "master"
        assert hp.holds_vip(pair, "gw1"), "documented: a SIGKILLed keepalived leaves its addresses"
        hp.restart_keepalived(pair, "gw1")
        hp.wait_master(pair, "gw1", timeout=20)
    finally:
        summary = flows.finish()
    assert hp.tcp_survivors(summary) == TCP_FLOWS, summary["tcp"]
    assert summary["udp"]["lost"] <= summary["udp"]["rate"], summary["udp"]


@long_only
def test_master_masqd_killed_kernel_keeps_forwarding(pair):
    """masqd is not in the data path: its table stays in the kernel, keepalived does not
    fail over, flows and new connections go on through the master."""
    _healthy(pair)
    flows = hp.Flows(pair, TCP_FLOWS, UDP_RATE, seconds=60)
    try:
        time.sleep(1.0)
        before = hp.transitions(pair, "gw1")
        took = _new_connection_time(pair, lambda: hp.kill_masqd(pair, "gw1"))
        assert took is not None and took < 0.5, took
        assert hp.master(pair) == "gw1" and hp.transitions(pair, "gw1") == before
        tables = pair.run("gw1", ["nft", "list", "tables"], check=True).stdout
        assert "inet masqd" in tables
    finally:
        summary = flows.finish()
        hp.converge(pair)  # the role starts the agent again
    assert hp.tcp_survivors(summary) == TCP_FLOWS, summary["tcp"]
    assert summary["udp"]["lost"] == 0, summary["udp"]


@long_only
def test_sync_link_down_no_split_brain_then_resync(pair):
    """VRRP never runs over sync0, so losing it changes no roles (no split brain); flows
    opened meanwhile are not replicated until the link is back, when conntrackd's FTFW
    catches up; then a failover carries them too."""
    _healthy(pair)
    hp.sync_link(pair, "gw1", False)
    try:
        time.sleep(1.0)
        assert hp.master(pair) == "gw1"
        flows = hp.Flows(pair, TCP_FLOWS, UDP_RATE, seconds=90)
        time.sleep(1.0)
        assert hp.master(pair) == "gw1", "sync link loss must not make two masters"
    finally:
        hp.sync_link(pair, "gw1", True)
    try:
        # the backup asks for a resync on no transition here: FTFW resends, and the
        # flows' next updates reach it; give it a moment
        hp.conntrackd(pair, "gw2", "-n")
        deadline = time.monotonic() + 10
        while hp.external_cache_size(pair, "gw2") < TCP_FLOWS + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hp.external_cache_size(pair, "gw2") >= TCP_FLOWS + 1
        hp.set_links(pair, "gw1", False)
        hp.wait_master(pair, "gw2")
        time.sleep(2.0)
    finally:
        summary = flows.finish()
        _healthy(pair)
    assert hp.tcp_survivors(summary) == TCP_FLOWS, summary["tcp"]
