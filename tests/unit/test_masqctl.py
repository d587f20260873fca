"""masqctl's flow: usage errors exit 2 with the usage text, refusals exit 1, listings print."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from masqd import masqctl
from masqd.client import AgentUnavailable, MasqdError
from masqd.listing import Names


class FakeClient:
    """Stands in for masqd.client.Client: records requests, answers from a script."""

    def __init__(self, answers):
        self.answers = answers
        self.sent = []
        self.socket_path = None

    def __call__(self, socket_path):
        self.socket_path = socket_path
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def request(self, op, **args):
        self.sent.append(dict(op=op, **args))
        answer = self.answers.get(op, {"ok": True, "revision": 2, "changed": True, "result": {}})
        if isinstance(answer, Exception):
            raise answer
        return answer


def run(argv, answers=None):
    client = FakeClient(answers or {})
    out, err = io.StringIO(), io.StringIO()
    code = masqctl.run(argv, client_factory=client, out=out, err=err, names=Names(numeric=True))
    return code, out.getvalue(), err.getvalue(), client


def test_write_sends_the_parsed_request_and_is_silent():
    code, out, err, client = run(["--socket", "/tmp/a.sock", "mfw", "-S", "-m", "1"])
    assert (code, out, err) == (0, "", "")
    assert client.sent == [{"op": "schedule", "mark": 1}]
    assert client.socket_path == "/tmp/a.sock"


def test_json_prints_the_envelope():
    code, out, _err, _client = run(["mfw", "-F", "--json"])
    assert code == 0 and json.loads(out) == {"ok": True, "revision": 2, "changed": True, "result": {}}


def test_usage_error_prints_module_usage_and_exits_2():
    code, out, err, client = run(["portfw", "-a", "-P", "tcp"])
    assert code == 2 and out == "" and client.sent == []
    assert err.startswith("masqctl portfw: insufficient options specified\nUsage: portfw -a -P PROTO")


def test_help_is_printed_on_stdout_with_exit_0():
    code, out, err, client = run(["portfw", "-h"])
    assert code == 0 and out.startswith("Usage: portfw -a") and err == "" and client.sent == []
    assert run(["--help"])[0] == 0
    assert run([])[0] == 2


def test_unknown_module_prints_masqctl_usage():
    code, _out, err, _client = run(["ipfwadm", "-A"])
    assert code == 2 and "unknown module 'ipfwadm'" in err and "Usage: masqctl" in err


def test_refusal_names_field_and_value_and_exits_1():
    refusal = MasqdError("entry.backends[0].port", 70000, "port must be 1-65535")
    code, _out, err, _client = run(["portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", "10.16.0.27",
                                   "70000"], {"add": refusal})
    assert code == 1
    assert err == "masqctl portfw: entry.backends[0].port=70000: port must be 1-65535\n"


def test_agent_unavailable_exits_1_with_its_message():
    code, _out, err, _client = run(["status"], {"status": AgentUnavailable("masqd is not running at /x: start it")})
    assert code == 1 and err == "masqctl: masqd is not running at /x: start it\n"


def test_listing_uses_the_list_op():
    entries = [{"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 0, "pcnt": 0}]}]
    code, out, _err, client = run(["mfw", "-L", "-n"], {"list": {"ok": True, "result": {"entries": entries}}})
    assert code == 0 and client.sent == [{"op": "list", "table": "mfw", "stream": True}]
    assert out.splitlines()[1].split() == ["1", "10.16.0.3", "any", "0", "0"]
    code, out, _err, _client = run(["mfw", "-L", "--json"], {"list": {"ok": True, "result": {"entries": entries}}})
    assert json.loads(out) == {"entries": entries}


def test_insert_of_a_mark_rule_reads_the_table_then_sets_it_with_the_revision():
    current = [{"name": "friend", "mark": 1, "source": "203.0.113.0/24"}]
    code, _out, _err, client = run(["mark", "-I", "input", "-s", "!", "203.0.113.0/24", "-m", "3"],
                                   {"get": {"ok": True, "revision": 7, "result": {"entries": current}}})
    assert code == 0
    assert client.sent[0] == {"op": "get", "table": "marks"}
    final = client.sent[1]
    assert final["op"] == "set" and final["revision"] == 7 and final["entries"][1:] == current
    assert final["entries"][0]["source_invert"] is True


def test_state_error_exits_1():
    code, _out, err, _client = run(["mfw", "-E", "-m", "9", "-p", "0"],
                                   {"get": {"ok": True, "revision": 1, "result": {"entries": []}}})
    assert code == 1 and "fwmark 9 has no entries" in err


def test_status_text():
    status = {"ok": True, "result": {"version": "0.1.0", "revision": 1, "tables": {"portfw": 0}}}
    code, out, _err, _client = run(["status"], {"status": status})
    assert code == 0 and out.startswith("masqd 0.1.0, revision 1\n")
    assert run(["status", "extra"])[0] == 2


@pytest.mark.parametrize("argv", [["--socket"], ["portfw", "--socket"]])
def test_socket_option_needs_a_path(argv):
    assert run(argv)[0] == 2


# -- every error path of the real program: one clear line, exit non-zero, no traceback ------

MASQCTL = [sys.executable, "-m", "masqd.masqctl"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def masqctl_process(args, prefix=()):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("MASQD_SOCKET", None)
    return subprocess.run(list(prefix) + MASQCTL + list(args), capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO, check=False)


def assert_one_clear_line(result, code=1, expect=""):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("masqctl"), result.stderr
    assert expect in lines[0], lines[0]


class FakeAgent:
    """A socket that answers every request line with `reply` (bytes) then hangs up."""

    def __init__(self, path, reply):
        self.path, self.reply = path, reply
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        with contextlib.suppress(OSError):
            conn, _peer = self.listener.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(1 << 16)
                conn.sendall(self.reply)

    def close(self):
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.mark.parametrize("socket_path,expect", [
    ("/nonexistent-dir/masqd.sock", "masqd is not running at /nonexistent-dir/masqd.sock"),
    ("/", "masqd is not running at /"),                          # a directory
    ("/etc/hostname", "masqd is not running at /etc/hostname"),  # a file, not a socket
    ("/tmp/" + "x" * 200, "cannot connect to masqd"),           # longer than sun_path
    ("/tmp/a\x01b", "masqd is not running"),
])
def test_broken_socket_paths(socket_path, expect):
    assert_one_clear_line(masqctl_process(["--socket", socket_path, "status"]), expect=expect)


def test_nul_in_the_socket_path_is_one_line():
    # argv cannot carry a NUL; the Python API can
    out, err = io.StringIO(), io.StringIO()
    code = masqctl.run(["--socket", "/tmp/a\0b", "status"], out=out, err=err)
    assert code == 1 and err.getvalue().count("\n") == 1 and "masqd is not running" in err.getvalue()


def test_permission_denied_is_one_line(tmp_path):
    path = str(tmp_path / "masqd.sock")
    agent = FakeAgent(path, b"")
    os.chmod(path, 0)
    try:  # root without CAP_DAC_OVERRIDE: the file mode applies
        result = masqctl_process(["--socket", path, "status"],
                                 prefix=["setpriv", "--bounding-set=-all", "--inh-caps=-all"])
    finally:
        agent.close()
    assert_one_clear_line(result, expect="permission denied on masqd's socket")


@pytest.mark.parametrize("reply,expect", [
    (b"this is not json\n", "sent malformed JSON"),
    (b"\xff\xfe\n", "sent malformed JSON"),
    (b"[1, 2]\n", "not a masqd envelope"),
    (b'{"ok": true}\n', "not a masqd envelope"),
    (b'{"ok": "yes", "result": {}}\n', "not a masqd envelope"),
    (b'{"ok": false, "error": "nope"}\n', "not a masqd envelope"),
    (b'{"ok": true, "result": {"tables": 5}}\n', "unexpected error"),
    (b'{"ok": true, "result": {}', "closed the connection without an answer"),
    (b"", "closed the connection without an answer"),
])
def test_a_reply_that_is_not_an_envelope_is_one_line(tmp_path, reply, expect):
    path = str(tmp_path / "masqd.sock")
    agent = FakeAgent(path, reply)
    try:
        result = masqctl_process(["--socket", path, "status"])
    finally:
        agent.close()
    assert_one_clear_line(result, expect=expect)


@pytest.mark.parametrize("args", [
    ["portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "\u0668\u0661", "-R", "10.16.0.27", "80"],
    ["portfw", "-a", "-P", "tcp", "-L", "198.51.100.1", "80", "-R", "10.16.0.27", "\u00b2"],
    ["mark", "-A", "input", "-s", "10.0.0.0/8", "-m", "\u0661"],
    ["autofw", "-A", "-r", "udp", "\u0661", "20", "-h", "10.16.0.27"],
    ["portfw", "-z"], ["bogus"], ["--socket"],
])
def test_bad_arguments_are_a_usage_error_without_a_traceback(args, tmp_path):
    result = masqctl_process(["--socket", str(tmp_path / "none.sock")] + args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.startswith("masqctl"), result.stderr
