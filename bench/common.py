"""Shared helpers of the benchmark suite: the lab topology, masqd in a namespace,
bounded load tools, CPU accounting, medians and the result files.

Every benchmark runs inside a lab (ipmasq_lab) whose teardown kills what was spawned
and deletes the namespaces, also on failure. Every load loop is bounded in count and
time (ab -n and -t, iperf3 -t, subprocess timeouts).
"""

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
VENV_BIN = os.path.join(REPO, ".venv", "bin")
PYTHON = os.path.join(VENV_BIN, "python")

# client 198.51.100.10 -- eth0 198.51.100.1 (+ .2) [gateway] eth1 10.16.0.1 -- server 10.16.0.10
GATEWAY_OUT = "198.51.100.1"
GATEWAY_OUT2 = "198.51.100.2"   # a second outside address: the linear-chain comparison
GATEWAY_IN = "10.16.0.1"
CLIENT = "198.51.100.10"
SERVER = "10.16.0.10"

# A client that opens a TCP connection every 5 ms for argv[3] seconds to argv[1]:argv[2]
# (an identity server answers with its host name) and prints
# [[started, answered, host or None], ...] on CLOCK_MONOTONIC (one clock for every namespace).
PROBER = r"""
import json, socket, sys, time
end = time.monotonic() + float(sys.argv[3])
out = []
while time.monotonic() < end:
    t = time.monotonic()
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5)
        s.settimeout(0.5)
        data = s.recv(512)
        s.close()
        out.append([t, time.monotonic(), json.loads(data.decode())["host"]])
    except (OSError, ValueError, KeyError):
        out.append([t, time.monotonic(), None])
    time.sleep(0.005)
print(json.dumps(out))
"""


CLIENT_SYSCTLS = {
    # Many short connections from one client: reuse TIME_WAIT ports, use a wide range.
    "net.ipv4.tcp_tw_reuse": 1,
    "net.ipv4.ip_local_port_range": "1024 65000",
}


def triple_spec(name="bench", extra_servers=0):
    """client -- gateway -- server; `extra_servers` more servers on a bridge instead."""
    spec = {
        "name": name,
        "hosts": {
            "client": {"interfaces": {"eth0": {"addresses": [CLIENT + "/24"]}},
                       "routes": [{"to": "default", "via": GATEWAY_OUT}],
                       "sysctls": dict(CLIENT_SYSCTLS)},
            "gateway": {"interfaces": {"eth0": {"addresses": [GATEWAY_OUT + "/24", GATEWAY_OUT2 + "/24"]},
                                       "eth1": {"addresses": [GATEWAY_IN + "/24"]}},
                        "sysctls": {"net.ipv4.ip_forward": 1,
                                    "net.ipv4.tcp_tw_reuse": 1,
                                    "net.ipv4.ip_local_port_range": "1024 65000"}},
            "server": {"interfaces": {"eth0": {"addresses": [SERVER + "/24"]}},
                       "routes": [{"to": "default", "via": GATEWAY_IN}],
                       "sysctls": {"net.core.somaxconn": 4096,
                                   "net.ipv4.tcp_max_syn_backlog": 4096}},
        },
        "links": [["client:eth0", "gateway:eth0"]],
    }
    if extra_servers:
        bridge = ["gateway:eth1", "server:eth0"]
        for i in range(extra_servers):
            host = "server%d" % (i + 2)
            spec["hosts"][host] = {"interfaces": {"eth0": {"addresses": ["10.16.0.%d/24" % (11 + i)]}},
                                   "routes": [{"to": "default", "via": GATEWAY_IN}]}
            bridge.append(host + ":eth0")
        spec["bridges"] = {"inside": bridge}
    else:
        spec["links"].append(["gateway:eth1", "server:eth0"])
    return spec


# --- statistics -------------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def log(msg, *args):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg % args if args else msg))
    sys.stderr.flush()


# --- machine facts and result files --------------------------------------------------------

def _version(argv, pick=lambda s: s.strip().splitlines()[0] if s.strip() else None):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return pick(out.stdout + out.stderr)
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine():
    import masqd
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import ansible
        ansible_version = ansible.__version__ if hasattr(ansible, "__version__") else None
        from ansible.release import __version__ as ansible_version
    except ImportError:
        ansible_version = None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "versions": {
            "masqd": masqd.__version__,
            "ansible-core": ansible_version,
            "nft": _version(["nft", "--version"]),
            "iperf3": _version(["iperf3", "--version"]),
            "haproxy": _version(["haproxy", "-v"]),
            "nginx": _version(["nginx", "-v"]),
            "ab": _version(["ab", "-V"]),
            "socat": _version(["socat", "-V"], lambda s: next((l for l in s.splitlines() if "version" in l), None)),
            "iptables": _version(["iptables", "--version"]),
        },
    }


def write_result(name, quick, data):
    os.makedirs(RESULTS, exist_ok=True)
    doc = {"benchmark": name, "quick": quick, "machine": machine()}
    doc.update(data)
    path = os.path.join(RESULTS, "%s.json" % name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.rename(tmp, path)
    log("wrote %s", os.path.relpath(path, REPO))
    return path


# --- CPU accounting ------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot():
    """Machine-wide CPU seconds by kind from /proc/stat (all CPUs)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq = (int(x) for x in fields[:7])
    return {"user": (user + nice) / CLK_TCK, "system": system / CLK_TCK,
            "softirq": (softirq + irq) / CLK_TCK, "idle": (idle + iowait) / CLK_TCK}


def cpu_delta(a, b):
    d = {k: b[k] - a[k] for k in a}
    d["busy"] = d["user"] + d["system"] + d["softirq"]
    return d


def process_cpu(pids):
    """CPU seconds (utime+stime, plus reaped children's) of the given processes."""
    total = 0.0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3); utime=14, stime=15, cutime=16, cstime=17
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    return total


def netns_pids(netns):
    """PIDs whose network namespace is `netns` (like the lab's teardown finds them)."""
    try:
        target = os.stat("/run/netns/%s" % netns).st_ino
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat("/proc/%s/ns/net" % entry).st_ino == target:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def status_kib(pid, field):
    """A KiB field of /proc/PID/status (VmRSS, VmHWM)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/%d/status" % (field, pid))


# --- masqd in a lab namespace -------------------------------------------------------------

class Agent:
    """masqd running in a lab namespace, with its own state dir and socket."""

    def __init__(self, lab, host, workdir):
        self.lab = lab
        self.host = host
        self.dir = os.path.join(workdir, "masqd-" + host)
        os.makedirs(self.dir, exist_ok=True)
        self.state_dir = os.path.join(self.dir, "state")
        self.socket = os.path.join(self.dir, "masqd.sock")
        self.log = os.path.join(self.dir, "masqd.log")
        self.proc = None

    def start(self, timeout=120):
        """Start and wait until the socket answers; returns the seconds it took."""
        t0 = time.monotonic()
        with open(self.log, "ab") as logf:
            argv = [os.path.join(VENV_BIN, "masqd"), "--state-dir", self.state_dir,
                    "--socket", self.socket, "--log-level", "warning"]
            self.proc = self.lab.spawn(self.host, argv, stdout=logf, stderr=logf)
        from masqd.client import AgentUnavailable, Client
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("masqd in %s exited: %s" % (self.host, self.tail()))
            if os.path.exists(self.socket):
                try:
                    with Client(self.socket, timeout=timeout) as c:
                        c.request("status")
                    return time.monotonic() - t0
                except AgentUnavailable:
                    pass
            time.sleep(0.02)
        raise RuntimeError("masqd in %s not ready after %ss: %s" % (self.host, timeout, self.tail()))

    def stop(self, timeout=20):
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def tail(self):
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(f.read().splitlines()[-5:])
        except OSError:
            return ""

    def client(self, timeout=120):
        from masqd.client import Client
        return Client(self.socket, timeout=timeout)

    def rss_kib(self):
        return status_kib(self.proc.pid, "VmRSS")

    def reset_peak_rss(self):
        """The peak RSS (VmHWM) starts again from the current RSS."""
        with open("/proc/%d/clear_refs" % self.proc.pid, "w") as f:
            f.write("5")

    def peak_rss_kib(self):
        return status_kib(self.proc.pid, "VmHWM")

    def preload(self, tables, revision=1):
        """Write a state file (masqd.store's format) for the next start."""
        from masqd.store import Store
        store = Store(self.state_dir)
        store.ensure_dir()
        store.save({"revision": revision, "tables": tables, "mfw_heads": {}})


class Workdir:
    """A temporary directory removed at the end (state dirs, configs, sockets)."""

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="ipmasq-bench-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


# --- servers and load tools ---------------------------------------------------------------

def wait_port(lab, host, address, port, timeout=10):
    """Wait until a TCP port accepts connections (probed from `host`)."""
    code = ("import socket,sys,time\n"
            "d=time.monotonic()+%f\n"
            "while time.monotonic()<d:\n"
            "  try:\n"
            "    socket.create_connection((%r,%d),timeout=0.5).close(); sys.exit(0)\n"
            "  except OSError: time.sleep(0.05)\n"
            "sys.exit(1)\n" % (timeout, address, port))
    r = lab.run(host, [sys.executable, "-c", code], timeout=timeout + 5)
    if r.returncode != 0:
        raise RuntimeError("%s:%d not reachable from %s" % (address, port, host))


def nginx_conf(workdir, ports, name="nginx"):
    """A minimal nginx serving a tiny body on each port (one worker per CPU)."""
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    listens = "\n".join("        listen %d reuseport backlog=4096;" % p for p in ports)
    conf = """worker_processes auto;
daemon off;
pid %(d)s/nginx.pid;
error_log %(d)s/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(d)s/body;
    proxy_temp_path %(d)s/proxy;
    fastcgi_temp_path %(d)s/fastcgi;
    uwsgi_temp_path %(d)s/uwsgi;
    scgi_temp_path %(d)s/scgi;
    keepalive_timeout 0;
    server {
%(listens)s
        location / { return 200 "ok\\n"; }
    }
}
""" % {"d": d, "listens": listens}
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def haproxy_conf(workdir, frontends, name="haproxy"):
    """HAProxy (TCP mode, splice-auto, maxconn 4000): frontends [(bind addr, port, backend addr, port)]."""
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    parts = ["global\n    maxconn 4000\n    nbthread 2\n",
             "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
             "    timeout server 30s\n    option splice-auto\n"]
    for i, (addr, port, baddr, bport) in enumerate(frontends):
        parts.append("listen l%d\n    bind %s:%d\n    server s %s:%d\n" % (i, addr, port, baddr, bport))
    path = os.path.join(d, "haproxy.cfg")
    with open(path, "w") as f:
        f.write("".join(parts))
    return path


ASYNCIO_PROXY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "asyncio_proxy.py")


def spawn_redirectors(lab, workdir, routes):
    """Start the user-space redirectors in the gateway.

    routes: {"socat"|"haproxy"|"asyncio": [(listen port, backend port), ...]} (any
    subset); returns {name: [Popen]} (their PIDs are what the CPU accounting reads)."""
    procs = {}
    devnull = subprocess.DEVNULL
    for port, bport in routes.get("socat", ()):
        procs.setdefault("socat", []).append(lab.spawn("gateway", [
            "socat", "TCP-LISTEN:%d,bind=%s,fork,reuseaddr,backlog=4096" % (port, GATEWAY_OUT),
            "TCP:%s:%d" % (SERVER, bport)], stdout=devnull, stderr=devnull))
    if routes.get("haproxy"):
        cfg = haproxy_conf(workdir, [(GATEWAY_OUT, p, SERVER, b) for p, b in routes["haproxy"]])
        procs["haproxy"] = [lab.spawn("gateway", ["haproxy", "-db", "-f", cfg],
                                      stdout=devnull, stderr=devnull)]
    for port, bport in routes.get("asyncio", ()):
        procs.setdefault("asyncio", []).append(lab.spawn("gateway", [
            PYTHON, ASYNCIO_PROXY, GATEWAY_OUT, str(port), SERVER, str(bport)],
            stdout=devnull, stderr=devnull))
    for pairs in routes.values():
        for port, _b in pairs:
            wait_port(lab, "client", GATEWAY_OUT, port)
    return procs


def tree_pids(pid):
    """`pid` and its descendants (socat forks one child per connection)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def iperf3(lab, address, port, seconds=3, timeout_extra=15):
    """One iperf3 TCP run from the client; returns bits/s received, or None on failure."""
    r = lab.run("client", ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J",
                           "--connect-timeout", "3000"], timeout=seconds + timeout_extra)
    try:
        doc = json.loads(r.stdout)
        return doc["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError):
        log("iperf3 to %s:%d failed: %s", address, port, (r.stdout + r.stderr)[-300:])
        return None


def ab(lab, address, port, requests, concurrency=16, seconds=20):
    """ab from the client: `requests` short connections (no keep-alive), at most
    `seconds`; returns (connections per second, completed, failed)."""
    argv = ["ab", "-q", "-r", "-t", str(seconds), "-n", str(requests), "-c", str(concurrency),
            "-s", "5", "http://%s:%d/" % (address, port)]
    r = lab.run("client", argv, timeout=seconds + 20)
    rate = complete = failed = None
    for line in r.stdout.splitlines():
        if line.startswith("Requests per second:"):
            rate = float(line.split()[3])
        elif line.startswith("Complete requests:"):
            complete = int(line.split()[2])
        elif line.startswith("Failed requests:"):
            failed = int(line.split()[2])
    if rate is None:
        log("ab to %s:%d failed: %s", address, port, (r.stdout + r.stderr)[-300:])
    return rate, complete, failed


def masqd_listing(lab, host, timeout=300):
    """`nft -s list table` of each of masqd's tables (render.TABLES) in `host`, as one
    file `nft -f` loads."""
    from masqd import render
    return "".join(lab.run(host, ["nft", "-s", "list", "table", "inet", name], timeout=timeout, check=True).stdout
                   for name in render.TABLES)


def delete_masqd_tables(lab, host, timeout=300):
    """Every one of masqd's tables in `host`, in one transaction (absent ones too)."""
    from masqd import render
    text = "; ".join("add table inet %s; delete table inet %s" % (name, name) for name in render.TABLES)
    lab.run(host, ["nft", text], timeout=timeout, check=True)


def conntrack_flush(lab, host="gateway"):
    lab.run(host, ["conntrack", "-F"], timeout=10)


def connect_times(lab, address, port, count, timeout=30):
    """SYN -> SYN-ACK time seen by the client: `count` TCP connects (connect()
    returns when the SYN-ACK arrives), in microseconds; runs in the client."""
    code = ("import socket,time,json\n"
            "out=[]\n"
            "end=time.monotonic()+%f\n"
            "for i in range(%d):\n"
            "  if time.monotonic()>end: break\n"
            "  s=socket.socket(); s.settimeout(2)\n"
            "  s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00')\n"
            "  t=time.perf_counter_ns()\n"
            "  try:\n"
            "    s.connect((%r,%d)); out.append((time.perf_counter_ns()-t)/1000)\n"
            "  except OSError: pass\n"
            "  s.close()\n"
            "print(json.dumps(out))\n" % (timeout - 5, count, address, port))
    r = lab.run("client", [sys.executable, "-c", code], timeout=timeout)
    try:
        return json.loads(r.stdout)
    except ValueError:
        log("connect timing failed: %s", r.stderr[-300:])
        return []


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def now():
    return time.monotonic()


def free_port_pair_check(*ports):
    assert len(set(ports)) == len(ports), ports


def host_socket():
    return socket.gethostname()
