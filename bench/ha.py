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
    r = out["runs"]["conntrackd"]
    out["targets"] = {
        "%d/%d TCP flows continue with no reset" % (tcp_flows, tcp_flows): r["tcp_continuing"] == tcp_flows,
        "UDP loses at most 1 s of datagrams": r["udp_lost_s"] <= 1.0,
        "new connections through the backup within 1 s":
            r["failure_to_new_connection_s"] is not None and r["failure_to_new_connection_s"] < 1.0,
    }
    out["summary"] = out["runs"]
    return out
