"""masqd.metrics over a Service on the fake kernel: the exposition's values, the cache,
the change counters, the HTTP endpoint and the textfile (the real kernel and real
traffic: tests/lab/test_metrics_live.py)."""

import gzip
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from masqd import metrics, render
from masqd.nft import FakeNftables
from masqd.service import Service

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

WEB_KEY = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80}
WEB = dict(WEB_KEY, backends=[{"address": "10.16.0.27", "port": 80, "pref": 15},
                              {"address": "10.16.0.28", "port": 80, "pref": 5}])


class FakeReader:
    """The collector's own kernel handle: pool maps."""

    def __init__(self, nft):
        self.nft, self.calls = nft, 0

    def map_elements(self, names):
        self.calls += 1
        return self.nft.read_elements(names)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def svc(tmp_path):
    service = Service(str(tmp_path / "state"), nft=FakeNftables())
    service.start()
    return service


def ok(target, **request):
    resp = target.handle(request)
    assert resp["ok"], resp
    return resp


def samples(registry):
    """{(name, sorted labels): value} of a registry's exposition, parsed back."""
    text = prometheus_client.generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, text


def make(svc, clock=None, cache=0.0):
    m = metrics.Metrics.__new__(metrics.Metrics)  # no server, no textfile
    registry = prometheus_client.CollectorRegistry()
    changes = metrics.ChangeMetrics(prometheus_client, registry)
    reader = FakeReader(svc.nft)
    collector = metrics.ServiceCollector(svc, cache, lambda: reader, clock or Clock())
    registry.register(collector)
    m.registry, m.collector, m.service = registry, collector, metrics.InstrumentedService(svc, changes)
    return m, reader


def test_backend_connections_are_the_kernels_counters(svc):
    m, _reader = make(svc)
    ok(m.service, op="set", table="portfw", entries=[WEB])
    chain = render.portfw_chain_name(("tcp", "198.51.100.1", 80))
    svc.nft.rule_counters = {chain: [15, 5]}  # the seed's 15/5 after 20 connections
    got, _text = samples(m.registry)
    key = (("backend", "10.16.0.27:80"), ("key", "tcp 198.51.100.1:80"), ("table", "portfw"))
    key2 = (("backend", "10.16.0.28:80"), ("key", "tcp 198.51.100.1:80"), ("table", "portfw"))
    assert got[("masqd_backend_connections_total", key)] == 15
    assert got[("masqd_backend_connections_total", key2)] == 5
    assert got[("masqd_entries", (("table", "portfw"),))] == 1
    assert got[("masqd_state_revision", ())] == 1
    assert got[("masqd_agent_answering", ())] == 1
    # the set went through the wrapper: counted and timed
    assert got[("masqd_changes_total", (("op", "set"), ("result", "changed")))] == 1
    assert got[("masqd_change_duration_seconds_count", (("op", "set"),))] == 1


def test_changes_by_result_and_reads_not_counted(svc):
    m, _reader = make(svc)
    ok(m.service, op="set", table="portfw", entries=[WEB])
    ok(m.service, op="set", table="portfw", entries=[WEB])  # the same again: unchanged
    bad = m.service.handle({"op": "add", "table": "portfw", "entry": dict(WEB_KEY, local_port=70000,
                                                                          backends=WEB["backends"])})
    assert not bad["ok"]
    ok(m.service, op="list")
    got, _text = samples(m.registry)
    assert got[("masqd_changes_total", (("op", "set"), ("result", "unchanged")))] == 1
    assert got[("masqd_changes_total", (("op", "add"), ("result", "refused")))] == 1
    assert not any(name == "masqd_changes_total" and dict(labels)["op"] == "list" for name, labels in got)
    assert m.service.store is svc.store  # everything else is the Service's own


def test_result_of():
    assert metrics.result_of({"ok": True, "changed": True}) == "changed"
    assert metrics.result_of({"ok": True, "changed": False}) == "unchanged"
    assert metrics.result_of({"ok": False, "error": {"message": "port must be 1-65535"}}) == "refused"
    assert metrics.result_of({"ok": False, "error": {"message": "internal error: KeyError: 1"}}) == "error"


def test_the_list_is_cached_for_cache_seconds(svc):
    clock = Clock()
    m, reader = make(svc, clock=clock, cache=5.0)
    ok(svc, op="set", table="portfw", entries=[WEB])
    first, _text = samples(m.registry)
    ok(svc, op="set", table="portfw", entries=[])  # within the cache time: still the old reading
    clock.now += 4.9
    second, _text = samples(m.registry)
    assert second[("masqd_entries", (("table", "portfw"),))] == 1
    assert m.collector.readings == 1
    clock.now += 0.2
    third, _text = samples(m.registry)
    assert third[("masqd_entries", (("table", "portfw"),))] == 0
    assert m.collector.readings == 2
    assert third[("masqd_metrics_reading_timestamp_seconds", ())] >= first[("masqd_metrics_reading_timestamp_seconds", ())]
    assert first[("masqd_state_revision", ())] == 1 and third[("masqd_state_revision", ())] == 2
    assert reader.calls == 0  # no pool rule: the pool maps are not read


def test_mfw_autofw_pool_and_marks(svc):
    m, _reader = make(svc)
    ok(svc, op="set", table="mfw", entries=[{"mark": 1, "backends": [{"address": "10.16.0.3", "port": None}]}])
    ok(svc, op="set", table="marks", entries=[
        {"name": "friend", "mark": 1, "source": "203.0.113.0/24", "input_interface": "eth0"},
        {"name": "rest", "mark": 3, "source": "203.0.113.0/24", "source_invert": True, "input_interface": "eth0"}])
    ok(svc, op="set", table="autofw", entries=[
        {"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27"}])
    pool_rule = {"name": "inside", "source": "10.16.0.0/24", "pool": ["198.51.100.2", "198.51.100.3"]}
    ok(svc, op="set", table="masquerade", entries=[pool_rule])
    out_map = render.pool_map_names(ok(svc, op="get", table="masquerade")["result"]["entries"][0])[0]
    svc.nft.elements.setdefault(out_map, {}).update({"10.16.0.27": "198.51.100.2", "10.16.0.28": "198.51.100.3"})
    svc.nft.rule_counters = {render.mfw_chain_name(1): [4], "mark_classify": [7, 3]}
    got, _text = samples(m.registry)
    assert got[("masqd_backend_connections_total", (("backend", "10.16.0.3"), ("key", "1"), ("table", "mfw")))] == 4
    assert got[("masqd_autofw_associations", (("range", "udp 6970-7170"),))] == 1
    assert got[("masqd_pool_bindings", (("rule", "inside"),))] == 2
    assert got[("masqd_mark_classifier_hits_total", (("mark", "1"), ("rule", "friend")))] == 7
    assert got[("masqd_mark_classifier_hits_total", (("mark", "3"), ("rule", "rest")))] == 3


def test_mark_hits_absent_while_the_classifier_has_no_counters(svc):
    m, _reader = make(svc)
    friend = {"name": "friend", "mark": 1, "source": "203.0.113.0/24", "input_interface": "eth0"}
    ok(svc, op="set", table="marks", entries=[friend])
    got, _text = samples(m.registry)
    assert not any(name == "masqd_mark_classifier_hits_total" for name, _labels in got)
    assert got[("masqd_entries", (("table", "marks"),))] == 1


def test_health_state_and_full_syncs_consumed_when_present(svc):
    """The fields other work adds (backends[].health.state, status.full_syncs): used
    when there, and their absence tolerated (the other tests)."""
    m, _reader = make(svc)
    ok(svc, op="set", table="portfw", entries=[WEB])
    real = svc.handle

    def with_fields(request):
        resp = real(request)
        if request.get("op") == "list":
            backends = resp["result"]["tables"]["portfw"][0]["backends"]
            backends[0]["health"] = {"state": "down", "since": None, "last_error": "refused"}
            backends[1]["health"] = {"state": "up", "since": None, "last_error": None}
        if request.get("op") == "status":
            resp["result"]["full_syncs"] = 3
        return resp

    svc.handle = with_fields
    got, _text = samples(m.registry)
    up = {dict(labels)["backend"]: v for (name, labels), v in got.items() if name == "masqd_backend_up"}
    assert up == {"10.16.0.27:80": 0, "10.16.0.28:80": 1}
    assert got[("masqd_full_resyncs_total", ())] == 3


def test_a_failing_agent_reads_as_not_answering(svc):
    m, _reader = make(svc)
    svc.handle = lambda request: {"ok": False, "error": {"message": "the agent is not started"}}
    got, _text = samples(m.registry)
    assert got[("masqd_agent_answering", ())] == 0
    assert got[("masqd_metrics_reading_errors_total", ())] == 1


def test_parse_listen():
    assert metrics.parse_listen("127.0.0.1:9339") == ("127.0.0.1", 9339)
    assert metrics.parse_listen("[::1]:9339") == ("::1", 9339)
    for bad in ("9339", ":9339", "127.0.0.1:", "127.0.0.1:70000", "127.0.0.1:http", "h:٣"):
        with pytest.raises(metrics.MetricsError, match="--metrics-listen"):
            metrics.parse_listen(bad)


def test_http_endpoint_and_textfile(svc, tmp_path):
    path = str(tmp_path / "masqd.prom")
    m = metrics.Metrics(svc, "127.0.0.1:0", path, textfile_interval=0.05, cache_seconds=60,
                        kernel=lambda: FakeReader(svc.nft))
    ok(m.service, op="set", table="portfw", entries=[WEB])
    m.start()
    try:
        host, port = m.address
        with urllib.request.urlopen("http://%s:%d/metrics" % (host, port), timeout=5) as resp:
            body = resp.read().decode()
        assert 'masqd_backend_connections_total{backend="10.16.0.27:80",key="tcp 198.51.100.1:80",' \
               'table="portfw"} 0.0' in body
        assert "process_resident_memory_bytes" in body
        # Prometheus asks for gzip: the same text, compressed
        request = urllib.request.Request("http://%s:%d/metrics" % (host, port), headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(resp.read()).decode() == body  # within the cache time: the same bytes
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen("http://%s:%d/other" % (host, port), timeout=5)
        with open(path) as handle:
            assert "masqd_entries{table=\"portfw\"} 1.0" in handle.read()
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    finally:
        m.stop()


def test_the_exposition_is_generated_once_per_cache_time(svc):
    m = metrics.Metrics(svc, None, None, cache_seconds=60, kernel=lambda: FakeReader(svc.nft))
    first = m.exposition()
    ok(m.service, op="set", table="portfw", entries=[WEB])
    assert m.exposition() is first and m.collector.readings == 1
    m.cache_seconds = m.keep_seconds = m.collector.cache_seconds = 0
    assert b'masqd_entries{table="portfw"} 1.0' in m.exposition() and m.collector.readings == 2


def test_a_slow_reading_is_kept_duty_times_as_long(svc, monkeypatch):
    """However often it is scraped, the agent spends at most ~1/DUTY of its time reading."""
    m = metrics.Metrics(svc, None, None, cache_seconds=0, kernel=lambda: FakeReader(svc.nft))

    class SlowClient:
        calls = 0

        def generate_latest(self, _registry):
            SlowClient.calls += 1
            time.sleep(0.05)
            return b"text %d" % SlowClient.calls

    m.client = SlowClient()
    monkeypatch.setattr(metrics, "DUTY_AFTER", 0.01)
    first = m.exposition()
    assert m.keep_seconds >= metrics.DUTY * 0.05
    assert m.exposition() is first and SlowClient.calls == 1


def test_textfile_in_a_missing_directory_is_refused(svc, tmp_path):
    with pytest.raises(metrics.MetricsError, match="--metrics-textfile"):
        metrics.Metrics(svc, None, str(tmp_path / "nope" / "masqd.prom"))


def test_without_the_library_a_flag_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_client(name, *args, **kwargs):
        if name.startswith("prometheus_client"):
            raise ImportError("No module named 'prometheus_client'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_client)
    with pytest.raises(metrics.MetricsError, match="python3-prometheus-client"):
        metrics.require_client()


def test_daemon_refuses_a_bad_listen_address_before_touching_anything(tmp_path, caplog):
    from masqd import daemon
    state = tmp_path / "state"
    rc = daemon.main(["--state-dir", str(state), "--socket", str(tmp_path / "s.sock"),
                      "--metrics-listen", "localhost"])
    assert rc == 1
    assert "--metrics-listen 'localhost': must be HOST:PORT" in caplog.text
    assert not state.exists() and not (tmp_path / "s.sock").exists()


ALERTS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "alerts")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) not installed")
def test_alert_rules_pass_promtool_check_and_their_tests():
    for argv in (["promtool", "check", "rules", "masqd.rules.yml"],
                 ["promtool", "test", "rules", "masqd.rules.test.yml"]):
        result = subprocess.run(argv, cwd=ALERTS, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


def test_alert_rules_use_only_metrics_the_agent_exports(svc):
    """A rule on a misspelt metric never fires: every masqd_* name in the rules must be
    in the exposition (with the health fields present)."""
    import re
    m, _reader = make(svc)
    ok(svc, op="set", table="portfw", entries=[WEB])
    real = svc.handle

    def with_health(request):
        resp = real(request)
        if request.get("op") == "list":
            for b in resp["result"]["tables"]["portfw"][0]["backends"]:
                b["health"] = {"state": "down"}
        return resp

    svc.handle = with_health
    got, _text = samples(m.registry)
    exported = {name for name, _labels in got}
    with open(os.path.join(ALERTS, "masqd.rules.yml")) as handle:
        used = set(re.findall(r"\bmasqd_[a-z_]+", handle.read()))
    assert used and used <= exported, used - exported
