"""The state file: atomic snapshot, private modes, journal replay."""

import json
import os
import stat

import pytest

from masqd.store import Store, StoreError

ENTRY = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
         "backends": [{"address": "10.16.0.27", "port": 80, "pref": 10}]}


def test_empty_then_snapshot_modes(tmp_path):
    store = Store(str(tmp_path / "state"))
    assert store.load() == {"format": 1, "revision": 0, "tables": {}, "mfw_heads": {}}
    store.save({"revision": 3, "tables": {"portfw": [ENTRY]}, "mfw_heads": {}})
    assert stat.S_IMODE(os.stat(store.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    with open(store.path) as f:
        assert json.load(f) == {"format": 1, "revision": 3, "tables": {"portfw": [ENTRY]}, "mfw_heads": {}}
    assert os.listdir(store.state_dir) == ["state.json"]  # no temporary file left


def test_journal_replay_and_compaction(tmp_path):
    store = Store(str(tmp_path))
    store.save({"revision": 1, "tables": {"portfw": [ENTRY]}, "mfw_heads": {}})
    other = dict(ENTRY, local_port=81)
    store.append({"revision": 2, "table": "portfw", "put": [other], "delete": []})
    store.append({"revision": 3, "table": "portfw", "put": [], "delete": [["tcp", "198.51.100.1", 80]]})
    store.append({"revision": 4, "table": "mfw", "put": [{"mark": 1, "backends": []}], "delete": [],
                  "mfw_heads": {"1": {"address": "10.0.0.1", "port": None}}})
    assert stat.S_IMODE(os.stat(store.journal_path).st_mode) == 0o600
    doc = Store(str(tmp_path)).load()
    assert doc["revision"] == 4
    assert doc["tables"]["portfw"] == [other]
    assert doc["mfw_heads"] == {"1": {"address": "10.0.0.1", "port": None}}
    store.save(dict(doc))
    assert not os.path.exists(store.journal_path)
    assert Store(str(tmp_path)).load()["revision"] == 4


def test_torn_journal_tail_ignored(tmp_path):
    store = Store(str(tmp_path))
    store.append({"revision": 1, "table": "portfw", "put": [ENTRY], "delete": []})
    with open(store.journal_path, "a") as f:
        f.write('{"revision": 2, "table": "portfw", "put": [')  # crash mid-append
    doc = Store(str(tmp_path)).load()
    assert doc["revision"] == 1 and doc["tables"]["portfw"] == [ENTRY]


def test_stale_journal_records_skipped(tmp_path):
    store = Store(str(tmp_path))
    store.append({"revision": 1, "table": "portfw", "put": [ENTRY], "delete": []})
    # A crash between the snapshot's rename and the journal's unlink: records <= snapshot.
    with open(store.path, "w") as f:
        json.dump({"format": 1, "revision": 5, "tables": {}, "mfw_heads": {}}, f)
    doc = Store(str(tmp_path)).load()
    assert doc["revision"] == 5 and doc["tables"] == {}


@pytest.mark.parametrize("content", ["{not json", '{"format": 99}', "[]"])
def test_corrupt_or_unknown_file_refused(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(StoreError):
        Store(str(tmp_path)).load()
