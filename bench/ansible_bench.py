"""Benchmark 5: Ansible.

  - N forwarding entries on one gateway namespace: one `ipmasq.gateway.masq_portfw`
    task (state overridden) vs the same DNATs via `ansible.builtin.iptables` in a loop
    (iptables-nft in the namespace); wall time of the first run and of the idempotent
    re-run, each ansible-playbook run timed whole (start-up included);
  - fleet converge: N gateway namespaces, each with its own masqd, one playbook run
    setting 20 PORTFW keys and one masquerade rule on every gateway (forks 10), first
    run and re-run.

Every host is a lab namespace reached with the ipmasq.gateway.netns connection.
"""

import json
import os
import subprocess

from bench import common
from bench.common import GATEWAY_OUT, SERVER, log

PORTFW_PLAY = """- hosts: gateways
  gather_facts: false
  tasks:
    - name: PORTFW entries via masqd
      ipmasq.gateway.masq_portfw:
        socket: "{{ masq_socket }}"
        state: overridden
        config: "{{ lookup('file', portfw_file) | from_json }}"
"""

IPTABLES_PLAY = """- hosts: gateways
  gather_facts: false
  tasks:
    - name: DNAT entries via iptables, one task item each
      ansible.builtin.iptables:
        table: nat
        chain: PREROUTING
        protocol: tcp
        destination: "{{ item.local_address }}"
        destination_port: "{{ item.local_port }}"
        jump: DNAT
        to_destination: "{{ item.backends[0].address }}:{{ item.backends[0].port }}"
      loop: "{{ lookup('file', portfw_file) | from_json }}"
"""

FLEET_PLAY = """- hosts: gateways
  gather_facts: false
  tasks:
    - name: PORTFW keys
      ipmasq.gateway.masq_portfw:
        socket: "{{ masq_socket }}"
        state: overridden
        config: "{{ lookup('file', portfw_file) | from_json }}"
    - name: Replies from the inside network masqueraded
      ipmasq.gateway.masq_masquerade:
        socket: "{{ masq_socket }}"
        state: overridden
        config:
          - {name: inside, source: 10.16.0.0/24}
"""


def entries(n):
    return [{"protocol": "tcp", "local_address": GATEWAY_OUT, "local_port": 10000 + i,
             "backends": [{"address": SERVER, "port": 20000 + i}]} for i in range(n)]


def _env(work):
    env = dict(os.environ)
    env.update({"ANSIBLE_LOCAL_TEMP": os.path.join(work, "ansible-tmp"), "ANSIBLE_FORKS": "10",
                "ANSIBLE_PIPELINING": "1", "ANSIBLE_HOST_KEY_CHECKING": "0",
                "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_DEPRECATION_WARNINGS": "0"})
    return env


def playbook(work, inventory, play, extra, timeout):
    """One ansible-playbook run; returns (seconds, changed count)."""
    path = os.path.join(work, "play-%d.yml" % abs(hash(play)))
    with open(path, "w") as f:
        f.write(play)
    t0 = common.now()
    r = subprocess.run([os.path.join(common.VENV_BIN, "ansible-playbook"), "-i", inventory, path,
                        "-e", json.dumps(extra)], capture_output=True, text=True, timeout=timeout,
                       env=_env(work), cwd=work, check=False)
    seconds = common.now() - t0
    # PLAY RECAP lines: "gw : ok=1 changed=1 unreachable=0 failed=0 ..."
    recap = [dict(kv.split("=", 1) for kv in line.split(":", 1)[1].split() if "=" in kv)
             for line in r.stdout.split("PLAY RECAP", 1)[-1].splitlines() if " ok=" in line]
    changed = sum(int(x["changed"]) for x in recap) if recap else None
    failed = sum(int(x["unreachable"]) + int(x["failed"]) for x in recap) if recap else 1
    if r.returncode != 0 or failed:
        raise RuntimeError("ansible-playbook failed (rc %d): %s %s" % (r.returncode, r.stdout[-1500:], r.stderr[-1500:]))
    return seconds, changed


def inventory_file(work, name, hosts):
    """hosts: {inventory name: (netns, socket)}"""
    lines = ["[gateways]"]
    for host, (netns, sock) in hosts.items():
        lines.append("%s ansible_host=%s masq_socket=%s" % (host, netns, sock))
    lines += ["[gateways:vars]", "ansible_connection=ipmasq.gateway.netns",
              "ansible_python_interpreter=%s" % common.PYTHON]
    path = os.path.join(work, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def single_gateway(quick):
    module_sizes = [10, 100, 1000]
    iptables_sizes = [10, 100] if quick else [10, 100, 1000]
    rows = []
    with common.Workdir() as work, _lab(common.triple_spec("ansible")) as lab:
        agent = common.Agent(lab, "gateway", work)
        agent.start()
        inv = inventory_file(work, "single.ini", {"gw": (lab.netns("gateway"), agent.socket)})
        for n in module_sizes:
            pf = os.path.join(work, "portfw-%d.json" % n)
            with open(pf, "w") as f:
                json.dump(entries(n), f)
            extra = {"portfw_file": pf}
            row = {"entries": n}
            runs = [("masq_portfw", PORTFW_PLAY)]
            if n in iptables_sizes:
                runs.append(("iptables", IPTABLES_PLAY))
            # First runs, then re-runs, interleaved.
            for phase in ("first", "rerun"):
                for name, play in (runs if phase == "first" else runs[::-1]):
                    s, changed = playbook(work, inv, play, extra, timeout=3600)
                    row["%s_%s_s" % (name, phase)] = s
                    row["%s_%s_changed" % (name, phase)] = changed
                    log("ansible %s %d entries %s run: %.1f s (changed %s)", name, n, phase, s, changed)
            # Clean slate for the next size.
            with agent.client() as c:
                c.request("flush", table="portfw")
            lab.run("gateway", ["iptables", "-t", "nat", "-F", "PREROUTING"], timeout=60)
            for phase in ("first", "rerun"):
                row["speedup_" + phase] = common.ratio(row.get("iptables_%s_s" % phase), row["masq_portfw_%s_s" % phase])
            rows.append(row)
        agent.stop()
        lab.run("gateway", ["nft", "flush", "ruleset"], timeout=60)
    return rows


def fleet(quick):
    sizes = [5, 10] if quick else [5, 10, 20, 40]
    rows = []
    for n in sizes:
        hosts = {"gw%d" % i: {"interfaces": {"eth0": {"addresses": ["10.20.%d.%d/16" % (i // 200, 1 + i % 200)]}}}
                 for i in range(n)}
        spec = {"name": "fleet", "hosts": hosts, "bridges": {"fleet": ["gw%d:eth0" % i for i in range(n)]}}
        with common.Workdir() as work, _lab(spec) as lab:
            agents = {}
            for host in hosts:
                agents[host] = common.Agent(lab, host, work)
                agents[host].start()
            inv = inventory_file(work, "fleet.ini", {h: (lab.netns(h), a.socket) for h, a in agents.items()})
            pf = os.path.join(work, "portfw.json")
            with open(pf, "w") as f:
                json.dump(entries(20), f)
            first, changed1 = playbook(work, inv, FLEET_PLAY, {"portfw_file": pf}, timeout=1800)
            rerun, changed2 = playbook(work, inv, FLEET_PLAY, {"portfw_file": pf}, timeout=1800)
            log("fleet %d gateways: first %.1f s (changed %s), re-run %.1f s (changed %s)", n, first, changed1,
                rerun, changed2)
            rows.append({"gateways": n, "first_s": first, "rerun_s": rerun, "first_changed": changed1,
                         "rerun_changed": changed2, "per_gateway_first_s": first / n})
            for a in agents.values():
                a.stop()
    return rows


def run(quick=False):
    single = single_gateway(quick)
    fleet_rows = fleet(quick)
    biggest = max((r for r in single if r.get("speedup_first")), key=lambda r: r["entries"])
    targets = {
        "masq_portfw >= 20x faster than iptables loop, first run (%d entries)" % biggest["entries"]:
            (biggest["speedup_first"] or 0) >= 20,
        "masq_portfw >= 20x faster than iptables loop, re-run (%d entries)" % biggest["entries"]:
            (biggest["speedup_rerun"] or 0) >= 20,
        "re-runs change nothing": all(r.get("masq_portfw_rerun_changed") == 0 for r in single)
        and all(r["rerun_changed"] == 0 for r in fleet_rows),
    }
    return {"method": {"forks": 10, "pipelining": True, "connection": "ipmasq.gateway.netns",
                       "fleet_keys_per_gateway": 20, "timing": "ansible-playbook wall time, start-up included"},
            "single_gateway": single, "fleet": fleet_rows,
            "ratios": {"speedup_first_at_%d" % biggest["entries"]: biggest["speedup_first"],
                       "speedup_rerun_at_%d" % biggest["entries"]: biggest["speedup_rerun"]},
            "targets": targets}


def _lab(spec):
    import ipmasq_lab
    return ipmasq_lab.lab(spec)


if __name__ == "__main__":
    import sys
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
