"""Concurrency against one real agent: many Python clients, masqctl processes and two
ansible-playbook runs change the same gateway at once. Every acknowledged change is
there at the end, nothing is duplicated, writes are serialised (every revision is
acknowledged exactly once), and compare-and-set stops a declarative caller from
overwriting a change it did not see.

MASQD_SOAK=1: 8 writers x 200 changes (default 8 x 60)."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import PYTHON, VENV_BIN, Agent  # noqa: E402

from masqd.client import Client, MasqdError  # noqa: E402

pytestmark = pytest.mark.lab

SOAK = os.environ.get("MASQD_SOAK") == "1"
WRITERS = 8
CHANGES = int(os.environ.get("MASQD_CHANGES_PER_WRITER", 200 if SOAK else 60))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GW = "198.51.100.1"
SHARED = (10, 22, 34, 46)  # changes that add a backend to the shared mark (never i % 4 == 3)


@pytest.fixture
def agent(seed_lab):
    base = tempfile.mkdtemp(prefix="masqd-conc-")
    running = Agent(seed_lab, base)
    running.start()
    yield running
    running.stop()
    shutil.rmtree(base, ignore_errors=True)


def entry(port, address="10.16.0.27"):
    return {"protocol": "tcp", "local_address": GW, "local_port": port,
            "backends": [{"address": address, "port": 80, "pref": 10}]}


def test_writers_at_once_every_acknowledged_change_once(agent):
    with Client(agent.socket) as client:
        client.request("add", table="mfw", entry={"mark": 1, "backends": [{"address": "10.16.0.3"}]})
        start = client.request("status")["revision"]
    revisions, failures, expected_keys, lock = [], [], set(), threading.Lock()
    barrier = threading.Barrier(WRITERS)

    def writer(w):
        mine, acked = [], []
        try:
            with Client(agent.socket) as client:
                barrier.wait(10)
                for i in range(CHANGES):
                    if i % 4 == 3 and mine:  # delete one of my keys
                        port = mine.pop(0)
                        r = client.request("delete", table="portfw", entry={
                            "protocol": "tcp", "local_address": GW, "local_port": port})
                    elif i in SHARED:  # a backend of the shared mark (4 per writer)
                        r = client.request("add", table="mfw", entry={
                            "mark": 1, "backends": [{"address": "10.17.%d.%d" % (w, i)}]})
                    else:
                        port = 10000 + w * 1000 + i
                        r = client.request("add", table="portfw", entry=entry(port))
                        mine.append(port)
                    acked.append(r["revision"])
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append("writer %d: %r" % (w, exc))
        with lock:
            revisions.extend(acked)
            expected_keys.update(mine)

    # two masqctl processes writing at the same time, with the seed's syntax
    script = ('for p in $(seq %d %d); do masqctl portfw -a -P tcp -L %s $p -R 10.16.0.28 80 || exit 1; done'
              % (30000, 30000 + 19, GW), 'for p in $(seq %d %d); do masqctl portfw -a -P tcp -L %s $p -R 10.16.0.28 80 || exit 1; done'
              % (31000, 31000 + 19, GW))
    env = dict(os.environ, PATH=VENV_BIN + ":" + os.environ["PATH"], MASQD_SOCKET=agent.socket)
    shells = [agent.lab.spawn("gateway", ["bash", "-c", s], env=env, stderr=subprocess.PIPE) for s in script]
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for shell in shells:
        assert shell.wait(120) == 0, shell.stderr.read()
    assert not failures, failures
    expected_keys.update(range(30000, 30020))
    expected_keys.update(range(31000, 31020))
    with Client(agent.socket) as client:
        final = client.request("get")
    ports = [e["local_port"] for e in final["result"]["tables"]["portfw"]]
    assert len(ports) == len(set(ports)), "duplicated keys"
    assert set(ports) == expected_keys
    mark = final["result"]["tables"]["mfw"][0]["backends"]
    addresses = [b["address"] for b in mark]
    assert len(addresses) == len(set(addresses)) == 1 + WRITERS * len([i for i in SHARED if i < CHANGES])
    # serialised: each revision acknowledged once, none skipped (40 from masqctl)
    assert len(revisions) == len(set(revisions)) == WRITERS * CHANGES
    assert final["revision"] == start + WRITERS * CHANGES + 40
    assert set(revisions) <= set(range(start + 1, final["revision"] + 1))
    # and the kernel holds every key: one element per single-backend key
    table = agent.table()
    for port in (min(expected_keys), max(expected_keys)):
        assert "%s . tcp . %d" % (GW, port) in table
    print("\n%d writers x %d changes + 2 masqctl x 20: revision %d -> %d"
          % (WRITERS, CHANGES, start, final["revision"]))


def test_two_sets_with_the_same_stale_revision_exactly_one_wins(agent):
    for round_ in range(20):
        with Client(agent.socket) as client:
            revision = client.request("status")["revision"]
        barrier, results = threading.Barrier(2), [None, None]

        def set_table(i):
            with Client(agent.socket) as client:
                barrier.wait(10)
                try:
                    results[i] = client.request("set", table="portfw", entries=[entry(80 + i + 2 * round_)],
                                                revision=revision)
                except MasqdError as exc:
                    results[i] = exc

        threads = [threading.Thread(target=set_table, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        wins = [r for r in results if isinstance(r, dict)]
        losses = [r for r in results if isinstance(r, MasqdError)]
        assert len(wins) == 1 and len(losses) == 1, results
        assert losses[0].field == "revision" and losses[0].value == revision
        assert "stale: the current revision is %d" % (revision + 1) in losses[0].message
        with Client(agent.socket) as client:
            assert client.request("get", table="portfw")["result"]["entries"] == wins[0]["result"]["entries"]


def ansible_env(tmp_path):
    collections = tmp_path / "collections" / "ansible_collections" / "ipmasq"
    collections.mkdir(parents=True)
    (collections / "gateway").symlink_to(REPO)
    home = tmp_path / "ansible-home"
    env = dict(os.environ)
    env.update({"PATH": VENV_BIN + os.pathsep + env.get("PATH", "/usr/bin:/bin"),
                "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections"), "ANSIBLE_HOME": str(home),
                "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_REMOTE_TEMP": str(tmp_path / "remote-tmp"),
                "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PIPELINING": "true", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                "PYTHONDONTWRITEBYTECODE": "1"})
    env.pop("ANSIBLE_CONFIG", None)
    return env


def test_two_ansible_runs_merge_different_keys_at_once(agent, tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[gateways]\n%s\n[gateways:vars]\nansible_connection=ipmasq.gateway.netns\n"
                         "ansible_python_interpreter=%s\n" % (agent.lab.netns("gateway"), PYTHON))
    runs = []
    for run, base in ((0, 20000), (1, 21000)):
        play = [{"name": "run %d" % run, "hosts": "gateways", "gather_facts": False, "tasks": [
            {"name": "merge key", "ipmasq.gateway.masq_portfw": {
                "socket": agent.socket, "state": "merged",
                "config": [{"protocol": "tcp", "local_address": GW, "local_port": "{{ item }}",
                            "backends": [{"address": "10.16.0.27", "port": 80}]}]},
             "loop": list(range(base, base + 6))}]}]
        path = tmp_path / ("play%d.yml" % run)
        path.write_text(yaml.safe_dump(play, sort_keys=False))
        runs.append(subprocess.Popen(["ansible-playbook", "-i", str(inventory), str(path)],
                                     env=ansible_env(tmp_path / ("run%d" % run)), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    outputs = [r.communicate(timeout=240)[0] for r in runs]
    for r, out in zip(runs, outputs):
        assert r.returncode == 0, out[-3000:]
    with Client(agent.socket) as client:
        ports = [e["local_port"] for e in client.request("get", table="portfw")["result"]["entries"]]
    assert sorted(ports) == list(range(20000, 20006)) + list(range(21000, 21006))
