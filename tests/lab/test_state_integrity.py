"""The journal never drops acknowledged changes silently: a real agent in a lab
namespace over damaged state files refuses to start, names the file, the line and the
problem, leaves every file byte-identical and the kernel untouched; `masqd
--salvage-state` keeps a copy, loads the valid prefix and the agent starts again; a torn
last record (a crash mid-append) is the one damage that is forgiven."""

import json
import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import PYTHON, Agent  # noqa: E402

from masqd.client import Client  # noqa: E402

pytestmark = pytest.mark.lab

GW = "198.51.100.1"


def web(port):
    return {"protocol": "tcp", "local_address": GW, "local_port": port,
            "backends": [{"address": "10.16.0.27", "port": port, "pref": 10}]}


def ports(agent):
    with Client(agent.socket) as client:
        return [e["local_port"] for e in client.request("get", table="portfw")["result"]["entries"]]


def kernel(agent):
    return agent.lab.run(agent.host, ["nft", "list", "ruleset"], timeout=10, check=True).stdout


def refused(agent, *words):
    """The agent exits non-zero with a message naming `words`; files and kernel as before."""
    files, ruleset = agent.state_bytes(), kernel(agent)
    proc = agent.start(wait=False)
    assert proc.wait(timeout=20) != 0, agent.log()
    errors = [line for line in agent.log().splitlines() if "cannot start" in line]
    assert errors, agent.log()
    log = errors[-1]
    for word in words:
        assert word in log, log
    for python_message in ("Traceback", "invalid literal", "KeyError", "TypeError", "ValueError"):
        assert python_message not in agent.log(), agent.log()
    assert agent.state_bytes() == files
    assert kernel(agent) == ruleset
    assert not os.path.exists(agent.socket)
    print(log)
    return log


def salvage(agent):
    result = agent.lab.run(agent.host, [PYTHON, "-m", "masqd.daemon", "--state-dir", agent.state_dir,
                                        "--socket", agent.socket, "--salvage-state"], timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.fixture
def agent(seed_lab, tmp_path):
    made = Agent(seed_lab, str(tmp_path))
    made.start()
    with Client(made.socket) as client:
        client.request("set", table="portfw", entries=[web(80)])  # a snapshot at revision 1
        for port in (81, 82, 83):
            client.request("add", table="portfw", entry=web(port))  # journal lines 1-3
    made.stop()
    yield made
    made.stop()


def journal(agent):
    return os.path.join(agent.state_dir, "state.journal")


def test_garbled_middle_record_refused_then_salvaged(agent):
    with open(journal(agent), "rb") as handle:
        lines = handle.read().split(b"\n")
    lines[1] = lines[1].replace(b'"local_port":82', b'"local_port":92')
    damaged = b"\n".join(lines)
    with open(journal(agent), "wb") as handle:
        handle.write(damaged)
    refused(agent, "state.journal line 2", "checksum mismatch", "--salvage-state")
    report = salvage(agent)
    assert "state.journal line 2" in report and "and the 1 after it dropped" in report, report
    copies = [n for n in os.listdir(agent.state_dir) if n.startswith("state.journal.damaged-")]
    assert len(copies) == 1
    with open(os.path.join(agent.state_dir, copies[0]), "rb") as handle:
        assert handle.read() == damaged
    assert stat.S_IMODE(os.stat(os.path.join(agent.state_dir, copies[0])).st_mode) == 0o600
    agent.start()
    assert ports(agent) == [80, 81]
    with Client(agent.socket) as client:
        assert client.request("status")["revision"] == 5  # above any revision the damaged files held
        client.request("add", table="portfw", entry=web(84))
    assert ports(agent) == [80, 81, 84]


def test_missing_snapshot_refused(agent):
    os.unlink(os.path.join(agent.state_dir, "state.json"))
    refused(agent, "state.journal line 1", "state.json is missing", "starts at revision 2: revision 1 was only")


def test_type_corrupt_snapshot_named_by_entry_and_field(agent):
    path = os.path.join(agent.state_dir, "state.json")
    os.unlink(journal(agent))
    with open(path, "w") as handle:
        json.dump({"format": 2, "revision": 1, "tables": {"portfw": [dict(web(80), local_port="80")]},
                   "mfw_heads": {}}, handle)
    refused(agent, "state.tables.portfw[0].local_port", "port must be an integer")
    with open(path, "w") as handle:
        json.dump({"format": 2, "revision": 1, "tables": {}, "mfw_heads": {"x": {"address": "10.16.0.3",
                                                                                 "port": None}}}, handle)
    refused(agent, "state.json", "mfw_heads['x']", "decimal integer")


def test_torn_last_record_is_forgiven(agent):
    with open(journal(agent), "ab") as handle:
        handle.write(b'190 1234abcd {"revision":5,"table":"portfw","put":[{"proto')  # killed mid-append
    agent.start()
    assert ports(agent) == [80, 81, 82, 83]
    with Client(agent.socket) as client:
        client.request("add", table="portfw", entry=web(85))
    agent.stop()
    agent.start()
    assert ports(agent) == [80, 81, 82, 83, 85]


def test_a_state_dir_others_can_write_to_is_refused_and_not_remoded(seed_lab, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    agent = Agent(seed_lab, str(tmp_path))
    agent.state_dir = str(shared)
    log = refused(agent, "state_dir %s" % shared, "mode 1777")
    assert "masqd" not in kernel(agent), log
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777


def test_format_1_state_is_upgraded(seed_lab, tmp_path):
    """What the previous agent wrote: a format 1 snapshot and unchecked journal lines."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "state.json").write_text(json.dumps({"format": 1, "revision": 1, "tables": {"portfw": [web(80)]},
                                                  "mfw_heads": {}}))
    (state / "state.journal").write_text("".join(
        json.dumps({"revision": r, "table": "portfw", "put": [web(79 + r)], "delete": []}) + "\n" for r in (2, 3)))
    agent = Agent(seed_lab, str(tmp_path))
    agent.start()
    try:
        assert ports(agent) == [80, 81, 82]
        with Client(agent.socket) as client:
            client.request("add", table="portfw", entry=web(83))
        agent.stop()
        agent.start()
        assert ports(agent) == [80, 81, 82, 83]
    finally:
        agent.stop()


def test_salvage_refuses_to_run_under_a_live_agent(agent):
    agent.start()
    files = agent.state_bytes()
    result = agent.lab.run(agent.host, [PYTHON, "-m", "masqd.daemon", "--state-dir", agent.state_dir,
                                        "--salvage-state"], timeout=30)
    assert result.returncode == 1, result.stderr
    assert "cannot salvage: state dir %s is in use by another masqd (pid %d" % (agent.state_dir, agent.proc.pid) \
        in result.stderr, result.stderr
    assert agent.state_bytes() == files
    assert ports(agent) == [80, 81, 82, 83]
