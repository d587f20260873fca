"""The state files: atomic snapshot, private modes, a checked journal that is either
provably complete or refused (naming file, line and problem, nothing changed), and
the operator's salvage."""

import datetime
import json
import os
import stat
import zlib

import pytest

from masqd.store import DamagedState, Store, StoreError, encode_record

ENTRY = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
         "backends": [{"address": "10.16.0.27", "port": 80, "pref": 10}]}


HEAD = {"address": "10.0.0.1", "port": None}


def entry(port):
    return dict(ENTRY, local_port=port)


def record(revision, port, table="portfw"):
    return {"revision": revision, "table": table, "put": [entry(port)], "delete": []}


def files(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as handle:
            out[name] = handle.read()
    return out


def journal_of(tmp_path, *records, snapshot_revision=0):
    """A state dir with a snapshot at `snapshot_revision` and the given records."""
    store = Store(str(tmp_path))
    store.save({"revision": snapshot_revision, "tables": {}, "mfw_heads": {}})
    for rec in records:
        store.append(rec)
    return store


def rewrite_line(path, number, new):
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    lines[number - 1] = new
    with open(path, "wb") as handle:
        handle.write(b"\n".join(lines))


def refused(tmp_path, line, words):
    """load() raises DamagedState at `line` naming `words`, and no file changed."""
    before = files(str(tmp_path))
    with pytest.raises(DamagedState) as exc:
        Store(str(tmp_path)).load()
    assert exc.value.line == line, str(exc.value)
    for word in words:
        assert word in str(exc.value), str(exc.value)
    assert "Error" not in str(exc.value) and "invalid literal" not in str(exc.value)
    assert files(str(tmp_path)) == before
    return exc.value


def test_empty_then_snapshot_modes(tmp_path):
    store = Store(str(tmp_path / "state"))
    store.ensure_dir()
    assert store.load() == {"format": 2, "revision": 0, "tables": {}, "mfw_heads": {}}
    store.save({"revision": 3, "tables": {"portfw": [ENTRY]}, "mfw_heads": {}})
    assert stat.S_IMODE(os.stat(store.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    with open(store.path) as f:
        assert json.load(f) == {"format": 2, "revision": 3, "tables": {"portfw": [ENTRY]}, "mfw_heads": {}}
    assert os.listdir(store.state_dir) == ["state.json"]  # no temporary file left


def test_journal_lines_are_checked(tmp_path):
    store = journal_of(tmp_path, record(1, 81))
    with open(store.journal_path, "rb") as handle:
        line = handle.read()
    length, crc, payload = line.rstrip(b"\n").split(b" ", 2)
    assert int(length) == len(payload) and int(crc, 16) == zlib.crc32(payload)
    assert json.loads(payload) == record(1, 81)
    assert line == encode_record(record(1, 81))


def test_journal_replay_and_compaction(tmp_path):
    store = Store(str(tmp_path))
    store.save({"revision": 1, "tables": {"portfw": [ENTRY]}, "mfw_heads": {}})
    other = entry(81)
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


def test_first_journal_record_comes_with_a_snapshot(tmp_path):
    """An agent that cannot read checked records refuses the directory (unknown
    format in state.json) instead of misreading the journal."""
    store = Store(str(tmp_path))
    store.load()
    store.append(record(1, 81))
    with open(store.path) as handle:
        assert json.load(handle) == {"format": 2, "revision": 0, "tables": {}, "mfw_heads": {}}
    assert Store(str(tmp_path)).load()["tables"]["portfw"] == [entry(81)]


@pytest.mark.parametrize("tail", [b'123 0badf00d {"revision": 2, "table": "portfw", "put": [',  # no newline
                                  b"\0" * 300,  # the file grew, the blocks never came
                                  b"61 " + b"\0" * 40 + b"\n"])  # zero-filled, with the newline's block
def test_torn_journal_tail_ignored_and_cut_before_the_next_append(tmp_path, tail):
    store = journal_of(tmp_path, record(1, 81))
    with open(store.journal_path, "ab") as f:
        f.write(tail)
    again = Store(str(tmp_path))
    doc = again.load()
    assert doc["revision"] == 1 and doc["tables"]["portfw"] == [entry(81)]
    again.append(record(2, 82))
    doc = Store(str(tmp_path)).load()
    assert doc["revision"] == 2 and doc["tables"]["portfw"] == [entry(81), entry(82)]


def test_stale_journal_records_skipped(tmp_path):
    store = journal_of(tmp_path, record(1, 81))
    # A crash between the snapshot's rename and the journal's unlink: records < snapshot.
    with open(store.path, "w") as f:
        json.dump({"format": 2, "revision": 5, "tables": {}, "mfw_heads": {}}, f)
    doc = Store(str(tmp_path)).load()
    assert doc["revision"] == 5 and doc["tables"] == {}
    Store(str(tmp_path)).append(record(6, 86))  # after the stale ones
    assert Store(str(tmp_path)).load()["tables"]["portfw"] == [entry(86)]


@pytest.mark.parametrize("content", ["{not json", '{"format": 99}', "[]", '{"format": 2, "revision": "3"}',
                                     '{"format": 2, "revision": 1, "tables": {"nat": []}}',
                                     '{"format": 2, "revision": 1, "tables": {"portfw": {}}}'])
def test_corrupt_or_unknown_snapshot_refused(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    exc = refused(tmp_path, None, ["state.json"])
    assert isinstance(exc, StoreError)


def test_garbled_record_in_the_middle_refused_byte_identical(tmp_path):
    store = journal_of(tmp_path, record(1, 81), record(2, 82), record(3, 83))
    with open(store.journal_path, "rb") as handle:
        lines = handle.read().split(b"\n")
    rewrite_line(store.journal_path, 2, lines[1].replace(b"82", b"92"))  # a flipped digit
    refused(tmp_path, 2, ["state.journal line 2", "checksum mismatch", "--salvage-state"])


def test_checksum_mismatch_on_the_last_complete_line_refused(tmp_path):
    """A whole line (newline and all) was acknowledged: a wrong checksum is damage,
    not a torn append."""
    store = journal_of(tmp_path, record(1, 81), record(2, 82))
    with open(store.journal_path, "rb") as handle:
        lines = handle.read().split(b"\n")
    rewrite_line(store.journal_path, 2, lines[1].replace(b"82", b"92"))
    refused(tmp_path, 2, ["checksum mismatch"])


@pytest.mark.parametrize("line", [b"hello", b"12 zzzzzzzz {}", b'5 00000000 {"a":1}'])
def test_unreadable_line_in_the_middle_refused(tmp_path, line):
    store = journal_of(tmp_path, record(1, 81), record(2, 82))
    rewrite_line(store.journal_path, 1, line)
    refused(tmp_path, 1, ["state.journal line 1"])


def test_missing_revisions_refused(tmp_path):
    journal_of(tmp_path, record(1, 81), record(2, 82), record(4, 84))
    refused(tmp_path, 3, ["revision 4 where 3 was expected"])


def test_out_of_sequence_refused(tmp_path):
    journal_of(tmp_path, record(6, 86), record(7, 87), record(3, 83), snapshot_revision=5)
    refused(tmp_path, 3, ["revision 3 after revision 7", "out of sequence"])


def test_a_record_of_the_snapshots_own_revision_refused(tmp_path):
    journal_of(tmp_path, record(4, 84), record(5, 85), snapshot_revision=3)
    with open(os.path.join(str(tmp_path), "state.json"), "w") as f:
        json.dump({"format": 2, "revision": 5, "tables": {}, "mfw_heads": {}}, f)
    refused(tmp_path, 2, ["two versions of one change"])


def test_missing_snapshot_refused_unless_the_journal_starts_at_one(tmp_path):
    store = journal_of(tmp_path, record(3, 83), record(4, 84), snapshot_revision=2)
    os.unlink(store.path)
    refused(tmp_path, 1, ["state.json is missing", "revisions 1-2 were only in the snapshot"])
    # a journal from revision 1 (as format 1 agents wrote it) is complete by itself
    os.unlink(store.journal_path)
    journal_of(tmp_path, record(1, 81), record(2, 82))
    os.unlink(store.path)
    assert Store(str(tmp_path)).load()["tables"]["portfw"] == [entry(81), entry(82)]


@pytest.mark.parametrize("rec, words", [
    ({"revision": 2, "table": "portfw", "put": {"a": 1}, "delete": []}, ["put must be a list"]),
    ({"revision": 2, "table": "portfw", "put": [dict(ENTRY, local_port="80")], "delete": []},
     ["put[0].local_port", "port must be an integer"]),
    ({"revision": 2, "table": "portfw", "put": ["x"], "delete": []}, ["put[0]"]),
    ({"revision": 2, "table": "portfw", "put": [], "delete": [["tcp", "198.51.100.1"]]}, ["delete[0]"]),
    ({"revision": 2, "table": "nat", "put": [], "delete": []}, ["table must be one of"]),
    ({"revision": "2", "table": "portfw", "put": [], "delete": []}, ["revision must be an integer"]),
    ({"revision": 2, "table": "mfw", "put": [], "delete": [], "mfw_heads": {"x": HEAD}},
     ["mfw_heads['x']", "decimal integer"]),
    ({"revision": 2, "table": "mfw", "put": [], "delete": [], "mfw_heads": {"\u0668": HEAD}},
     ["mfw_heads", "decimal integer"]),
    ({"revision": 2, "table": "mfw", "put": [], "delete": [], "mfw_heads": {"1": dict(HEAD, port="80")}},
     ["mfw_heads['1'].port"]),
])
def test_type_corrupt_record_names_line_and_field(tmp_path, rec, words):
    store = journal_of(tmp_path, record(1, 81))
    with open(store.journal_path, "ab") as handle:
        handle.write(encode_record(rec))  # a well-formed line that says something impossible
    refused(tmp_path, 2, ["state.journal line 2"] + words)


def test_type_corrupt_snapshot_heads_and_entries_named(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps(
        {"format": 2, "revision": 1, "tables": {}, "mfw_heads": {"one": {"address": "10.0.0.1", "port": None}}}))
    refused(tmp_path, None, ["state.json", "mfw_heads['one']"])
    # an entry the journal touches must at least have its key fields
    (tmp_path / "state.json").write_text(json.dumps(
        {"format": 2, "revision": 1, "tables": {"portfw": [{"protocol": "tcp"}]}, "mfw_heads": {}}))
    Store(str(tmp_path)).append(record(2, 82))
    refused(tmp_path, None, ["state.json", "tables.portfw[0].local_address: missing"])


def test_format_1_journal_read_once_for_upgrade(tmp_path):
    """An agent of format 1 wrote unchecked JSON lines and a format 1 snapshot."""
    (tmp_path / "state.json").write_text(json.dumps({"format": 1, "revision": 1, "tables": {"portfw": [ENTRY]},
                                                     "mfw_heads": {}}))
    with open(tmp_path / "state.journal", "w") as handle:
        for rec in (record(2, 82), record(3, 83)):
            handle.write(json.dumps(rec) + "\n")
        handle.write('{"revision": 4, "table": "portfw", "pu')  # its torn tail
    store = Store(str(tmp_path))
    assert store.load()["revision"] == 3
    store.append(record(4, 84))  # checked from now on
    doc = Store(str(tmp_path)).load()
    assert doc["revision"] == 4 and [e["local_port"] for e in doc["tables"]["portfw"]] == [80, 82, 83, 84]
    # an unchecked line after checked ones is not an old agent's: damage
    with open(tmp_path / "state.journal", "a") as handle:
        handle.write(json.dumps(record(5, 85)) + "\n")
    refused(tmp_path, 4, ["unchecked (format 1) record after checked records"])


def test_format_1_garbled_middle_refused(tmp_path):
    (tmp_path / "state.journal").write_text(json.dumps(record(1, 81)) + "\n{garbage\n" + json.dumps(record(2, 82))
                                            + "\n")
    refused(tmp_path, 2, ["not valid JSON"])


# -- the directory ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o1777, 0o770, 0o702])
def test_a_directory_others_can_write_to_is_refused_and_not_remoded(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    with pytest.raises(StoreError) as exc:
        Store(str(shared)).ensure_dir()
    assert str(shared) in str(exc.value) and "%04o" % mode in str(exc.value)
    assert stat.S_IMODE(os.stat(shared).st_mode) == mode


def test_an_existing_private_directory_is_used_as_it_is(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)
    store = Store(str(mine))
    store.ensure_dir()
    store.save({"revision": 1, "tables": {}, "mfw_heads": {}})
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o755
    missing = Store(str(tmp_path / "a" / "b"))
    missing.ensure_dir()
    assert stat.S_IMODE(os.stat(missing.state_dir).st_mode) == 0o700


# -- salvage ---------------------------------------------------------------------------------

NOW = datetime.datetime(2026, 12, 1, 21, 0, 0, tzinfo=datetime.timezone.utc)


def test_salvage_keeps_copies_loads_the_valid_prefix_and_writes_a_clean_snapshot(tmp_path):
    store = journal_of(tmp_path, record(1, 81), record(2, 82), record(3, 83), record(4, 84))
    rewrite_line(store.journal_path, 3, b"garbage")
    damaged = files(str(tmp_path))
    report = Store(str(tmp_path)).salvage(now=NOW)
    assert report["damaged"] is True
    assert report["revision"] == 5  # above any revision the damaged files held: old clients re-read
    assert report["entries"]["portfw"] == 2
    assert len(report["dropped"]) == 1 and "state.journal line 3" in report["dropped"][0]
    assert "and the 1 after it dropped" in report["dropped"][0]
    after = files(str(tmp_path))
    assert after["state.journal.damaged-20261201T210000Z"] == damaged["state.journal"]
    assert after["state.json.damaged-20261201T210000Z"] == damaged["state.json"]
    assert "state.journal" not in after
    for name in after:
        assert stat.S_IMODE(os.stat(os.path.join(str(tmp_path), name)).st_mode) == 0o600
    doc = Store(str(tmp_path)).load()
    assert doc["revision"] == 5 and doc["tables"]["portfw"] == [entry(81), entry(82)]


def test_salvage_drops_bad_snapshot_entries_and_leaves_intact_state_alone(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps(
        {"format": 2, "revision": 7, "tables": {"portfw": [ENTRY, dict(ENTRY, local_port="81")]},
         "mfw_heads": {}}))
    report = Store(str(tmp_path)).salvage(now=NOW)
    assert report["damaged"] is True and report["entries"]["portfw"] == 1
    assert "tables.portfw[1].local_port" in report["dropped"][0]
    intact = files(str(tmp_path))
    assert Store(str(tmp_path)).salvage(now=NOW)["damaged"] is False
    assert files(str(tmp_path)) == intact
