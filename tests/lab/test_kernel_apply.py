"""masqd's kernel side against the real kernel, in a throwaway namespace: full apply
gives exactly one table, kernel rejections change nothing, 10,000 keys load,
restart reconciles, and other tables are never touched.

Each test runs a small Python program inside the lab's namespace (the Service with
the real libnftables backend) and checks what `nft` lists there."""

import json
import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from masqd_agent import masqd_table_json, masqd_tables, table_objects  # noqa: E402

from masqd import render  # noqa: E402

pytestmark = pytest.mark.lab

ONE_HOST = {"name": "kernel-apply", "hosts": {"gw": {}}, "links": []}

PRELUDE = textwrap.dedent("""
    import json, sys, time
    from masqd.service import Service
    from masqd import render
    def ok(svc, **req):
        resp = svc.handle(req)
        assert resp["ok"], resp
        return resp
    WEB = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
           "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15},
                        {"address": "10.16.0.28", "port": 80, "pref": 5}]}
    SCENARIO = [
        ("portfw", [WEB, {"protocol": "udp", "local_address": "2001:db8::1", "local_port": 53,
                          "backends": [{"address": "fd00::53", "port": 53}]}]),
        ("mfw", [{"mark": 3, "backends": [{"address": "10.16.15.46"}]},
                 {"mark": 7, "backends": [{"address": "10.16.0.27", "pref": 0},
                                          {"address": "10.16.0.28", "port": 8080, "pref": 0}]}]),
        ("marks", [{"name": "friend", "mark": 1, "source": "203.0.113.0/24", "input_interface": "eth0"},
                   {"name": "neutral", "mark": 3, "source": "203.0.113.0/24", "source_invert": True,
                    "protocol": "tcp", "destination_ports": [80, "8000-8080"]}]),
        ("autofw", [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27"},
                    {"protocol": "udp", "low_port": 9000, "high_port": 9100,
                     "control_protocol": "tcp", "control_port": 7070}]),
        ("masquerade", [{"name": "web", "source": "10.16.0.0/24", "output_interface": "wan0"}]),
    ]
    def load_scenario(svc):
        for table, entries in SCENARIO:
            ok(svc, op="set", table=table, entries=entries)
""")


def run_in(lab, code, timeout=60):
    result = lab.run("gw", [sys.executable, "-c", PRELUDE + textwrap.dedent(code)], timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def nft(lab, *args):
    return lab.run("gw", ["nft"] + list(args), timeout=30, check=True).stdout


@pytest.fixture
def gw(lab_factory):
    lab = lab_factory(ONE_HOST)
    nft(lab, "add table inet other; add chain inet other c { type filter hook input priority 0; }; "
             "add rule inet other c tcp dport 22 counter accept")
    return lab


def test_full_apply_exactly_one_table_and_others_untouched(gw, tmp_path):
    other = nft(gw, "list", "table", "inet", "other")
    out = run_in(gw, """
        svc = Service(%r); svc.start(); load_scenario(svc)
        print(json.dumps({"kernel": svc.nft.list_text()}))
    """ % str(tmp_path))
    tables = nft(gw, "list", "tables").split("\n")
    assert sorted(t for t in tables if t) == sorted(["table inet %s" % name for name in render.TABLES]
                                                    + ["table inet other"])
    assert nft(gw, "list", "table", "inet", "other") == other
    listing = masqd_tables(nft(gw, "list", "ruleset"))
    assert listing == out["kernel"]
    assert "numgen inc mod 20 < 15 counter packets 0 bytes 0 dnat ip to 10.16.0.27:80" in listing
    assert "2001:db8::1 . udp . 53 counter packets 0 bytes 0 : fd00::53 . 53" in listing
    assert 'iifname "eth0" ip saddr 203.0.113.0/24 counter packets 0 bytes 0 meta mark set 0x00000001' in listing
    # a second agent start replaces the table (a full re-sync creates the objects in
    # another order than the changes did): the same objects, other still untouched
    run_in(gw, "Service(%r).start(); print(json.dumps({}))" % str(tmp_path))
    assert table_objects(masqd_tables(nft(gw, "list", "ruleset"))) == table_objects(listing)
    assert nft(gw, "list", "table", "inet", "other") == other


def test_kernel_rejection_leaves_listing_identical(gw, tmp_path):
    out = run_in(gw, """
        from masqd.nft import LibNftables
        class Poisoned(LibNftables):
            # Appends a jump to a base chain, which the kernel refuses (EOPNOTSUPP).
            poison = False
            def apply(self, txn, dry_run=False, alongside=None):
                if self.poison:
                    txn = render.Transaction(txn.ops + [
                        render.Op("add", "chain", "loop", render.Chain("loop", None, ())),
                        render.Op("add", "rule", "loop", "jump prerouting")])
                return super().apply(txn, dry_run, alongside)
        svc = Service(%r, nft=Poisoned()); svc.start(); load_scenario(svc)
        before = svc.nft.list_text()
        svc.nft.poison = True
        bad = svc.handle({"op": "add", "table": "portfw", "entry": dict(WEB, local_port=81)})
        bad_set = svc.handle({"op": "set", "table": "marks", "entries": []})
        after = svc.nft.list_text()
        print(json.dumps({"bad": bad, "bad_set": bad_set, "same": before == after,
                          "revision": svc.handle({"op": "status"})["revision"]}))
    """ % str(tmp_path))
    assert out["bad"]["ok"] is False and out["bad_set"]["ok"] is False
    assert "the kernel refused the change" in out["bad"]["error"]["message"]
    assert "Error:" in out["bad"]["error"]["message"]
    assert out["same"] is True
    assert out["revision"] == len([1 for _set in range(5)])  # the five `set`s of load_scenario only


def test_ten_thousand_keys_and_incremental_change(gw, tmp_path):
    out = run_in(gw, """
        def ip(i): return "10.%%d.%%d.%%d" %% (i >> 16 & 255, i >> 8 & 255, i & 255)
        entries = [{"protocol": "tcp", "local_address": ip(i), "local_port": 80,
                    "backends": [{"address": "10.200.0.1", "port": 80, "pref": 2},
                                 {"address": "10.200.0.2", "port": 80, "pref": 1}][: 1 + i %% 2]}
                   for i in range(10000)]
        svc = Service(%r); svc.start()
        t = time.perf_counter(); ok(svc, op="set", table="portfw", entries=entries)
        full = time.perf_counter() - t
        t = time.perf_counter(); ok(svc, op="add", table="portfw", entry=dict(WEB, local_port=81))
        add = time.perf_counter() - t
        t = time.perf_counter(); ok(svc, op="delete", table="portfw", entry={"protocol": "tcp",
            "local_address": ip(7), "local_port": 80})
        delete = time.perf_counter() - t
        print(json.dumps({"full": full, "add": add, "delete": delete}))
    """ % str(tmp_path), timeout=120)
    objs = masqd_table_json(json.loads(nft(gw, "-j", "list", "ruleset"))["nftables"])
    elems = {o["map"]["name"]: len(o["map"].get("elem", [])) for o in objs if "map" in o}
    assert sum(elems[name] for name in render.direct_maps("v4")) == 5000 - 0  # even i: one backend (key 7 was odd)
    shards = [render.cascade_map("v4", n) for n in range(render.PORTFW_SHARDS)]
    assert sum(elems[name] for name in shards) == 5000 - 1 + 1  # odd i: chains; minus key 7, plus WEB:81
    assert min(elems[name] for name in shards) > 500  # spread over the shard tables
    chains = [(o["chain"]["table"], o["chain"]["name"]) for o in objs if "chain" in o]
    assert len([c for t, c in chains if c.startswith("pf_")]) == 5000
    assert all(t == render.table_of(c) for t, c in chains)
    print("\n10,000 keys: set %.2f s, add one %.1f ms, delete one %.1f ms"
          % (out["full"], out["add"] * 1000, out["delete"] * 1000))


def test_restart_after_kill_reconciles(gw, tmp_path):
    out = run_in(gw, """
        svc = Service(%r); svc.start(); load_scenario(svc)
        ok(svc, op="schedule", mark=7)
        print(json.dumps({"listing": svc.nft.list_text()}))
    """ % str(tmp_path))
    # What a crash leaves behind and someone's meddling: junk in the table, a lost element.
    nft(gw, "add chain inet masqd junk; add rule inet masqd junk counter; "
            "delete element inet masqd mfw_marks { 3 }")
    assert masqd_tables(nft(gw, "list", "ruleset")) != out["listing"]
    again = run_in(gw, """
        svc = Service(%r); svc.start()
        print(json.dumps({"revision": svc.handle({"op": "status"})["revision"],
                          "mfw": svc.handle({"op": "list", "table": "mfw"})["result"]["entries"]}))
    """ % str(tmp_path))
    assert table_objects(masqd_tables(nft(gw, "list", "ruleset"))) == table_objects(out["listing"])
    assert again["revision"] == 6
    heads = [b["address"] for b in again["mfw"][1]["backends"] if b["head"]]
    assert heads == ["10.16.0.28"]
    assert "dnat ip to 10.16.0.28:8080" in out["listing"]


def test_a_start_in_two_steps_builds_the_table_a_full_sync_builds(gw, tmp_path):
    """A start loads the PORTFW keys as one netlink batch after the rest of the table:
    with no table in the kernel, the rest first, then the keys; with the table in
    place (and meddled with), the rest is replaced while the PORTFW maps keep every key,
    then one batch refills them. Either way the table is the one a single full re-sync
    writes."""
    out = run_in(gw, """
        import subprocess
        from masqd import nfnetlink, portfw_batch
        from masqd.nft import LibNftables
        def listing():
            return LibNftables().list_text()
        def portfw_elements():
            with nfnetlink.Dumper() as d:
                return sum(d.element_count(render.table_of(name), name) for name in render.PORTFW_MAPS)
        svc = Service(%r); svc.start(); load_scenario(svc)
        ok(svc, op="set", table="portfw", entries=[
            {"protocol": "udp" if i %% 5 else "tcp", "local_address": "2001:db8::%%x" %% (i %% 7) if i %% 4 == 0
             else "203.0.113.%%d" %% (i %% 9), "local_port": 1000 + i,
             "backends": [{"address": "fd00::%%x" %% (i %% 3 + 1) if i %% 4 == 0 else "10.16.0.%%d" %% (i %% 3 + 1),
                           "port": 80 + b, "pref": 1 + b} for b in range(1 + (i %% 3 == 0))]}
            for i in range(3000)])
        subprocess.run(["nft", "delete", "table", "inet", "masqd"], check=True)
        batches = []
        commit = portfw_batch.BatchWriter.commit
        def counted(self, ops, alongside=None):
            batches.append((len(ops), portfw_elements()))  # what forwards just before the batch
            return commit(self, ops, alongside)
        portfw_batch.BatchWriter.commit = counted
        import logging
        refused = []
        logging.getLogger("masqd.service").addHandler(logging.Handler())
        logging.getLogger("masqd.service").handlers[-1].emit = lambda record: refused.append(record.getMessage())
        cold = Service(%r); cold.start()
        after_cold, cold_batches = listing(), list(batches)
        subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
            "add chain inet masqd junk\\nadd rule inet masqd junk counter\\nadd chain inet masqd_portfw_0 pf_00000000000000ee\\n"
            "delete element inet masqd mfw_marks { 3 }\\nflush chain inet masqd mark_prerouting\\n"
            "add element inet masqd portfw_direct_v4_4 { 198.51.100.1 . tcp . 4444 : 10.16.0.99 . 1 }\\n"))
        warm = Service(%r); warm.start()
        after_warm, warm_batches = listing(), batches[len(cold_batches):]
        # A cascade chain in a table its name does not say: only a whole re-sync removes it.
        subprocess.run(["nft", "add chain inet masqd pf_00000000000000ef"], check=True)
        misplaced = Service(%r); misplaced.start()
        after_misplaced, misplaced_batches = listing(), batches[len(cold_batches) + len(warm_batches):]
        LibNftables().apply(render.full_sync(warm._ruleset))
        print(json.dumps({"cold": after_cold, "warm": after_warm, "misplaced": after_misplaced, "whole": listing(),
                          "cold_batches": cold_batches, "warm_batches": warm_batches,
                          "misplaced_batches": misplaced_batches, "refused": [m for m in refused if "refused" in m]}))
    """ % (str(tmp_path), str(tmp_path), str(tmp_path), str(tmp_path)), timeout=120)
    assert out["refused"] == []  # both starts went in two steps, neither fell back to one transaction
    assert table_objects(out["cold"]) == table_objects(out["whole"])  # the cascade chains come later in the listing
    assert table_objects(out["warm"]) == table_objects(out["whole"])  # the meddling undone
    assert "pf_" in out["cold"] and "2001:db8::6 . udp" in out["cold"] and "mfw_7" in out["cold"]
    assert "junk" not in out["warm"] and "4444" not in out["warm"] and "pf_00000000000000ee" not in out["warm"]
    ((size, before),) = out["cold_batches"]
    assert size > 3000 and before == 0  # every key's element and the cascades, into empty maps
    ((size, before),) = out["warm_batches"]
    assert size > 3000 and before == 3001  # the rest replaced, every key (and the junk one) still there
    assert table_objects(out["misplaced"]) == table_objects(out["whole"]) and out["misplaced_batches"] == []


def test_plan_uses_kernel_dry_run(gw, tmp_path):
    out = run_in(gw, """
        svc = Service(%r); svc.start(); load_scenario(svc)
        before = svc.nft.list_text()
        plan = ok(svc, op="plan", table="portfw", entries=[dict(WEB, local_port=8080)])
        print(json.dumps({"plan": plan, "same": before == svc.nft.list_text()}))
    """ % str(tmp_path))
    assert out["same"] is True
    assert out["plan"]["result"]["changed"] is True
    assert "goto pf_" in out["plan"]["result"]["nft"]


def test_direct_map_counts_connections_for_pcnt(seed_lab, tmp_path):
    """A single-backend key lives in a portfw_direct_v4 shard (no chain): real connections
    reach the backend and its per-element counter gives list its pcnt."""
    from ipmasq_lab import probes
    code = """
        svc = Service(%r); svc.start()
        ok(svc, op="add", table="portfw", entry={"protocol": "tcp", "local_address": "198.51.100.1",
           "local_port": 8080, "backends": [{"address": "10.16.0.27", "port": 80, "pref": 4}]})
        print(json.dumps({}))
    """ % str(tmp_path)
    result = seed_lab.run("gateway", [sys.executable, "-c", PRELUDE + textwrap.dedent(code)], timeout=30)
    assert result.returncode == 0, result.stderr
    with probes.serve_identity(seed_lab, "web1", 80):
        answers = probes.connect_many(seed_lab, "client", "198.51.100.1", 8080, count=3)
    assert [a.backend for a in answers] == ["web1"] * 3
    code = """
        from masqd.nft import LibNftables
        from masqd.service import backend_runtime
        rules, elements = LibNftables().read_counters()
        entry = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 8080,
                 "backends": [{"address": "10.16.0.27", "port": 80, "pref": 4}]}
        print(json.dumps(backend_runtime("portfw", entry, None, rules, elements)))
    """
    result = seed_lab.run("gateway", [sys.executable, "-c", PRELUDE + textwrap.dedent(code)], timeout=30)
    assert result.returncode == 0, result.stderr
    (backend,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert (backend["connections"], backend["pcnt"], backend["head"]) == (3, 1, True)


def test_every_direct_shard_forwards(seed_lab, tmp_path):
    """The prerouting dispatch (address & 3 . port & 3) jumps to the shard whose map
    render.direct_shard put the key in, for all 16 shards of both families: one key per
    shard, each reached by a real connection, each counted in its own map."""
    from ipmasq_lab import probes
    keys = [("%s%d" % (prefix, 4 + low), 8000 + port)
            for prefix in ("203.0.113.", "2001:db8:ffff::") for low in range(4) for port in range(4)]
    code = """
        svc = Service(%r); svc.start()
        keys = %r
        ok(svc, op="set", table="portfw", entries=[{"protocol": "tcp", "local_address": a, "local_port": p,
           "backends": [{"address": "fd00:16::27" if ":" in a else "10.16.0.27", "port": 80}]} for a, p in keys])
        print(json.dumps(sorted({render.direct_map(a, p) for a, p in keys})))
    """ % (str(tmp_path), keys)
    result = seed_lab.run("gateway", [sys.executable, "-c", PRELUDE + textwrap.dedent(code)], timeout=30)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.strip().splitlines()[-1])) == 32
    with probes.serve_identity(seed_lab, "web1", 80):
        reached = {(address, port): [a.backend for a in probes.connect_many(seed_lab, "client", address, port)]
                   for address, port in keys}
    assert reached == {key: ["web1"] for key in keys}
    for address, port in keys:
        listed = seed_lab.run("gateway", ["nft", "list", "map", "inet", "masqd", render.direct_map(address, port)],
                              timeout=10, check=True).stdout
        assert "%s . tcp . %d counter packets 1 " % (address, port) in listed, listed


def test_incremental_portfw_changes_equal_a_full_resync(gw):
    """Element-level diffs (single -> cascade, cascade -> other cascade, cascade ->
    single, keys removed) leave exactly the table a full re-sync of the same state
    builds, and a refused transaction changes nothing."""
    out = run_in(gw, """
        import subprocess
        from masqd import model
        from masqd.nft import LibNftables, NftError
        def entry(proto, laddr, port, backends):
            return model.normalize_entry("portfw", {"protocol": proto, "local_address": laddr,
                "local_port": port, "backends": [{"address": a, "port": p, "pref": w} for a, p, w in backends]})
        def listing():
            return LibNftables().list_text()
        steps = [
            [entry("tcp", "198.51.100.1", 80, [("10.16.0.27", 80, 15), ("10.16.0.28", 8080, 5)]),
             entry("udp", "2001:db8::1", 53, [("fd00::53", 53, 10)]),
             entry("tcp", "2001:db8::2", 443, [("fd00::1", 443, 3), ("fd00::2", 443, 1), ("fd00::3", 4443, 2)]),
             entry("udp", "198.51.100.2", 65535, [("10.16.0.9", 1, 10)])],
            [entry("tcp", "198.51.100.1", 80, [("10.16.0.27", 80, 1), ("10.16.0.29", 80, 1)]),
             entry("udp", "2001:db8::1", 53, [("fd00::53", 53, 10), ("fd00::54", 53, 10)]),
             entry("tcp", "2001:db8::2", 443, [("fd00::1", 443, 0), ("fd00::2", 443, 1)])],
            [],
        ]
        nft = LibNftables()
        rs = render.render({})
        nft.apply(render.full_sync(rs))
        incremental, resynced = [], []
        for step in steps:
            new = render.Ruleset(rs.fragments, {model.entry_key("portfw", e): e for e in step})
            nft.apply(render.diff(rs, new))
            incremental.append(listing())
            nft.apply(render.full_sync(new))
            resynced.append(listing())
            rs = new
        # A refused transaction (goto a chain that does not exist) changes nothing.
        before = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        bad = render.Transaction([
            render.Op("add", "element", render.direct_map("198.51.100.9", 9), [("198.51.100.9 . tcp . 9", "10.0.0.1 . 80")]),
            render.Op("add", "element", "portfw_v4_0", [("198.51.100.9 . tcp . 10", "goto pf_0000000000000000")])])
        try:
            nft.apply(bad)
            refused = None
        except NftError as exc:
            refused = str(exc)
        after = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        print(json.dumps({"incremental": incremental, "resynced": resynced, "refused": refused,
                          "unchanged": before == after}))
    """)
    assert out["incremental"] == out["resynced"]
    first = out["incremental"][0]
    assert "numgen inc mod 20 < 15 counter packets 0 bytes 0 dnat ip to 10.16.0.27:80" in first
    assert "dnat ip6 to [fd00::3]:4443" in first and "198.51.100.2 . udp . 65535 counter packets 0 bytes 0 : 10.16.0.9 . 1" in first
    assert "pf_" not in out["incremental"][2]
    assert out["refused"]
    assert out["unchanged"]


def test_counters_by_netlink_dump_equal_the_listing(gw, tmp_path):
    """read_counters (nfnetlink dumps) gives what libnftables' listing gives, on
    generated keys (IPv4 and IPv6, tcp and udp, one and two backends) with generated
    counter values, and list reports them as the keys' connections."""
    out = run_in(gw, """
        import random, subprocess
        rnd = random.Random(7)
        svc = Service(%r); svc.start(); load_scenario(svc)
        entries = []
        for i in range(400):
            v6 = i %% 5 == 0
            local = "2001:db8::%%x" %% (1 + i %% 7) if v6 else "198.51.100.%%d" %% (1 + i %% 9)
            backend = lambda n: {"address": ("fd00::%%x" if v6 else "10.16.%%d.1") %% n, "port": 1 + n}
            backends = [backend(i %% 200)] + ([dict(backend(i %% 200 + 1), pref=3)] if i %% 4 == 0 else [])
            entries.append({"protocol": rnd.choice(["tcp", "udp"]), "local_address": local,
                            "local_port": 1000 + i, "backends": backends})
        ok(svc, op="set", table="portfw", entries=entries)
        # Counter values the kernel keeps: elements re-added with counters of their own.
        expected = {}
        for e in rnd.sample([e for e in entries if len(e["backends"]) == 1], 60):
            fam = "v6" if ":" in e["local_address"] else "v4"
            b = e["backends"][0]
            key = "%%s . %%s . %%d" %% (e["local_address"], e["protocol"], e["local_port"])
            value = ("[%%s]" if fam == "v6" else "%%s") %% b["address"]
            packets = rnd.randrange(1, 1 << 40)
            m = "inet masqd " + render.direct_map(e["local_address"], e["local_port"])
            subprocess.run(["nft", "delete element %%s { %%s }" %% (m, key)], check=True)
            subprocess.run(["nft", "add element %%s { %%s counter packets %%d bytes 1 : %%s . %%d }"
                            %% (m, key, packets, b["address"], b["port"])], check=True)
            expected["%%s %%s" %% (e["protocol"], key)] = packets
        ok(svc, op="set", table="masquerade", entries=[
            {"name": "ftp", "source": "10.16.0.0/24", "output_interface": "wan0", "helpers": ["ftp"]}])
        dumped, listed = svc.nft.read_counters(), svc.nft._listed_counters()
        # A walk that writes interrupted, and that missed every other element: the
        # missed keys are read one by one (a key the map does not hold is left out).
        from masqd import nfnetlink
        whole = nfnetlink.Dumper.element_counters
        def lossy(self, table, name, attempts=5, partial=False):
            items = list(whole(self, table, name))
            self.interrupted = True
            return iter(items[::2])
        # And a rule dump that writes kept interrupting: read chain by chain.
        every_rule = nfnetlink.Dumper.rule_counters
        def interrupted(self, table, chains=None):
            if chains is None:
                raise nfnetlink.DumpInterrupted("test")
            return every_rule(self, table, chains)
        nfnetlink.Dumper.element_counters = lossy
        nfnetlink.Dumper.rule_counters = interrupted
        try:
            refilled = svc.nft.read_counters(svc._direct_keys, svc._counted_chains)
        finally:
            nfnetlink.Dumper.element_counters = whole
            nfnetlink.Dumper.rule_counters = every_rule
        with nfnetlink.Dumper() as d:
            absent = d.element_packets("masqd", "portfw_direct_v4_0", [
                nfnetlink.address_proto_port_key("198.51.100.250", "tcp", 9)])
        table, listed_table = svc.nft.read_table(), svc.nft._listed_table()
        same_table = {f: getattr(table, f) == getattr(listed_table, f) for f in ("shape", "rules", "comments", "timed")}
        shape_diff = sorted(str((k, table.shape.get(k), listed_table.shape.get(k)))
                            for k in set(table.shape) | set(listed_table.shape) if table.shape.get(k) != listed_table.shape.get(k))
        kinds = sorted({kind for kind, _name in table.shape})
        rows = svc.handle({"op": "list", "table": "portfw"})["result"]["entries"]
        got = {"%%s %%s . %%s . %%d" %% (r["protocol"], r["local_address"], r["protocol"], r["local_port"]):
               r["backends"][0]["connections"] for r in rows if len(r["backends"]) == 1}
        print(json.dumps({"rules_equal": dumped[0] == listed[0], "rule_chains": len(dumped[0]),
                          "elements_equal": {k: v for k, v in dumped[1].items() if v} == listed[1],
                          "elements": sum(len(v) for v in dumped[1].values()),
                          "refilled_equal": refilled[1] == dumped[1], "absent": absent,
                          "rules_by_chain": {c: n for c, n in dumped[0].items() if c.startswith(("pf_", "mfw_", "mark_"))}
                                            == refilled[0],
                          "connections": {k: got[k] for k in expected}, "expected": expected,
                          "same_table": same_table, "shape_diff": shape_diff[:5], "kinds": kinds, "timed_maps": len(table.timed),
                          "phases": sum(1 for c in table.comments.values() if c.startswith("phase"))}))
    """ % str(tmp_path))
    assert out["rules_equal"] and out["rule_chains"] >= 100
    assert out["elements_equal"] and out["elements"] == 300  # the set replaced the scenario's keys
    assert out["connections"] == out["expected"]
    assert out["refilled_equal"] and out["absent"] == {} and out["rules_by_chain"]
    # read_table (dumps, and each timed map listed alone) reads what the whole-table listing reads
    assert out["same_table"] == {"shape": True, "rules": True, "comments": True, "timed": True}, out["shape_diff"]
    assert out["kinds"] == ["chain", "ct helper", "map"] and out["timed_maps"] >= 2


RULE_SHAPES = [  # every rule text render writes for PORTFW keys (cascades, all_down reject)
    'meta l4proto tcp numgen inc mod 20 < 15 counter dnat ip to 10.16.0.27:80 comment "phase 3"',
    "meta l4proto tcp numgen inc mod 5 < 3 counter dnat ip to 10.16.0.28:8080",
    "meta l4proto tcp counter dnat ip to 10.16.0.29:65535",
    "meta l4proto udp numgen inc mod 65535 < 1 counter dnat ip6 to [fd00::1]:53",
    'meta l4proto udp counter dnat ip6 to [2001:db8::ffff:1]:1 comment "phase 4294967"',
    "meta l4proto tcp reject with tcp reset",
    "reject",
]


def test_portfw_batches_write_what_libnftables_writes(gw):
    """The same PORTFW transaction (chains, every rule shape, both maps of each family,
    then a rewrite and a removal) written by masqd.portfw_batch and by libnftables
    lists the same, line by line, counters and comments included; and the kernel's
    own dump of every rule (its expressions as the kernel holds them: registers,
    byte order, NAT flags; its comment) is byte for byte the same."""
    out = run_in(gw, """
        import subprocess
        from masqd import nfnetlink, portfw_batch
        from masqd.nft import LibNftables
        def kernel_rules():
            with nfnetlink.Dumper() as dumper:
                parts = [part for table in render.TABLES for part in dumper.dump(
                    nfnetlink.NFT_MSG_GETRULE, [(nfnetlink.NFTA_RULE_TABLE, table.encode() + b"\\0")])]
            rules = [nfnetlink.attributes(part) for part in parts]
            return sorted([(r.get(nfnetlink.NFTA_RULE_CHAIN) or b"").hex(),
                           (r.get(nfnetlink.NFTA_RULE_EXPRESSIONS) or b"").hex(),
                           (r.get(nfnetlink.NFTA_RULE_USERDATA) or b"").hex()] for r in rules)
        rules = %r
        chains = [render.Chain("pf_%%02x%%014x" %% (i, i), None, (rule,)) for i, rule in enumerate(rules)]  # shard i
        steps = [render.Transaction(
            [render.Op("add", "chain", c.name, c) for c in chains]
            + [render.Op("add", "rule", c.name, r) for c in chains for r in c.rules]
            + [render.Op("add", "element", render.cascade_map("v4", render.shard_of(c.name)),
                         [("198.51.100.1 . tcp . %%d" %% i, "goto " + c.name)]) for i, c in enumerate(chains)]
            + [render.Op("add", "element", "portfw_v6_3", [("2001:db8::1 . udp . 53", "goto " + chains[3].name)]),
               render.Op("add", "element", render.direct_map("203.0.113.1", 80), [("203.0.113.1 . tcp . 80", "10.16.0.30 . 8080")]),
               render.Op("add", "element", render.direct_map("2001:db8::2", 443), [("2001:db8::2 . tcp . 443", "fd00::2 . 443")])]),
            render.Transaction([render.Op("flush", "chain", chains[0].name, None)]
                               + [render.Op("add", "rule", chains[0].name, r) for r in rules[1:3]]
                               + [render.Op("delete", "element", "portfw_v4_6", ["198.51.100.1 . tcp . 6"]),
                                  render.Op("delete", "chain", chains[6].name, None)])]
        listings = {}
        for how in ("batch", "libnftables"):
            nft = LibNftables()
            nft.apply(render.full_sync(render.render({})))
            for step in steps:
                assert portfw_batch.batch_ops(step) is not None
                nft.apply(step) if how == "batch" else nft._run(step)
                listings.setdefault(how, []).append(nft.list_text())
                listings.setdefault(how + " rules", []).append(kernel_rules())
        print(json.dumps(listings))
    """ % RULE_SHAPES)
    assert out["batch"] == out["libnftables"]
    assert out["batch rules"] == out["libnftables rules"] and len(out["batch rules"][0]) > 10
    assert 'comment "phase 3"' in out["batch"][0] and "reject with tcp reset" in out["batch"][0]
    assert "pf_0600000000000006" not in out["batch"][1]


def test_refused_portfw_batch_changes_nothing(gw):
    """A PORTFW batch the kernel refuses (here: the last of its deletions names a key
    that is not there) commits nothing: not its new chain, not one of its elements."""
    out = run_in(gw, """
        import subprocess
        from masqd import portfw_batch
        from masqd.nft import LibNftables, NftError
        nft = LibNftables()
        nft.apply(render.full_sync(render.render({})))
        listing = lambda: subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        chain = render.Chain("pf_02000000000000aa", None, ("meta l4proto tcp counter dnat ip to 10.16.0.27:80",))
        ok = render.Transaction([render.Op("add", "element", "portfw_direct_v4_0",
                                           [("198.51.100.1 . tcp . %d" % p, "10.16.0.27 . 80") for p in range(1, 3001)])])
        nft.apply(ok)
        before = listing()
        bad = render.Transaction([
            render.Op("add", "chain", chain.name, chain), render.Op("add", "rule", chain.name, chain.rules[0]),
            render.Op("delete", "element", "portfw_direct_v4_0",
                      ["198.51.100.1 . tcp . %d" % p for p in range(1, 3001)] + ["198.51.100.1 . tcp . 9"]),
            render.Op("add", "element", "portfw_v4_2", [("198.51.100.2 . tcp . 80", "goto " + chain.name)])])
        assert portfw_batch.batch_ops(bad) is not None
        try:
            nft.apply(bad)
            refused = None
        except NftError as exc:
            refused = str(exc)
        print(json.dumps({"refused": refused, "unchanged": listing() == before, "count": before.count("10.16.0.27 . 80")}))
    """)
    assert out["refused"] and "No such file or directory" in out["refused"]
    assert out["count"] == 3000 and out["unchanged"]


def test_events_off_for_own_batches_and_foreign_commits_still_checked(gw):
    """The ruleset monitor drops its subscription for the agent's own large PORTFW
    batch (RulesetMonitor.events_off): no events, no verification for that batch alone;
    a commit by another program inside that window moves the generation by more than
    one, and the monitor's thread then runs the comparison (as after an overflow)."""
    out = run_in(gw, """
        import subprocess, threading
        from masqd.nft import LibNftables
        from masqd.portfw_batch import BatchWriter
        from masqd.watchers.ruleset import RulesetMonitor
        nft = LibNftables()
        nft.apply(render.full_sync(render.render({})))
        verified = []
        done = threading.Event()
        def on_verify(reason):
            verified.append(reason)
            done.set()
        monitor = RulesetMonitor(lambda report: verified.append("drift"), on_verify, verify_interval=0)
        assert monitor.start()
        writer = BatchWriter()
        def batch(port):
            return [(render.Op("add", "element", "portfw_direct_v4_0", [("198.51.100.1 . tcp . %d" % port, "10.16.0.27 . 80")]), None)]
        events = monitor.events
        with monitor.events_off(writer.generation):
            writer.commit(batch(1))
        time.sleep(0.6)  # a loop of the monitor's thread
        alone = {"verified": list(verified), "events": monitor.events - events}
        with monitor.events_off(writer.generation):
            writer.commit(batch(2))
            subprocess.run(["nft", "add", "table", "inet", "foreign"], check=True)
        done.wait(5)
        monitor.stop()
        print(json.dumps({"alone": alone, "with_foreign": verified,
                          "elements": subprocess.run(["nft", "list", "map", "inet", "masqd", "portfw_direct_v4_0"],
                                                     capture_output=True, text=True).stdout}))
    """)
    assert out["alone"] == {"verified": [], "events": 0}
    assert len(out["with_foreign"]) == 1 and "another program" in out["with_foreign"][0]
    assert "198.51.100.1 . tcp . 1" in out["elements"] and "198.51.100.1 . tcp . 2" in out["elements"]
