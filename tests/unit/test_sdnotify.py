"""masqd.sdnotify: the datagrams systemd's Type=notify expects, on a real socket."""

import os
import socket

from masqd import sdnotify


def receiver(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_ready_sends_ready_status_and_mainpid_to_a_path_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with receiver(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.ready("serving /run/masqd/masqd.sock")
        assert sock.recv(4096).decode().split("\n") == [
            "READY=1", "STATUS=serving /run/masqd/masqd.sock", "MAINPID=%d" % os.getpid()]
        assert sdnotify.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_an_abstract_socket_is_reached_through_its_at_sign_name(monkeypatch):
    name = "masqd-test-%d" % os.getpid()
    with receiver("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent_and_a_dead_socket_is_not_fatal(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready("x") is False
