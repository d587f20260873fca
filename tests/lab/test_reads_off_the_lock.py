"""A long read (`list` of a big table) never holds up writers or other readers: reads
run on a snapshot of the state with a kernel handle of their own (real agent, real
kernel)."""

import os
import statistics
import sys
import threading
import time

import pytest

from masqd.client import Client

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import running_agent  # noqa: E402

pytestmark = pytest.mark.lab

KEYS = int(os.environ.get("MASQD_LIST_KEYS", "30000"))


def entries(count, port_base=1):
    return [{"protocol": "udp", "local_address": "198.51.100.%d" % (2 + i // 60000),
             "local_port": port_base + i % 60000,
             "backends": [{"address": "10.16.%d.%d" % (1 + i // 250 % 250, 1 + i % 250), "port": 53, "pref": 10}]}
            for i in range(count)]


def test_writes_and_status_go_on_while_a_big_list_runs(seed_lab):
    with running_agent(seed_lab) as agent:
        with Client(agent.socket, timeout=120) as c:
            c.request("set", table="portfw", entries=entries(KEYS))
        listed, done = {}, threading.Event()

        def long_list():
            with Client(agent.socket, timeout=120) as c:
                started = time.monotonic()
                listed["count"] = len(c.request("list", table="portfw")["result"]["entries"])
                listed["seconds"] = time.monotonic() - started
            done.set()

        reader = threading.Thread(target=long_list)
        reader.start()
        adds, statuses = [], []
        with Client(agent.socket, timeout=30) as writer, Client(agent.socket, timeout=30) as other:
            time.sleep(0.05)  # the list has started
            port = 0
            while not done.is_set() and port < 200:
                port += 1
                t0 = time.monotonic()
                writer.request("add", table="portfw", entry={
                    "protocol": "tcp", "local_address": "203.0.113.1", "local_port": port,
                    "backends": [{"address": "10.16.0.27", "port": 80}]})
                adds.append(time.monotonic() - t0)
                t0 = time.monotonic()
                other.request("status")
                statuses.append(time.monotonic() - t0)
        reader.join(120)
        assert listed["count"] == KEYS  # the snapshot: the keys of when the list began
        print("list of %d keys: %.2f s; meanwhile %d adds, median %.1f ms, max %.1f ms; status max %.1f ms"
              % (KEYS, listed["seconds"], len(adds), statistics.median(adds) * 1e3, max(adds) * 1e3,
                 max(statuses) * 1e3))
        assert len(adds) >= 3, "the list ended before the writes could be measured"
        assert statistics.median(adds) < 0.025 and max(adds) < 0.25
        assert max(statuses) < 0.25
