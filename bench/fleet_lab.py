"""Fleet lab: N gateway namespaces, each with its own client and server, converged by
ONE run of playbooks/site.yml (the gateway role + each gateway's tables, the product
path: the role installs and starts masqd in every namespace), verified with real
connections, then converged again, which must change nothing.

    python -m bench.fleet_lab [--gateways 20] [--grow-to 40] [--forks 10] [--serial 100%] [--timeout S]
                              [--repeat 3] [--no-report]

Beside every fleet figure, Ansible's own floor measured in the same lab: one play with
one ansible.builtin.ping per gateway, same inventory, connection and forks, run three
times interleaved with the converges (before the first run, between, after the re-run);
its median is the floor, and each figure is also given as a multiple of it. With
--repeat R the whole lab is built R times and every figure is the median of the R
(the machine is shared: medians, never a single sample).

Per gateway I (0-based), all in one lab:

    cI  198.51.100.4I+2/30 -- eth0 198.51.100.4I+1/30 [gwI] eth1 10.40.I.1/24 -- sI 10.40.I.10/24

(gateways 64..127 take their /30 from 203.0.113.0/24). gwI's tables: PORTFW tcp
<eth0 address>:80 -> sI:80 and one masquerade rule for 10.40.I.0/24. Forwarding starts
off: the role turns it on. The probe: an identity server on sI:80, connections from cI
to gwI's external address, each must be answered by sI and show cI's own address
(PORTFW keeps the client's address); and one connection from sI to an identity server
on cI, which must see gwI's external address (the masquerade rule).

Everything is bounded (ansible-playbook, probes, identity servers' lifetime) and the
lab, with every agent the role started in it and its file area, is torn down on every
path (ipmasq_lab's context manager, also on Ctrl-C/SIGTERM).
"""

import argparse
import concurrent.futures
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import yaml

from bench import common
from bench.common import REPO, log

DEFAULT_GATEWAYS = 20
MAX_GATEWAYS = 128          # 64 /30s in each of 198.51.100.0/24 and 203.0.113.0/24
# What ansible-playbook needs of the collection (see snapshot()).
COLLECTION_PARTS = ("galaxy.yml", "meta", "plugins", "roles", "playbooks", "inventory", "masqd")
PORT = 80                   # the forwarded web port (gateway and server)
CLIENT_PORT = 8080          # the identity server on the client (masquerade probe)
PROBE_CONNECTIONS = 3


def addresses(i):
    """Addresses of fleet member i: the external /30 link and the inside /24."""
    outside = ipaddress.ip_network(("198.51.100.0" if i < 64 else "203.0.113.0") + "/24")
    base = outside.network_address + 4 * (i % 64)
    return {"gateway_out": str(base + 1), "client": str(base + 2),
            "gateway_in": "10.40.%d.1" % i, "server": "10.40.%d.10" % i,
            "inside_net": "10.40.%d.0/24" % i}


def fleet_spec(n):
    """The lab spec: gwI, cI, sI for I in 0..n-1, two veth links each."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_GATEWAYS:
        raise ValueError("gateways=%r: must be an integer from 1 to %d" % (n, MAX_GATEWAYS))
    hosts, links = {}, []
    for i in range(n):
        a = addresses(i)
        hosts["gw%d" % i] = {"interfaces": {"eth0": {"addresses": [a["gateway_out"] + "/30"]},
                                            "eth1": {"addresses": [a["gateway_in"] + "/24"]}}}
        # The client needs no route: every answer it gets comes from gwI's address on its link.
        hosts["c%d" % i] = {"interfaces": {"eth0": {"addresses": [a["client"] + "/30"]}}}
        hosts["s%d" % i] = {"interfaces": {"eth0": {"addresses": [a["server"] + "/24"]}},
                            "routes": [{"to": "default", "via": a["gateway_in"]}]}
        links += [["c%d:eth0" % i, "gw%d:eth0" % i], ["gw%d:eth1" % i, "s%d:eth0" % i]]
    return {"name": "fleet", "description": "%d gateways, each with a client and a server" % n,
            "hosts": hosts, "links": links}


def tables(i):
    """gwI's desired tables (the gateway role's variables)."""
    a = addresses(i)
    return {"gateway_portfw": [{"protocol": "tcp", "local_address": a["gateway_out"], "local_port": PORT,
                                "backends": [{"address": a["server"], "port": PORT}]}],
            "gateway_masquerade": [{"name": "inside", "source": a["inside_net"]}]}


def snapshot(dest):
    """Copy the collection to dest/ansible_collections/ipmasq/gateway; returns dest.

    Both runs converge to this copy, not to the working tree: an agent file edited in
    between would (rightly) make the re-run copy it and restart the agent."""
    root = os.path.join(dest, "ansible_collections", "ipmasq", "gateway")
    os.makedirs(root)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in COLLECTION_PARTS:
        src = os.path.join(REPO, part)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(root, part), ignore=skip)
        elif os.path.exists(src):
            shutil.copy2(src, root)
    return dest


def inventory(collection, prefix, n):
    """Group `gateways`: one host per gateway namespace, its agent's files under the lab's
    file area exactly as inventory/lab.yml lays them out (its gateway vars are reused
    verbatim), and its own tables as host vars."""
    with open(os.path.join(collection, "inventory", "lab.yml")) as f:
        lab_inv = yaml.safe_load(f)["all"]["children"]["lab"]
    hosts = {}
    for i in range(n):
        host = "gw%d" % i
        hosts[host] = dict({"ansible_host": "%s-%s" % (prefix, host),
                            "lab_run_dir": "/run/ipmasq-lab/%s/%s" % (prefix, host)}, **tables(i))
    group_vars = dict(lab_inv["vars"], **lab_inv["children"]["gateways"]["vars"])
    return {"all": {"children": {"gateways": {"hosts": hosts, "vars": group_vars}}}}


RECAP_LINE = re.compile(r"^(\S+)\s*:\s*(ok=.*)$")


def recap(stdout):
    """PLAY RECAP -> {host: {"ok": int, "changed": int, "failed": int, ...}}."""
    out = {}
    for line in stdout.split("PLAY RECAP", 1)[-1].splitlines():
        m = RECAP_LINE.match(line.strip())
        if m:
            out[m.group(1)] = {k: int(v) for k, v in (kv.split("=", 1) for kv in m.group(2).split())}
    return out


def ansible_env(collections, forks):
    env = dict(os.environ)
    env.update({"ANSIBLE_COLLECTIONS_PATH": collections, "ANSIBLE_FORKS": str(forks),
                "ANSIBLE_PIPELINING": "1", "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_STDOUT_CALLBACK": "default", "ANSIBLE_HOST_KEY_CHECKING": "0",
                "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_DEPRECATION_WARNINGS": "0"})
    return env


def kill_tree(pid):
    """SIGKILL `pid` and all its descendants. Not its process group: ansible's workers
    setsid() themselves (WorkerProcess._detach), and one orphaned mid-task blocks for
    ever on its result pipe. Everything is stopped first, so nothing forks meanwhile."""
    stopped = set()
    while True:
        new = set(common.tree_pids(pid)) - stopped
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped:
        _signal(p, signal.SIGKILL)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def converge(collections, inventory_path, extra, forks, timeout):
    """One `ansible-playbook playbooks/site.yml` run (of the collection in `collections`),
    killed with all its processes after `timeout` s; returns (wall seconds,
    per-host recap). Raises on failure."""
    site = os.path.join(collections, "ansible_collections", "ipmasq", "gateway", "playbooks", "site.yml")
    argv = [os.path.join(common.VENV_BIN, "ansible-playbook"), "-i", inventory_path, site, "-e", json.dumps(extra)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ansible_env(collections, forks), cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise RuntimeError("ansible-playbook site.yml did not finish within %d s" % timeout) from None
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
        raise
    seconds = time.monotonic() - t0
    hosts = recap(stdout)
    bad = [h for h, r in hosts.items() if r.get("failed") or r.get("unreachable")]
    if proc.returncode != 0 or bad or not hosts:
        raise RuntimeError("ansible-playbook site.yml failed (rc %d, hosts %s):\n%s\n%s"
                           % (proc.returncode, bad, stdout[-3000:], stderr[-1500:]))
    return seconds, hosts


FLOOR_PLAY = [{"name": "Ansible's floor: one ping per gateway", "hosts": "gateways",
               "gather_facts": False, "tasks": [{"name": "Ping", "ansible.builtin.ping": {}}]}]


def floor(collections, inventory_path, forks, timeout):
    """Wall seconds of FLOOR_PLAY over the same inventory, connection and forks."""
    play = os.path.join(os.path.dirname(inventory_path), "fleet-floor.yml")
    if not os.path.exists(play):
        with open(play, "w") as f:
            yaml.safe_dump(FLOOR_PLAY, f, sort_keys=False)
    argv = [os.path.join(common.VENV_BIN, "ansible-playbook"), "-i", inventory_path, play]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ansible_env(collections, forks), cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    seconds = time.monotonic() - t0
    hosts = recap(stdout)
    if proc.returncode != 0 or not hosts or any(r.get("failed") or r.get("unreachable") for r in hosts.values()):
        raise RuntimeError("floor play failed (rc %d):\n%s\n%s" % (proc.returncode, stdout[-2000:], stderr[-1000:]))
    return seconds


def probe(lab, i):
    """gwI's PORTFW and masquerade rule, with real connections (identity servers up)."""
    from ipmasq_lab import probes
    a = addresses(i)
    t0 = time.monotonic()
    conns = probes.connect_many(lab, "c%d" % i, a["gateway_out"], PORT, count=PROBE_CONNECTIONS, timeout=2.0)
    portfw_ok = all(c.ok and c.backend == "s%d" % i and c.seen_source_address == a["client"]
                    and (c.seen_destination_address, c.seen_destination_port) == (a["server"], PORT)
                    for c in conns)
    out = probes.connect_many(lab, "s%d" % i, a["client"], CLIENT_PORT, count=1, timeout=2.0)[0]
    masq_ok = out.ok and out.backend == "c%d" % i and out.seen_source_address == a["gateway_out"]
    return {"gateway": "gw%d" % i, "ok": portfw_ok and masq_ok, "portfw_ok": portfw_ok,
            "masquerade_ok": masq_ok, "backends": [c.backend for c in conns],
            "seen_sources": sorted({c.seen_source_address for c in conns if c.seen_source_address}),
            "errors": [c.error for c in conns + [out] if c.error],
            "masquerade_seen_source": out.seen_source_address,
            "seconds": round(time.monotonic() - t0, 3)}


def fleet_lab(n=DEFAULT_GATEWAYS, forks=10, serial=None, timeout=None):
    """Build, converge, probe, re-converge, tear down; returns the result document."""
    import ipmasq_lab
    from ipmasq_lab import probes, registry
    spec = fleet_spec(n)
    timeout = timeout or max(600, 30 * n)
    extra = {"rollout_serial": int(serial) if str(serial).isdigit() else serial} if serial else {}
    t0 = time.monotonic()
    with ipmasq_lab.lab(spec) as lab:
        files = registry.files_dir(lab.prefix)
        try:
            lab_up_s = time.monotonic() - t0
            log("fleet lab %s up: %d gateways, %d namespaces in %.1f s", lab.prefix, n, len(lab.hosts), lab_up_s)
            collections = snapshot(os.path.join(files, "fleet-collection"))
            inv = os.path.join(files, "fleet-inventory.yml")
            with open(inv, "w") as f:
                yaml.safe_dump(inventory(os.path.join(collections, "ansible_collections", "ipmasq", "gateway"),
                                         lab.prefix, n), f, sort_keys=False)

            # Servers first: site.yml's post-change check connects to every PORTFW backend.
            t = time.monotonic()
            for i in range(n):
                probes.serve_identity(lab, "s%d" % i, PORT, lifetime=3 * timeout)
                probes.serve_identity(lab, "c%d" % i, CLIENT_PORT, lifetime=3 * timeout)
            servers_s = time.monotonic() - t

            floors = [floor(collections, inv, forks, timeout)]
            first_s, first = converge(collections, inv, extra, forks, timeout)
            log("first run: %.1f s, changed %d", first_s, sum(r["changed"] for r in first.values()))
            floors.append(floor(collections, inv, forks, timeout))

            t = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                checks = list(pool.map(lambda i: probe(lab, i), range(n)))
            probe_s = time.monotonic() - t
            log("probes: %d/%d gateways ok in %.1f s", sum(c["ok"] for c in checks), n, probe_s)

            rerun_s, rerun = converge(collections, inv, extra, forks, timeout)
            log("re-run: %.1f s, changed %d", rerun_s, sum(r["changed"] for r in rerun.values()))
            floors.append(floor(collections, inv, forks, timeout))
            floor_s = common.median(floors)
            log("floor (median of %s): %.2f s; first run %.1fx, re-run %.1fx",
                ", ".join("%.2f" % x for x in floors), floor_s, first_s / floor_s, rerun_s / floor_s)
        finally:
            lab.down()   # kills every agent the role started in the lab's namespaces
            shutil.rmtree(files, ignore_errors=True)

    rows = [{"gateway": c["gateway"], "first_changed": first.get(c["gateway"], {}).get("changed"),
             "rerun_changed": rerun.get(c["gateway"], {}).get("changed"), "probe": c} for c in checks]
    data = {
        "method": {"gateways": n, "namespaces": 3 * n, "forks": forks,
                   "rollout_serial": serial or "site.yml default [1, '25%', '100%']",
                   "playbook": "playbooks/site.yml (gateway role + tables + post-change check) of a "
                               "snapshot of the collection taken at start",
                   "connection": "ipmasq.gateway.netns", "pipelining": True,
                   "tables_per_gateway": "1 PORTFW key + 1 masquerade rule",
                   "probe": "%d connections cI -> gwI:%d (answered by sI, cI's address kept) + 1 "
                            "connection sI -> cI:%d (gwI's address seen)" % (PROBE_CONNECTIONS, PORT, CLIENT_PORT),
                   "timing": "ansible-playbook wall time, start-up included; timeout %d s" % timeout,
                   "floor": "median of 3 runs of one play with one ansible.builtin.ping per gateway "
                            "(same inventory, connection, forks), interleaved with the converges"},
        "summary": {"first_s": first_s, "rerun_s": rerun_s, "floor_s": floor_s, "floor_samples_s": floors,
                    "first_x_floor": first_s / floor_s, "rerun_x_floor": rerun_s / floor_s,
                    "per_gateway_first_s": first_s / n, "per_gateway_rerun_s": rerun_s / n,
                    "first_changed": sum(r["changed"] for r in first.values()),
                    "rerun_changed": sum(r["changed"] for r in rerun.values()),
                    "probes_ok": sum(c["ok"] for c in checks), "lab_up_s": lab_up_s,
                    "servers_start_s": servers_s, "probe_s": probe_s},
        "gateways": rows,
        "targets": {
            "every gateway converged by one site.yml run": len(first) == n,
            "every gateway's probe passes (PORTFW to its own server, client address kept; masquerade)":
                all(c["ok"] for c in checks),
            "re-run reports changed=0 on every gateway": len(rerun) == n and all(
                r["changed"] == 0 for r in rerun.values()),
        },
    }
    if n == 10:  # the targets are set at 10 gateways
        data["targets"]["first run <= 10x Ansible's floor (10 gateways)"] = first_s <= 10 * floor_s
        data["targets"]["re-run <= 5x Ansible's floor (10 gateways)"] = rerun_s <= 5 * floor_s
    return data


def medians_of(runs):
    """One document for R runs of fleet_lab(): every summary figure the median of the R,
    the ratios the medians of each run's own ratio, targets true only when true in all."""
    data = dict(runs[-1])
    data["summary"] = dict((k, common.median([r["summary"][k] for r in runs]))
                           for k, v in runs[-1]["summary"].items() if isinstance(v, (int, float)))
    data["summary"]["floor_samples_s"] = [x for r in runs for x in r["summary"]["floor_samples_s"]]
    data["runs"] = [r["summary"] for r in runs]
    data["targets"] = dict((k, all(r["targets"][k] for r in runs)) for k in runs[-1]["targets"])
    data["method"] = dict(runs[-1]["method"], repeats=len(runs),
                          statistics="median over %d lab builds (shared 2-core machine)" % len(runs))
    return data


def growth(small, large):
    """How the fleet's time grows from `small` to `large` gateways (two medians_of()
    documents measured in the same invocation): the ratios of their wall times, and the
    target that growth stays within 4.5x for 4x the gateways (no superlinear growth)."""
    a, b = small["summary"], large["summary"]
    n, m = small["method"]["gateways"], large["method"]["gateways"]
    ratios = {"gateways": [n, m], "first_s": [a["first_s"], b["first_s"]], "rerun_s": [a["rerun_s"], b["rerun_s"]],
              "floor_s": [a["floor_s"], b["floor_s"]], "first_ratio": b["first_s"] / a["first_s"],
              "rerun_ratio": b["rerun_s"] / a["rerun_s"]}
    limit = 4.5 * m / (4 * n)
    target = "%d gateways <= %.2gx the time of %d (first run and re-run)" % (m, limit, n)
    return ratios, {target: ratios["first_ratio"] <= limit and ratios["rerun_ratio"] <= limit}


def run(quick=False):
    """bench.run's interface: 10 gateways in quick mode, else DEFAULT_GATEWAYS."""
    return fleet_lab(10 if quick else DEFAULT_GATEWAYS)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_lab", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--gateways", type=int, default=DEFAULT_GATEWAYS, help="fleet size (1-%d)" % MAX_GATEWAYS)
    parser.add_argument("--forks", type=int, default=10, help="ansible forks (default 10)")
    parser.add_argument("--serial", default=None,
                        help="rollout_serial for site.yml (e.g. 100%%); default: site.yml's own batches")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per ansible-playbook run")
    parser.add_argument("--repeat", type=int, default=1, help="build the lab this many times; figures are medians")
    parser.add_argument("--grow-to", type=int, default=None, metavar="N",
                        help="also measure N gateways in the same run (alternating with --gateways) and "
                             "report how the time grows")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate bench/REPORT.md")
    args = parser.parse_args(argv)
    if not 1 <= args.gateways <= MAX_GATEWAYS:
        parser.error("--gateways %d: must be from 1 to %d" % (args.gateways, MAX_GATEWAYS))
    if args.forks < 1:
        parser.error("--forks %d: must be at least 1" % args.forks)
    if os.geteuid() != 0:
        parser.error("must run as root (namespaces, nftables)")
    if args.repeat < 1:
        parser.error("--repeat %d: must be at least 1" % args.repeat)
    if args.grow_to is not None and not args.gateways < args.grow_to <= MAX_GATEWAYS:
        parser.error("--grow-to %d: must be more than --gateways and at most %d" % (args.grow_to, MAX_GATEWAYS))
    t0 = time.monotonic()
    runs, grown = [], []
    for _run in range(args.repeat):
        runs.append(fleet_lab(args.gateways, args.forks, args.serial, args.timeout))
        if args.grow_to:
            grown.append(fleet_lab(args.grow_to, args.forks, args.serial, args.timeout))
    data = medians_of(runs)
    if grown:
        data["growth"], target = growth(data, medians_of(grown))
        data["targets"].update(target)
        log("%d -> %d gateways: first run %.2fx, re-run %.2fx the time" % (
            args.gateways, args.grow_to, data["growth"]["first_ratio"], data["growth"]["rerun_ratio"]))
    data["wall_s"] = time.monotonic() - t0
    common.write_result("fleet_lab", False, data)
    # A dated copy per fleet size, so the 10- and 40-gateway figures sit side by side.
    common.write_result("fleet_lab-%dgw-%s" % (args.gateways, time.strftime("%Y%m%d", time.gmtime())), False, data)
    s = data["summary"]
    print("fleet lab, %d gateways (median of %d): first run %.1f s = %.1fx the floor, re-run %.1f s = %.1fx "
          "the floor (floor %.2f s: one ping per gateway), changed %d / %d, probes ok %d/%d"
          % (args.gateways, args.repeat, s["first_s"], s["first_x_floor"], s["rerun_s"], s["rerun_x_floor"],
             s["floor_s"], s["first_changed"], s["rerun_changed"], s["probes_ok"], args.gateways))
    if not args.no_report:
        try:
            import matplotlib  # noqa: F401  (the other sections' plots; bench/requirements.txt)
        except ImportError:
            log("matplotlib missing: REPORT.md not regenerated (scripts/bench.sh --report does it)")
        else:
            from bench import report
            report.main()
    return 0 if all(data["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
