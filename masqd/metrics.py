"""Prometheus metrics of the agent (docs/metrics.md): `masqd --metrics-listen HOST:PORT`
serves /metrics, `--metrics-textfile PATH` writes the same text for node_exporter's
textfile collector.

Everything is read from the Service at scrape time, through its own read ops (`status`
and `list`: snapshots off the service lock, so a scrape never blocks a writer), plus
the pool maps through a kernel handle of this module's own. The `list` reading (all
kernel counters: the expensive part, seconds at 100,000 PORTFW keys) and the text
generated from it are made at most once per `cache_seconds`; concurrent scrapes and
the textfile writer share that text. Agent changes are counted by
InstrumentedService, a wrapper around `Service.handle` that the daemon gives the socket
Server instead of the Service.

prometheus_client is optional: this module imports it only in `require_client`, so the
agent runs without it when no metrics flag is given.
"""

import gzip
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from masqd import render
from masqd.nft import trim_heap
from masqd.service import gc_paused

log = logging.getLogger("masqd.metrics")

DEFAULT_CACHE_SECONDS = 5.0
DEFAULT_TEXTFILE_INTERVAL = 15.0
# A reading may take seconds (100,000 keys); the text is then kept for at least this
# many times what the reading took, so readings use at most ~1/DUTY of the agent's time
# however often it is scraped, but never longer than MAX_KEEP seconds (staleness bound).
DUTY = 10
MAX_KEEP = 60.0
DUTY_AFTER = 1.0  # seconds: quicker readings keep exactly the cache time
WRITE_OPS = ("add", "insert", "edit", "delete", "flush", "set", "schedule")
# Change latency: from a no-op edit (~1 ms) to a whole 100,000-key `set` (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsError(Exception):
    """A metrics flag cannot be honoured (no prometheus_client, a bad address)."""


def require_client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # noqa: F401 (the metric families)
        import prometheus_client.exposition  # noqa: F401
    except ImportError as exc:
        raise MetricsError("--metrics-listen/--metrics-textfile need the Python package prometheus_client "
                           "(Debian: python3-prometheus-client): %s" % exc) from None
    return prometheus_client


def parse_listen(value: str) -> Tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host, port); a clear error naming the value."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise MetricsError("--metrics-listen %r: must be HOST:PORT (e.g. 127.0.0.1:9339 or [::1]:9339)" % value)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) < 65536:
        raise MetricsError("--metrics-listen %r: port must be 0-65535 (0: any free port)" % value)
    return host, int(port)


# --- labels ---------------------------------------------------------------------------

def endpoint(address: str, port: Optional[int]) -> str:
    if port is None:
        return address
    return "[%s]:%d" % (address, port) if ":" in address else "%s:%d" % (address, port)


def portfw_key(entry: Dict[str, Any]) -> str:
    return "%s %s" % (entry["protocol"], endpoint(entry["local_address"], entry["local_port"]))


def autofw_range(entry: Dict[str, Any]) -> str:
    return "%s %d-%d" % (entry["protocol"], entry["low_port"], entry["high_port"])


# --- the change counters ---------------------------------------------------------------

class ChangeMetrics:
    """Counters of the agent's changes, fed by InstrumentedService."""

    def __init__(self, client: Any, registry: Any) -> None:
        self.changes = client.Counter(
            "masqd_changes", "Write requests to the agent, by op and result "
            "(changed, unchanged, refused: bad input or the kernel said no, error: internal).",
            ["op", "result"], registry=registry)
        self.latency = client.Histogram(
            "masqd_change_duration_seconds", "Time the agent took to answer a write request, by op.",
            ["op"], buckets=LATENCY_BUCKETS, registry=registry)

    def record(self, op: str, response: Any, seconds: float) -> None:
        self.changes.labels(op, result_of(response)).inc()
        self.latency.labels(op).observe(seconds)


def result_of(response: Any) -> str:
    if not isinstance(response, dict):
        return "error"
    if response.get("ok"):
        return "changed" if response.get("changed") else "unchanged"
    message = str((response.get("error") or {}).get("message", ""))
    return "error" if message.startswith("internal error") else "refused"


class InstrumentedService:
    """The Service as the socket Server sees it, with its writes counted and timed.
    Everything but `handle` is the Service's own."""

    def __init__(self, service: Any, changes: ChangeMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._service = service
        self._changes = changes
        self._clock = clock

    def handle(self, request: Any, owned: bool = False) -> Any:
        op = request.get("op") if isinstance(request, dict) else None
        if op not in WRITE_OPS:
            return self._service.handle(request, owned)
        started = self._clock()
        response = self._service.handle(request, owned)
        self._changes.record(op, response, self._clock() - started)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)


def release_slowly(items: List[Any]) -> None:
    """Empty a list an element at a time (a thread switch can come between any two)."""
    while items:
        items.pop()


# --- the kernel, read directly ----------------------------------------------------------

class KernelReader:
    """This module's own libnftables handle (libnftables contexts are not thread-safe,
    and the Service's are its own): the pool maps, each listed alone so a scrape never
    lists the whole table a second time."""

    def __init__(self) -> None:
        from masqd.nft import LibNftables
        self._nft = LibNftables()

    def map_elements(self, names: List[str]) -> Dict[str, Dict[str, Dict[str, Any]]]:
        return self._nft.read_elements(names)


# --- the collector ----------------------------------------------------------------------

class Reading:
    """One cached reading of the agent: `status`, `list` and the pool maps."""

    def __init__(self, status: Dict[str, Any], tables: Dict[str, List[Dict[str, Any]]],
                 pools: Dict[str, int], hits: Dict[str, int], took: float, at: float) -> None:
        self.status, self.tables, self.pools, self.hits = status, tables, pools, hits
        self.took, self.at = took, at
        self.wall = time.time()


class ServiceCollector:
    """A prometheus_client custom collector over the Service's read ops.

    `kernel`: a factory of the handle that reads the pool maps
    (default: a KernelReader, a libnftables handle of this collector's own)."""

    def __init__(self, service: Any, cache_seconds: float = DEFAULT_CACHE_SECONDS,
                 kernel: Optional[Callable[[], Any]] = None, clock: Callable[[], float] = time.monotonic) -> None:
        import prometheus_client.core
        self.service = service
        self.core = prometheus_client.core  # the metric families
        self.cache_seconds = cache_seconds
        self._kernel_factory = kernel
        self._kernel: Any = None
        self._clock = clock
        self._lock = threading.Lock()  # one reading at a time; concurrent scrapes share it
        self._reading: Optional[Reading] = None
        self.readings = 0
        self.errors = 0
        self._spent: List[Any] = []          # families of the last collect(), for release()
        self._spent_reading: Optional[Reading] = None

    def describe(self) -> List[Any]:
        return []  # names are dynamic: no collection at registration

    # --- reading ----------------------------------------------------------------------

    def reading(self) -> Reading:
        with self._lock:
            now = self._clock()
            if self._reading is not None and now - self._reading.at < self.cache_seconds:
                return self._reading
            started = time.monotonic()
            status = self._ok(self.service.handle({"op": "status"}), "status")
            listed = self._ok(self.service.handle({"op": "list"}), "list")["tables"]
            pools = self._pool_bindings(listed.get("masquerade", []))
            hits = self._mark_hits(listed.get("marks", []))
            reading = Reading(status, listed, pools, hits, time.monotonic() - started, now)
            self._reading = reading if self.cache_seconds > 0 else None  # no reason to hold 100,000 entries
            self.readings += 1
            return reading

    @staticmethod
    def _ok(response: Dict[str, Any], op: str) -> Dict[str, Any]:
        if not response.get("ok"):
            raise MetricsError("%s: %s" % (op, (response.get("error") or {}).get("message")))
        return response["result"]

    def _kernel_reader(self) -> Any:
        if self._kernel is None:
            self._kernel = (self._kernel_factory or KernelReader)()
        return self._kernel

    def _pool_bindings(self, rules: List[Dict[str, Any]]) -> Dict[str, int]:
        """{rule name: hosts holding a pool address} from the rule's host -> address map."""
        names = {render.pool_map_names(r)[0]: r["name"] for r in rules if r.get("pool")}
        if not names:
            return {}
        elements = self._kernel_reader().map_elements(sorted(names))
        return {rule: len(elements.get(name, {})) for name, rule in names.items()}

    @staticmethod
    def _mark_hits(rules: List[Dict[str, Any]]) -> Dict[str, int]:
        """{marks rule name: connections its classifier rule counted}: the `hits` of the
        Service's list (absent while the chain is being repaired)."""
        return {r["name"]: r["hits"] for r in rules if "hits" in r}

    # --- families ---------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        """The families, each kept (with the reading) until release(): dropped at once,
        100,000 keys' worth of them is one long free in which no other thread runs."""
        for family in self._families():
            self._spent.append(family)
            yield family

    def release(self) -> None:
        """Free what the last collect() built, an element at a time: the interpreter
        switches threads between elements, so the API's threads are not held up."""
        spent, self._spent = self._spent, []
        for family in spent:
            release_slowly(family.samples)
        spent.clear()
        reading, self._spent_reading = self._spent_reading, None
        if reading is not None and reading is not self._reading:
            for entries in reading.tables.values():
                release_slowly(entries)

    def _families(self) -> Iterator[Any]:
        gauge, counter = self.core.GaugeMetricFamily, self.core.CounterMetricFamily
        answering = gauge("masqd_agent_answering", "1 when the agent answered this scrape's status and list.")
        try:
            r = self.reading()
        except Exception as exc:  # the scrape still answers: the alert reads this gauge
            self.errors += 1
            log.warning("metrics: reading the agent failed: %s", exc)
            answering.add_metric([], 0)
            yield answering
            yield from self._self_metrics(None)
            return
        answering.add_metric([], 1)
        self._spent_reading = r
        yield answering
        yield from self._status_families(r.status, gauge, counter)
        yield from self._backend_families(r.tables, gauge, counter)
        yield from self._autofw_families(r.tables.get("autofw", []), gauge)
        yield from self._mark_families(r.tables.get("marks", []), r.hits, counter)
        pools = gauge("masqd_pool_bindings", "Inside hosts holding an address of a masquerade rule's pool "
                      "(elements of the rule's kernel map).", labels=["rule"])
        for rule, count in sorted(r.pools.items()):
            pools.add_metric([rule], count)
        yield pools
        yield from self._self_metrics(r)

    def _status_families(self, status: Dict[str, Any], gauge: Any, counter: Any) -> Iterator[Any]:
        info = gauge("masqd_info", "The agent's version.", labels=["version"])
        info.add_metric([str(status.get("version"))], 1)
        yield info
        revision = gauge("masqd_state_revision", "The agent's state revision (bumped by every committed change).")
        revision.add_metric([], status["revision"])
        yield revision
        entries = gauge("masqd_entries", "Entries (keys, marks, rules) per table.", labels=["table"])
        for table, count in sorted(status["tables"].items()):
            entries.add_metric([table], count)
        yield entries
        drift = status.get("drift") or {}
        repairs = counter("masqd_drift_repairs", "Foreign changes to the agent's table that it repaired "
                          "(full re-sync), since the agent started.")
        repairs.add_metric([], drift.get("count", 0) - drift.get("failures", 0))
        yield repairs
        failures = counter("masqd_drift_repair_failures", "Repairs of foreign changes that failed.")
        failures.add_metric([], drift.get("failures", 0))
        yield failures
        if "full_syncs" in status:  # when the Service counts them (docs/metrics.md)
            syncs = counter("masqd_full_resyncs", "Full re-syncs of the table (start, repairs, rollbacks).")
            syncs.add_metric([], status["full_syncs"])
            yield syncs
        running = gauge("masqd_watcher_running", "1 when the watcher runs.", labels=["watcher"])
        for name, stats in sorted((status.get("watchers") or {}).items()):
            running.add_metric([name], 1 if stats.get("running") else 0)
        yield running
        autofw = status.get("autofw_watcher") or {}
        if "detections" in autofw:
            detections = counter("masqd_autofw_detections", "AUTOFW recipients detected from control connections.")
            detections.add_metric([], autofw["detections"])
            yield detections

    def _backend_families(self, tables: Dict[str, List[Dict[str, Any]]], gauge: Any, counter: Any) -> Iterator[Any]:
        labels = ["table", "key", "backend"]
        conns = counter("masqd_backend_connections", "Connections the kernel sent to the backend (its rule or "
                        "element counter; restarts at 0 when the key's schedule is rebuilt).", labels=labels)
        up = gauge("masqd_backend_up", "Health of a checked backend: 1 up, 0 down (absent: unchecked or "
                   "not yet known).", labels=labels)
        for table in ("portfw", "mfw"):
            for entry in tables.get(table, []):
                key = portfw_key(entry) if table == "portfw" else str(entry["mark"])
                for b in entry["backends"]:
                    values = [table, key, endpoint(b["address"], b["port"])]
                    conns.add_metric(values, b["connections"])
                    state = (b.get("health") or {}).get("state")
                    if state in ("up", "down"):
                        up.add_metric(values, 1 if state == "up" else 0)
        yield from (conns, up)

    def _autofw_families(self, entries: List[Dict[str, Any]], gauge: Any) -> Iterator[Any]:
        assoc = gauge("masqd_autofw_associations", "Hosts receiving the AUTOFW range (a fixed hidden host "
                      "counts 1).", labels=["range"])
        expires = gauge("masqd_autofw_recipient_expires_seconds", "Seconds left before a detected AUTOFW "
                        "recipient expires (refreshed by control traffic).", labels=["range", "peer", "address"])
        for e in entries:
            name = autofw_range(e)
            recipients = e.get("recipients") or []
            assoc.add_metric([name], len(recipients) if e.get("hidden_host") is None else 1)
            for rec in recipients:
                if rec.get("expires") is not None:
                    expires.add_metric([name, rec.get("peer") or "", rec["address"]], rec["expires"])
        yield from (assoc, expires)

    @staticmethod
    def _mark_families(rules: List[Dict[str, Any]], counts: Dict[str, int], counter: Any) -> Iterator[Any]:
        hits = counter("masqd_mark_classifier_hits", "Packets the marks rule classified (its kernel rule "
                       "counter).", labels=["rule", "mark"])
        for rule in rules:
            if rule["name"] in counts:
                hits.add_metric([rule["name"], str(rule["mark"])], counts[rule["name"]])
        yield hits

    def _self_metrics(self, r: Optional[Reading]) -> Iterator[Any]:
        c = self.core
        took = c.GaugeMetricFamily("masqd_metrics_reading_seconds", "Time the last reading of the agent took "
                                   "(status, list, pool maps).")
        stamp = c.GaugeMetricFamily("masqd_metrics_reading_timestamp_seconds", "Unix time of this scrape's "
                                    "reading (textfile: stale when the agent stopped writing).")
        errors = c.CounterMetricFamily("masqd_metrics_reading_errors", "Readings of the agent that failed.")
        if r is not None:
            took.add_metric([], r.took)
            stamp.add_metric([], r.wall)
        errors.add_metric([], self.errors)
        yield from (took, stamp, errors)


# --- serving ----------------------------------------------------------------------------

class Metrics:
    """What the daemon starts: the registry, the HTTP endpoint and/or the textfile writer."""

    def __init__(self, service: Any, listen: Optional[str] = None, textfile: Optional[str] = None,
                 textfile_interval: float = DEFAULT_TEXTFILE_INTERVAL,
                 cache_seconds: float = DEFAULT_CACHE_SECONDS, kernel: Optional[Callable[[], Any]] = None) -> None:
        self.client = require_client()
        self.listen = parse_listen(listen) if listen else None
        if textfile is not None and not os.path.isdir(os.path.dirname(os.path.abspath(textfile))):
            raise MetricsError("--metrics-textfile %r: directory %s does not exist"
                               % (textfile, os.path.dirname(os.path.abspath(textfile))))
        self.textfile, self.textfile_interval = textfile, textfile_interval
        self.registry = self.client.CollectorRegistry()
        self.changes = ChangeMetrics(self.client, self.registry)
        # The text is cached here; the collector reads afresh for each generation and
        # keeps nothing (a reading of 100,000 keys is ~10^5 Python dicts).
        self.collector = ServiceCollector(service, 0, kernel)
        self.registry.register(self.collector)
        self.client.ProcessCollector(registry=self.registry)
        self.service = InstrumentedService(service, self.changes)
        self.cache_seconds = cache_seconds
        self.keep_seconds = cache_seconds  # max(cache_seconds, DUTY x the last generation's time)
        self._exposition: Optional[Tuple[float, bytes]] = None  # (clock, text) of the last generation
        self._exposition_lock = threading.Lock()
        self._httpd: Any = None
        self._threads: List[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """(host, port) actually bound (port 0 picks one)."""
        return None if self._httpd is None else self._httpd.server_address[:2]

    def exposition(self) -> bytes:
        """The text of every metric; generated at most once per cache time (at 100,000
        keys generating it costs seconds of CPU: docs/metrics.md), scrapes and the
        textfile writer in between get the same bytes."""
        with self._exposition_lock:
            now = time.monotonic()
            if self._exposition is None or now - self._exposition[0] >= self.keep_seconds:
                self._exposition = None
                with gc_paused():  # no full collection over ~10^6 new objects meanwhile
                    text = self.client.generate_latest(self.registry)
                    self.collector.release()
                took = time.monotonic() - now
                slow = took >= DUTY_AFTER
                self.keep_seconds = max(self.cache_seconds, min(DUTY * took, MAX_KEEP)) if slow else self.cache_seconds
                self._exposition = (time.monotonic(), text)
                trim_heap()  # a list of 100,000 keys leaves many small objects freed
            return self._exposition[1]

    def start(self) -> None:
        if self.listen is not None:
            self._serve(*self.listen)
        if self.textfile is not None:
            self.write_textfile()  # at once, so a failure shows at start-up
            self._spawn(self._textfile_loop, "masqd-metrics-textfile")

    def _serve(self, host: str, port: int) -> None:
        import socket
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer

        class Quiet(WSGIRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        content_type = self.client.CONTENT_TYPE_LATEST

        def only_metrics(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"only /metrics here\n"]
            body, headers = self.exposition(), [("Content-Type", content_type)]
            if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):  # Prometheus asks for it
                body = gzip.compress(body, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
            start_response("200 OK", headers + [("Content-Length", str(len(body)))])
            return [body]

        try:
            self._httpd = make_server(host, port, only_metrics, Server, handler_class=Quiet)
        except OSError as exc:
            raise MetricsError("--metrics-listen %s: %s" % (endpoint(host, port), exc)) from None
        self._spawn(self._httpd.serve_forever, "masqd-metrics-http")
        host_port = self.address
        if host_port is not None:
            log.info("metrics on http://%s/metrics", endpoint(*host_port))

    def write_textfile(self) -> None:
        """PATH.<pid>.tmp, then renamed over PATH: node_exporter never reads half a file."""
        assert self.textfile is not None
        tmp = "%s.%d.tmp" % (self.textfile, os.getpid())
        try:
            with open(tmp, "wb") as handle:
                handle.write(self.exposition())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.textfile)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _textfile_loop(self) -> None:
        while not self._stop.wait(self.textfile_interval):
            try:
                self.write_textfile()
            except Exception as exc:  # keep trying: the directory may come back
                log.warning("metrics: writing %s failed: %s", self.textfile, exc)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
