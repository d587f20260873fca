"""Benchmarks 1 and 2: data-plane throughput and new connections per second, client ->
gateway -> server, through each path side by side in one lab:

  routing   the gateway only routes (no NAT): the ceiling
  portfw    a PORTFW key in masqd (kernel DNAT through the agent's nft table)
  haproxy   HAProxy 2.6 in TCP mode, option splice-auto, maxconn 4000
  socat     socat TCP-LISTEN,fork (one process per connection)
  asyncio   a 40-line Python asyncio redirector

Each path has its own server port (iperf3 servers and nginx listeners in the server
namespace), so 4-tuples never collide with TIME_WAIT entries of another path. The
variants are interleaved (the order rotates every round) and repeated; medians.

CPU per connection: machine-wide busy time (user + system + irq/softirq, /proc/stat)
over a round divided by its connections, plus the redirector processes' own CPU
(/proc/<pid>/stat utime+stime and reaped children) for the user-space paths. All the
namespaces share the machine's kernel, so softirq work of the gateway cannot be split
from the client's and server's per namespace: the machine-wide figure minus the
routing path's is the extra cost of the path (a NAT or a proxy) per connection.
"""

import os

from bench import common
from bench.common import GATEWAY_OUT, SERVER, log, median

PATHS = ("routing", "portfw", "haproxy", "socat", "asyncio")
IPERF_PORT = {"routing": 5201, "portfw": 5202, "haproxy": 5203, "socat": 5204, "asyncio": 5205}
HTTP_PORT = {"routing": 8001, "portfw": 8002, "haproxy": 8003, "socat": 8004, "asyncio": 8005}
FRONT = 10000  # the gateway's listen port for path p = backend port + FRONT * index


def front_port(path, backend_port):
    return backend_port + 10000 * (PATHS.index(path))


def target(path, kind):
    port = (IPERF_PORT if kind == "iperf" else HTTP_PORT)[path]
    if path == "routing":
        return SERVER, port
    return GATEWAY_OUT, front_port(path, port)


def run(quick=False, paths=PATHS):
    runs = 3
    rounds = 3 if quick else 5
    requests = 4000 if quick else 20000
    seconds = 3
    with common.Workdir() as work, _lab() as lab:
        agent = common.Agent(lab, "gateway", work)
        agent.start()
        # Backends: an iperf3 server and an nginx port per path.
        for path in paths:
            lab.spawn("server", ["iperf3", "-s", "-p", str(IPERF_PORT[path])],
                      stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
        conf = common.nginx_conf(work, [HTTP_PORT[p] for p in paths])
        lab.spawn("server", ["nginx", "-c", conf], stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
        for path in paths:
            common.wait_port(lab, "client", SERVER, IPERF_PORT[path])
            common.wait_port(lab, "client", SERVER, HTTP_PORT[path])
        # PORTFW keys through masqd, one per kind.
        if "portfw" in paths:
            entries = [{"protocol": "tcp", "local_address": GATEWAY_OUT, "local_port": target("portfw", k)[1],
                        "backends": [{"address": SERVER, "port": (IPERF_PORT if k == "iperf" else HTTP_PORT)["portfw"]}]}
                       for k in ("iperf", "http")]
            with agent.client() as c:
                c.request("set", table="portfw", entries=entries)
        routes = {p: [(target(p, "iperf")[1], IPERF_PORT[p]), (target(p, "http")[1], HTTP_PORT[p])]
                  for p in paths if p in ("haproxy", "socat", "asyncio")}
        procs = common.spawn_redirectors(lab, work, routes)
        proxy_pids = {name: [p.pid for p in ps] for name, ps in procs.items()}

        throughput = {p: [] for p in paths}
        for r in range(runs):
            order = list(paths[r % len(paths):] + paths[:r % len(paths)])
            for path in order:
                addr, port = target(path, "iperf")
                bps = common.iperf3(lab, addr, port, seconds)
                throughput[path].append(bps)
                log("throughput %-8s run %d: %.2f Gbit/s", path, r, (bps or 0) / 1e9)

        rate = {p: [] for p in paths}
        cpu = {p: [] for p in paths}
        for r in range(rounds):
            order = list(paths[r % len(paths):] + paths[:r % len(paths)])
            for path in order:
                common.conntrack_flush(lab)
                addr, port = target(path, "http")
                pids = [q for pid in proxy_pids.get(path, []) for q in common.tree_pids(pid)]
                p0, c0 = common.process_cpu(pids), common.cpu_snapshot()
                conns, done, failed = common.ab(lab, addr, port, requests)
                c1 = common.cpu_snapshot()
                p1 = common.process_cpu([q for pid in proxy_pids.get(path, []) for q in common.tree_pids(pid)])
                rate[path].append(conns)
                if done:
                    d = common.cpu_delta(c0, c1)
                    cpu[path].append({"busy_us": d["busy"] / done * 1e6, "softirq_us": d["softirq"] / done * 1e6,
                                      "system_us": d["system"] / done * 1e6,
                                      "proxy_us": (p1 - p0) / done * 1e6, "failed": failed})
                log("conn rate %-8s round %d: %s conn/s (%s done, %s failed)", path, r, conns, done, failed)
        common.conntrack_flush(lab)
        agent.stop()

    summary = {}
    for p in paths:
        cp = cpu[p]
        summary[p] = {
            "throughput_gbps": _g(median(throughput[p])),
            "conn_per_s": median(rate[p]),
            "cpu_busy_us_per_conn": median([c["busy_us"] for c in cp]),
            "cpu_softirq_us_per_conn": median([c["softirq_us"] for c in cp]),
            "cpu_proxy_us_per_conn": median([c["proxy_us"] for c in cp]) if p in proxy_pids else 0.0,
        }
    pf = summary.get("portfw", {})
    ratios = {}
    for other in paths:
        if other == "portfw":
            continue
        ratios["throughput_portfw_vs_" + other] = common.ratio(pf.get("throughput_gbps"), summary[other]["throughput_gbps"])
        ratios["conn_rate_portfw_vs_" + other] = common.ratio(pf.get("conn_per_s"), summary[other]["conn_per_s"])
    targets = {
        "throughput_portfw_vs_routing >= 0.95": _ok(ratios.get("throughput_portfw_vs_routing"), 0.95),
        "throughput_portfw_vs_haproxy >= 2": _ok(ratios.get("throughput_portfw_vs_haproxy"), 2),
        "throughput_portfw_vs_socat >= 5": _ok(ratios.get("throughput_portfw_vs_socat"), 5),
        "conn_rate portfw ahead of every user-space redirector": all(
            _ok(ratios.get("conn_rate_portfw_vs_" + o), 1.0) for o in ("haproxy", "socat", "asyncio") if o in paths),
    }
    return {
        "method": {"iperf3_seconds": seconds, "iperf3_runs": runs, "ab_requests": requests, "ab_concurrency": 16,
                   "conn_rounds": rounds, "interleaved": True, "statistic": "median"},
        "raw": {"throughput_bps": throughput, "conn_per_s": rate, "cpu": cpu},
        "summary": summary, "ratios": ratios, "targets": targets,
    }


def _g(bps):
    return None if bps is None else bps / 1e9


def _ok(value, threshold):
    return value is not None and value >= threshold


def _lab():
    import ipmasq_lab
    return ipmasq_lab.lab(common.triple_spec("dataplane"), prefix=None)


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
