"""testinfra checks of a lab gateway, run inside its network namespace:

    ip netns exec PREFIX-gateway pytest --hosts=local:// molecule/shared/tests

The agent's paths come from the environment (verify_gateway.yml sets them from the
inventory): MASQD_SOCKET, MASQD_PIDFILE, MASQD_BIN_DIR.
"""

import json
import os

import pytest

SOCKET = os.environ.get("MASQD_SOCKET", "/run/masqd/masqd.sock")
PIDFILE = os.environ.get("MASQD_PIDFILE", "/run/masqd/masqd.pid")
BIN_DIR = os.environ.get("MASQD_BIN_DIR", "/usr/local/sbin")


@pytest.fixture
def agent_pid(host):
    pidfile = host.file(PIDFILE)
    assert pidfile.exists, "no pidfile at %s" % PIDFILE
    return int(pidfile.content_string.strip())


def test_agent_process_runs_masqd(host, agent_pid):
    cmdline = host.file("/proc/%d/cmdline" % agent_pid).content.split(b"\0")
    # the interpreter runs the executable zip application through its masqd link
    assert cmdline[1].endswith(b"/bin/masqd"), cmdline
    assert SOCKET.encode() in cmdline, cmdline


def test_agent_runs_in_this_namespace(host, agent_pid):
    # readlink of our own process and of the agent's: the same netns inode.
    ours = host.check_output("readlink /proc/self/ns/net")
    theirs = host.check_output("readlink /proc/%d/ns/net" % agent_pid)
    assert theirs == ours


def test_socket_is_root_only(host):
    sock = host.file(SOCKET)
    assert sock.is_socket
    assert sock.user == "root"
    assert sock.mode & 0o007 == 0


def test_masqctl_reaches_the_agent(host):
    out = host.check_output("%s/masqctl --socket %s --json status" % (BIN_DIR, SOCKET))
    status = json.loads(out)
    status = status.get("result", status)
    assert "revision" in status and "tables" in status, status


def test_nft_table_present(host):
    listing = host.run("nft list table inet masqd")
    assert listing.rc == 0, listing.stderr
    assert "table inet masqd" in listing.stdout


def test_ipv4_forwarding_on(host):
    assert host.file("/proc/sys/net/ipv4/ip_forward").content_string.strip() == "1"
