"""Health checks, pure logic: the `check` contract, fall/rise counting, live schedules,
pref-0 failover heads, all-down policies, one transaction per change of state (the
fake kernel). The real probes against real servers: tests/lab/test_health_live.py."""

import asyncio
import socket

import pytest

from masqd import model, render
from masqd.model import ValidationError
from masqd.nft import FakeNftables
from masqd.service import Service
from masqd.watchers import health

KEY = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80}
A, B, C = "10.16.0.27", "10.16.0.28", "10.16.0.29"
TCP = {"type": "tcp", "interval": 0.1, "fall": 2, "rise": 2}


def portfw(*backends, **options):
    return dict(KEY, backends=[dict(b) for b in backends], **options)


@pytest.fixture
def svc(tmp_path):
    service = Service(str(tmp_path / "state"), nft=FakeNftables())
    service.start()
    return service


def ok(svc, **request):
    resp = svc.handle(request)
    assert resp["ok"], resp
    return resp


# --- the contract -----------------------------------------------------------------------

def test_check_defaults_and_canonical_form():
    e = model.normalize_portfw(portfw({"address": A, "port": 80, "check": {"type": "tcp"}}))
    assert e["backends"][0]["check"] == {"type": "tcp", "port": None, "interval": 2.0, "timeout": 2.0,
                                         "fall": 3, "rise": 2}
    e = model.normalize_portfw(portfw({"address": A, "port": 80, "check": {
        "type": "http", "port": 8080, "path": "/healthz", "status": [204, 200], "interval": 0.5}}))
    assert e["backends"][0]["check"] == {"type": "http", "port": 8080, "path": "/healthz", "status": [200, 204],
                                         "interval": 0.5, "timeout": 0.5, "fall": 3, "rise": 2}
    e = model.normalize_portfw(portfw({"address": A, "port": 80, "check": {"type": "none"}}))
    assert "check" not in e["backends"][0]  # none: exactly an unchecked backend
    e = model.normalize_mfw({"mark": 1, "backends": [{"address": A, "check": {"type": "icmp"}}]})
    assert e["backends"][0]["check"]["type"] == "icmp"
    # An entry without health fields is exactly what it was before health checks.
    assert model.normalize_portfw(portfw({"address": A, "port": 80})) == dict(
        KEY, backends=[{"address": A, "port": 80, "pref": 10}])


@pytest.mark.parametrize("check, field, value", [
    ({"type": "ping"}, "backends[0].check.type", "ping"),
    ({"type": "tcp", "fall": 0}, "backends[0].check.fall", 0),
    ({"type": "tcp", "rise": True}, "backends[0].check.rise", True),
    ({"type": "tcp", "interval": 0}, "backends[0].check.interval", 0),
    ({"type": "tcp", "interval": "2"}, "backends[0].check.interval", "2"),
    ({"type": "tcp", "timeout": -1}, "backends[0].check.timeout", -1),
    ({"type": "tcp", "port": 70000}, "backends[0].check.port", 70000),
    ({"type": "tcp", "path": "/"}, "backends[0].check.path", "/"),
    ({"type": "http", "path": "no-slash"}, "backends[0].check.path", "no-slash"),
    ({"type": "http", "path": "/a b"}, "backends[0].check.path", "/a b"),
    ({"type": "http", "status": 99}, "backends[0].check.status", 99),
    ({"type": "icmp", "port": 80}, "backends[0].check.port", 80),
    ({"type": "none", "fall": 2}, "backends[0].check.fall", 2),
    ({"type": "tcp", "bogus": 1}, "backends[0].check.bogus", 1),
    ("tcp", "backends[0].check", "tcp"),
])
def test_bad_check_names_field_and_value(check, field, value):
    with pytest.raises(ValidationError) as exc:
        model.normalize_portfw(portfw({"address": A, "port": 80, "check": check}))
    assert exc.value.field == field and exc.value.value == value


def test_portless_mfw_backend_needs_a_check_port_unless_icmp():
    with pytest.raises(ValidationError) as exc:
        model.normalize_mfw({"mark": 1, "backends": [{"address": A, "check": {"type": "tcp"}}]})
    assert exc.value.field == "backends[0].check.port"
    e = model.normalize_mfw({"mark": 1, "backends": [{"address": A, "check": {"type": "tcp", "port": 22}}]})
    assert e["backends"][0]["check"]["port"] == 22


@pytest.mark.parametrize("options, field", [
    ({"all_down": "drop"}, "all_down"),
    ({"all_down": "fallback"}, "fallback"),
    ({"fallback": {"address": C, "port": 80}}, "fallback"),
    ({"all_down": "fallback", "fallback": {"address": "2001:db8::1", "port": 80}}, "fallback.address"),
    ({"all_down": "fallback", "fallback": {"address": C}}, "fallback.port"),
    ({"failback": "yes"}, "failback"),
    ({"flush_on_down": 1}, "flush_on_down"),
])
def test_bad_entry_health_options(options, field):
    with pytest.raises(ValidationError) as exc:
        model.normalize_portfw(portfw({"address": A, "port": 80}, **options))
    assert exc.value.field == field


def test_bad_check_through_the_api_changes_nothing(svc):
    ok(svc, op="add", table="portfw", entry=portfw({"address": A, "port": 80}))
    before = (svc.nft.dump(), svc.handle({"op": "get"}), svc._revision)
    resp = svc.handle({"op": "add", "table": "portfw", "entry": portfw(
        {"address": B, "port": 80, "check": {"type": "tcp", "fall": 1000}})})
    assert not resp["ok"] and resp["error"]["field"] == "entry.backends[0].check.fall"
    assert resp["error"]["value"] == 1000
    assert (svc.nft.dump(), svc.handle({"op": "get"}), svc._revision) == before


# --- fall / rise ------------------------------------------------------------------------

def test_record_fall_and_rise():
    st = health.TargetState(check=dict(TCP, fall=3, rise=2))
    assert health.record(st, True, None, 1.0) == "up"  # unknown -> up at the first success
    assert [health.record(st, False, "refused", t) for t in (2, 3, 4)] == [None, None, "down"]
    assert st.state == "down" and st.since == 4 and st.last_error == "refused"
    assert health.record(st, False, "refused", 5) is None  # stays down, no new change
    assert [health.record(st, True, None, t) for t in (6, 7)] == [None, "up"]
    # A success in between restarts the count of failures.
    assert [health.record(st, ok, None, 8) for ok in (False, False, True, False, False)] == [None] * 5
    assert health.record(st, False, "x", 9) == "down"


def test_record_unknown_goes_down_after_fall():
    st = health.TargetState(check=dict(TCP, fall=2))
    assert [health.record(st, False, "timeout", t) for t in (1, 2)] == [None, "down"]


def test_http_status_expectations():
    assert health.http_status_ok({}, 200) and health.http_status_ok({}, 302)
    assert not health.http_status_ok({}, 404) and not health.http_status_ok({}, 500)
    assert health.http_status_ok({"status": [404]}, 404) and not health.http_status_ok({"status": [404]}, 200)


# --- live schedules ---------------------------------------------------------------------

def _cascade_targets(rules):
    return [r.split("to ")[-1].split(" ")[0] for r in rules]


def test_down_backend_leaves_the_cascade():
    entry = model.normalize_portfw(portfw({"address": A, "port": 80, "pref": 15},
                                          {"address": B, "port": 80, "pref": 5}))
    _n, _k, _v, chain = render.portfw_items(entry)
    assert _cascade_targets(chain.rules) == ["10.16.0.27:80", "10.16.0.28:80"]
    # 15/5 with the 5 down: all to the 15 (a single target: one direct-map element).
    name, _k, value, chain = render.portfw_items(entry, down={(B, 80)})
    assert (name, value, chain) == (render.direct_map(entry["local_address"], entry["local_port"]), "10.16.0.27 . 80", None)
    three = model.normalize_portfw(portfw({"address": A, "port": 80, "pref": 3}, {"address": B, "port": 80, "pref": 1},
                                          {"address": C, "port": 80, "pref": 2}))
    _n, _k, _v, chain = render.portfw_items(three, down={(B, 80)})
    assert chain.rules[0].startswith("meta l4proto tcp numgen inc mod 5 < 3 ")
    assert _cascade_targets(chain.rules) == ["10.16.0.27:80", "10.16.0.29:80"]


@pytest.mark.parametrize("options, want", [
    ({}, "cascade"),
    ({"all_down": "fallback", "fallback": {"address": C, "port": 8080}}, "10.16.0.29 . 8080"),
    ({"all_down": "reject"}, "reject"),
])
def test_all_down_policies(options, want):
    entry = model.normalize_portfw(portfw({"address": A, "port": 80}, {"address": B, "port": 80}, **options))
    name, _k, value, chain = render.portfw_items(entry, down={(A, 80), (B, 80)})
    if want == "cascade":  # forward (default): as if all were up
        assert render.portfw_items(entry, down={(A, 80), (B, 80)}) == render.portfw_items(entry)
    elif want == "reject":
        assert chain.rules == ("meta l4proto tcp reject with tcp reset",) and value == "goto " + chain.name
    else:
        assert (name, value, chain) == (render.direct_map(entry["local_address"], entry["local_port"]), want, None)


def test_mfw_all_down_reject_rules():
    entry = model.normalize_mfw({"mark": 3, "all_down": "reject", "backends": [{"address": A, "check": {"type": "icmp"}}]})
    frag = render.mfw_fragment(entry, down={(A, None)})
    assert frag.chains["mfw_3"].rules == ("meta l4proto tcp reject with tcp reset", "reject")


# --- the Service: one transaction per change of state -----------------------------------

def test_health_change_is_one_transaction_and_not_persisted(svc):
    entry = portfw({"address": A, "port": 80, "pref": 15, "check": TCP},
                   {"address": B, "port": 80, "pref": 5, "check": TCP})
    ok(svc, op="add", table="portfw", entry=entry)
    revision, txns = svc._revision, len(svc.nft.transactions)
    key = ("tcp", "198.51.100.1", 80)
    assert svc.health_changed("portfw", key, B, 80, up=False) is False  # applied, no flush
    assert len(svc.nft.transactions) == txns + 1 and svc._revision == revision
    assert "10.16.0.28" not in svc.nft.dump() and svc.nft.dump() == svc._ruleset.dump()
    assert svc.health_changed("portfw", key, B, 80, up=False) is None  # no change, no transaction
    assert len(svc.nft.transactions) == txns + 1
    (listed,) = ok(svc, op="list", table="portfw")["result"]["entries"]
    assert [b["health"]["state"] for b in listed["backends"]] == ["unknown", "down"]
    svc.health_changed("portfw", key, B, 80, up=True)
    assert len(svc.nft.transactions) == txns + 2
    assert svc.nft.dump() == render.render(svc._tables).dump()  # the sequence resumes
    assert not svc.store.journal_records or svc.store.journal_records == 1  # the add only


def test_unknown_backend_or_check_is_ignored(svc):
    ok(svc, op="add", table="portfw", entry=portfw({"address": A, "port": 80}, {"address": B, "port": 80}))
    key = ("tcp", "198.51.100.1", 80)
    assert svc.health_changed("portfw", key, A, 80, up=False) is None  # not checked
    assert svc.health_changed("portfw", ("tcp", "198.51.100.1", 81), A, 80, up=False) is None


def test_removed_or_changed_check_leaves_the_down_map(svc):
    ok(svc, op="add", table="portfw", entry=portfw({"address": A, "port": 80, "check": TCP},
                                                   {"address": B, "port": 80, "check": TCP}))
    key = ("tcp", "198.51.100.1", 80)
    svc.health_changed("portfw", key, B, 80, up=False)
    assert svc._down == {("portfw", key): frozenset({(B, 80)})}
    ok(svc, op="set", table="portfw", entries=[portfw({"address": A, "port": 80, "check": TCP},
                                                      {"address": B, "port": 80, "check": dict(TCP, fall=5)})])
    assert svc._down == {}
    assert "10.16.0.28" in svc.nft.dump()


def _mfw(svc, failback):
    chk = {"type": "tcp", "port": 22, "interval": 0.1, "fall": 2, "rise": 2}
    ok(svc, op="add", table="mfw", entry={"mark": 1, "failback": failback, "backends": [
        {"address": A, "pref": 0, "check": chk}, {"address": B, "pref": 0, "check": chk},
        {"address": C, "pref": 0, "check": chk}]})


def _serving(svc):
    return svc._ruleset.fragments[("mfw", 1)].chains["mfw_1"].rules[0].split()[-1]


def test_mfw_pref0_failover_without_failback(svc):
    _mfw(svc, failback=False)
    assert _serving(svc) == A
    svc.health_changed("mfw", 1, A, None, up=False)
    assert _serving(svc) == B and svc._mfw_heads[1] == {"address": B, "port": None}  # as -S would
    svc.health_changed("mfw", 1, A, None, up=True)
    assert _serving(svc) == B  # the head stays where it is
    svc.health_changed("mfw", 1, B, None, up=False)
    assert _serving(svc) == C
    # Kept across a restart like `schedule`'s heads (the health state itself is not).
    again = Service(svc.store.state_dir, nft=FakeNftables())
    again.start()
    assert again._mfw_heads[1] == {"address": C, "port": None} and again._down == {}


def test_mfw_pref0_failover_with_failback(svc):
    _mfw(svc, failback=True)
    svc.health_changed("mfw", 1, A, None, up=False)
    assert _serving(svc) == B and 1 not in svc._mfw_heads
    svc.health_changed("mfw", 1, A, None, up=True)
    assert _serving(svc) == A


def test_all_down_then_one_back_without_failback(svc):
    _mfw(svc, failback=False)
    for b in (A, B, C):
        svc.health_changed("mfw", 1, b, None, up=False)
    svc.health_changed("mfw", 1, A, None, up=True)
    assert _serving(svc) == A
    svc.health_changed("mfw", 1, C, None, up=True)
    assert _serving(svc) == A  # A serves: C coming back does not take over


# --- the watcher's loop against local listeners (loopback in this namespace) ------------

class FakeService:
    """Records the watcher's calls; configuration from a dict."""

    def __init__(self, targets):
        self._revision = 1
        self.targets = targets
        self.calls = []

    def health_targets(self):
        return dict(self.targets)

    def health_changed(self, table, key, address, port, up):
        self.calls.append((address, port, up))
        return False


def test_watcher_tcp_down_and_up_on_loopback():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    check = {"type": "tcp", "port": None, "interval": 0.05, "timeout": 0.2, "fall": 2, "rise": 2}
    fake = FakeService({("portfw", "k", "127.0.0.1", port): check})
    watcher = health.HealthWatcher(fake, refresh=0.05)
    try:
        assert watcher.start()
        _wait(lambda: (watcher.state_of("portfw", "k", "127.0.0.1", port) or {}).get("state") == "up")
        listener.close()
        _wait(lambda: fake.calls[:1] == [("127.0.0.1", port, False)])
        view = watcher.state_of("portfw", "k", "127.0.0.1", port)
        assert view["state"] == "down" and view["since"] and "refused" in view["last_error"].lower()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        _wait(lambda: fake.calls[-1:] == [("127.0.0.1", port, True)])
        # The watcher counts a transition once the commit worker is done (_committed, a
        # callback on its loop), a moment after the Service was told.
        _wait(lambda: watcher.stats()["transitions"] >= 2)
        assert watcher.stats()["up"] == 1
        fake.targets, fake._revision = {}, 2  # configuration changed: the target is forgotten
        _wait(lambda: watcher.stats()["targets"] == 0)
    finally:
        watcher.stop()
        listener.close()
    assert not watcher.running


@pytest.mark.parametrize("family, address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_tcp_probes_keep_one_socket_and_never_complete_a_connection(family, address):
    """A succeeded check's socket is reset (AF_UNSPEC) and reused: one socket for many
    checks, and the listener's application never gets a connection (SYN, SYN-ACK,
    RST). A failed check's socket is closed; the next check after it still works."""
    listener = socket.socket(family)
    try:
        listener.bind((address, 0))
    except OSError:
        listener.close()
        pytest.skip("no %s loopback" % address)
    listener.listen(64)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def checks(count):
        results = []
        done = asyncio.Event()

        def finish(target, st, ok, error):
            results.append((ok, error))
            if len(results) == count:
                done.set()
            else:
                probes.start(address, port, 1.0, target, st)

        probes = health.TcpProbes(asyncio.get_running_loop(), finish)
        try:
            probes.start(address, port, 1.0, "target", None)
            await asyncio.wait_for(done.wait(), 5)
            return results, len(probes.idle[family]), len(probes.registered)
        finally:
            probes.close()

    try:
        results, idle, registered = asyncio.run(checks(20))
        assert results == [(True, None)] * 20
        assert (idle, registered) == (1, 1)
        with pytest.raises(BlockingIOError):
            listener.accept()
        listener.close()
        results, idle, registered = asyncio.run(checks(2))
        assert [ok for ok, _error in results] == [False, False] and "refused" in results[0][1].lower()
        assert (idle, registered) == (0, 0)
    finally:
        listener.close()


def _wait(cond, timeout=5.0):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    assert cond()


def test_http_probe_parses_status():
    async def run():
        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 503 Unavailable\r\n\r\n")
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ConnectionError, match="503"):
                await health.probe_http("127.0.0.1", port, {"path": "/"})
            await health.probe_http("127.0.0.1", port, {"path": "/", "status": [503]})
        finally:
            server.close()
    asyncio.run(run())


# --- masqctl: --check on the backend being given -----------------------------------------

def test_masqctl_check_options():
    from masqd import ipmasqadm
    cmd = ipmasqadm.parse(["portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", A, "80",
                           "--check", "http:8080/healthz", "--check-interval", "0.1", "--check-timeout", "0.05",
                           "--check-fall", "2", "--check-rise", "3"])
    assert cmd.request["entry"]["backends"][0]["check"] == {
        "type": "http", "port": 8080, "path": "/healthz", "interval": 0.1, "timeout": 0.05, "fall": 2, "rise": 3}
    assert model.normalize_portfw(cmd.request["entry"])["backends"][0]["check"]["path"] == "/healthz"
    cmd = ipmasqadm.parse(["mfw", "-I", "-m", "7", "-r", A, "--check=icmp"])
    assert cmd.request["entry"]["backends"][0]["check"] == {"type": "icmp"}
    cmd = ipmasqadm.parse(["mfw", "-A", "-m", "7", "-r", A, "80", "--check", "tcp:22"])
    assert cmd.request["entry"]["backends"][0]["check"] == {"type": "tcp", "port": 22}


@pytest.mark.parametrize("argv", [
    ["portfw", "-d", "-P", "tcp", "-L", "198.51.100.1", "80", "--check", "tcp"],
    ["portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", A, "80", "--check", "tcp:x"],
    ["portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", A, "80", "--check-fall", "2"],
    ["portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", A, "80", "--check", "tcp", "--check-fall", "x"],
    ["mfw", "-S", "-m", "7", "--check", "icmp"],
])
def test_masqctl_bad_check_options(argv):
    from masqd import ipmasqadm
    with pytest.raises(ipmasqadm.UsageError):
        ipmasqadm.parse(argv)


def test_edit_sets_and_removes_a_check(svc):
    ok(svc, op="add", table="mfw", entry={"mark": 7, "backends": [{"address": A, "port": 80}]})
    r = ok(svc, op="edit", table="mfw", entry={"mark": 7, "backends": [{"address": A, "port": 80, "check": TCP}]})
    assert r["result"]["entry"]["backends"][0]["check"]["fall"] == 2
    r = ok(svc, op="edit", table="mfw", entry={"mark": 7, "backends": [{"address": A, "port": 80, "pref": 5}]})
    assert r["result"]["entry"]["backends"][0]["check"]["fall"] == 2  # untouched without `check`
    none = {"address": A, "port": 80, "check": {"type": "none"}}
    r = ok(svc, op="edit", table="mfw", entry={"mark": 7, "backends": [none]})
    assert "check" not in r["result"]["entry"]["backends"][0]


# --- the modules' normalisation (plugins/module_utils/resource.py) ----------------------

def test_module_check_canonical_form_matches_the_agent():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "plugins", "module_utils", "resource.py")
    spec = importlib.util.spec_from_file_location("resource_for_test", path)
    resource = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resource)
    check = {"type": "http", "port": None, "path": None, "status": None, "interval": 1, "timeout": None,
             "fall": None, "rise": 5}
    given = portfw({"address": A, "port": 80, "check": check},
                   all_down="reject", failback=None, fallback=None, flush_on_down=False)
    agent = model.normalize_portfw(given)  # what the agent keeps (module nulls are absent fields)
    assert resource.complete("portfw", given) == resource.complete("portfw", agent)
    assert resource.complete("portfw", agent) == agent
    plain = portfw({"address": A, "port": 80})
    assert resource.complete("portfw", plain) == dict(KEY, backends=[{"address": A, "port": 80, "pref": 10}])
    none = portfw({"address": A, "port": 80, "check": {"type": "none"}})
    assert resource.complete("portfw", none) == resource.complete("portfw", plain)


def test_quiet_chain_while_checks_run(svc):
    """The probes' conntrack events are silenced only while checks run; a full re-sync
    (drift repair) keeps the chain."""
    assert "health_output" not in svc.nft.dump()
    svc.health_quiet(True)
    assert "meta mark 0x6d617364 ct state new ct event set 0x0" in svc.nft.dump()
    assert render.HEALTH_QUIET_MARK == health.QUIET_MARK
    svc._full_sync(None)
    assert "health_output" in svc.nft.dump() and svc.nft.dump() == svc._ruleset.dump()
    svc.health_quiet(False)
    assert "health_output" not in svc.nft.dump()
