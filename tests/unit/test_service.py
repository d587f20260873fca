"""Service ops over the fake kernel: results, revisions, and "bad input changes nothing"."""

import os

import pytest

from masqd import nfnetlink, render
from masqd import service as service_module
from masqd.nft import FakeNftables
from masqd.service import AUTOFW_CONTROL_STATUS, Service

WEB = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
       "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15}]}
WEB_KEY = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80}


@pytest.fixture
def svc(tmp_path):
    service = Service(str(tmp_path / "state"), nft=FakeNftables())
    service.start()
    return service


def ok(svc, **request):
    resp = svc.handle(request)
    assert resp["ok"], resp
    return resp


def snapshot(svc):
    """Everything a bad request must leave alone."""
    files = {}
    for name in sorted(os.listdir(svc.store.state_dir)):
        with open(os.path.join(svc.store.state_dir, name), "rb") as f:
            files[name] = f.read()
    return svc.nft.dump(), files, svc.handle({"op": "get"}), len(svc.nft.transactions)


def test_start_creates_exactly_the_table(svc):
    assert svc.nft.dump() == render.render({}).dump()
    assert ok(svc, op="status")["result"]["full_syncs"] == 1
    assert ok(svc, op="status")["result"]["tables"] == {t: 0 for t in ("portfw", "autofw", "mfw", "marks", "masquerade")}


def test_add_append_list_delete_backend(svc):
    r = ok(svc, op="add", table="portfw", entry=WEB)
    assert r["changed"] and r["revision"] == 1
    r = ok(svc, op="add", table="portfw", entry=dict(WEB_KEY, backends=[{"address": "10.16.0.28", "port": 80, "pref": 5}]))
    assert [b["address"] for b in r["result"]["entry"]["backends"]] == ["10.16.0.27", "10.16.0.28"]
    assert svc.nft.dump() == svc._ruleset.dump()
    # 17 connections: the .27 backend took 15, the head is now .28 with 3 left.
    chain = render.portfw_chain_name(("tcp", "198.51.100.1", 80))
    svc.nft.rule_counters = {chain: [15, 2]}
    (entry,) = ok(svc, op="list", table="portfw")["result"]["entries"]
    assert [(b["pcnt"], b["pref"], b["connections"], b["head"]) for b in entry["backends"]] == [
        (15, 15, 15, False), (3, 5, 2, True)]
    r = ok(svc, op="delete", table="portfw", entry=dict(WEB_KEY, backends=[{"address": "10.16.0.27", "port": 80}]))
    assert r["result"]["entry"]["backends"] == [{"address": "10.16.0.28", "port": 80, "pref": 5}]
    r = ok(svc, op="delete", table="portfw", entry=WEB_KEY)
    assert ok(svc, op="get", table="portfw")["result"]["entries"] == []
    assert svc.nft.dump() == render.render({}).dump()
    assert r["revision"] == 4


def test_single_backend_pcnt_from_element_counter(svc):
    ok(svc, op="add", table="portfw", entry=WEB)
    svc.nft.element_counters = {"portfw_direct_v4": {nfnetlink.address_proto_port_key("198.51.100.1", "tcp", 80): 17}}
    (entry,) = ok(svc, op="list", table="portfw")["result"]["entries"]
    assert entry["backends"][0]["pcnt"] == 13 and entry["backends"][0]["connections"] == 17


def test_unchanged_write_does_not_touch_kernel(svc):
    ok(svc, op="set", table="portfw", entries=[WEB])
    before = snapshot(svc)
    r = ok(svc, op="set", table="portfw", entries=[WEB])
    assert not r["changed"] and r["revision"] == 1
    assert snapshot(svc) == before


def test_revision_compare_and_set(svc):
    ok(svc, op="set", table="portfw", entries=[WEB], revision=0)
    before = snapshot(svc)
    r = svc.handle({"op": "flush", "table": "portfw", "revision": 0})
    assert r == {"ok": False, "error": {"field": "revision", "value": 0,
                                        "message": "stale: the current revision is 1"}}
    assert snapshot(svc) == before
    assert ok(svc, op="flush", table="portfw", revision=1)["revision"] == 2


BAD_REQUESTS = [
    ({"op": "add", "table": "portfw", "entry": dict(WEB, backends=[{"address": "10.16.0.28", "port": 70000}])},
     "entry.backends[0].port", 70000),
    ({"op": "set", "table": "portfw", "entries": [WEB, dict(WEB, local_port=81, backends=[
        {"address": "10.0.0.1", "port": 1}, {"address": "fd00::1", "port": 1}])]},
     "entries[1].backends[1].address", "fd00::1"),
    ({"op": "add", "table": "portfw", "entry": dict(WEB_KEY, backends=[{"address": "10.16.0.27", "port": 80}])},
     "entry.backends[0]", {"address": "10.16.0.27", "port": 80, "pref": 10}),
    ({"op": "delete", "table": "portfw", "entry": dict(WEB_KEY, local_port=81)}, "entry", dict(WEB_KEY, local_port=81)),
    ({"op": "delete", "table": "portfw", "entry": dict(WEB_KEY, backends=[{"address": "10.9.9.9", "port": 80}])},
     "entry.backends[0]", {"address": "10.9.9.9", "port": 80}),
    ({"op": "delete", "table": "marks", "entry": {"name": "nope"}}, "entry", {"name": "nope"}),
    ({"op": "add", "table": "nat", "entry": {}}, "table", "nat"),
    ({"op": "explode"}, "op", "explode"),
    ({"op": "get", "colour": 1}, "colour", 1),
    ({"op": "insert", "table": "portfw", "entry": WEB}, "table", "portfw"),
    ({"op": "schedule", "mark": 42}, "mark", 42),
    ({"op": "schedule", "mark": 0}, "mark", 0),
    ({"op": "edit", "table": "mfw", "entry": {"mark": 1, "backends": [{"address": "10.0.0.9"}]}},
     "entry", {"mark": 1, "backends": [{"address": "10.0.0.9"}]}),
    ({"op": "add", "table": "marks", "entry": {"name": "x", "mark": 1, "input_interface": "a very long name"}},
     "entry.input_interface", "a very long name"),
    ({"op": "add", "table": "autofw", "entry": {"protocol": "udp", "low_port": 7000, "high_port": 7001,
                                                "hidden_host": "10.0.0.5"}}, "entry", None),
]


@pytest.mark.parametrize("request_,field,value", BAD_REQUESTS)
def test_bad_input_changes_nothing(svc, request_, field, value):
    ok(svc, op="set", table="portfw", entries=[WEB])
    ok(svc, op="set", table="autofw", entries=[{"protocol": "udp", "low_port": 6970, "high_port": 7170,
                                                "hidden_host": "10.16.0.27"}])
    before = snapshot(svc)
    resp = svc.handle(request_)
    assert resp["ok"] is False
    assert resp["error"]["field"] == field
    if value is not None:
        assert resp["error"]["value"] == value
    assert resp["error"]["message"]
    assert snapshot(svc) == before


def test_not_a_dict_request(svc):
    assert svc.handle(["op"])["error"]["field"] == "request"


def test_kernel_rejection_leaves_everything(svc):
    ok(svc, op="set", table="portfw", entries=[WEB])
    before = snapshot(svc)[:3]
    svc.nft.reject = lambda op: "Could not process rule: No buffer space" if op.kind == "element" else None
    resp = svc.handle({"op": "add", "table": "portfw", "entry": dict(WEB, local_port=81)})
    assert resp["ok"] is False
    assert resp["error"]["field"] == "entry"
    assert "the kernel refused the change: Error: Could not process rule: No buffer space" == resp["error"]["message"]
    assert snapshot(svc)[:3] == before
    # The fallback tried a full re-sync as a dry run only.
    assert [dry for _txn, dry in svc.nft.transactions[-2:]] == [False, True]


def test_drifted_kernel_is_resynced(svc):
    ok(svc, op="set", table="portfw", entries=[WEB])
    svc.nft.apply(render.Transaction([render.Op("delete", "table", None, None)]))  # someone deleted it
    ok(svc, op="add", table="portfw", entry=dict(WEB, local_port=81))
    assert svc.nft.dump() == svc._ruleset.dump()


def test_persist_failure_rolls_kernel_back(svc, monkeypatch):
    ok(svc, op="set", table="portfw", entries=[WEB])
    before = snapshot(svc)[:3]

    def fail(record):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(svc.store, "append", fail)
    resp = svc.handle({"op": "add", "table": "portfw", "entry": dict(WEB, local_port=81)})
    assert resp["ok"] is False and resp["error"]["field"] == "state_dir"
    assert snapshot(svc)[:3] == before


def test_snapshot_written_beside_the_kernel_call(svc, monkeypatch):
    """A `set` (a snapshot) is encoded and written while the kernel commits: a failed
    write rolls the kernel back; a refused kernel leaves no temporary file behind."""
    ok(svc, op="set", table="portfw", entries=[WEB])
    before = snapshot(svc)[:3]

    def fail(doc):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(svc.store, "prepare", fail)
    resp = svc.handle({"op": "set", "table": "portfw", "entries": [dict(WEB, local_port=81)]})
    assert resp["ok"] is False and resp["error"]["field"] == "state_dir"
    assert snapshot(svc)[:3] == before
    monkeypatch.undo()

    prepared = []
    real_prepare = svc.store.prepare
    monkeypatch.setattr(svc.store, "prepare", lambda doc: prepared.append(real_prepare(doc)) or prepared[-1])
    svc.nft.reject = lambda op: "Error: Could not process rule: Operation not supported"
    resp = svc.handle({"op": "set", "table": "portfw", "entries": [dict(WEB, local_port=82)]})
    assert resp["ok"] is False and prepared and not any(os.path.exists(p) for p in prepared)
    assert snapshot(svc)[:3] == before
    svc.nft.reject = None
    ok(svc, op="set", table="portfw", entries=[dict(WEB, local_port=83)])
    assert len(prepared) == 2 and not os.path.exists(prepared[-1])  # installed: renamed
    assert [e["local_port"] for e in ok(svc, op="get", table="portfw")["result"]["entries"]] == [83]


def test_set_consumes_only_an_owned_request(svc):
    """The server hands its parsed request over (owned): a set drops the raw entries as
    it validates them. Any other caller's objects are left as they were."""
    entries = [dict(WEB, local_port=90 + i) for i in range(3)]
    ok(svc, op="set", table="portfw", entries=entries)
    assert [e["local_port"] for e in entries] == [90, 91, 92]
    request = {"op": "set", "table": "portfw", "entries": [dict(WEB, local_port=95)]}
    assert svc.handle(request, owned=True)["ok"] and request["entries"] == [None]
    assert [e["local_port"] for e in ok(svc, op="get", table="portfw")["result"]["entries"]] == [95]


def test_restart_reconciles(tmp_path):
    fake = FakeNftables()
    first = Service(str(tmp_path), nft=fake)
    first.start()
    ok(first, op="set", table="portfw", entries=[WEB])
    ok(first, op="add", table="mfw", entry={"mark": 1, "backends": [{"address": "10.0.0.1", "pref": 0},
                                                                    {"address": "10.0.0.2", "pref": 0}]})
    ok(first, op="schedule", mark=1)
    # kill -9: the kernel keeps a stale table with junk in it
    fake.apply(render.Transaction([render.Op("add", "chain", "junk", render.Chain("junk", None, ()))]))
    second = Service(str(tmp_path), nft=fake)
    second.start()
    assert fake.dump() == first._ruleset.dump()
    assert ok(second, op="get")["result"] == ok(first, op="get")["result"]
    assert ok(second, op="status")["revision"] == 3
    assert "counter dnat ip to 10.0.0.2" in fake.dump()


def test_mfw_insert_edit_schedule_failover(svc):
    ok(svc, op="add", table="mfw", entry={"mark": 7, "backends": [{"address": "10.0.0.2", "pref": 0}]})
    ok(svc, op="insert", table="mfw", entry={"mark": 7, "backends": [{"address": "10.0.0.1", "pref": 0}]})
    assert "mfw_7 {\n\t\tcounter dnat ip to 10.0.0.1\n" in svc.nft.dump()
    r = ok(svc, op="schedule", mark=7)
    assert r["changed"] and r["result"]["head"] == {"address": "10.0.0.2", "port": None}
    assert "counter dnat ip to 10.0.0.2\n" in svc.nft.dump()
    (entry,) = ok(svc, op="list", table="mfw")["result"]["entries"]
    assert [b["head"] for b in entry["backends"]] == [False, True]
    ok(svc, op="schedule", mark=7)
    assert "counter dnat ip to 10.0.0.1\n" in svc.nft.dump()
    r = ok(svc, op="edit", table="mfw", entry={"mark": 7, "backends": [{"address": "10.0.0.2", "pref": 3}]})
    assert r["result"]["entry"]["backends"][1]["pref"] == 3


def test_single_backend_schedule_is_no_change(svc):
    ok(svc, op="add", table="mfw", entry={"mark": 7, "backends": [{"address": "10.0.0.2", "pref": 0}]})
    assert not ok(svc, op="schedule", mark=7)["changed"]


def test_autofw_control_listed_inactive(svc):
    ok(svc, op="add", table="autofw", entry={"protocol": "udp", "low_port": 6970, "high_port": 7170,
                                             "control_protocol": "tcp", "control_port": 7070})
    (entry,) = ok(svc, op="list", table="autofw")["result"]["entries"]
    assert entry["status"] == AUTOFW_CONTROL_STATUS and entry["recipient"] is None
    assert "elements" not in svc.nft.dump().split("map autofw_v4")[1].split("}")[0]


def test_plan_is_dry_run(svc):
    ok(svc, op="set", table="portfw", entries=[WEB])
    before = snapshot(svc)
    r = ok(svc, op="plan", table="portfw", entries=[dict(WEB, local_port=81)])
    assert r["changed"] is False  # plan applies nothing
    assert r["result"]["changed"] is True
    assert r["result"]["after"][0]["local_port"] == 81
    assert "add element inet masqd portfw_direct_v4_5 { 198.51.100.1 . tcp . 81 : 10.16.0.27 . 80 }" in r["result"]["nft"]
    assert svc.nft.transactions[-1][1] is True
    assert snapshot(svc)[:3] == before[:3]


def test_marks_order_and_masquerade(svc):
    ok(svc, op="set", table="marks", entries=[{"name": "a", "mark": 1, "source": "203.0.113.0/24"},
                                              {"name": "b", "mark": 2}])
    r = ok(svc, op="set", table="marks", entries=[{"name": "b", "mark": 2},
                                                  {"name": "a", "mark": 1, "source": "203.0.113.0/24"}])
    assert r["changed"]
    dump = svc.nft.dump()
    assert dump.index("meta mark set 2") < dump.index("meta mark set 1")
    ok(svc, op="add", table="masquerade", entry={"name": "out", "output_interface": "wan0"})
    assert 'oifname "wan0" masquerade' in svc.nft.dump()
    assert not ok(svc, op="add", table="masquerade", entry={"name": "out", "output_interface": "wan0"})["changed"]
    r = svc.handle({"op": "add", "table": "masquerade", "entry": {"name": "out", "output_interface": "wan1"}})
    assert r["error"]["field"] == "entry.name"


def test_journal_then_snapshot_reload(tmp_path):
    svc = Service(str(tmp_path), nft=FakeNftables())
    svc.start()
    for port in range(1, 6):
        ok(svc, op="add", table="portfw", entry=dict(WEB, local_port=port))
    assert os.path.exists(svc.store.journal_path)
    ok(svc, op="delete", table="portfw", entry=dict(WEB_KEY, local_port=3))
    again = Service(str(tmp_path), nft=FakeNftables())
    again.start()
    assert [e["local_port"] for e in ok(again, op="get", table="portfw")["result"]["entries"]] == [1, 2, 4, 5]


MARK = {"name": "friend", "mark": 1, "source": "203.0.113.0/24"}
MFW = {"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 10}]}


def test_set_of_several_tables_is_one_transaction_and_one_revision(svc):
    before = len(svc.nft.transactions)
    r = ok(svc, op="set", tables={"portfw": [WEB], "marks": [MARK], "mfw": [MFW]})
    assert r["changed"] and r["revision"] == 1
    assert len(svc.nft.transactions) == before + 1
    assert sorted(r["result"]["tables"]) == ["marks", "mfw", "portfw"]
    assert svc.nft.dump() == svc._ruleset.dump()
    # Tables the request does not name are untouched; the same request again changes nothing.
    ok(svc, op="add", table="masquerade", entry={"name": "web", "source": "10.16.0.27/32"})
    r = ok(svc, op="set", tables={"portfw": [WEB], "marks": [MARK], "mfw": [MFW]})
    assert not r["changed"] and r["revision"] == 2
    assert len(ok(svc, op="get", table="masquerade")["result"]["entries"]) == 1
    # A restart loads what the multi-table set stored.
    again = Service(svc.store.state_dir, nft=FakeNftables())
    again.start()
    assert again.handle({"op": "get"}) == svc.handle({"op": "get"})


def test_plan_of_several_tables_applies_nothing(svc):
    r = ok(svc, op="plan", tables={"portfw": [WEB], "marks": [MARK]})
    assert r["result"]["changed"] and not r["changed"]
    assert r["result"]["before"] == {"portfw": [], "marks": []}
    assert "198.51.100.1 . tcp . 80" in r["result"]["nft"]
    assert svc.nft.dump() == render.render({}).dump()


@pytest.mark.parametrize("tables, field", [
    ({}, "tables"), ([], "tables"), ({"nosuch": []}, "tables"),
    ({"portfw": [WEB], "marks": [dict(MARK, mark=0)]}, "tables.marks[0].mark"),
    ({"portfw": "x"}, "tables.portfw"),
])
def test_bad_multi_table_set_names_the_field_and_changes_nothing(svc, tables, field):
    ok(svc, op="add", table="portfw", entry=WEB)
    state = snapshot(svc)
    resp = svc.handle({"op": "set", "tables": tables})
    assert not resp["ok"] and resp["error"]["field"] == field, resp
    assert snapshot(svc)[:3] == state[:3]


def test_a_set_without_echo_answers_with_counts_and_changes_the_same(svc):
    r = ok(svc, op="set", table="portfw", entries=[WEB], echo=False)
    assert r["changed"] and r["result"] == {"count": 1}
    assert len(ok(svc, op="get", table="portfw")["result"]["entries"]) == 1
    r = ok(svc, op="set", tables={"portfw": [WEB], "marks": [MARK]}, echo=False)
    assert r["changed"] and r["result"] == {"counts": {"portfw": 1, "marks": 1}}
    assert ok(svc, op="set", table="portfw", entries=[WEB])["result"]["entries"][0]["local_port"] == 80


@pytest.mark.parametrize("request_, field", [
    ({"op": "set", "table": "portfw", "entries": [], "echo": "no"}, "echo"),
    ({"op": "set", "table": "portfw", "entries": [], "echo": 0}, "echo"),
    ({"op": "get", "table": "portfw", "echo": False}, "echo"),
    ({"op": "add", "table": "portfw", "entry": WEB, "echo": False}, "echo"),
    ({"op": "list", "table": "portfw", "stream": "yes"}, "stream"),
    ({"op": "list", "table": "portfw", "stream": 1}, "stream"),
    ({"op": "get", "table": "portfw", "stream": True}, "stream"),
    ({"op": "set", "table": "portfw", "entries": [WEB], "stream": True}, "stream"),
    ({"op": "list", "stream": True}, "stream"),  # of every table: one line
])
def test_a_bad_echo_or_stream_is_refused_naming_it_and_changes_nothing(svc, request_, field):
    ok(svc, op="add", table="masquerade", entry={"name": "web", "source": "10.16.0.27/32"})
    state = snapshot(svc)
    resp = svc.handle(request_)
    assert not resp["ok"] and resp["error"]["field"] == field, resp
    assert snapshot(svc)[:3] == state[:3]


def test_a_streamed_list_is_its_entries_in_parts(svc, monkeypatch):
    monkeypatch.setattr(service_module, "STREAM_ENTRIES", 2)
    ok(svc, op="add", table="masquerade", entry={"name": "web", "source": "10.16.0.27/32"})
    ok(svc, op="set", table="portfw", entries=[dict(WEB, local_port=port) for port in (80, 81, 82)]
       + [dict(WEB, local_port=83, backends=WEB["backends"][:1])])
    (part,) = ok(svc, op="list", table="masquerade", stream=True)["result"]["entries"]
    assert [e["name"] for e in part] == ["web"]
    parts = list(ok(svc, op="list", table="portfw", stream=True)["result"]["entries"])
    assert [len(p) for p in parts] == [2, 2]
    assert [row for p in parts for row in p] == ok(svc, op="list", table="portfw")["result"]["entries"]


def test_tables_and_table_together_are_refused(svc):
    resp = svc.handle({"op": "set", "table": "portfw", "tables": {"portfw": []}})
    assert not resp["ok"] and resp["error"]["field"] == "tables"


def test_a_restart_continues_an_mfw_schedule_where_the_kernel_stood(tmp_path):
    nft = FakeNftables()
    svc = Service(str(tmp_path / "state"), nft=nft)
    svc.start()
    backends = [{"address": "10.16.0.3", "port": None, "pref": 3}, {"address": "10.16.0.4", "port": None, "pref": 2}]
    ok(svc, op="set", table="mfw", entries=[{"mark": 1, "backends": backends}])
    nft.rule_counters = {"mfw_1": [2, 0]}  # 2 of .3's 3 connections taken
    again = Service(str(tmp_path / "state"), nft=nft)
    again.start()  # reads the counters, rebuilds the cascade rotated: .3 x1, .4 x2, .3 x2
    rules = nft.chains["mfw_1"].rules
    assert rules[0].endswith('dnat ip to 10.16.0.3 comment "phase 2"') and "mod 5 < 1 " in rules[0]
    assert "mod 4 < 2 " in rules[1] and rules[1].endswith("dnat ip to 10.16.0.4")
    assert rules[2] == "counter dnat ip to 10.16.0.3"
    nft.rule_counters = {"mfw_1": [1, 0, 0]}  # one more to .3: the head is .4 with its 2 left
    (entry,) = ok(again, op="list", table="mfw")["result"]["entries"]
    assert [(b["address"], b["head"], b["pcnt"]) for b in entry["backends"]] == [
        ("10.16.0.3", False, 3), ("10.16.0.4", True, 2)]
    assert [b["connections"] for b in entry["backends"]] == [1, 0]


def test_periodic_verification_skipped_while_the_generation_has_not_moved(svc, monkeypatch):
    """The periodic backstop reads the table only when something committed since the
    agent's own last commit or the last matching comparison; a verification for lost
    events is never skipped."""
    from masqd.watchers.ruleset import PERIODIC
    ok(svc, op="set", table="portfw", entries=[WEB, dict(WEB, local_port=81)])
    reads = []
    read_table = svc.nft.read_table
    monkeypatch.setattr(svc.nft, "read_table", lambda shape=True: reads.append(shape) or read_table(shape))
    svc.verify_kernel(PERIODIC)
    assert reads == [] and svc.verifications_skipped == 1
    for elements in svc.nft.elements.values():  # another program empties the maps
        elements.clear()
    svc.nft.commits += 1
    svc.verify_kernel(PERIODIC)
    assert reads and svc.nft.dump() == svc._ruleset.dump()  # compared, found, repaired
    svc.nft.commits += 1  # another program commits elsewhere: compared, matches
    count = len(reads)
    svc.verify_kernel(PERIODIC)
    assert len(reads) == count + 1
    svc.verify_kernel(PERIODIC)  # that comparison's generation: skipped
    assert len(reads) == count + 1 and svc.verifications_skipped == 2
    svc.verify_kernel("events lost (socket overflow)")
    assert len(reads) == count + 2
