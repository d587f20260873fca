"""Benchmark 3: rule-set scale. 10 ... 100,000 PORTFW keys (1% with two backends, so
the verdict map and per-key chains are exercised too) plus 16 mark classifiers loaded
into masqd; side by side, the same keys as a linear nft DNAT chain (one rule per key,
the seed's linked-list design; the probed key is the last rule).

Measured per size, interleaved and repeated (medians):
  - new connections/s (ab against nginx) through the probed key, masqd vs linear;
  - first-packet latency: SYN -> SYN-ACK as the client's connect() sees it;
  - per-packet cost of what runs on every packet: masqd's mark restore (the probed
    flows carry a mark, so every packet takes the restore rule): iperf3 throughput
    through a PORTFW key at N keys vs 10.

Both tables are loaded at once and do not disturb each other: the linear chain
starts with `ip daddr != 198.51.100.2 accept`, and masqd has no key on that address
(its maps miss in O(1)).
"""

import os

from bench import common
from bench.common import GATEWAY_OUT, GATEWAY_OUT2, SERVER, log, median

MARKS = 16
HTTP_MASQD, HTTP_LINEAR, HTTP_ROUTING, IPERF = 8002, 8003, 8001, 5201
KEY_HTTP, KEY_IPERF, LINEAR_HTTP = 8080, 5301, 9080


def portfw_entries(n):
    """n keys: the two probed keys first, then fillers on other addresses."""
    entries = [
        {"protocol": "tcp", "local_address": GATEWAY_OUT, "local_port": KEY_HTTP,
         "backends": [{"address": SERVER, "port": HTTP_MASQD, "pref": 10}]},
        {"protocol": "tcp", "local_address": GATEWAY_OUT, "local_port": KEY_IPERF,
         "backends": [{"address": SERVER, "port": IPERF, "pref": 10}]},
    ]
    for i in range(max(0, n - 2)):
        backends = [{"address": SERVER, "port": 20000 + i % 40000, "pref": 10}]
        if i % 100 == 0:
            backends.append({"address": "10.16.0.11", "port": 20000 + i % 40000, "pref": 5})
        entries.append({"protocol": "tcp" if (i // 60000) % 2 == 0 else "udp",
                        "local_address": "203.0.113.%d" % (1 + i // 60000),
                        "local_port": 1024 + i % 60000, "backends": backends})
    return entries


def mark_entries():
    """16 classifiers; only the last matches the lab's client (every bench flow)."""
    out = [{"name": "m%02d" % i, "mark": i + 1, "protocol": "tcp", "source": "10.%d.0.0/16" % (100 + i)}
           for i in range(MARKS - 1)]
    out.append({"name": "bench-clients", "mark": MARKS, "source": "198.51.100.0/24"})
    return out


def linear_ruleset(n):
    """The same number of keys as one DNAT rule each, probed key last."""
    lines = ["table ip linbench {", " chain pre {",
             "  type nat hook prerouting priority dstnat; policy accept;",
             "  ip daddr != %s accept" % GATEWAY_OUT2]
    for i in range(max(0, n - 1)):
        proto = "tcp" if i < 55000 else "udp"
        port = 10000 + i % 55000
        lines.append("  ip daddr %s %s dport %d dnat to %s:%d" % (GATEWAY_OUT2, proto, port, SERVER, 20000 + i % 40000))
    lines.append("  ip daddr %s tcp dport %d dnat to %s:%d" % (GATEWAY_OUT2, LINEAR_HTTP, SERVER, HTTP_LINEAR))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def run(quick=False, sizes=(10, 1000, 10000, 100000)):
    rounds = 2 if quick else 5
    requests = 3000 if quick else 10000
    latency_samples = 200 if quick else 1000
    iperf_runs = 3 if quick else 5
    results = {}
    with common.Workdir() as work, common_lab() as lab:
        agent = common.Agent(lab, "gateway", work)
        lab.spawn("server", ["iperf3", "-s", "-p", str(IPERF)], stdout=open(os.devnull, "w"),
                  stderr=open(os.devnull, "w"))
        conf = common.nginx_conf(work, [HTTP_ROUTING, HTTP_MASQD, HTTP_LINEAR])
        lab.spawn("server", ["nginx", "-c", conf], stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
        for port in (IPERF, HTTP_ROUTING, HTTP_MASQD, HTTP_LINEAR):
            common.wait_port(lab, "client", SERVER, port)
        linear_file = os.path.join(work, "linear.nft")
        for n in sizes:
            log("scale: loading %d keys", n)
            agent.stop()
            agent.preload({"portfw": portfw_entries(n), "marks": mark_entries()})
            start_s = agent.start(timeout=300)
            rss = agent.rss_kib()
            lab.run("gateway", ["nft", "delete", "table", "ip", "linbench"], timeout=30)
            with open(linear_file, "w") as f:
                f.write(linear_ruleset(n))
            t0 = common.now()
            r = lab.run("gateway", ["nft", "-f", linear_file], timeout=600)
            linear_load_s = common.now() - t0
            if r.returncode != 0:
                raise RuntimeError("linear ruleset refused: %s" % r.stderr[-500:])
            common.wait_port(lab, "client", GATEWAY_OUT, KEY_HTTP)
            common.wait_port(lab, "client", GATEWAY_OUT2, LINEAR_HTTP, timeout=30)
            row = {"keys": n, "masqd_start_s": start_s, "masqd_rss_kib": rss, "linear_load_s": linear_load_s,
                   "raw": {k: [] for k in ("masqd_conn", "linear_conn", "masqd_syn_us", "linear_syn_us",
                                           "routing_syn_us", "masqd_gbps")}}
            raw = row["raw"]
            for rnd in range(rounds):
                steps = [
                    ("masqd_conn", lambda: common.ab(lab, GATEWAY_OUT, KEY_HTTP, requests)[0]),
                    ("linear_conn", lambda: common.ab(lab, GATEWAY_OUT2, LINEAR_HTTP, requests,
                                                      seconds=10 if quick else 20)[0]),
                    ("masqd_syn_us", lambda: median(common.connect_times(lab, GATEWAY_OUT, KEY_HTTP, latency_samples))),
                    ("linear_syn_us", lambda: median(common.connect_times(lab, GATEWAY_OUT2, LINEAR_HTTP,
                                                                          latency_samples))),
                    ("routing_syn_us", lambda: median(common.connect_times(lab, SERVER, HTTP_ROUTING, latency_samples))),
                ]
                if rnd % 2:
                    steps.reverse()
                for name, step in steps:
                    common.conntrack_flush(lab)
                    raw[name].append(step())
                log("scale %6d round %d: masqd %s conn/s %s us, linear %s conn/s %s us", n, rnd,
                    raw["masqd_conn"][-1], raw["masqd_syn_us"][-1], raw["linear_conn"][-1],
                    raw["linear_syn_us"][-1])
            # Per-packet path: through the PORTFW key and, as the noise reference in the
            # same minute, routed straight to the server (both flows carry the mark).
            raw["routing_gbps"] = []
            for i in range(iperf_runs):
                pair = [("masqd_gbps", GATEWAY_OUT, KEY_IPERF), ("routing_gbps", SERVER, IPERF)]
                for name, addr, port in (pair if i % 2 == 0 else pair[::-1]):
                    bps = common.iperf3(lab, addr, port, 3)
                    raw[name].append(None if bps is None else bps / 1e9)
            marked = lab.run("gateway", ["conntrack", "-L", "-m", str(MARKS)], timeout=30)
            row["marked_connections_seen"] = len([l for l in marked.stdout.splitlines() if "mark=" in l])
            for name in list(raw):
                row[name] = median(raw[name])
            results[n] = row
        agent.stop()
        lab.run("gateway", ["nft", "delete", "table", "ip", "linbench"], timeout=60)

    small, big = results[sizes[0]], results[sizes[-1]]
    ratios = {
        "conn_rate_masqd_%d_vs_%d" % (sizes[-1], sizes[0]): common.ratio(big["masqd_conn"], small["masqd_conn"]),
        "conn_rate_linear_%d_vs_%d" % (sizes[-1], sizes[0]): common.ratio(big["linear_conn"], small["linear_conn"]),
        "syn_latency_masqd_%d_vs_%d" % (sizes[-1], sizes[0]): common.ratio(big["masqd_syn_us"], small["masqd_syn_us"]),
        "syn_latency_linear_%d_vs_%d" % (sizes[-1], sizes[0]): common.ratio(big["linear_syn_us"], small["linear_syn_us"]),
        "per_packet_throughput_masqd_%d_vs_%d" % (sizes[-1], sizes[0]): common.ratio(big["masqd_gbps"], small["masqd_gbps"]),
        "conn_rate_masqd_vs_linear_at_%d" % sizes[-1]: common.ratio(big["masqd_conn"], big["linear_conn"]),
    }
    norm = common.ratio(common.ratio(big["masqd_gbps"], big["routing_gbps"]),
                        common.ratio(small["masqd_gbps"], small["routing_gbps"]))
    ratios["per_packet_throughput_masqd_%d_vs_%d_normalized" % (sizes[-1], sizes[0])] = norm
    targets = {
        "per-packet (mark restore) throughput %d vs %d >= 0.95 (normalized by the routed flow of the same "
        "minute; raw ratio in the table)" % (sizes[-1], sizes[0]):
            (norm or 0) >= 0.95,
        "conn rate %d vs %d >= 0.95" % (sizes[-1], sizes[0]):
            (ratios["conn_rate_masqd_%d_vs_%d" % (sizes[-1], sizes[0])] or 0) >= 0.95,
    }
    return {"method": {"sizes": list(sizes), "rounds": rounds, "ab_requests": requests,
                       "latency_samples_per_round": latency_samples, "iperf_runs": iperf_runs,
                       "marks": MARKS, "two_backend_share": 0.01, "interleaved": True, "statistic": "median"},
            "sizes": [results[n] for n in sizes], "ratios": ratios, "targets": targets}


def common_lab():
    import ipmasq_lab
    return ipmasq_lab.lab(common.triple_spec("scale"))


if __name__ == "__main__":
    import json
    import sys
    sizes = (10, 1000) if "--tiny" in sys.argv else (10, 1000, 10000, 100000)
    print(json.dumps(run(quick="--quick" in sys.argv, sizes=sizes), indent=1))
