"""Benchmark: one multi-backend PORTFW key added and deleted while many are loaded,
with this machine's libnftables and with Debian 13's, side by side.

A multi-backend key is a chain of its own (its pcnt/pref cascade) and a `goto` element
in its shard table's verdict map. Two costs used to grow with the number of such keys
loaded (docs/architecture.md, Performance): libnftables filled its cache before an
element command (PORTFW changes now go by masqd's own netlink batch), and the kernel
validates the table a `goto` element is added to (now one of eight shard tables). This
benchmark runs the same agent (same sources, same requests) twice:

  - "machine": the agent of the venv, on this machine's libnftables (Debian 12: 1.0.6);
  - "debian13": the agent run with `chroot` in an overlay of the cached Debian 13 root
    (ipmasq_lab.booted_roots), with nftables and python3-nftables installed into the
    overlay from that root's apt cache (1.1.x), so the lower root stays as it was.

Per size and libnftables, in a lab of its own: the agent starts with N two-backend keys
stored, then 15 times adds and deletes one more two-backend key over the socket
(medians); the same for a one-backend key.

The multi-backend keys live in render.PORTFW_SHARDS tables of their own so that the
kernel validates one shard per commit; each shard table hooks prerouting. What those
hooks cost a new connection is measured beside it (`hooks`): ab through a one-backend
key (client -> gateway -> nginx), the table loaded by `nft -f` with the shard tables
and without them, alternated, with the routed path to the same server as the ceiling.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile
import time

from bench import common
from bench.common import log, median

PACKAGES = ("nftables", "python3-nftables", "python3-pyroute2")
OPS = 15


def keys(n):
    return [{"protocol": "tcp", "local_address": "203.0.113.%d" % (1 + i // 50000), "local_port": 1024 + i % 50000,
             "backends": [{"address": "10.16.0.10", "port": 80, "pref": 10},
                          {"address": "10.16.0.11", "port": 80, "pref": 5}]} for i in range(n)]


def run(quick=False):
    from ipmasq_lab import booted_roots
    from masqd import render
    sizes = (20000,) if quick else (20000, 100000)
    root = booted_roots.ensure("trixie")
    rows = []
    with common.Workdir() as work, _debian13(root, work) as overlay:
        versions = {"machine": _nft_version(None), "debian13": _nft_version(overlay)}
        log("multi_backend: nft %s here, %s in the Debian 13 overlay", versions["machine"], versions["debian13"])
        for n in sizes:
            for where in ("machine", "debian13"):
                # A lab of its own each: the agent leaves its table behind when it stops,
                # and libnftables 1.0.6 crashes reading a table 1.1's wrote.
                with _lab() as lab:
                    row = _measure(lab, work, overlay if where == "debian13" else None, n)
                row.update({"keys": n, "where": where, "nft": versions[where]})
                log("multi_backend: %s, %d two-backend keys: add %.1f ms, delete %.1f ms (one-backend add %.1f ms)",
                    where, n, row["add_ms"], row["delete_ms"], row["single_add_ms"])
                rows.append(row)
    hooks = _hook_cost(quick)
    at = {(r["where"], r["keys"]): r for r in rows}
    targets = {}
    for n in sizes:
        for where in ("machine", "debian13"):
            r = at[(where, n)]
            targets["one two-backend key add/delete at %d two-backend keys <= 25 ms (%s)" % (n, where)] = \
                max(r["add_ms"], r["delete_ms"]) <= 25
    targets["new connections/s through a one-backend key with the shard tables' hooks >= 0.95x without"] = \
        (hooks["with_vs_without"] or 0) >= 0.95
    return {"method": {"sizes": list(sizes), "ops": OPS, "statistic": "median",
                       "two_backend_key": "pref 10 / 5", "nft": versions,
                       "hooks": {"rounds": hooks["rounds"], "ab_requests": hooks["requests"], "ab_concurrency": 16,
                                 "interleaved": True}},
            "summary": {"rows": rows, "shards": render.PORTFW_SHARDS,
                        "hooks": {k: v for k, v in hooks.items() if k != "raw"}},
            "raw": {"hooks": hooks["raw"]}, "targets": targets}


def _hook_cost(quick):
    """New connections/s through a one-backend PORTFW key with the shard tables (and
    their prerouting hooks) loaded and without them, and routed to the server. Each
    variant has its own server port, so 4-tuples never meet another's TIME_WAIT."""
    from masqd import model, render
    rounds, requests = (3, 4000) if quick else (7, 20000)
    ports = {"with": 8002, "without": 8003, "routing": 8004}
    entries = [{"protocol": "tcp", "local_address": common.GATEWAY_OUT, "local_port": 10000 + port,
                "backends": [{"address": common.SERVER, "port": port}]} for port in (ports["with"], ports["without"])]
    whole = render.full_sync(render.render({"portfw": model.normalize_table("portfw", entries)})).to_text()
    without = "".join("delete table inet %s\n" % name for name in render.SHARD_TABLES)
    raw = {how: [] for how in ports}
    with common.Workdir() as work, _lab("hooks") as lab:
        conf = common.nginx_conf(work, list(ports.values()))
        lab.spawn("server", ["nginx", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in ports.values():
            common.wait_port(lab, "client", common.SERVER, port)
        files = {}
        for how, text in (("with", whole), ("without", whole + without)):
            files[how] = os.path.join(work, "hooks-%s.nft" % how)
            with open(files[how], "w") as f:
                f.write(text)
        order = list(ports)
        for r in range(rounds):
            for how in order[r % 3:] + order[:r % 3]:
                if how != "routing":
                    lab.run("gateway", ["nft", "-f", files[how]], timeout=60, check=True)
                common.conntrack_flush(lab)
                address, to = (common.SERVER, ports[how]) if how == "routing" else (common.GATEWAY_OUT, 10000 + ports[how])
                rate, _done, failed = common.ab(lab, address, to, requests)
                raw[how].append(rate)
                log("multi_backend hooks: %-7s round %d: %s conn/s (%s failed)", how, r, rate, failed)
        common.delete_masqd_tables(lab, "gateway", timeout=60)
    out = {how: median(rates) for how, rates in raw.items()}
    return {"rounds": rounds, "requests": requests, "conn_per_s": out, "raw": raw,
            "with_vs_without": common.ratio(out["with"], out["without"]),
            "with_vs_routing": common.ratio(out["with"], out["routing"]),
            "without_vs_routing": common.ratio(out["without"], out["routing"])}


def _measure(lab, work, overlay, n):
    from masqd.client import Client
    from masqd.store import Store
    base = os.path.join(overlay, "tmp") if overlay else work
    state = tempfile.mkdtemp(prefix="masqd-state-", dir=base)
    store = Store(state)
    store.ensure_dir()
    store.save({"revision": 1, "tables": {"portfw": keys(n)}, "mfw_heads": {}})
    sock = os.path.join(base, "masqd-%d.sock" % n)
    if overlay:  # paths as the agent in the chroot sees them
        argv = ["chroot", overlay, "env", "PYTHONPATH=/opt/masqd", "python3", "-m", "masqd.daemon",
                "--state-dir", "/" + os.path.relpath(state, overlay), "--socket", "/" + os.path.relpath(sock, overlay),
                "--log-level", "warning"]
    else:
        argv = [os.path.join(common.VENV_BIN, "masqd"), "--state-dir", state, "--socket", sock,
                "--log-level", "warning"]
    t0 = time.monotonic()
    logf = open(os.path.join(work, "masqd-%s-%d.log" % ("debian13" if overlay else "machine", n)), "w+b")
    proc = lab.spawn("gateway", argv, stdout=logf, stderr=logf)
    try:
        _wait_socket(proc, sock, logf, 900)
        start_s = time.monotonic() - t0
        out = {"start_s": start_s}
        with Client(sock, timeout=300) as c:
            for label, backends in (("", keys(1)[0]["backends"]), ("single_", keys(1)[0]["backends"][:1])):
                add, delete = [], []
                for i in range(OPS):
                    entry = {"protocol": "tcp", "local_address": "198.51.100.9", "local_port": 2000 + i,
                             "backends": backends}
                    t0 = time.monotonic()
                    c.request("add", table="portfw", entry=entry)
                    add.append(time.monotonic() - t0)
                    t0 = time.monotonic()
                    c.request("delete", table="portfw", entry={k: entry[k] for k in ("protocol", "local_address",
                                                                                     "local_port")})
                    delete.append(time.monotonic() - t0)
                out[label + "add_ms"] = median(add) * 1e3
                out[label + "delete_ms"] = median(delete) * 1e3
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        logf.close()
        shutil.rmtree(state, ignore_errors=True)


def _wait_socket(proc, sock, logf, timeout):
    from masqd.client import AgentUnavailable, Client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logf.seek(0)
            raise RuntimeError("masqd exited: %s" % logf.read().decode(errors="replace")[-1000:])
        if os.path.exists(sock):
            with contextlib.suppress(AgentUnavailable):
                with Client(sock, timeout=timeout) as c:
                    c.request("status")
                return
        time.sleep(0.05)
    raise RuntimeError("masqd not ready after %ss" % timeout)


def _nft_version(overlay):
    argv = ["nft", "--version"] if overlay is None else ["chroot", overlay, "nft", "--version"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout.split()[1]


@contextlib.contextmanager
def _debian13(root, work):
    """An overlay of the Debian 13 root (writes go to `work`), the role's nft packages
    installed into it offline, this checkout's masqd at /opt/masqd, /proc bound in."""
    upper, scratch, merged = (os.path.join(work, "debian13-" + p) for p in ("upper", "work", "root"))
    for d in (upper, scratch, merged):
        os.makedirs(d)
    mounted = []
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        "lowerdir=%s,upperdir=%s,workdir=%s" % (root, upper, scratch), merged], check=True, timeout=60)
        mounted.append(merged)
        subprocess.run(["mount", "--bind", "/proc", os.path.join(merged, "proc")], check=True, timeout=60)
        mounted.append(os.path.join(merged, "proc"))
        # Offline: the root's apt cache holds the role's packages and their dependencies.
        subprocess.run(["chroot", merged, "apt-get", "install", "-q", "-y", "--no-download", *PACKAGES],
                       check=True, timeout=600, capture_output=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        shutil.copytree(os.path.join(common.REPO, "masqd"), os.path.join(merged, "opt/masqd/masqd"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        yield merged
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", path], check=False, timeout=60)


def _lab(name="multi"):
    import ipmasq_lab
    return ipmasq_lab.lab(common.triple_spec(name))


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run(quick="--quick" in sys.argv)["summary"], indent=1))
