"""masqd's socket server and Python client, over real Unix sockets, with a stand-in Service."""

import json
import os
import socket
import stat
import threading
import time

import pytest

from masqd import server as server_mod
from masqd.client import AgentUnavailable, Client, MasqdError
from masqd.server import MAX_REQUEST, Server, ServerError, json_depth, parse_request
from masqd.service import STREAM_ENTRIES, EntryParts


class EchoService:
    """Answers like the real Service: an envelope per request, never raising (except 'boom')."""

    def __init__(self):
        self.seen = []

    def handle(self, request, owned=False):
        self.seen.append(request)
        if request.get("op") == "boom":
            raise RuntimeError("bug")
        if request.get("op") == "fail":
            return {"ok": False, "error": {"field": "entries[0].port", "value": 70000,
                                           "message": "port must be 1-65535"}}
        if request.get("op") == "status":
            return {"ok": True, "revision": 3, "changed": False,
                    "result": {"version": "0.1.0", "revision": 3, "tables": {}, "socket": None}}
        if request.get("op") == "list":  # as the Service: parts of STREAM_ENTRIES with stream
            entries = [{"n": n} for n in range(request.get("count", 0))]
            if request.get("stream"):
                entries = EntryParts(iter(entries))
            return {"ok": True, "revision": 3, "changed": False, "result": {"entries": entries}}
        return {"ok": True, "revision": 3, "changed": False, "result": {"echo": request}}


@pytest.fixture
def running(tmp_path):
    """A served EchoService; yields (server, service, socket path)."""
    path = str(tmp_path / "run" / "masqd.sock")
    service = EchoService()
    srv = Server(service, path)
    srv.listen()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, service, path
    srv.shutdown()
    thread.join(timeout=5)
    assert not thread.is_alive()


def raw_exchange(path, payload, read=True, parts=None):
    """The answer lines to `payload`: one per request line, or `parts` of them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(payload)
        if not read:
            return None
        reader = sock.makefile("rb")
        return [json.loads(reader.readline()) for _answer in range(parts or payload.count(b"\n") or 1)]


def test_requests_and_responses_share_one_connection(running):
    _srv, service, path = running
    with Client(path) as client:
        first = client.request("get", table="portfw")
        second = client.request("flush", table="mfw")
    assert first["result"]["echo"] == {"op": "get", "table": "portfw"}
    assert second["result"]["echo"] == {"op": "flush", "table": "mfw"}
    assert service.seen == [{"op": "get", "table": "portfw"}, {"op": "flush", "table": "mfw"}]


@pytest.mark.parametrize("count", [0, 1, STREAM_ENTRIES, 2 * STREAM_ENTRIES + 1])
def test_a_streamed_list_comes_in_parts_that_the_client_joins(running, count):
    _srv, _service, path = running
    with Client(path) as client:
        whole = client.request("list", count=count)
        streamed = client.request("list", count=count, stream=True)
        after = client.request("get", table="portfw")  # the connection is in step after a stream
    assert streamed == whole and whole["result"]["entries"] == [{"n": n} for n in range(count)]
    assert after["result"]["echo"] == {"op": "get", "table": "portfw"}
    parts = raw_exchange(path, json.dumps({"op": "list", "count": count, "stream": True}).encode() + b"\n",
                         parts=max(1, -(-count // STREAM_ENTRIES)))
    sizes = [min(STREAM_ENTRIES, count - start) for start in range(0, count, STREAM_ENTRIES)] or [0]
    assert [len(p["result"]["entries"]) for p in parts] == sizes
    assert [p.get("more") for p in parts] == [True] * (len(parts) - 1) + [None]
    assert all(p["ok"] and p["revision"] == 3 for p in parts)


def test_refusal_raises_masqd_error_with_field_and_value(running):
    _srv, _service, path = running
    with Client(path) as client, pytest.raises(MasqdError) as caught:
        client.request("fail")
    assert (caught.value.field, caught.value.value) == ("entries[0].port", 70000)
    assert "port must be 1-65535" in str(caught.value)


def test_malformed_json_gets_an_error_and_the_connection_lives_on(running):
    _srv, service, path = running
    answers = raw_exchange(path, b'{"op": "get",\n[1, 2]\n\xff\xfe\n{"op": "status"}\n')
    assert [a["ok"] for a in answers] == [False, False, False, True]
    assert "malformed JSON" in answers[0]["error"]["message"]
    assert "JSON object" in answers[1]["error"]["message"]
    assert "UTF-8" in answers[2]["error"]["message"]
    assert service.seen == [{"op": "status"}]


def test_status_reports_the_socket_it_was_asked_on(running):
    _srv, _service, path = running
    with Client(path) as client:
        assert client.request("status")["result"]["socket"] == path


def test_request_over_one_mebibyte_is_refused_and_the_next_one_served(running):
    _srv, service, path = running
    big = b'{"op": "add", "pad": "' + b"x" * MAX_REQUEST + b'"}\n'
    answers = raw_exchange(path, big + b'{"op": "status"}\n')
    assert answers[0]["ok"] is False and "larger than" in answers[0]["error"]["message"]
    assert answers[1]["ok"] is True
    assert service.seen == [{"op": "status"}]


def test_the_heap_is_trimmed_after_a_large_request_only(running, monkeypatch):
    """A large request's text and parsed objects are handed back to the system once
    answered (glibc would keep them in the agent's RSS); small ones cost no trim."""
    from masqd import server as server_module
    trims = []
    monkeypatch.setattr(server_module, "trim_heap", lambda: trims.append(1))
    _srv, service, path = running
    with Client(path) as client:
        client.request("get", table="portfw")
        assert trims == []
        client.request("set", table="portfw", entries=[{"pad": "x" * 1000}] * 1100)  # > 1 MiB
        client.request("status")
    assert trims == [1] and len(service.seen) == 3


def test_deep_nesting_is_refused_before_parsing(running):
    _srv, service, path = running
    deep = b'{"op": "set", "entries": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"
    answers = raw_exchange(path, deep)
    assert answers[0]["ok"] is False and "nested deeper" in answers[0]["error"]["message"]
    assert service.seen == []


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(json.loads('{"a": "' + "[" * 100 + '"}')) == 1
    assert json_depth(json.loads("[" * 40 + "]" * 40)) == 33  # counting stops past MAX_DEPTH
    assert json_depth(json.loads("[" * 40 + "]" * 40), limit=100) == 40
    assert json_depth(json.loads('[1, {"a": [[]], "b": {}}, "x"]')) == 4
    assert json_depth(7) == json_depth("[[[") == 0
    assert parse_request(b'{"op": "get"}') == ({"op": "get"}, None)
    deep = b'{"op": "status", "x": ' + b"[" * 33 + b"]" * 33 + b"}"
    assert "nested deeper than 32" in parse_request(deep)[1]["error"]["message"]
    ok = b'{"op": "status", "x": ' + b"[" * 31 + b"]" * 31 + b"}"
    assert parse_request(ok)[1] is None


STALL = b'{"op":"status","x":' + b"[" * 40 + b'"' + b'\\"' * 64000  # 128 KiB: 34 s of regex backtracking before


def _timed(function, *args, bound=1.0):
    """Run function(*args) in a thread; its result, or an AssertionError after `bound` s."""
    out = []
    thread = threading.Thread(target=lambda: out.append(function(*args)), daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(bound)
    assert out, "still running after %.1fs" % bound
    return out[0], time.monotonic() - started


def test_the_stall_request_is_refused_in_linear_time():
    (_request, envelope), took = _timed(parse_request, STALL)
    error = envelope["error"]
    assert error["field"] == "request" and "malformed JSON" in error["message"]
    assert took < 0.1, took
    # the same shape, closed: a real nesting error, found as fast
    (_request, envelope), took = _timed(parse_request, STALL + b'"' + b"]" * 40 + b"}")
    assert "nested deeper than 32" in envelope["error"]["message"] and took < 0.1
    # 200,000 open brackets: the parser's own recursion limit, not a crash
    (_request, envelope), took = _timed(parse_request, b"[" * 200000)
    assert "nested deeper" in envelope["error"]["message"] and took < 0.5


def test_another_client_is_served_while_the_stall_request_is_parsed(running):
    _srv, _service, path = running
    stall = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stall.settimeout(10)
    stall.connect(path)
    stall.sendall(STALL + b"\n")
    worst = 0.0
    with Client(path, timeout=5) as other:
        for _probe in range(20):
            started = time.monotonic()
            assert other.request("status")["ok"]
            worst = max(worst, time.monotonic() - started)
    answer = json.loads(stall.makefile("rb").readline())
    stall.close()
    assert answer["ok"] is False and answer["error"]["field"] == "request"
    assert worst < 0.1, worst


@pytest.fixture
def quick(tmp_path):
    """A served EchoService with short timeouts: idle 0.5 s, request 0.5 s."""
    path = str(tmp_path / "run" / "masqd.sock")
    srv = Server(EchoService(), path, idle_timeout=0.5, request_timeout=0.5)
    srv.listen()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, path
    srv.shutdown()
    thread.join(timeout=5)


def _connect(path, timeout=5):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)  # blocking: a full backlog waits instead of EAGAIN
    sock.settimeout(timeout)
    return sock


def test_an_idle_connection_is_closed_after_the_idle_timeout(quick):
    _srv, path = quick
    sock = _connect(path)
    sock.sendall(b'{"op": "status"}\n')
    reader = sock.makefile("rb")
    assert json.loads(reader.readline())["ok"]
    started = time.monotonic()
    assert reader.readline() == b""  # EOF: the agent hung up
    assert 0.4 < time.monotonic() - started < 2
    sock.close()


def test_a_request_must_arrive_whole_within_the_request_timeout(quick):
    _srv, path = quick
    sock = _connect(path)
    reader = sock.makefile("rb")
    started = time.monotonic()
    for byte in b'{"op": "sta':  # a slow drip for 0.4 s: each byte well within the idle timeout
        sock.sendall(bytes([byte]))
        time.sleep(0.035)
    answer = json.loads(reader.readline())
    assert answer["ok"] is False and answer["error"]["field"] == "request"
    assert "not complete within 0.5 seconds" in answer["error"]["message"]
    assert reader.readline() == b""
    assert time.monotonic() - started < 2
    sock.close()


def test_a_client_reconnects_by_itself_after_the_idle_timeout(quick):
    _srv, path = quick
    with Client(path) as client:
        assert client.request("status")["ok"]
        time.sleep(0.8)
        assert client.request("status")["ok"]


def test_idle_connections_never_lock_out_a_new_one(running):
    _srv, _service, path = running
    held = [_connect(path) for _slot in range(server_mod.MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)
        with Client(path, timeout=5) as client:  # the longest-idle connection made room
            assert client.request("status")["ok"]
        assert held[0].recv(1) == b""
        for sock in held[1:]:  # the others are still served
            sock.sendall(b'{"op": "status"}\n')
            assert json.loads(sock.makefile("rb").readline())["ok"]
    finally:
        for sock in held:
            sock.close()


def test_root_has_reserved_slots_when_every_connection_is_busy(running, monkeypatch):
    srv, _service, path = running
    busy = []
    try:
        for _slot in range(server_mod.MAX_CONNECTIONS):
            sock = _connect(path)
            sock.sendall(b'{"op": ')  # mid-request: not idle, not evictable
            busy.append(sock)
        # Every busy connection accepted and mid-request (a fixed sleep was too short on a loaded machine).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(
                1 for slot in list(srv._conns.values()) if slot.idle_since is None) < server_mod.MAX_CONNECTIONS:
            time.sleep(0.02)
        with Client(path, timeout=5) as client:  # the test runs as root
            assert client.request("status")["ok"]
        # Root's connection, idle once answered, would be evicted to make room for the
        # next one: wait until its thread has seen the close and left.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(srv._conns) > server_mod.MAX_CONNECTIONS:
            time.sleep(0.02)
        monkeypatch.setattr(server_mod, "peer_credentials", lambda sock: (1, 1000, 1000))
        refused = _connect(path)
        assert b"too many connections" in refused.makefile("rb").readline()
        refused.close()
    finally:
        for sock in busy:
            sock.close()
    assert len(srv._conns) <= server_mod.MAX_CONNECTIONS + server_mod.ROOT_RESERVE


def test_a_service_bug_is_an_error_envelope_not_a_dead_agent(running):
    _srv, _service, path = running
    answers = raw_exchange(path, b'{"op": "boom"}\n{"op": "status"}\n')
    assert answers[0]["ok"] is False and "internal error" in answers[0]["error"]["message"]
    assert answers[1]["ok"] is True


def test_socket_and_directory_modes(running):
    _srv, _service, path = running
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_group_socket_is_0660_in_a_0750_directory(tmp_path):
    path = str(tmp_path / "grp" / "masqd.sock")
    srv = Server(EchoService(), path, group="0")
    srv.listen()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o750
        assert os.stat(path).st_gid == 0
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_unknown_group_is_refused():
    with pytest.raises(ServerError, match="no such group"):
        Server(EchoService(), "/nonexistent/masqd.sock", group="no-such-group-masqd")


def test_shared_directory_mode_is_left_alone(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "other-file").write_text("not ours")
    srv = Server(EchoService(), str(shared / "masqd.sock"))
    srv.listen()
    srv.close()
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755


def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "masqd.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a killed agent leaves
    srv = Server(EchoService(), path)
    srv.listen()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with Client(path, timeout=10) as client:
            assert client.request("get")["ok"] is True
    finally:
        srv.shutdown()
        thread.join(timeout=5)


def test_live_agent_on_the_socket_is_not_replaced(running, tmp_path):
    _srv, _service, path = running
    with pytest.raises(ServerError, match="already running"):
        Server(EchoService(), path).prepare()
    # and a foreign program listening there (no lock held) is not replaced either
    other = str(tmp_path / "other.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(other)
    listener.listen(1)
    try:
        with pytest.raises(ServerError, match="answers on"):
            Server(EchoService(), other).prepare()
        assert os.path.exists(other)
    finally:
        listener.close()
    with Client(path) as client:  # the first agent still serves
        assert client.request("status")["ok"]


def test_path_that_is_not_a_socket_is_never_removed(tmp_path):
    path = tmp_path / "masqd.sock"
    path.write_text("precious")
    with pytest.raises(ServerError, match="not a socket"):
        Server(EchoService(), str(path)).prepare()
    assert path.read_text() == "precious"


def test_shutdown_removes_the_socket(tmp_path):
    path = str(tmp_path / "masqd.sock")
    srv = Server(EchoService(), path)
    srv.listen()
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    client = Client(path)
    client.request("status")  # an open connection must not hold up shutdown
    srv.shutdown()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert not os.path.exists(path)
    client.close()


def test_missing_agent_is_a_clear_agent_unavailable(tmp_path):
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(AgentUnavailable, match="masqd is not running at %s: start it" % path):
        Client(path).request("status")


def test_client_socket_defaults_to_env(monkeypatch):
    monkeypatch.setenv("MASQD_SOCKET", "/tmp/elsewhere.sock")
    assert Client().socket_path == "/tmp/elsewhere.sock"
    monkeypatch.delenv("MASQD_SOCKET")
    assert Client().socket_path == "/run/masqd/masqd.sock"


def test_authorise_root_self_and_group_members(monkeypatch):
    srv = Server(EchoService(), "/nonexistent/masqd.sock", group="100")
    monkeypatch.setattr(server_mod, "process_groups", lambda pid: {100} if pid == 42 else {5})
    assert srv.authorise(1, 0, 0) is None
    assert srv.authorise(42, 1234, 1234) is None          # supplementary member
    assert srv.authorise(43, 1234, 100) is None           # primary group
    refusal = srv.authorise(44, 1234, 1234)
    assert "uid 1234 may not use masqd" in refusal and "group 100" in refusal
    lonely = Server(EchoService(), "/nonexistent/masqd.sock")
    assert "uid 1234" in lonely.authorise(42, 1234, 100)


def test_refused_peer_reads_the_refusal_not_a_broken_pipe(running, monkeypatch):
    srv, service, path = running
    monkeypatch.setattr(srv, "authorise", lambda pid, uid, gid: "uid %d may not use masqd" % uid)
    for _attempt in range(5):  # the hang-up races the client's write: never a broken pipe
        with Client(path) as client, pytest.raises(MasqdError) as caught:
            client.request("status")
        assert caught.value.field == "peer" and "may not use masqd" in caught.value.message
    assert service.seen == []
