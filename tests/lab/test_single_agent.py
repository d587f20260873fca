"""One agent per state directory and per network namespace, with real agents in lab
namespaces: a second agent exits non-zero naming the running one, before it touches
the kernel, and the first keeps serving with its table and state intact; agents in two
different namespaces both run."""

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import Agent  # noqa: E402

from masqd.client import Client  # noqa: E402

pytestmark = pytest.mark.lab

GW = "198.51.100.1"
WEB = {"protocol": "tcp", "local_address": GW, "local_port": 80,
       "backends": [{"address": "10.16.0.27", "port": 80, "pref": 10}]}


@pytest.fixture
def bases():
    made = []

    def make():
        made.append(tempfile.mkdtemp(prefix="masqd-single-"))
        return made[-1]
    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def first(seed_lab, bases):
    agent = Agent(seed_lab, bases())
    agent.start()
    with Client(agent.socket) as client:
        for port in (80, 81, 82):
            client.request("add", table="portfw", entry=dict(WEB, local_port=port))
    yield agent
    agent.stop()


def refused_second(second, first):
    """The second agent exits non-zero, naming the first (pid, state dir, socket)."""
    proc = second.start(wait=False)
    assert proc.wait(timeout=20) != 0, second.log()
    log = second.log()
    assert "cannot start" in log, log
    assert "pid %d" % first.proc.pid in log, log
    assert "state dir %s" % first.state_dir in log and "socket %s" % first.socket in log, log
    assert "Traceback" not in log, log
    return log


def still_serving(agent, table, files):
    assert agent.proc.poll() is None, agent.log()
    with Client(agent.socket) as client:
        entries = client.request("get", table="portfw")["result"]["entries"]
        assert [e["local_port"] for e in entries] == [80, 81, 82]
        client.request("add", table="portfw", entry=dict(WEB, local_port=83))  # and still writes
        client.request("delete", table="portfw", entry=dict(WEB, local_port=83, backends=[]))
    assert agent.table() == table
    assert agent.state_bytes().keys() == files.keys()


def test_two_agents_on_one_state_dir_with_different_sockets(first, seed_lab, bases, lab_factory):
    """In another namespace even: the state dir alone decides."""
    other = lab_factory({"name": "sd2", "hosts": {"solo": {"interfaces": {}}}})
    second = Agent(other, bases(), host="solo")
    second.state_dir = first.state_dir
    table, files = first.table(), first.state_bytes()
    log = refused_second(second, first)
    assert "state dir %s is in use by another masqd" % first.state_dir in log, log
    assert not os.path.exists(second.socket)
    assert "masqd" not in other.run("solo", ["nft", "list", "tables"], timeout=10, check=True).stdout
    assert first.state_bytes() == files  # not even read-modified
    still_serving(first, table, files)


def test_two_agents_in_one_namespace_with_different_dirs(first, seed_lab, bases):
    second = Agent(seed_lab, bases())
    table, files = first.table(), first.state_bytes()
    log = refused_second(second, first)
    assert "another masqd runs in this network namespace" in log, log
    assert not os.path.exists(second.socket)
    assert first.table() == table  # not replaced by the second agent's (empty) state
    still_serving(first, table, files)


def test_agents_in_two_namespaces_both_run(first, bases, lab_factory):
    other = lab_factory({"name": "ns2", "hosts": {"solo": {"interfaces": {}}}})
    second = Agent(other, bases(), host="solo")
    second.start()
    try:
        with Client(second.socket) as client:
            client.request("add", table="marks", entry={"name": "friend", "mark": 1, "source": "203.0.113.0/24"})
        with Client(first.socket) as client:
            assert client.request("status")["result"]["tables"]["portfw"] == 3
            assert client.request("status")["result"]["tables"]["marks"] == 0
        assert "203.0.113.0/24" in second.table() and "203.0.113.0/24" not in first.table()
    finally:
        assert second.stop() == 0
