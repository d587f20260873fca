"""Established connections and load, measured as operators do: numbered UDP and TCP
probe streams and a ping through the gateway, loss counted, while the agent takes
1,000 rule changes, a kill -9 and restart, and re-runs of the gateway role.

MASQD_SOAK=1: the RSS soak runs 10,000 changes (default 2,000)."""

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from reliability_flows import Stream, start_echo  # noqa: E402
from masqd_agent import VENV_BIN, Agent  # noqa: E402

from masqd.client import Client  # noqa: E402

pytestmark = pytest.mark.lab

SOAK = os.environ.get("MASQD_SOAK") == "1"
RSS_CHANGES = int(os.environ.get("MASQD_RSS_CHANGES", 10000 if SOAK else 2000))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GW = "198.51.100.1"
WEB1, WEB2 = "10.16.0.27", "10.16.0.28"


def key(protocol, port, *addresses):
    return {"protocol": protocol, "local_address": GW, "local_port": port,
            "backends": [{"address": a, "port": port, "pref": 10} for a in addresses]}


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="masqd-traffic-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Ping:
    """The system's ping at 50/s; SIGINT makes it print its summary."""

    def __init__(self, lab, host, dst):
        self.proc = lab.spawn(host, ["ping", "-n", "-i", "0.02", "-w", "600", dst],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self):
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGINT)
        out, _stderr = self.proc.communicate(timeout=10)
        sent, received = re.search(r"(\d+) packets transmitted, (\d+) received", out).groups()
        return {"sent": int(sent), "lost": int(sent) - int(received)}


def other_changes(client, count, base=7000):
    """`count` changes to keys the streams do not use: portfw keys with one and two
    backends come and go, and marks/masquerade rules for other networks."""
    latencies = []
    for i in range(count):
        port = base + (i // 2) % 400
        if i % 2 == 0:
            request = ("add", {"table": "portfw", "entry": key("tcp", port, WEB1, WEB2) if i % 4 == 0
                               else key("udp", port, WEB2)})
        else:
            request = ("delete", {"table": "portfw", "entry": {
                "protocol": "tcp" if i % 4 == 1 else "udp", "local_address": GW, "local_port": port}})
        if i % 50 == 24:  # (replaces an add/delete pair)
            request = ("set", {"table": "marks", "entries": [
                {"name": "other%d" % i, "mark": 9, "source": "10.99.0.0/16"}]})
        if i % 50 == 25:
            request = ("set", {"table": "masquerade", "entries": [
                {"name": "lab%d" % i, "source": "10.99.0.0/16"}]})
        started = time.perf_counter()
        client.request(request[0], **request[1])
        latencies.append(time.perf_counter() - started)
    return latencies


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1))))]


def test_established_flows_survive_changes_and_restart_new_ones_follow_the_backends(seed_lab, workdir):
    agent = Agent(seed_lab, workdir)
    agent.start()
    servers = [start_echo(seed_lab, host, port) for host in ("web1", "web2") for port in (5000, 5001)]
    with Client(agent.socket) as client:
        client.request("add", table="portfw", entry=key("udp", 5000, WEB1))
        client.request("add", table="portfw", entry=key("tcp", 5001, WEB1))
    udp = Stream(seed_lab, "client", "udp", GW, 5000, rate=200)
    tcp = Stream(seed_lab, "client", "tcp", GW, 5001, rate=200)
    ping = Ping(seed_lab, "client", WEB2)
    try:
        with Client(agent.socket) as client:
            latencies = other_changes(client, 1000)
        agent.stop(signal.SIGKILL)
        time.sleep(0.5)  # the agent is down: the kernel keeps forwarding
        agent.start()
        with Client(agent.socket) as client:
            # the key's own backends change: only new connections follow
            client.request("set", table="portfw", entries=[key("udp", 5000, WEB2), key("tcp", 5001, WEB2)])
        time.sleep(0.5)
        fresh_udp = Stream(seed_lab, "client", "udp", GW, 5000, rate=50)
        fresh_tcp = Stream(seed_lab, "client", "tcp", GW, 5001, rate=50)
        time.sleep(0.5)
        fresh = fresh_udp.finish(), fresh_tcp.finish()
    finally:
        results = {"udp": udp.finish(), "tcp": tcp.finish(), "ping": ping.finish()}
        agent.stop()
        for server in servers:
            server.kill()
    print("\nflows through 1,000 changes + kill -9/restart + backend change: %s; change p50 %.1f ms p99 %.1f ms"
          % ({k: (v["sent"], v["lost"]) for k, v in results.items()},
             1000 * percentile(latencies, 50), 1000 * percentile(latencies, 99)))
    for name in ("udp", "tcp"):
        summary = results[name]
        assert summary["error"] is None and summary["lost"] == 0, (name, summary)
        assert summary["backends"] == {"web1": summary["received"]}, (name, summary)  # stayed on web1
        assert summary["sent"] > 400
    assert results["ping"]["lost"] == 0 and results["ping"]["sent"] > 100, results["ping"]
    for summary in fresh:
        assert summary["error"] is None and summary["lost"] == 0 and list(summary["backends"]) == ["web2"], fresh


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        return int(re.search(r"VmRSS:\s+(\d+) kB", handle.read()).group(1))


def test_load_latency_under_traffic_and_flat_memory(seed_lab, workdir):
    agent = Agent(seed_lab, workdir)
    agent.start()
    iperf_server = seed_lab.spawn("web2", ["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    # sustained traffic through the gateway for the whole measurement (bounded: 60 s, 500 Mbit/s)
    iperf = seed_lab.spawn("client", ["iperf3", "-c", WEB2, "-p", "5201", "-t", "60", "-b", "500M", "-J"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        with Client(agent.socket) as client:
            client.request("add", table="portfw", entry=key("udp", 5000, WEB1))
            latencies = other_changes(client, 1000)
            warm = rss_kib(agent.proc.pid)
            samples = [warm]
            started = time.monotonic()
            for block in range(RSS_CHANGES // 1000):
                other_changes(client, 1000, base=8000)
                samples.append(rss_kib(agent.proc.pid))
            soak_seconds = time.monotonic() - started
            status = client.request("status")["result"]
        iperf_running = iperf.poll() is None
    finally:
        iperf.kill()
        iperf_server.kill()
        agent.stop()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    print("\n1,000 changes under iperf3 load: p50 %.1f ms, p99 %.1f ms, max %.1f ms, mean %.1f ms"
          % (1000 * p50, 1000 * p99, 1000 * max(latencies), 1000 * statistics.mean(latencies)))
    print("RSS over %d more changes (%.1f s): %s KiB" % (RSS_CHANGES, soak_seconds, samples))
    assert iperf_running, "the traffic stopped before the changes were done"
    assert p99 < 0.25, "p99 %.3f s" % p99
    assert status["tables"]["portfw"] <= 401
    # flat: after warm-up, growth below 4 MiB whatever the number of changes
    assert max(samples) - warm < 4096, samples


def test_flows_survive_gateway_role_reruns_and_a_kill(seed_lab, tmp_path):
    """roles/gateway installs and runs the agent (start-stop-daemon in the lab): a
    re-run with the agent alive, and one after kill -9 (it restarts the agent),
    never disturb established flows."""
    prefix = seed_lab.prefix
    run_dir = "/run/ipmasq-lab/%s" % prefix
    home = tmp_path / "home"
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ["PATH"], ANSIBLE_HOME=str(home),
               ANSIBLE_LOCAL_TEMP=str(home / "tmp"), ANSIBLE_REMOTE_TEMP=str(tmp_path / "remote"),
               ANSIBLE_PIPELINING="true", ANSIBLE_NOCOLOR="1", PYTHONDONTWRITEBYTECODE="1")
    collections = tmp_path / "collections" / "ansible_collections" / "ipmasq"
    collections.mkdir(parents=True)
    (collections / "gateway").symlink_to(REPO)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(tmp_path / "collections")
    env.pop("ANSIBLE_CONFIG", None)
    play = tmp_path / "role.yml"
    play.write_text(yaml.safe_dump([{"name": "gateway role", "hosts": "gateways", "gather_facts": False,
                                     "roles": ["ipmasq.gateway.gateway"]}]))
    tables = '{"gateway_portfw": [%s, %s]}' % tuple(
        str(key(p, port, WEB1)).replace("'", '"') for p, port in (("udp", 5000), ("tcp", 5001)))

    def role():
        proc = subprocess.run(["ansible-playbook", "-i", os.path.join(REPO, "inventory", "lab.yml"),
                               "-e", "lab_prefix=" + prefix, "-e", tables, str(play)],
                              env=env, capture_output=True, text=True, timeout=180, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        return proc.stdout

    servers = [start_echo(seed_lab, "web1", port) for port in (5000, 5001)]
    try:
        role()
        udp = Stream(seed_lab, "client", "udp", GW, 5000, rate=200)
        tcp = Stream(seed_lab, "client", "tcp", GW, 5001, rate=200)
        try:
            role()  # (a restart too when the agent's files changed since the first run)
            with open(os.path.join(run_dir, "gateway", "masqd.pid")) as handle:
                pid = int(handle.read())
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            role()  # starts the agent again and re-applies the tables
        finally:
            results = {"udp": udp.finish(), "tcp": tcp.finish()}
    finally:
        for server in servers:
            server.kill()
        seed_lab.down()  # also kills the role's agent
        shutil.rmtree(run_dir, ignore_errors=True)
    print("\nflows through 2 role re-runs and a kill: %s" % {k: (v["sent"], v["lost"]) for k, v in results.items()})
    for name, summary in results.items():
        assert summary["error"] is None and summary["lost"] == 0, (name, summary)
        assert summary["backends"] == {"web1": summary["received"]}
