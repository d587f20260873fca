"""Benchmark: one million PORTFW keys (issue "Control plane at the kernel's pace").

One lab (client -> gateway -> server); the agent runs in the gateway. Measured side by
side in one run:
  - a socket `set` of 1,000,000 PORTFW keys (1% with two backends), from empty, as the
    single-table masq_* modules send it (`echo: false`), against `nft -f` of the same
    table in the client namespace, which has no agent. The reference file is written
    here from the same entries (the nft commands of the agent's full load: table, maps,
    chains, rules, elements), not read back from the agent: libnftables 1.0.6 takes
    about 140 s and 2 GB to list a million elements;
  - the agent's RSS: the peak during that set (clear_refs, then VmHWM) and once settled;
  - the data plane at 1,000,000 keys vs 10: new connections/s (ab) and per-packet
    throughput (iperf3; the probed flows carry a mark, so every packet takes the mark
    restore) through a PORTFW key, each divided by the routed flow measured in the same
    minute (the machine drifts between sizes);
  - a restart with the million keys stored, until the socket answers (a full re-sync:
    one libnftables transaction), with its peak RSS. Informative, not a target.

Each measurement starts on a settled machine (`_settle`), and the data plane at a
million keys is measured before the reference `nft -f` loads (and deletes) another
million-element table in the lab.

    python -m bench.run --only million          (about 4 minutes)
"""

import json
import os
import time

from bench import common, scale
from bench.common import GATEWAY_OUT, SERVER, log, median

KEYS = 1000000


def run(quick=False, keys=KEYS):
    rounds = 2 if quick else 3
    requests = 3000 if quick else 6000
    iperf_runs = 3 if quick else 5
    with common.Workdir() as work, scale.common_lab() as lab:
        agent = common.Agent(lab, "gateway", work)
        lab.spawn("server", ["iperf3", "-s", "-p", str(scale.IPERF)], stdout=open(os.devnull, "w"),
                  stderr=open(os.devnull, "w"))
        conf = common.nginx_conf(work, [scale.HTTP_ROUTING, scale.HTTP_MASQD])
        lab.spawn("server", ["nginx", "-c", conf], stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
        for port in (scale.IPERF, scale.HTTP_ROUTING, scale.HTTP_MASQD):
            common.wait_port(lab, "client", SERVER, port)
        agent.start()
        dataplane = {}
        with agent.client(timeout=600) as c:
            c.request("set", table="marks", entries=scale.mark_entries())
            c.request("set", table="portfw", entries=scale.portfw_entries(10), echo=False)
            dataplane[10] = _dataplane(lab, rounds, requests, iperf_runs)
            c.request("flush", table="portfw")
            entries = scale.portfw_entries(keys)
            request_bytes = len(json.dumps({"op": "set", "table": "portfw", "entries": entries, "echo": False}))
            syncs_before = c.request("status")["result"]["full_syncs"]
            _settle()
            agent.reset_peak_rss()
            t0 = common.now()
            c.request("set", table="portfw", entries=entries, echo=False)
            set_s = common.now() - t0
            peak_mib = agent.peak_rss_kib() / 1024
            time.sleep(1.0)  # settled: the server trims its heap right after answering
            rss_mib = agent.rss_kib() / 1024
            log("million: socket set of %d keys %.1f s, peak RSS %.0f MiB, after %.0f MiB", keys, set_s,
                peak_mib, rss_mib)
            status = c.request("status")["result"]
            status["full_syncs"] -= syncs_before
        common.wait_port(lab, "client", GATEWAY_OUT, scale.KEY_HTTP)
        _settle()
        dataplane[keys] = _dataplane(lab, rounds, requests, iperf_runs)
        reference = os.path.join(work, "million.nft")
        _write_reference(reference, entries)
        del entries
        _settle()
        t0 = common.now()
        lab.run("client", ["nft", "-f", reference], timeout=900, check=True)
        nft_f_s = common.now() - t0
        common.delete_masqd_tables(lab, "client")
        log("million: nft -f of the same table %.1f s (socket set %.2fx)", nft_f_s, set_s / nft_f_s)
        agent.stop()
        _settle()
        restart_s = agent.start(timeout=900)
        restart_peak_mib, restart_rss_mib = agent.peak_rss_kib() / 1024, agent.rss_kib() / 1024
        agent.stop()
    small, big = dataplane[10], dataplane[keys]
    conn = common.ratio(common.ratio(big["masqd_conn"], big["routing_conn"]),
                        common.ratio(small["masqd_conn"], small["routing_conn"]))
    packet = common.ratio(common.ratio(big["masqd_gbps"], big["routing_gbps"]),
                          common.ratio(small["masqd_gbps"], small["routing_gbps"]))
    summary = {
        "keys": keys, "request_bytes": request_bytes, "socket_set_s": set_s, "nft_f_s": nft_f_s,
        "socket_set_x_nft_f": set_s / nft_f_s, "set_peak_rss_mib": peak_mib, "rss_after_set_mib": rss_mib,
        "full_syncs_during_set": status.get("full_syncs"),
        "restart_s": restart_s, "restart_x_nft_f": restart_s / nft_f_s,
        "restart_peak_rss_mib": restart_peak_mib, "restart_rss_mib": restart_rss_mib,
        "conn_rate_%d_vs_10_normalized" % keys: conn, "per_packet_%d_vs_10_normalized" % keys: packet,
        "dataplane": {str(n): {k: v for k, v in d.items() if k != "raw"} for n, d in dataplane.items()},
    }
    targets = {
        "socket set of %d keys <= 1.5x nft -f of the same table" % keys: set_s / nft_f_s <= 1.5,
        "agent RSS at %d keys <= 1 GiB (settled after the set)" % keys: rss_mib <= 1024,
        "new connections/s at %d keys vs 10 >= 0.95 (normalized by the routed flow)" % keys: (conn or 0) >= 0.95,
        "per-packet throughput at %d keys vs 10 >= 0.95 (normalized by the routed flow)" % keys:
            (packet or 0) >= 0.95,
    }
    return {"method": {"keys": keys, "two_backend_share": 0.01, "rounds": rounds, "ab_requests": requests,
                       "iperf_runs": iperf_runs, "statistic": "median", "interleaved": True},
            "summary": summary, "raw": {str(n): d["raw"] for n, d in dataplane.items()}, "targets": targets}


def _settle(busy_below=0.25, limit_s=90):
    """Wait until the machine is mostly idle (busy share of all CPUs over one second):
    after a million-element commit or table deletion the kernel goes on resizing and
    freeing hash tables in its workqueues for a while, which would count against
    whatever is measured next."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = common.cpu_snapshot()
        time.sleep(1.0)
        delta = common.cpu_delta(before, common.cpu_snapshot())
        if delta["busy"] / max(delta["busy"] + delta["idle"], 1e-9) < busy_below:
            return
    log("million: machine still busy after %d s; measuring anyway", limit_s)


def _dataplane(lab, rounds, requests, iperf_runs):
    """New connections/s and throughput through the probed PORTFW key and routed straight
    to the server, alternated (the routed flow is the same minute's reference)."""
    raw = {"masqd_conn": [], "routing_conn": [], "masqd_gbps": [], "routing_gbps": []}
    for rnd in range(rounds):
        pair = [("masqd_conn", GATEWAY_OUT, scale.KEY_HTTP), ("routing_conn", SERVER, scale.HTTP_ROUTING)]
        for name, addr, port in (pair if rnd % 2 == 0 else pair[::-1]):
            common.conntrack_flush(lab)
            raw[name].append(common.ab(lab, addr, port, requests)[0])
    for i in range(iperf_runs):
        pair = [("masqd_gbps", GATEWAY_OUT, scale.KEY_IPERF), ("routing_gbps", SERVER, scale.IPERF)]
        for name, addr, port in (pair if i % 2 == 0 else pair[::-1]):
            bps = common.iperf3(lab, addr, port, 3)
            raw[name].append(None if bps is None else bps / 1e9)
    out = {name: median([v for v in values if v is not None]) for name, values in raw.items()}
    out["raw"] = raw
    log("million: dataplane %s", {k: v for k, v in out.items() if k != "raw"})
    return out


def _write_reference(path, entries):
    """The table the agent programs for `entries` (plus the marks), as nft commands: the
    text of the agent's full-load transaction (what a restart hands libnftables)."""
    from masqd import model, render
    tables = {"portfw": model.normalize_table("portfw", entries),
              "marks": model.normalize_table("marks", scale.mark_entries())}
    with open(path, "w") as f:
        f.write(render.full_sync(render.render(tables)).to_text())
