"""Benchmark 8: an HA gateway pair losing its master (issue 13, docs/ha.md).

The `ha` lab, converged with playbooks/ha.yml (keepalived VRRPv3 every 100 ms,
conntrackd FTFW on sync0): 100 long-lived TCP connections from the client through the
outside VIP to a PORTFW service (round robin over web1/web2, one probe line every 100 ms
each) plus one UDP stream (500 datagrams/s). Then the master loses all its links at
once (a dead box). Measured, on CLOCK_MONOTONIC:

  - TCP flows that continue with every probe echoed and no reset (target 100/100)
  - UDP datagrams lost, and how many seconds of the stream that is (target <= 1 s)
  - failure -> first new connection through the backup that works (target < 1 s;
    attempts every 20 ms, counted only if started after the links were down)
  - failure -> the backup holds both virtual addresses
  - masqd's runtime state on the backup: the PORTFW schedule position is per box (the
    backup's own counters, untouched while it was backup); the flows' backends are
    whatever conntrackd carried (every flow keeps its server)
  - masqd's AUTOFW recipient and pool binding on the backup (a separate lab): web1's
    control connection (SNATed to the outside VIP through a pool) survives; fresh UDP
    datagrams to the range reach web1 through the backup again after a failure

The same again with conntrackd disabled (gateway_ha_conntrackd: false), to show what it
buys. One run each (quick: 20 flows).
"""

import datetime
import os
import sys
import time

from bench import common
from bench.common import log

sys.path.insert(0, os.path.join(common.REPO, "tests", "lab"))
import ha_pair as hp  # noqa: E402

from ipmasq_lab.lab import Lab  # noqa: E402

UDP_RATE = 500


def _one(conntrackd, tcp_flows):
    with Lab("ha") as lab:
        t0 = time.monotonic()
        hp.converge(lab, conntrackd=conntrackd)
        converge_s = time.monotonic() - t0
        hp.wait_master(lab, "gw1", timeout=20)
        hp.start_servers(lab)
        flows = hp.Flows(lab, tcp_flows, UDP_RATE, seconds=120)
        try:
            time.sleep(2.0)
            replicated = hp.external_cache_size(lab, "gw2") if conntrackd else None
            prober = hp.Prober(lab, seconds=30)
            time.sleep(0.5)
            t_fail = time.monotonic()
            hp.set_links(lab, "gw1", False)
            t_dead = time.monotonic()
            hp.wait_master(lab, "gw2", timeout=10)
            t_vips = time.monotonic()
            time.sleep(3.0)
            attempts = prober.finish()
        finally:
            summary = flows.finish(timeout=60)
    ok = [end for start, end, good, _backend in attempts if good and start >= t_dead]
    before, after = hp.schedule(attempts, 0, t_fail), hp.schedule(attempts, t_dead)
    tcp = summary["tcp"]
    resets = sum(1 for f in tcp if f["error"] and ("reset" in f["error"].lower() or "closed" in f["error"]))
    udp = summary["udp"]
    return {
        "conntrackd": conntrackd,
        "tcp_flows": tcp_flows,
        "tcp_continuing": hp.tcp_survivors(summary),
        "tcp_reset": resets,
        "tcp_errors": sorted({f["error"] for f in tcp if f["error"]}),
        "tcp_flows_kept_their_backend": sum(1 for f in tcp if len(f["backends"]) == 1),
        "udp_sent": udp["sent"], "udp_lost": udp["lost"], "udp_rate": udp["rate"],
        "udp_lost_s": round(udp["lost"] / udp["rate"], 3),
        "failure_to_new_connection_s": round(min(ok) - t_fail, 3) if ok else None,
        "failure_to_backup_holds_vips_s": round(t_vips - t_fail, 3),
        "links_down_command_s": round(t_dead - t_fail, 3),
        "flows_replicated_to_backup_before": replicated,
        "converge_s": round(converge_s, 1),
        # masqd's PORTFW schedule is per box: the new master runs its own round robin
        "schedule_before": {"connections": len(before), "alternation": hp.alternations(before),
                            "first": before[-6:]},
        "schedule_after": {"connections": len(after), "alternation": hp.alternations(after),
                           "first": after[:6]},
    }


AUTOFW = [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "control_protocol": "tcp",
           "control_port": 7070, "timeout": 15}]
# SNAT to the outside VIP (a one-address pool): plain masquerade would use gw1's own
# 198.51.100.2, which the backup does not have. Out of eth0 only: without it the rule
# also matches the gateways' own VRRP adverts from 10.16.0.2/.3 to 224.0.0.18 (seen).
MASQUERADE = [{"name": "inside-out", "source": "10.16.0.0/24", "destination": "10.16.0.0/24",
               "destination_invert": True, "output_interface": "eth0", "pool": [hp.OUTSIDE_VIP]}]


def _autofw_recipients(lab, host):
    try:
        doc = hp.masqctl(lab, host, "autofw", "-L")
    except Exception as exc:  # the benchmark records what it could not read
        return {"error": str(exc)[:200]}
    return doc


def _runtime_state():
    """masqd's runtime state across a failover: an AUTOFW control-port entry (web1's
    control connection to the client's port 7070 makes web1 the recipient of the UDP
    range) and the inside network SNATed to the outside VIP through a pool."""
    from reliability_flows import Stream, start_echo
    with Lab("ha") as lab:
        hp.converge(lab, extra={"gateway_autofw": AUTOFW, "gateway_masquerade": MASQUERADE})
        hp.wait_master(lab, "gw1", timeout=20)
        start_echo(lab, "client", 7070, 300)          # the outside "streaming server"
        start_echo(lab, "web1", 7000, 300)            # the inside recipient of the range
        control = Stream(lab, "web1", "tcp", "198.51.100.10", 7070, rate=5, max_seconds=120)
        try:
            time.sleep(1.5)
            out = {"gw1_autofw_before": _autofw_recipients(lab, "gw1"),
                   "gw2_autofw_before": _autofw_recipients(lab, "gw2"),
                   "gw1_pool_before": hp.pool_elements(lab, "gw1"),
                   "gw2_pool_before": hp.pool_elements(lab, "gw2")}
            probe = hp.Prober(lab, seconds=30, port=7000, kind="udpprobe")
            time.sleep(1.0)
            t_fail = time.monotonic()
            hp.set_links(lab, "gw1", False)
            t_dead = time.monotonic()
            hp.wait_master(lab, "gw2", timeout=10)
            time.sleep(4.0)
            attempts = probe.finish()
            out.update({"gw2_autofw_after": _autofw_recipients(lab, "gw2"),
                        "gw2_pool_after": hp.pool_elements(lab, "gw2")})
        finally:
            summary = control.finish()
    ok_before = [a for a in attempts if a[2] and a[0] < t_fail]
    ok_after = [end for start, end, good, _b in attempts if good and start >= t_dead]
    out.update({
        "control_connection": {"error": summary["error"], "sent": summary["sent"], "lost": summary["lost"]},
        "autofw_datagrams_answered_before": len(ok_before),
        "failure_to_autofw_forwarding_on_backup_s": round(min(ok_after) - t_fail, 3) if ok_after else None,
        "autofw_datagrams_answered_after": len(ok_after),
    })
    return out


def run(quick=False):
    tcp_flows = 20 if quick else 100
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "method": {"tcp_flows": tcp_flows, "udp_rate": UDP_RATE, "advert_int_s": 0.1,
                      "failure": "master loses all links", "lab": "ha (ipmasq_lab/topologies/ha.yml)"},
           "runs": {}}
    for conntrackd in (True, False):
        name = "conntrackd" if conntrackd else "no_conntrackd"
        log("ha: %s, %d TCP flows + UDP %d/s", name, tcp_flows, UDP_RATE)
        out["runs"][name] = _one(conntrackd, tcp_flows)
        log("ha: %s", out["runs"][name])
    log("ha: masqd runtime state (AUTOFW recipient, pool binding) across a failover")
    out["runtime_state"] = _runtime_state()
    log("ha: %s", out["runtime_state"])
    r = out["runs"]["conntrackd"]
    out["targets"] = {
        "%d/%d TCP flows continue with no reset" % (tcp_flows, tcp_flows): r["tcp_continuing"] == tcp_flows,
        "UDP loses at most 1 s of datagrams": r["udp_lost_s"] <= 1.0,
        "new connections through the backup within 1 s":
            r["failure_to_new_connection_s"] is not None and r["failure_to_new_connection_s"] < 1.0,
    }
    out["summary"] = out["runs"]
    return out
