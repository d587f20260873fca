"""masqd's Prometheus metrics with real packets: the seed's PORTFW 15/5 after 20
connections reads 15 and 5 on /metrics, in masq_info and in a real Prometheus server
(Debian's package, run in a lab host's namespace) that scrapes the gateway."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from ipmasq_lab import probes

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import PYTHON, running_agent  # noqa: E402
from test_helpers_pool import POOL, add_pool_addresses, ansible_env, playbook  # noqa: E402

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.lab

LISTEN = "10.16.0.1:9339"  # the gateway's inside address: scraped from the inside bridge
WEB_KEY = "tcp 198.51.100.1:80"
SEED_PORTFW = """set -e
masqctl portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15
masqctl portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5
"""
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def textfile():
    base = tempfile.mkdtemp(prefix="masqd-metrics-textfile-")
    try:
        yield os.path.join(base, "masqd.prom")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def gateway(seed_lab, textfile):
    extra = ["--metrics-listen", LISTEN, "--metrics-cache", "1",
             "--metrics-textfile", textfile, "--metrics-textfile-interval", "0.5"]
    with running_agent(seed_lab, "masqd-metrics-", mode=0o755, extra=extra) as agent:
        yield agent


def http_get(lab, host, url, timeout=5):
    """GET `url` from inside `host`'s namespace (the lab has no route to anything else)."""
    code = ("import sys, urllib.request\n"
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=%d).read().decode())" % timeout)
    result = lab.run(host, [PYTHON, "-c", code, url], timeout=timeout + 5)
    assert result.returncode == 0, result.stderr
    return result.stdout


def scrape(lab, host="web2", text=None):
    """{(name, ((label, value), ...)): value} of the gateway's /metrics (or of `text`)."""
    out = {}
    text = http_get(lab, host, "http://%s/metrics" % LISTEN) if text is None else text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def backend_connections(samples):
    return {(dict(labels)["table"], dict(labels)["key"], dict(labels)["backend"]): value
            for (name, labels), value in samples.items() if name == "masqd_backend_connections_total"}


def seed_traffic(lab, agent, count=20):
    from masqd_agent import run_script
    run_script(agent, SEED_PORTFW)
    with probes.serve_identity(lab, "web1", 80), probes.serve_identity(lab, "web2", 80):
        answers = probes.connect_many(lab, "client", "198.51.100.1", 80, count=count)
    assert [a.backend for a in answers] == ["web1"] * 15 + ["web2"] * 5, [a.error for a in answers]


CLIENT_HITS = ("masqd_mark_classifier_hits_total", (("mark", "7"), ("rule", "client")))


def test_metrics_count_the_seeds_15_and_5_like_masq_info(gateway, seed_lab, textfile):
    # A classifier rule for the client: it counts the first packet of each of its
    # connections (an unused mark changes no forwarding).
    gateway.masqctl("mark", "-A", "-s", "198.51.100.10", "--name", "client", "-m", "7")
    seed_traffic(seed_lab, gateway)
    time.sleep(1.1)  # past the metrics cache
    samples = scrape(seed_lab)
    assert backend_connections(samples) == {("portfw", WEB_KEY, "10.16.0.27:80"): 15,
                                            ("portfw", WEB_KEY, "10.16.0.28:80"): 5}
    assert samples[CLIENT_HITS] == 20
    with open(textfile) as handle:  # the textfile says the same (written every 0.5 s)
        assert backend_connections(scrape(seed_lab, text=handle.read())) == backend_connections(samples)
    assert samples[("masqd_changes_total", (("op", "add"), ("result", "changed")))] == 3
    assert samples[("masqd_change_duration_seconds_count", (("op", "add"),))] == 3
    assert samples[("masqd_entries", (("table", "portfw"),))] == 1
    assert samples[("masqd_agent_answering", ())] == 1
    # a refused change is counted as refused, and changes nothing
    bad = gateway.masqctl("portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", "10.16.0.29", "80",
                          "-p", "70000", check=False)
    assert bad.returncode != 0
    # pool bindings, from the kernel's map: two inside hosts with an address each
    add_pool_addresses(seed_lab)
    gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "--pool", ",".join(POOL), "-j", "MASQ")
    with probes.serve_identity(seed_lab, "client", 80):
        for host in ("web1", "web2"):
            assert all(a.ok for a in probes.connect_many(seed_lab, host, "198.51.100.10", 80, count=2))
    deadline = time.monotonic() + 10  # the figures are at most the cache time (1 s) old
    while True:
        after = scrape(seed_lab)
        pools = {dict(labels)["rule"]: v for (name, labels), v in after.items() if name == "masqd_pool_bindings"}
        if list(pools.values()) == [2] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert list(pools.values()) == [2], pools
    assert after[("masqd_changes_total", (("op", "add"), ("result", "refused")))] == 1
    # masq_info (the Ansible module) returns the same figures and the same revision
    tmp = tempfile.mkdtemp(prefix="masqd-metrics-ansible-")
    try:
        proc, results = playbook(seed_lab, gateway, tmp, ansible_env(tmp),
                                 [{"name": "info", "ipmasq.gateway.masq_info": {}}])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        info = results["info"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from_info = {("portfw", WEB_KEY, "%s:%d" % (b["address"], b["port"])): b["connections"]
                 for e in info["portfw"] for b in e["backends"]}
    assert from_info == backend_connections(after)
    assert [(m["name"], m["hits"]) for m in info["marks"]] == [("client", after[CLIENT_HITS])]
    assert info["status"]["revision"] == after[("masqd_state_revision", ())]
    assert dict(info["status"]["tables"]) == {
        dict(labels)["table"]: v for (name, labels), v in after.items() if name == "masqd_entries"}


def test_autofw_recipient_with_its_remaining_time(gateway, seed_lab):
    gateway.masqctl("masq", "-A", "-s", "10.16.0.0/24", "-j", "MASQ")
    gateway.masqctl("autofw", "-A", "-r", "udp", "6970", "7170", "-c", "tcp", "7070", "-t", "30")
    time.sleep(1.1)
    assert scrape(seed_lab)[("masqd_autofw_associations", (("range", "udp 6970-7170"),))] == 0
    with probes.serve_identity(seed_lab, "client", 7070):
        (answer,) = probes.connect_many(seed_lab, "web1", "198.51.100.10", 7070)
    assert answer.ok, answer.error
    deadline, samples = time.monotonic() + 5, {}
    while time.monotonic() < deadline:  # detection is asynchronous; the cache is 1 s
        samples = scrape(seed_lab)
        if samples[("masqd_autofw_associations", (("range", "udp 6970-7170"),))] == 1:
            break
        time.sleep(0.3)
    assert samples[("masqd_autofw_associations", (("range", "udp 6970-7170"),))] == 1
    (left,) = [v for (name, labels), v in samples.items() if name == "masqd_autofw_recipient_expires_seconds"
               and dict(labels) == {"range": "udp 6970-7170", "peer": "", "address": "10.16.0.27"}]
    assert 20 <= left <= 30
    assert samples[("masqd_autofw_detections_total", ())] >= 1
    assert samples[("masqd_watcher_running", (("watcher", "autofw"),))] == 1


PROMETHEUS_CONFIG = """global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: masqd
    static_configs:
      - targets: ["%s"]
"""


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed (scripts/setup.sh)")
def test_a_real_prometheus_scrapes_the_per_backend_counts(gateway, seed_lab):
    base = tempfile.mkdtemp(prefix="masqd-prometheus-")
    config = os.path.join(base, "prometheus.yml")
    with open(config, "w") as handle:
        handle.write(PROMETHEUS_CONFIG % LISTEN)
    log = open(os.path.join(base, "prometheus.log"), "wb")
    # In web2's namespace: its API on web2's loopback, the scrape over the inside bridge.
    proc = seed_lab.spawn("web2", [PROMETHEUS, "--config.file", config,
                                   "--storage.tsdb.path", os.path.join(base, "data"),
                                   "--web.listen-address", "127.0.0.1:9090",
                                   "--storage.tsdb.retention.time", "1h"],
                          stdout=log, stderr=log, cwd=base)
    log.close()
    try:
        seed_traffic(seed_lab, gateway)
        deadline = time.monotonic() + 30  # bounded: ready, a scrape after the traffic, the query
        query = ("http://127.0.0.1:9090/api/v1/query?query=masqd_backend_connections_total")
        got = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, open(os.path.join(base, "prometheus.log")).read()[-3000:]
            result = seed_lab.run("web2", [PYTHON, "-c", "import sys, urllib.request\n"
                                           "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2)"
                                           ".read().decode())", query], timeout=10)
            if result.returncode == 0:
                answer = json.loads(result.stdout)
                got = {(r["metric"]["table"], r["metric"]["key"], r["metric"]["backend"]): float(r["value"][1])
                       for r in answer["data"]["result"]}
                if got == {("portfw", WEB_KEY, "10.16.0.27:80"): 15.0, ("portfw", WEB_KEY, "10.16.0.28:80"): 5.0}:
                    break
            time.sleep(0.5)
        assert got == {("portfw", WEB_KEY, "10.16.0.27:80"): 15.0, ("portfw", WEB_KEY, "10.16.0.28:80"): 5.0}
        # the scrape target itself is healthy: up == 1 for the masqd job
        up = json.loads(http_get(seed_lab, "web2", "http://127.0.0.1:9090/api/v1/query?query=up"))
        assert [(r["metric"]["job"], r["value"][1]) for r in up["data"]["result"]] == [("masqd", "1")]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(base, ignore_errors=True)
