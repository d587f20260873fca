"""The HA pair in an `ha` lab (docs/ha.md), driven as an operator would: converge it
with playbooks/ha.yml and inventory/ha.yml, break the master, watch flows through the
virtual addresses. Shared by tests/lab/test_ha.py and bench/ha.py.

Run inside the client's namespace as a script (standard library only, bounded loops):

  flows DST PORT TCP_COUNT UDP_RATE SECONDS
      TCP_COUNT long-lived TCP connections (one probe line every 100 ms each) plus one UDP
      stream (UDP_RATE datagrams/s, fixed source port) to DST:PORT, until SIGTERM or
      SECONDS; prints {"ready": ...} once every flow has an echo, then a summary.
  prober DST PORT SECONDS
      a new TCP connection attempt every 20 ms (each may take 0.5 s); prints every
      attempt as [start, end, ok, backend] on CLOCK_MONOTONIC (one clock for every
      namespace; backend: the server that echoed).
  udpprobe DST PORT SECONDS
      a fresh UDP socket (so a new conntrack entry) every 20 ms, each waiting 0.5 s for
      its echo; prints every datagram as [start, end, ok, backend] like prober.
"""

import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.abspath(__file__)
PLAYBOOK_BIN = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
OUTSIDE_VIP, INSIDE_VIP, PORT = "198.51.100.1", "10.16.0.1", 8080
GATEWAYS = ("gw1", "gw2")
LINKS = ("eth0", "eth1", "sync0")
TCP_INTERVAL = 0.1


# -- flows (script mode) ---------------------------------------------------------------

def cmd_flows(dst, port, tcp_count, udp_rate, seconds):
    port, tcp_count, udp_interval = int(port), int(tcp_count), 1.0 / float(udp_rate)
    deadline = time.monotonic() + float(seconds)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sel = selectors.DefaultSelector()
    flows = []
    for i in range(tcp_count):
        flow = {"id": i, "sent": 0, "echoed": set(), "backends": {}, "error": None, "buf": b""}
        try:
            flow["sock"] = socket.create_connection((dst, port), timeout=5)
        except OSError as exc:
            flow["error"] = "connect: %s" % exc
            flows.append(flow)
            continue
        flow["sock"].setblocking(False)
        sel.register(flow["sock"], selectors.EVENT_READ, flow)
        flows.append(flow)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect((dst, port))
    udp.setblocking(False)
    sel.register(udp, selectors.EVENT_READ, None)
    usent, uechoed, ubackends = [], {}, {}
    ready = False
    next_tcp = next_udp = time.monotonic()
    grace_end = None
    while True:
        now = time.monotonic()
        if grace_end is None and (stop or now > deadline):
            grace_end = now + 1.5  # echoes in flight
        if grace_end is not None and now > grace_end:
            break
        if grace_end is None and now >= next_udp:
            try:
                udp.send(b"%d\n" % len(usent))
            except OSError:
                pass
            usent.append(now)
            next_udp += udp_interval
        if grace_end is None and now >= next_tcp:
            # A fresh order each round: a backup that picks flows up mid-stream (no
            # conntrackd) must not see them in creation order, which would line its round
            # robin up with the master's by construction (all or nothing).
            random.shuffle(flows)
            for flow in flows:
                if flow["error"] is None:
                    try:
                        flow["sock"].send(b"%d\n" % flow["sent"])
                        flow["sent"] += 1
                    except OSError as exc:
                        flow["error"] = "send: %s" % exc
            next_tcp += TCP_INTERVAL
        for key, _mask in sel.select(timeout=max(0.0, min(next_udp, next_tcp) - time.monotonic())):
            flow = key.data
            if flow is None:
                try:
                    data = udp.recv(65535)
                except OSError:
                    continue
                host, _sp, seq = data.decode().strip().partition(" ")
                uechoed.setdefault(int(seq), time.monotonic())
                ubackends[host] = ubackends.get(host, 0) + 1
                continue
            try:
                data = flow["sock"].recv(65535)
            except OSError as exc:
                flow["error"] = "recv: %s" % exc
                sel.unregister(flow["sock"])
                continue
            if not data:
                flow["error"] = "recv: closed by the peer"
                sel.unregister(flow["sock"])
                continue
            *lines, flow["buf"] = (flow["buf"] + data).split(b"\n")
            for line in lines:
                host, _sp, seq = line.decode().partition(" ")
                flow["echoed"].add(int(seq))
                flow["backends"][host] = flow["backends"].get(host, 0) + 1
        if not ready and uechoed and all(f["echoed"] or f["error"] for f in flows):
            ready = True
            print(json.dumps({"ready": True, "errors": sum(1 for f in flows if f["error"])}), flush=True)
    lost = [seq for seq in range(len(usent)) if seq not in uechoed]
    flows.sort(key=lambda f: f["id"])
    summary = {
        "tcp": [{"id": f["id"], "sent": f["sent"], "echoed": len(f["echoed"]), "error": f["error"],
                 "backends": f["backends"]} for f in flows],
        "udp": {"sent": len(usent), "echoed": len(uechoed), "lost": len(lost), "rate": float(udp_rate),
                "lost_first_sent": usent[lost[0]] if lost else None,
                "lost_last_sent": usent[lost[-1]] if lost else None, "backends": ubackends},
    }
    print(json.dumps(summary), flush=True)


def cmd_prober(dst, port, seconds):
    port, deadline = int(port), time.monotonic() + float(seconds)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sel = selectors.DefaultSelector()
    attempts, pending = [], {}
    next_start = time.monotonic()
    print(json.dumps({"ready": True}), flush=True)
    while (not stop and time.monotonic() < deadline) or pending:
        now = time.monotonic()
        if not stop and now < deadline and now >= next_start and len(pending) < 40:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex((dst, port))
            pending[sock] = [now, "connect"]
            sel.register(sock, selectors.EVENT_WRITE, pending[sock])
            next_start = now + 0.02
        for key, _mask in sel.select(timeout=0.005):
            sock, state = key.fileobj, key.data
            if state[1] == "connect":
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    attempts.append([state[0], time.monotonic(), False, None])
                    sel.unregister(sock)
                    sock.close()
                    del pending[sock]
                    continue
                sock.send(b"probe\n")
                state[1] = "echo"
                sel.modify(sock, selectors.EVENT_READ, state)
            else:
                try:
                    answer = sock.recv(4096)
                except OSError:
                    answer = b""
                ok = answer.endswith(b" probe\n")
                attempts.append([state[0], time.monotonic(), ok, answer.split(b" ")[0].decode() if ok else None])
                sel.unregister(sock)
                sock.close()
                del pending[sock]
        now = time.monotonic()
        for sock, state in list(pending.items()):
            if now - state[0] > 0.5:
                attempts.append([state[0], now, False, None])
                sel.unregister(sock)
                sock.close()
                del pending[sock]
    print(json.dumps({"attempts": attempts}), flush=True)


def cmd_udpprobe(dst, port, seconds):
    port, deadline = int(port), time.monotonic() + float(seconds)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sel = selectors.DefaultSelector()
    attempts, pending = [], {}
    next_start = time.monotonic()
    print(json.dumps({"ready": True}), flush=True)
    while (not stop and time.monotonic() < deadline) or pending:
        now = time.monotonic()
        if not stop and now < deadline and now >= next_start and len(pending) < 40:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.sendto(b"probe\n", (dst, port))
            except OSError:
                pass
            pending[sock] = now
            sel.register(sock, selectors.EVENT_READ, now)
            next_start = now + 0.02
        for key, _mask in sel.select(timeout=0.005):
            sock, start = key.fileobj, key.data
            try:
                answer = sock.recv(4096)
            except OSError:
                answer = b""
            ok = answer.endswith(b" probe\n")
            attempts.append([start, time.monotonic(), ok, answer.split(b" ")[0].decode() if ok else None])
            sel.unregister(sock)
            sock.close()
            del pending[sock]
        now = time.monotonic()
        for sock, start in list(pending.items()):
            if now - start > 0.5:
                attempts.append([start, now, False, None])
                sel.unregister(sock)
                sock.close()
                del pending[sock]
    print(json.dumps({"attempts": attempts}), flush=True)


# -- helpers for tests and the benchmark ----------------------------------------------------

def _ready(proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("%s exited %s: %s" % (what, proc.returncode, proc.stderr.read()))
        line = proc.stdout.readline()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("%s not ready within %ss" % (what, timeout))


class Flows:
    """TCP_COUNT long-lived TCP flows and a UDP stream from the client through the outside VIP."""

    def __init__(self, lab, tcp_count, udp_rate=200, seconds=120, port=PORT):
        self.proc = lab.spawn("client", [sys.executable, SCRIPT, "flows", OUTSIDE_VIP, str(port),
                                         str(tcp_count), str(udp_rate), str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.start = _ready(self.proc, 30 + tcp_count * 0.2, "flows")

    def finish(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith('{"tcp"')]
        if not lines:
            raise AssertionError("flows printed no summary: %s" % err)
        return json.loads(lines[-1])


class Prober:
    """New connections through the outside VIP, one every 20 ms (kind udpprobe: datagrams
    from fresh sockets)."""

    def __init__(self, lab, seconds=30, port=PORT, kind="prober"):
        self.proc = lab.spawn("client", [sys.executable, SCRIPT, kind, OUTSIDE_VIP, str(port),
                                         str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _ready(self.proc, 10, "prober")

    def finish(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith('{"attempts"')]
        if not lines:
            raise AssertionError("prober printed no result: %s" % err)
        return json.loads(lines[-1])["attempts"]


def first_new_connection_after(attempts, t0):
    """Seconds from t0 to the end of the first successful attempt started at or after t0."""
    ok = [end for start, end, good, _backend in attempts if good and start >= t0]
    return round(min(ok) - t0, 3) if ok else None


def schedule(attempts, t_from, t_to=float("inf")):
    """The backends of the successful new connections started in [t_from, t_to), in order:
    the PORTFW round robin as the gateway that took them ran it."""
    return [backend for start, _end, good, backend in sorted(attempts) if good and t_from <= start < t_to]


def alternations(backends):
    """Share of consecutive pairs on different backends (1.0: strict round robin)."""
    pairs = list(zip(backends, backends[1:]))
    return round(sum(1 for a, b in pairs if a != b) / len(pairs), 3) if pairs else None


def run_dir(lab, host):
    return "/run/ipmasq-lab/%s/%s" % (lab.prefix, host)


def converge(lab, conntrackd=True, timeout=400, extra=None):
    """playbooks/ha.yml against the lab; returns the CompletedProcess, raises AssertionError
    with the play's output when it fails."""
    extra_vars = {"lab_prefix": lab.prefix, "gateway_ha_conntrackd": conntrackd}
    extra_vars.update(extra or {})
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.environ.get("ANSIBLE_COLLECTIONS_PATH", ""),
               ANSIBLE_PIPELINING="true", ANSIBLE_FORCE_COLOR="0")
    proc = subprocess.run([PLAYBOOK_BIN, "-i", os.path.join(REPO, "inventory", "ha.yml"),
                           "-e", json.dumps(extra_vars), os.path.join(REPO, "playbooks", "ha.yml")],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, check=False)
    if proc.returncode != 0:
        raise AssertionError("playbooks/ha.yml failed (rc %d):\n%s\n%s"
                             % (proc.returncode, proc.stdout[-6000:], proc.stderr[-3000:]))
    return proc


def holds_vip(lab, host):
    out = lab.run(host, ["ip", "-o", "-4", "addr", "show"], check=True).stdout
    return (" %s/" % OUTSIDE_VIP) in out and (" %s/" % INSIDE_VIP) in out


def master(lab):
    """The gateway holding both virtual addresses (None, or a list when both do)."""
    holders = [g for g in GATEWAYS if holds_vip(lab, g)]
    return holders[0] if len(holders) == 1 else (holders or None)


def wait_master(lab, host, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if master(lab) == host:
            return True
        time.sleep(0.05)
    raise AssertionError("%s did not become the only master within %ss (master: %s)"
                         % (host, timeout, master(lab)))


def set_links(lab, host, up):
    for ifname in LINKS:
        lab.run(host, ["ip", "link", "set", ifname, "up" if up else "down"], check=True)


def sync_link(lab, host, up):
    lab.run(host, ["ip", "link", "set", "sync0", "up" if up else "down"], check=True)


def pid_of(lab, host, name):
    with open(os.path.join(run_dir(lab, host), name), encoding="ascii") as handle:
        return int(handle.read().split()[0])


def kill_keepalived(lab, host, sig=signal.SIGKILL):
    """SIGKILL keepalived's parent and VRRP child at once (a crash: no clean shutdown)."""
    pids = [pid_of(lab, host, "ha/keepalived.pid"), pid_of(lab, host, "ha/keepalived-vrrp.pid")]
    for pid in pids:
        os.kill(pid, sig)
    return pids


def kill_masqd(lab, host):
    pid = pid_of(lab, host, "masqd.pid")
    os.kill(pid, signal.SIGKILL)
    return pid


def restart_keepalived(lab, host):
    """What the role (or systemd) does for a dead keepalived: start it again."""
    for name in ("keepalived.pid", "keepalived-vrrp.pid"):
        path = os.path.join(run_dir(lab, host), "ha", name)
        if os.path.exists(path):
            os.unlink(path)
    return converge(lab)


def notify_log(lab, host):
    """[(time, state, word)] keepalived's notify script logged on `host`."""
    path = os.path.join(run_dir(lab, host), "ha", "ha-notify.log")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [tuple(line.split(" ", 2)) for line in handle.read().splitlines()]


def transitions(lab, host):
    return [state for _t, state, word in notify_log(lab, host) if word == "begin"]


def conntrackd(lab, host, *args):
    conf = os.path.join(run_dir(lab, host), "ha", "conntrackd.conf")
    return lab.run(host, ["conntrackd", "-C", conf] + list(args), timeout=10).stdout


def external_cache_size(lab, host):
    """How many flows `host`'s conntrackd holds for its peer (its external cache)."""
    out = conntrackd(lab, host, "-s")
    section = out.split("cache external:")[-1]
    for line in section.splitlines():
        if "current active connections" in line:
            return int(line.split()[-1])
    return None


def start_servers(lab, lifetime=600, port=PORT, hosts=("web1", "web2")):
    from reliability_flows import start_echo
    return [start_echo(lab, host, port, lifetime) for host in hosts]


def masqctl(lab, host, *args):
    """`masqctl --json ARGS` against `host`'s own agent, parsed."""
    run = run_dir(lab, host)
    out = lab.run(host, [os.path.join(run, "bin", "masqctl"), "--socket", os.path.join(run, "masqd.sock"),
                         "--json"] + list(args), timeout=20, check=True).stdout
    return json.loads(out)


def pool_elements(lab, host):
    """{set name: [element text]} of masqd's pool sets in `host`'s kernel (host <-> address)."""
    out = lab.run(host, ["nft", "-j", "list", "table", "inet", "masqd"], timeout=20, check=True).stdout
    found = {}
    for item in json.loads(out)["nftables"]:
        obj = item.get("map") or item.get("set")
        if obj and obj["name"].startswith("pool_"):
            found[obj["name"]] = [json.dumps(e) for e in obj.get("elem", [])]
    return found


def tcp_survivors(summary):
    """TCP flows that ended with no error and every probe echoed."""
    return sum(1 for f in summary["tcp"] if f["error"] is None and f["echoed"] == f["sent"])


if __name__ == "__main__":
    {"flows": cmd_flows, "prober": cmd_prober, "udpprobe": cmd_udpprobe}[sys.argv[1]](*sys.argv[2:])
