"""Crash safety with the real agent, kernel and packets: kill -9 at random points of a
stream of changes, a full or read-only state dir, and a change the kernel refuses.

After every restart the stored state is one of the committed versions (the last
acknowledged one, or the one in flight when the agent died), the kernel holds exactly
the rendering of that state, and a probe stream through a pre-existing PORTFW rule
never lost a packet: the kernel forwards while the agent is down.

MASQD_SOAK=1 runs the long versions (figures in RELIABILITY.md).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from reliability_flows import Stream, start_echo  # noqa: E402
from masqd_agent import PYTHON, Agent, masqd_table_json  # noqa: E402

from masqd.client import AgentUnavailable, Client, MasqdError  # noqa: E402
from masqd.store import Store  # noqa: E402

pytestmark = pytest.mark.lab

SOAK = os.environ.get("MASQD_SOAK") == "1"
KILLS = int(os.environ.get("MASQD_KILLS", 1000 if SOAK else 200))

GW = "198.51.100.1"
STREAM_KEY = {"protocol": "udp", "local_address": GW, "local_port": 5000,
              "backends": [{"address": "10.16.0.27", "port": 5000, "pref": 10}]}


def key_of(entry):
    return (entry["protocol"], entry["local_address"], entry["local_port"])


def portfw_entry(port, backends=1):
    return {"protocol": "udp", "local_address": GW, "local_port": port,
            "backends": [{"address": "10.16.0.%d" % (28 + i), "port": port, "pref": 10} for i in range(backends)]}


def canonical_table(objects):
    """An nft JSON listing of masqd's tables without handles, counter values, the order
    of map/set elements (a hash set lists in its own random-seeded order) and the order
    of chains, maps and sets (the kernel lists them as they were created, and a re-sync
    re-creates them): (sorted objects, {chain: its rules in order})."""
    out, rules = [], {}
    for obj in objects or []:
        (kind, body), = obj.items()
        if kind == "metainfo":
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind in ("map", "set") and "elem" in body:
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        text = re.sub(r'"counter": \{[^}]*\}', '"counter": {}', json.dumps({kind: body}, sort_keys=True))
        if kind == "rule":
            rules.setdefault(body["chain"], []).append(text)
        else:
            out.append(text)
    return sorted(out), rules


def kernel_table(lab, host="gateway"):
    result = lab.run(host, ["nft", "-j", "list", "ruleset"], timeout=10, check=True)
    return masqd_table_json(json.loads(result.stdout)["nftables"])


REFERENCE = r"""
import json, sys
from masqd.service import Service
for line in sys.stdin:
    svc = Service(line.strip())
    svc.start()
    print(json.dumps(svc.nft.list_table()), flush=True)
"""


class Reference:
    """What a fresh Service renders into a clean kernel for a given state dir: a
    long-lived process in a namespace of its own."""

    def __init__(self, lab_factory):
        self.lab = lab_factory({"name": "ref", "hosts": {"ref": {"interfaces": {}}}})
        self.proc = self.lab.spawn("ref", [PYTHON, "-c", REFERENCE], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        self.scratch = tempfile.mkdtemp(prefix="masqd-ref-")

    def render(self, state_dir):
        copy = os.path.join(self.scratch, "state")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(state_dir, copy)
        self.proc.stdin.write(copy + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.scratch, ignore_errors=True)


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="masqd-rel-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Writer(threading.Thread):
    """One client streaming random changes until the agent dies; `acked` maps each
    acknowledged revision to the portfw table it committed, `pending` is the change
    in flight (revision, table) when the connection broke."""

    def __init__(self, socket_path, rng, table, revision, acked):
        super().__init__(daemon=True)
        self.socket_path, self.rng, self.table, self.revision, self.acked = socket_path, rng, table, revision, acked
        self.pending = None
        self.failure = None

    def run(self):
        client = Client(self.socket_path, timeout=10)
        try:
            while True:
                op, args, new = self.next_change()
                self.pending = (self.revision + 1, new)
                response = client.request(op, table="portfw", **args)
                if not response["changed"] and new == self.table:
                    self.pending = None  # a `set` to what is there already: no commit
                    if response["revision"] != self.revision:
                        self.failure = "unchanged %s moved the revision to %s" % (op, response["revision"])
                        return
                    continue
                if response["revision"] != self.revision + 1:
                    self.failure = "%s acknowledged revision %s, expected %d" % (
                        op, response["revision"], self.revision + 1)
                    return
                self.revision += 1
                self.acked[self.revision] = new
                self.table = new
                self.pending = None
        except AgentUnavailable:
            return
        except MasqdError as exc:
            self.failure = "refused: %s" % exc
        finally:
            client.close()

    def next_change(self):
        table, rng = dict(self.table), self.rng
        mine = [k for k in table if k[2] != 5000]
        roll = rng.random()
        if roll < 0.05:  # whole-table change: a snapshot write
            keep = [table[k] for k in table if rng.random() < 0.7 or k[2] == 5000]
            keep.append(portfw_entry(rng.randrange(6000, 7000), rng.choice((1, 2))))
            new = {}
            for e in keep:
                new[key_of(e)] = e
            return "set", {"entries": list(new.values())}, new
        if mine and roll < 0.45:
            key = rng.choice(mine)
            del table[key]
            return "delete", {"entry": {"protocol": key[0], "local_address": key[1], "local_port": key[2],
                                        "backends": []}}, table
        if mine and roll < 0.6 and len(table[mine[0]]["backends"]) < 3:
            key = mine[0]
            extra = {"address": "10.16.0.%d" % (28 + len(table[key]["backends"])), "port": key[2], "pref": 10}
            table[key] = dict(table[key], backends=table[key]["backends"] + [extra])
            return "add", {"entry": dict(table[key], backends=[extra])}, table
        port = rng.randrange(6000, 7000)
        while (("udp", GW, port)) in table:
            port = rng.randrange(6000, 7000)
        entry = portfw_entry(port)
        table[key_of(entry)] = entry
        return "add", {"entry": entry}, table


def stored_portfw(state_dir):
    doc = Store(state_dir).load()
    return doc["revision"], {key_of(e): e for e in doc["tables"].get("portfw", [])}


def test_kill9_during_a_stream_of_changes(seed_lab, lab_factory, workdir):
    """KILLS x (start, stream changes, kill -9 at a random moment): stored state is a
    committed version, the kernel equals its rendering, forwarding never stopped."""
    rng = random.Random(int(os.environ.get("MASQD_SEED", "7")))
    agent = Agent(seed_lab, workdir)
    agent.start()
    with Client(agent.socket) as client:
        client.request("add", table="portfw", entry=STREAM_KEY)
    reference = Reference(lab_factory)
    start_echo(seed_lab, "web1", 5000)
    stream = Stream(seed_lab, "client", "udp", GW, 5000, rate=200, max_seconds=600)
    revision, table = stored_portfw(agent.state_dir)
    acked = {revision: table}
    outcomes = {"acked": 0, "in_flight_committed": 0, "in_flight_dropped": 0}
    try:
        for kill in range(KILLS):
            writer = Writer(agent.socket, rng, table, revision, acked)
            writer.start()
            time.sleep(rng.uniform(0.0, 0.06))
            agent.stop(signal.SIGKILL)
            writer.join(15)
            assert not writer.is_alive() and writer.failure is None, writer.failure
            outcomes["acked"] += writer.revision - revision
            agent.start()
            stored_rev, stored = stored_portfw(agent.state_dir)
            last = writer.revision
            if writer.pending and stored_rev == writer.pending[0]:
                assert stored == writer.pending[1], "kill %d: in-flight revision %d torn" % (kill, stored_rev)
                outcomes["in_flight_committed"] += 1
            else:
                assert stored_rev == last, "kill %d: stored revision %d, last acknowledged %d" % (
                    kill, stored_rev, last)
                assert stored == acked[last], "kill %d: stored table differs from revision %d" % (kill, last)
                outcomes["in_flight_dropped"] += writer.pending is not None
            leftovers = [n for n in os.listdir(agent.state_dir) if n not in ("state.json", "state.journal")]
            assert not leftovers, "kill %d left %s in the state dir" % (kill, leftovers)
            with Client(agent.socket) as client:
                status = client.request("get", table="portfw")
            assert status["revision"] == stored_rev
            assert {key_of(e): e for e in status["result"]["entries"]} == stored
            assert canonical_table(kernel_table(seed_lab)) == canonical_table(reference.render(agent.state_dir)), \
                "kill %d: kernel table is not the rendering of the stored state" % kill
            revision, table = stored_rev, stored
            acked[revision] = stored
    finally:
        summary = stream.finish()
        agent.stop()
        reference.close()
    print("\nkill -9 x %d: %s; stream %s" % (KILLS, outcomes, {k: summary[k] for k in ("sent", "lost")}))
    assert summary["error"] is None and summary["lost"] == 0, summary
    assert summary["backends"] == {"web1": summary["received"]}
    assert outcomes["acked"] >= KILLS  # the kills really landed in a stream of changes


# -- full disk, read-only state dir ------------------------------------------------------

class ConfinedAgent(Agent):
    """An agent whose state dir is a small tmpfs in a private mount namespace; the
    test reaches it through /proc/PID/root."""

    def __init__(self, lab, base, size="256k"):
        super().__init__(lab, base)
        self.size = size

    def start(self, wait=True):
        os.makedirs(self.state_dir, exist_ok=True)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        script = 'mount -t tmpfs -o size="$1",mode=0700 masqd-state "$2" && shift 2 && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", self.size,
                self.state_dir, PYTHON, "-m", "masqd.daemon", "--state-dir", self.state_dir,
                "--socket", self.socket]
        log = open(self.log_path, "ab")
        self.proc = self.lab.spawn(self.host, argv, stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_ready()
        return self.proc

    def path(self, name=""):
        return os.path.join("/proc/%d/root" % self.proc.pid, self.state_dir.lstrip("/"), name)

    def in_mounts(self, *argv):
        subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m"] + list(argv), check=True, timeout=10)

    def files(self):
        out = {}
        for name in sorted(os.listdir(self.path())):
            with open(self.path(name), "rb") as handle:
                out[name] = handle.read()
        return out


def fill(path):
    """Write `path` until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_full_disk_and_read_only_state_dir_fail_cleanly(seed_lab, workdir):
    agent = ConfinedAgent(seed_lab, workdir)
    agent.start()
    try:
        with Client(agent.socket) as client:
            client.request("add", table="portfw", entry=STREAM_KEY)
            # a journal whose last page has room, then a full disk: the next record
            # (a 64-backend entry, ~3 kB) fits only partly
            for port in range(6000, 6010):
                client.request("add", table="portfw", entry=portfw_entry(port))
            fill(agent.path("filler"))
            before_kernel, before_files = kernel_table(seed_lab), agent.files()
            revision = client.request("status")["revision"]
            big = {"protocol": "tcp", "local_address": GW, "local_port": 443,
                   "backends": [{"address": "10.16.1.%d" % i, "port": 443, "pref": 10} for i in range(1, 65)]}
            for op, args in (("add", {"entry": big}),
                             ("set", {"entries": [STREAM_KEY, big]}),
                             ("add", {"entry": dict(big, local_port=444)})):
                with pytest.raises(MasqdError) as refused:
                    client.request(op, table="portfw", **args)
                assert refused.value.field == "state_dir" and refused.value.value == agent.state_dir, op
                assert "could not persist" in refused.value.message and "No space left" in refused.value.message
                assert canonical_table(kernel_table(seed_lab)) == canonical_table(before_kernel), op
                assert agent.files() == before_files, op
                assert client.request("status")["revision"] == revision
            os.unlink(agent.path("filler"))
            client.request("add", table="portfw", entry=big)  # room again: it works
            # read-only
            agent.in_mounts("mount", "-o", "remount,ro", agent.state_dir)
            before_kernel, before_files = kernel_table(seed_lab), agent.files()
            with pytest.raises(MasqdError) as refused:
                client.request("delete", table="portfw", entry={"protocol": "tcp", "local_address": GW,
                                                                "local_port": 443})
            assert refused.value.field == "state_dir" and "Read-only file system" in refused.value.message
            assert canonical_table(kernel_table(seed_lab)) == canonical_table(before_kernel)
            assert agent.files() == before_files
            agent.in_mounts("mount", "-o", "remount,rw", agent.state_dir)
            expected = client.request("get", table="portfw")["result"]["entries"]
        # every acknowledged change is in what a restart would load (no torn record)
        copy = os.path.join(workdir, "copy")
        os.makedirs(copy)
        for name, data in agent.files().items():
            with open(os.path.join(copy, name), "wb") as handle:
                handle.write(data)
        assert Store(copy).load()["tables"]["portfw"] == expected
    finally:
        agent.stop()


# -- a change the kernel refuses ----------------------------------------------------------

REFUSAL = r"""
import json, os, sys
from masqd import render
from masqd.nft import LibNftables
from masqd.service import Service

class Refusing(LibNftables):
    '''The real kernel, with a fault injected into the apply step when armed: every
    transaction also jumps to a base chain, which the kernel refuses (EOPNOTSUPP).'''
    armed = False
    def apply(self, txn, dry_run=False, alongside=None):
        if self.armed:
            txn = render.Transaction(txn.ops + [
                render.Op("add", "chain", "loop", render.Chain("loop", None, ())),
                render.Op("add", "rule", "loop", "jump prerouting")])
        return super().apply(txn, dry_run, alongside)

def files(d):
    return {n: open(os.path.join(d, n), "rb").read().hex() for n in sorted(os.listdir(d))}

state_dir = sys.argv[1]
svc = Service(state_dir, nft=Refusing())
svc.start()
web = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
       "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15}, {"address": "10.16.0.28", "port": 80, "pref": 5}]}
setup = [{"op": "set", "table": "portfw", "entries": [web]},
         {"op": "add", "table": "mfw", "entry": {"mark": 1, "backends": [{"address": "10.16.0.3", "pref": 0},
                                                                         {"address": "10.16.0.46", "pref": 0}]}},
         {"op": "add", "table": "marks", "entry": {"name": "friend", "mark": 1, "source": "203.0.113.0/24"}},
         {"op": "add", "table": "autofw", "entry": {"protocol": "udp", "low_port": 6970, "high_port": 7170,
                                                     "hidden_host": "10.16.0.27"}},
         {"op": "add", "table": "masquerade", "entry": {"name": "out", "source": "10.16.0.0/24"}}]
for req in setup:
    assert svc.handle(req)["ok"], req
writes = [
    {"op": "add", "table": "portfw", "entry": dict(web, local_port=81)},
    {"op": "add", "table": "portfw", "entry": dict(web, backends=[{"address": "10.16.0.29", "port": 80}])},
    {"op": "edit", "table": "portfw", "entry": dict(web, backends=[{"address": "10.16.0.28", "port": 80, "pref": 1}])},
    {"op": "delete", "table": "portfw", "entry": {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80}},
    {"op": "insert", "table": "mfw", "entry": {"mark": 1, "backends": [{"address": "10.16.0.5", "pref": 0}]}},
    {"op": "schedule", "mark": 1},
    {"op": "delete", "table": "marks", "entry": {"name": "friend"}},
    {"op": "add", "table": "masquerade", "entry": {"name": "more", "destination": "203.0.113.0/24"}},
    {"op": "delete", "table": "autofw", "entry": {"protocol": "udp", "low_port": 6970, "high_port": 7170}},
    {"op": "flush", "table": "mfw"},
    {"op": "set", "table": "marks", "entries": []},
]
before = (svc.nft.list_text(), files(state_dir), svc.handle({"op": "get"}))
svc.nft.armed = True
out = []
for req in writes:
    resp = svc.handle(req)
    out.append({"op": req["op"], "response": resp,
                "same": (svc.nft.list_text(), files(state_dir), svc.handle({"op": "get"})) == before})
svc.nft.armed = False
out.append({"op": "disarmed", "response": svc.handle(writes[0]), "same": None})
print(json.dumps(out))
"""


def test_a_change_the_kernel_refuses_changes_nothing(seed_lab, workdir):
    """Every kind of write, refused by the real kernel (fault injected into the apply
    step): kernel listing, state files and the agent's view exactly as before, and the
    caller gets the kernel's own reason."""
    result = seed_lab.run("gateway", [PYTHON, "-c", REFUSAL, os.path.join(workdir, "state")], timeout=60)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.splitlines()[-1])
    for outcome in outcomes[:-1]:
        response = outcome["response"]
        assert response["ok"] is False, outcome
        assert response["error"]["field"] in ("entry", "entries", "mark") or (
            outcome["op"] == "schedule" and response["error"]["field"] in ("entry", "mark")), outcome
        assert response["error"]["message"].startswith("the kernel refused the change: Error:"), outcome
        assert "Operation not supported" in response["error"]["message"], outcome
        assert outcome["same"] is True, outcome["op"]
    assert outcomes[-1]["response"]["ok"] is True  # the same change goes through once the fault is gone
