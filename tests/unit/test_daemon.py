"""masqd's command line."""

from masqd.client import default_socket_path
from masqd.daemon import DEFAULT_STATE_DIR, parse_args


def test_defaults(monkeypatch):
    monkeypatch.delenv("MASQD_SOCKET", raising=False)
    args = parse_args([])
    assert (args.state_dir, args.socket, args.group, args.pidfile, args.log_level) == (
        DEFAULT_STATE_DIR, None, None, None, "info")
    assert default_socket_path() == "/run/masqd/masqd.sock"
    monkeypatch.setenv("MASQD_SOCKET", "/run/lab/a.sock")
    assert default_socket_path() == "/run/lab/a.sock"


def test_options():
    args = parse_args(["--state-dir", "/s", "--socket", "/r/m.sock", "--group", "masq",
                       "--pidfile", "/r/m.pid", "--log-level", "debug"])
    assert (args.state_dir, args.socket, args.group, args.pidfile, args.log_level) == (
        "/s", "/r/m.sock", "masq", "/r/m.pid", "debug")
