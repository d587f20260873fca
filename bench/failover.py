"""Benchmark 6: failover latency. The seed's recipe: a mark's backends all pref 0 (the
head keeps every connection) and, when the head fails, forced scheduling (`mfw -S`).

A client in the lab opens a TCP connection to the gateway every 5 ms (each answered by
an identity server naming its host) and records when each answer came, on
CLOCK_MONOTONIC (one clock for every namespace). The head's server is killed, then
scheduling is forced at once, either with `masqctl mfw -S -m 7` or with the module
(`ansible -m ipmasq.gateway.masq_mfw -a schedule=7`). Measured: failure -> first
answer from the next backend, and the forcing command's own wall time. Detection of
the failure is the caller's job here (a health check, playbooks/failover.yml); the
AUTOFW detection latency slot is filled by the AUTOFW work later.
"""

import json
import os
import subprocess
import time

from bench import common
from bench.common import GATEWAY_OUT, log, median

MARK, PORT = 7, 8000
SERVERS = {"server": "10.16.0.10", "server2": "10.16.0.11"}


def run(quick=False):
    trials = 3 if quick else 10
    spec = common.triple_spec("failover", extra_servers=1)
    out = {"masqctl": [], "module": []}
    with common.Workdir() as work, _lab(spec) as lab:
        agent = common.Agent(lab, "gateway", work)
        agent.start()
        with agent.client() as c:
            c.request("set", table="marks", entries=[{"name": "svc", "mark": MARK, "protocol": "tcp",
                                                      "destination": GATEWAY_OUT + "/32",
                                                      "destination_ports": [PORT]}])
            c.request("set", table="mfw", entries=[{"mark": MARK, "backends": [
                {"address": SERVERS["server"], "port": PORT, "pref": 0},
                {"address": SERVERS["server2"], "port": PORT, "pref": 0}]}])
        servers = {h: _identity(lab, h) for h in SERVERS}
        prober = os.path.join(work, "prober.py")
        with open(prober, "w") as f:
            f.write(common.PROBER)
        inv = os.path.join(work, "inv.ini")
        with open(inv, "w") as f:
            f.write("gw ansible_host=%s ansible_connection=ipmasq.gateway.netns ansible_python_interpreter=%s\n"
                    % (lab.netns("gateway"), common.PYTHON))
        for i in range(trials * 2):
            method = "masqctl" if i % 2 == 0 else "module"
            head = _head(lab, prober)
            if head is None or head != "server":
                # bring the first backend back to the head: restart it, force scheduling once
                _force(agent, method="masqctl", inv=inv, work=work)
                head = _head(lab, prober)
            if head != "server":
                log("failover trial %d: head is %s, skipped", i, head)
                continue
            probe = lab.spawn("client", [common.PYTHON, prober, GATEWAY_OUT, str(PORT), "3.0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(0.5)
            t_fail = time.monotonic()
            servers["server"].terminate()
            servers["server"].wait(5)
            t_cmd0 = time.monotonic()
            _force(agent, method, inv, work)
            t_cmd1 = time.monotonic()
            samples = json.loads(probe.communicate(timeout=30)[0])
            after = [s for s in samples if s[0] >= t_fail and s[2] == "server2"]
            failures = [s for s in samples if s[2] is None]
            row = {"failure_to_next_backend_ms": (after[0][1] - t_fail) * 1e3 if after else None,
                   "command_ms": (t_cmd1 - t_cmd0) * 1e3, "failed_probes": len(failures),
                   "probes": len(samples)}
            out[method].append(row)
            log("failover %s trial %d: %s", method, i, row)
            servers["server"] = _identity(lab, "server")
        agent.stop()
    summary = {m: {"failure_to_next_backend_ms": median([r["failure_to_next_backend_ms"] for r in rows]),
                   "command_ms": median([r["command_ms"] for r in rows]),
                   "failed_probes": median([r["failed_probes"] for r in rows])} for m, rows in out.items()}
    summary["autofw_detection"] = None  # slot: filled by the AUTOFW control-port detection work
    return {"method": {"trials_per_method": trials, "probe_interval_ms": 5, "statistic": "median"},
            "raw": out, "summary": summary}


def _identity(lab, host):
    proc = lab.spawn(host, [common.PYTHON, "-m", "ipmasq_lab.identity_server", "--name", host, "--port", str(PORT),
                            "--protocol", "tcp", "--lifetime", "600"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, cwd=common.REPO)
    common.wait_port(lab, "gateway", SERVERS[host], PORT)
    return proc


def _head(lab, prober):
    r = lab.run("client", [common.PYTHON, prober, GATEWAY_OUT, str(PORT), "0.05"], timeout=20)
    hosts = [s[2] for s in json.loads(r.stdout)]
    return hosts[-1] if hosts else None


def _force(agent, method, inv, work):
    if method == "masqctl":
        argv = [os.path.join(common.VENV_BIN, "masqctl"), "--socket", agent.socket, "mfw", "-S", "-m", str(MARK)]
    else:
        argv = [os.path.join(common.VENV_BIN, "ansible"), "-i", inv, "gw", "-m", "ipmasq.gateway.masq_mfw",
                "-a", "schedule=%d socket=%s" % (MARK, agent.socket)]
    env = dict(os.environ, ANSIBLE_LOCAL_TEMP=os.path.join(work, "ansible-tmp"), ANSIBLE_NOCOLOR="1")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError("forcing scheduling failed: %s %s" % (r.stdout[-500:], r.stderr[-500:]))


def _lab(spec):
    import ipmasq_lab
    return ipmasq_lab.lab(spec)


if __name__ == "__main__":
    import sys
    print(json.dumps(run(quick="--quick" in sys.argv)["summary"], indent=1))
