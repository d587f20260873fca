"""AUTOFW detection latency, end to end, with real packets (also for bench/).

    from autofw_latency import measure_detection_latency
    result = measure_detection_latency(lab, agent_socket)   # seed lab, masqd running

The external "streaming server" (the seed lab's `client`, 198.51.100.10) sends a fresh
UDP datagram (new socket, so a new conntrack entry) to the gateway's range every
`interval` seconds. The internal host `web1` then opens the TCP control connection.
The latency is the time from the control connection's SYN to the first datagram that
reached web1 (answered by its identity server): control packet seen -> inbound
forwarding ready, at `interval` resolution. All clocks are the machine's one
CLOCK_REALTIME (namespaces share it). The agent's own share (conntrack event received
-> element committed) is returned too, from `masqctl --json status`.

The caller provides a lab whose gateway runs masqd with a masquerade rule for the
inside network; this function adds (and removes) the AUTOFW entry itself.
"""

import json
import os
import subprocess
import sys
import time

PYTHON = sys.executable

# Runs in the server's namespace: fresh socket per datagram, then collect answers.
_BLASTER = r"""
import json, selectors, socket, sys, time
dst, port, interval, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
sent, first = {}, None
print(json.dumps({"ready": True}), flush=True)
end = time.time() + duration
while time.time() < end and first is None and len(sent) < 900:  # bounded: fds
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    t = time.time()
    try:
        s.sendto(b"latency", (dst, port))
    except OSError:
        s.close()
    else:
        sent[s] = t
        sel.register(s, selectors.EVENT_READ)
    deadline = time.time() + interval
    while time.time() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.time())):
            try:
                key.fileobj.recv(2048)
            except OSError:
                continue  # ICMP port unreachable: not forwarded (yet)
            if first is None or sent[key.fileobj] < first:
                first = sent[key.fileobj]
print(json.dumps({"first_forwarded": first, "sent": len(sent)}), flush=True)
"""

_CONTROL = r"""
import socket, sys, time
t = time.time()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
print(t, flush=True)
time.sleep(0.2)
s.close()
"""


def measure_detection_latency(lab, agent_socket, interval=0.001, duration=3.0, samples=3,
                              server="client", server_address="198.51.100.10",
                              gateway_address="198.51.100.1", inside="web1",
                              control_port=7070, low_port=6970, high_port=7170):
    """Returns {"samples": [seconds, ...], "agent": {...detection_latency from status}}."""
    from ipmasq_lab import probes

    def masqctl(*args):
        return lab.run("gateway", [PYTHON, "-m", "masqd.masqctl", "--socket", agent_socket] + list(args),
                       timeout=20, check=True).stdout

    results = []
    with probes.serve_identity(lab, server, control_port), \
            probes.serve_identity(lab, inside, low_port, "udp"):
        for _sample in range(samples):
            # a fresh entry each round: no recipient left from the previous one
            masqctl("autofw", "-A", "-r", "udp", str(low_port), str(high_port),
                    "-c", "tcp", str(control_port), "-t", "30")
            blaster = lab.spawn(server, [PYTHON, "-c", _BLASTER, gateway_address, str(low_port),
                                         str(interval), str(duration)],
                                stdout=subprocess.PIPE, text=True)
            try:
                assert json.loads(blaster.stdout.readline())["ready"]
                time.sleep(0.2)  # the blaster is sending: inbound is refused so far
                control = lab.run(inside, [PYTHON, "-c", _CONTROL, server_address, str(control_port)],
                                  timeout=10, check=True)
                started = float(control.stdout.split()[0])
                out, _stderr = blaster.communicate(timeout=duration + 5)
            finally:
                if blaster.poll() is None:
                    blaster.kill()
                    blaster.wait()
            report = json.loads(out.strip().splitlines()[-1])
            if report["first_forwarded"] is not None:
                results.append(max(0.0, report["first_forwarded"] - started))
            masqctl("autofw", "-D", "-r", "udp", str(low_port), str(high_port))
    status = json.loads(masqctl("--json", "status"))
    return {"samples": results, "agent": status.get("autofw_watcher", {}).get("detection_latency")}


if __name__ == "__main__":  # python tests/lab/autofw_latency.py  (root): one seed lab run
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tempfile

    import ipmasq_lab
    from masqd_agent import Agent

    with ipmasq_lab.lab("seed") as lab:
        agent = Agent(lab, tempfile.mkdtemp(prefix="masqd-latency-"))
        agent.start()
        try:
            agent.masqctl("masq", "-A", "-s", "10.16.0.0/24", "-j", "MASQ")
            print(json.dumps(measure_detection_latency(lab, agent.socket, samples=5), indent=2))
        finally:
            agent.stop()
