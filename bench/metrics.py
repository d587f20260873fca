"""Benchmark: what a Prometheus scrape of masqd costs, and what it does to the agent's
API meanwhile (docs/metrics.md).

masqd runs in the gateway namespace with `--metrics-listen 10.16.0.1:9339` (cache 5 s,
the default); a scraper in the server namespace GETs /metrics over the lab link. Per
PORTFW table size (1,000 and 100,000 keys; 10,000 in quick mode; every tenth key with
two backends):
  api_*_ms             latency of `status` (a read) and of an `add` + `delete` of one
                       backend (writes) from a client on the socket, 10 ms apart: for
                       15 s without scrapes, then while the first scrape makes its
                       reading (the expensive moment: `list` of every key) (p50 / p99)
  scrape_cold_ms       that first scrape (a new reading), with exposition bytes and samples
  reading_s            the agent's own masqd_metrics_reading_seconds
  scrape_warm_ms       scrapes right after (within the cache time: the kept text)
  rss_kib              the agent's resident memory before, after the reading, at the end
Bounded: every loop has a count and a deadline; the lab is torn down at the end.
"""

import json
import os
import threading
import time

from bench import common
from bench.common import GATEWAY_IN, log, median

PORT = 9339
WRITE_EVERY = 2.0  # seconds between the API client's add + delete pairs
READING_LIMIT = 300  # seconds a first scrape may take before it counts as not finished
READING_LIMIT_WRITES = 120  # the same with writes (enough to show it does not finish)
LISTEN = "%s:%d" % (GATEWAY_IN, PORT)

# argv: URL, seconds, max scrapes -> [[seconds, bytes, samples], ...]
SCRAPER = r"""
import json, sys, time, urllib.request
url, seconds, most = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end, out = time.monotonic() + seconds, []
while time.monotonic() < end and len(out) < most:
    t = time.monotonic()
    body = urllib.request.urlopen(url, timeout=seconds).read()
    out.append([time.monotonic() - t, len(body), body.count(b"\n") - body.count(b"\n#")])
print(json.dumps(out))
"""


def _entries(count):
    """PORTFW keys on the second outside address; every tenth one has two backends."""
    out = []
    for i in range(count):
        backends = [{"address": "10.16.%d.%d" % (1 + i // 60000, 1 + i % 250), "port": 1 + i % 60000, "pref": 10}]
        if i % 10 == 0:
            backends.append(dict(backends[0], address="10.17.%d.%d" % (1 + i // 60000, 1 + i % 250), pref=5))
        out.append({"protocol": "tcp" if i < 60000 else "udp", "local_address": common.GATEWAY_OUT2,
                    "local_port": 1 + i % 60000, "backends": backends})
    return out


class MetricsAgent(common.Agent):
    """common.Agent with the metrics flags."""

    def __init__(self, lab, host, workdir, cache):
        super().__init__(lab, host, workdir)
        self.cache = cache

    def start(self, timeout=300):
        t0 = time.monotonic()
        with open(self.log, "ab") as logf:
            argv = [os.path.join(common.VENV_BIN, "masqd"), "--state-dir", self.state_dir,
                    "--socket", self.socket, "--log-level", "warning", "--no-autofw-watcher",
                    "--metrics-listen", LISTEN, "--metrics-cache", str(self.cache)]
            self.proc = self.lab.spawn(self.host, argv, stdout=logf, stderr=logf)
        from masqd.client import AgentUnavailable, Client
        while time.monotonic() < t0 + timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("masqd exited: %s" % self.tail())
            if os.path.exists(self.socket):
                try:
                    with Client(self.socket, timeout=timeout) as c:
                        c.request("status")
                    return time.monotonic() - t0
                except AgentUnavailable:
                    pass
            time.sleep(0.05)
        raise RuntimeError("masqd not ready after %ss: %s" % (timeout, self.tail()))


def _scrape(lab, scraper, seconds, most):
    r = lab.run("server", [common.PYTHON, scraper, "http://%s/metrics" % LISTEN, str(seconds), str(most)],
                timeout=seconds * (most + 1) + 60)
    if r.returncode != 0:
        raise RuntimeError("scraper failed: %s" % r.stderr[-2000:])
    return json.loads(r.stdout)


def _api_latencies(agent, seconds, stop=None, write_every=WRITE_EVERY):
    """{"status": [ms], "write": [ms]}: a `status` every 10 ms and (unless `write_every`
    is None) an `add` + `delete` of one backend every `write_every` s, for `seconds` (or
    until `stop()` is true).

    Writes are kept rare on purpose: every commit makes a concurrent kernel listing
    start over (libnftables replays its cache fill when the ruleset generation changes),
    so a write every few milliseconds starves a 100,000-key `list` (docs/metrics.md)."""
    probe = {"protocol": "tcp", "local_address": common.GATEWAY_OUT, "local_port": 9,
             "backends": [{"address": "10.16.0.10", "port": 9, "pref": 10}]}
    extra = {"protocol": "tcp", "local_address": common.GATEWAY_OUT, "local_port": 9,
             "backends": [{"address": "10.16.0.11", "port": 9, "pref": 10}]}
    out = {"status": [], "write": []}
    with agent.client() as c:
        c.request("add", table="portfw", entry=probe)
        end, next_write = time.monotonic() + seconds, time.monotonic() + (write_every or 0) / 2
        while time.monotonic() < end and not (stop and stop()) and len(out["status"]) < 100000:
            t0 = time.monotonic()
            c.request("status")
            out["status"].append((time.monotonic() - t0) * 1e3)
            if write_every is not None and time.monotonic() >= next_write:
                t1 = time.monotonic()
                c.request("add", table="portfw", entry=extra)
                c.request("delete", table="portfw", entry=extra)
                out["write"].append((time.monotonic() - t1) * 1e3)
                next_write += write_every
            time.sleep(0.01)
        c.request("delete", table="portfw", entry=probe)
    return out


def _pct(values, q):
    return common.percentile(values, q / 100.0) if values else None


def _latency_summary(rows):
    status, write = rows["status"], rows["write"]
    return {"statuses": len(status), "writes": len(write), "status_p50_ms": _pct(status, 50), "status_p99_ms": _pct(status, 99),
            "write_p50_ms": _pct(write, 50), "write_p99_ms": _pct(write, 99)}


def _one(lab, work, scraper, size, cache, seconds, warm_scrapes, write_every):
    agent = MetricsAgent(lab, "gateway", os.path.join(work, "c%s-%d-%s" % (cache, size, write_every)), cache)
    agent.preload({"portfw": _entries(size)})
    limit = READING_LIMIT if write_every is None else READING_LIMIT_WRITES
    start_s = agent.start()
    try:
        common.wait_port(lab, "server", GATEWAY_IN, PORT, timeout=30)
        rss_before = agent.rss_kib()
        baseline = _api_latencies(agent, seconds, write_every=write_every)
        # The API while the first scrape makes a reading (the expensive moment): rounds
        # from just before the scrape starts until it has returned.
        result = {}

        def cold_scrape():
            time.sleep(0.3)
            try:
                result["cold"] = _scrape(lab, scraper, limit, 1)
            except Exception as exc:  # the reading did not finish in time: that is the result
                result["error"] = str(exc)[-300:]

        thread = threading.Thread(target=cold_scrape)
        thread.start()
        during = _api_latencies(agent, limit + 5, stop=lambda: not thread.is_alive(), write_every=write_every)
        thread.join(timeout=limit + 60)
        rss_after_reading = agent.rss_kib()
        try:  # within the cache time (after a reading that did not finish: waits for it)
            warm = _scrape(lab, scraper, limit, warm_scrapes)
            reading_s = _reading_seconds(lab)
        except Exception as exc:  # a timeout: recorded, the run goes on
            warm, reading_s = [], None
            result.setdefault("error", "warm scrapes: %s" % str(exc)[-200:])
        rss_after = agent.rss_kib()
    finally:
        agent.stop()
    cold = result.get("cold", [])
    row = {"keys": size, "cache_s": cache, "write_every_s": write_every, "agent_start_s": start_s,
           "cold_error": result.get("error"),
           "scrape_cold_ms": cold[0][0] * 1e3 if cold else None,
           "reading_s": reading_s,
           "scrape_warm_ms": median([s[0] * 1e3 for s in warm]),
           "exposition_bytes": cold[0][1] if cold else None, "samples": cold[0][2] if cold else None,
           "api_without_scrapes": _latency_summary(baseline), "api_during_scrapes": _latency_summary(during),
           "rss_kib_before": rss_before, "rss_kib_after_reading": rss_after_reading, "rss_kib_after": rss_after,
           "raw": {"cold_s": [s[0] for s in cold], "warm_s": [s[0] for s in warm],
                   "api_without": baseline, "api_during": during}}
    log("metrics %d keys, cache %s: %s", size, cache, {k: v for k, v in row.items() if k != "raw"})
    return row


def _reading_seconds(lab):
    """masqd_metrics_reading_seconds from the (cached) exposition."""
    body = lab.run("server", [common.PYTHON, "-c", "import sys, urllib.request\n"
                              "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=60).read().decode())",
                              "http://%s/metrics" % LISTEN], timeout=90).stdout
    for line in body.splitlines():
        if line.startswith("masqd_metrics_reading_seconds "):
            return float(line.split()[1])
    return None


def run(quick=False):
    sizes = [1000, 10000] if quick else [1000, 100000]
    seconds = 8 if quick else 15
    warm_scrapes = 5
    spec = common.triple_spec("metrics")
    rows = []
    with common.Workdir() as work, _lab(spec) as lab:
        scraper = os.path.join(work, "scraper.py")
        with open(scraper, "w") as f:
            f.write(SCRAPER)
        for size in sizes:
            for write_every in (None, WRITE_EVERY):  # reads only; then a write pair every 2 s
                rows.append(_one(lab, work, scraper, size, 5, seconds, warm_scrapes, write_every))
    largest = next(r for r in rows if r["keys"] == max(sizes) and r["write_every_s"] is None)
    targets = {
        "status p99 during a reading under 50 ms (%d keys)" % largest["keys"]:
            _le(largest["api_during_scrapes"]["status_p99_ms"], 50),
        "a reading finishes under a write every %.0f s (%d keys)" % (WRITE_EVERY, largest["keys"]):
            next(r for r in rows if r["keys"] == largest["keys"] and r["write_every_s"])["cold_error"] is None,
        "scrape within the cache time under 1 s (%d keys)" % largest["keys"]: _le(largest["scrape_warm_ms"], 1000),
    }
    method = {"sizes": sizes, "baseline_seconds": seconds, "warm_scrapes": warm_scrapes, "cache_s": 5,
              "duty": "text kept max(cache, 10 x reading time)",
              "scraper": "server namespace, HTTP over the lab link", "statistic": "median; p50/p99 for the API",
              "api": "status every 10 ms; alone, then with an add + delete of one backend every %.0f s"
                     % WRITE_EVERY, "reading_limit_s": READING_LIMIT, "reading_limit_writes_s": READING_LIMIT_WRITES}
    return {"targets": targets, "method": method, "rows": rows, "summary": _summary(rows)}


def _le(value, limit):
    return value is not None and value <= limit


def _summary(rows):
    return [{k: v for k, v in r.items() if k != "raw"} for r in rows]


def _lab(spec):
    import ipmasq_lab
    return ipmasq_lab.lab(spec)


if __name__ == "__main__":  # alone: python -m bench.metrics [--quick] (writes bench/results/metrics.json)
    import sys
    quick = "--quick" in sys.argv
    t0 = time.monotonic()
    data = run(quick=quick)
    data["wall_s"] = time.monotonic() - t0
    common.write_result("metrics", quick, data)
    print(json.dumps(data["summary"], indent=1))
