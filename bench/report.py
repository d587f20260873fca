"""bench/results/*.json -> bench/REPORT.md with tables and PNG plots (matplotlib, Agg).

    python -m bench.report
"""

import json
import os
import re

from bench.common import REPO, RESULTS

BENCH = os.path.join(REPO, "bench")
PLOTS = os.path.join(RESULTS, "plots")

# What a missed target means and what would close the gap (keyed by target prefix).
GAPS = {
    "socket set of": (
        "PORTFW changes already go to the kernel as one netlink batch (no libnftables "
        "parse); what is left is Python: the request's JSON parse and depth check, validation, "
        "render + diff, the batch's encoding (py-spy profile of this run: "
        "`bench/results/profiles/pyspy_socket_set_100000.txt`)."),
    "restart with": (
        "A restart with the table in place replaces the rest of the table while the PORTFW "
        "maps keep forwarding, then refills them in one batch (docs/architecture.md, \"A "
        "re-sync goes in two steps\"); the ratio moves with `nft -f`'s own time, 1.5-2.0 s "
        "between runs on this machine."),
    "start with": (
        "A start loads the state file, validates it, loads the rest of the table by "
        "libnftables and the PORTFW keys as one netlink batch; see the set's profile for the "
        "Python part."),
    "list of": (
        "The direct maps are in 16 shards (the kernel's dump walk, ~0.01 s) and their counters "
        "are read by one scan; what is left is building and encoding ~17 MB of rows in Python "
        "while the client decodes the previous part."),
    "RSS at": (
        "After a whole-table socket `set` the agent's RSS stays above the size of the loaded "
        "table when allocations of several threads left glibc arenas fragmented; the agent "
        "runs with one malloc arena (nft.one_malloc_arena) and trims the heap after large "
        "requests."),
    "new connections/s at": (
        "Over the runs of 2026-12-06 this ratio was 1.02, 0.99, 0.90, 0.87 and, after the "
        "direct maps were sharded, 1.03 (`python -m bench.run --only million`). A routed "
        "connection crosses the same prerouting lookups (they miss), so a cost of the maps' "
        "size alone cancels out; what only PORTFW pays is the hit (the element's counter and "
        "the NAT). The spread is this machine's noise on two shared cores as far as measured."),
    "peak RSS during": (
        "The request's text and parsed objects and the canonical entries are alive at once "
        "(the elements no longer pass through libnftables)."),
    "one two-backend key add/delete": (
        "See the multi-backend section: PORTFW changes go by netlink batch, without libnftables; "
        "what is left is the kernel's validation of the shard table a `goto` add goes to, which "
        "grows with that shard's keys (an eighth of the multi-backend keys)."),
    "shard tables' hooks": (
        "Each shard table's prerouting chain is one more base chain a connection's first packet "
        "passes (two map lookups that miss); established packets pass no NAT chain. The spread "
        "between rounds is this machine's noise on two shared cores."),
    "throughput_portfw_vs_socat": (
        "PORTFW itself runs at the routing ceiling (see the routing ratio); the ratio to socat "
        "is bounded by routing/socat on this machine. socat here moves ~3 Gbit/s (splice-less "
        "read/write but 64 KiB buffers on a fast veth), so even plain routing is under 5x socat "
        "in some runs. Nothing in masqd can close it: the kernel DNAT path adds no measurable "
        "per-packet work. A faster machine with more cores widens the gap (socat is one "
        "process per connection, bound to one core)."),
    "apply ": (
        "Where the time goes is in the cProfile (`%(profile)s`): validation, render + diff, "
        "the libnftables transaction (~0.9 s, the floor), JSON parsing. docs/architecture.md "
        "(Performance) has the breakdown and what was done about it."),
    "full table fits one socket request": (
        "The daemon refuses requests over masqd/server.py MAX_REQUEST; a 100,000-key `set` is "
        "~14 MB of JSON."),
    "add/remove one key": (
        "See the per-op timings; single-key ops diff one fragment, so their cost should not "
        "depend on the table size."),
    "per-packet": (
        "The per-packet path (mark restore: one set lookup on the ct mark) does not depend on "
        "the key count; a miss here is run-to-run noise of iperf3 on a shared 2-core machine. "
        "Re-run the full suite (5 runs per size)."),
    "conn rate ": (
        "New connections take one hash-map lookup per key family; a miss at this size is "
        "noise unless the linear chain shows the same slope."),
    "masq_portfw >= 20x": (
        "The module's time is dominated by ansible-playbook start-up (~0.8 s); the iptables "
        "loop pays ~0.24 s per entry. At 100 entries (quick mode) the ratio is ~30x; it "
        "grows with the entry count."),
    "re-run reports changed=0": (
        "The per-gateway table shows which gateways changed on the re-run; run "
        "`ansible-playbook --diff` of the same inventory against a lab left up to see which task. "
        "The fleet lab converges a snapshot of the collection, so edits to the working tree "
        "during the run cannot cause it."),
    "1,000 checked backends": (
        "Each TCP check is a socket, a connect through the gateway's own output hooks and conntrack, "
        "and a reset: about half the cost is the kernel's (sys time), half Python's per-check work "
        "(bench/results/health.json has both). Sharing one probe among keys that check the same "
        "address and port, or a C helper, would close it; HAProxy's figure is in the same table."),
    "conn_rate portfw ahead": ("PORTFW adds one conntrack NAT binding per connection; a user-space "
                               "redirector adds two sockets, two handshakes and a process wakeup."),
}


def load():
    out = {}
    if not os.path.isdir(RESULTS):
        return out
    for name in sorted(os.listdir(RESULTS)):
        if name.endswith(".json"):
            with open(os.path.join(RESULTS, name)) as f:
                doc = json.load(f)
            out[doc["benchmark"]] = doc
    return out


def f(value, fmt="%.2f"):
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    return fmt % value


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_bar(name, labels, values, ylabel, title):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = ["#4477aa" if label in ("portfw", "routing") else "#bbbbbb" for label in labels]
    ax.bar(labels, [v or 0 for v in values], color=colors)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        if v is not None:
            ax.text(i, v, "%.3g" % v, ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path = os.path.join(PLOTS, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.relpath(path, BENCH)


def plot_lines(name, series, xlabel, ylabel, title, logx=False, logy=False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, xs, ys in series:
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(PLOTS, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.relpath(path, BENCH)


def targets_section(docs):
    rows, misses = [], []
    for bench, _section in _sections():
        doc = docs.get(bench)
        if not doc:
            continue
        for target, ok in doc.get("targets", {}).items():
            rows.append((bench, target, "met" if ok else "**MISSED**"))
            if not ok:
                misses.append((bench, target, doc))
    out = ["## Targets\n", table(["benchmark", "target", "result"], rows)]
    if misses:
        out.append("\n### Missed targets: why, and what would close the gap\n")
        for bench, target, doc in misses:
            text = next((t for k, t in GAPS.items() if target.startswith(k) or k in target), "")
            text = text % {"profile": doc.get("method", {}).get("profile", "bench/results/profiles/")}
            out.append("- **%s: %s.** %s\n" % (bench, target, text))
    return "".join(out)


def dataplane_section(doc):
    s, r = doc["summary"], doc["ratios"]
    paths = list(s)
    out = ["## 1–2. Data plane: throughput and new connections per second by path\n\n",
           "Lab: client → gateway → server (veth). %s\n\n" % _method(doc),
           table(["path", "throughput Gbit/s", "vs portfw", "new conn/s", "vs portfw",
                  "machine CPU µs/conn", "softirq µs/conn", "redirector process CPU µs/conn"],
                 [(p, f(s[p]["throughput_gbps"]), f(_inv(r.get("throughput_portfw_vs_" + p)), "%.2fx") if p != "portfw" else "1",
                   f(s[p]["conn_per_s"], "%.0f"), f(_inv(r.get("conn_rate_portfw_vs_" + p)), "%.2fx") if p != "portfw" else "1",
                   f(s[p]["cpu_busy_us_per_conn"], "%.0f"), f(s[p]["cpu_softirq_us_per_conn"], "%.0f"),
                   f(s[p]["cpu_proxy_us_per_conn"], "%.0f")) for p in paths]),
           "\nHeadline ratios (PORTFW ÷ other): " + ", ".join(
               "%s %s" % (k.replace("_portfw_vs_", " vs "), f(v, "%.2fx")) for k, v in r.items()) + "\n\n",
           "CPU method: machine-wide busy time (user+system+irq+softirq from /proc/stat) during "
           "each ab round ÷ connections completed, plus the redirector processes' own CPU "
           "(/proc/<pid>/stat utime+stime+reaped children). All namespaces share one kernel, so "
           "the gateway's softirq work cannot be separated from the client's and server's; the "
           "difference to the routing row is what the path adds per connection. Other work on "
           "this shared machine also lands in the machine-wide figure (hence medians).\n\n"]
    throughput = plot_bar("throughput_by_path.png", paths, [s[p]["throughput_gbps"] for p in paths],
                          "Gbit/s", "iperf3 TCP throughput by path (median)")
    connections = plot_bar("conn_rate_by_path.png", paths, [s[p]["conn_per_s"] for p in paths],
                           "connections/s", "New connections/s by path (ab, median)")
    out.append("![throughput](%s)\n" % throughput)
    out.append("![connections](%s)\n\n" % connections)
    return "".join(out)


def _inv(x):
    return None if x in (None, 0) else x


def scale_section(doc):
    sizes = doc["sizes"]
    ks = [row["keys"] for row in sizes]
    out = ["## 3. Rule-set scale: masqd maps vs a linear DNAT chain\n\n", _method(doc), "\n\n",
           table(["keys", "masqd conn/s", "linear conn/s", "masqd SYN→SYN-ACK µs", "linear SYN→SYN-ACK µs",
                  "routed SYN→SYN-ACK µs", "masqd Gbit/s (mark restore per packet)", "routed Gbit/s",
                  "masqd start s", "masqd RSS MiB", "nft -f linear s"],
                 [(r["keys"], f(r["masqd_conn"], "%.0f"), f(r["linear_conn"], "%.0f"), f(r["masqd_syn_us"], "%.1f"),
                   f(r["linear_syn_us"], "%.1f"), f(r.get("routing_syn_us"), "%.1f"), f(r["masqd_gbps"]),
                   f(r.get("routing_gbps")), f(r["masqd_start_s"]), f(r["masqd_rss_kib"] / 1024, "%.0f"),
                   f(r["linear_load_s"])) for r in sizes]),
           "\nThe per-packet ratio is given raw (masqd Gbit/s at the largest size / at 10 keys) and "
           "normalized (each divided by the routed flow measured in the same minute, which cancels "
           "the machine's drift between sizes); nothing on the per-packet path depends on the key count. "
           "Read each row against its routed columns, measured in the same minute: with quick mode's 2 "
           "rounds one disturbed minute on this shared 2-core machine can move a single cell.\n\n"
           "Ratios: " + ", ".join("%s %s" % (k, f(v, "%.3f")) for k, v in doc["ratios"].items()) + "\n\n",
           "Every probed flow carries a mark (classifier `bench-clients`, the last of 16), so each "
           "packet after the first takes masqd's restore rule; `marked_connections_seen` (conntrack "
           "entries with that mark after the iperf3 runs) proves it: %s.\n\n"
           % ", ".join("%d keys: %s" % (r["keys"], r.get("marked_connections_seen")) for r in sizes)]
    out.append("![scale](%s)\n" % plot_lines(
        "cost_vs_rules_conn.png", [("masqd (maps)", ks, [r["masqd_conn"] for r in sizes]),
                                   ("linear chain", ks, [r["linear_conn"] for r in sizes])],
        "PORTFW keys", "new connections/s", "Connection rate vs rule count", logx=True))
    out.append("![latency](%s)\n\n" % plot_lines(
        "cost_vs_rules_latency.png", [("masqd (maps)", ks, [r["masqd_syn_us"] for r in sizes]),
                                      ("linear chain", ks, [r["linear_syn_us"] for r in sizes]),
                                      ("routed, no NAT", ks, [r.get("routing_syn_us") for r in sizes])],
        "PORTFW keys", "SYN→SYN-ACK µs (median)", "First-packet latency vs rule count", logx=True, logy=True))
    return "".join(out)


def control_section(doc):
    s = doc["summary"]
    rows = [("apply %d keys from empty (in-process set: parse, validate, render, nft, snapshot)" % doc["method"]["keys"],
             f(s["apply_full_table_s"]) + " s"),
            ("add one key at %d loaded, in-process / via socket (median)" % doc["method"]["keys"],
             "%s / %s ms" % (f(s["add_one_median_ms"], "%.1f"), f(s["socket_add_one_median_ms"], "%.1f"))),
            ("remove one key, in-process / via socket (median)",
             "%s / %s ms" % (f(s["delete_one_median_ms"], "%.1f"), f(s["socket_delete_one_median_ms"], "%.1f"))),
            ("add one key via socket, p90", f(s["socket_add_one_p90_ms"], "%.1f") + " ms"),
            ("daemon start with the keys stored, until the socket answers: none in the kernel (a boot) / "
             "the table in the kernel (a restart)",
             "%s / %s s" % (f(s["daemon_start_with_keys_s"]), f(s.get("daemon_restart_with_keys_s")))),
            ("agent RSS with the keys loaded / after the single-key ops",
             "%s / %s MiB" % (f(s["daemon_rss_mib"], "%.0f"), f(s["daemon_rss_after_ops_mib"], "%.0f"))),
            ("flush the table via socket", f(s["socket_flush_s"]) + " s"),
            ("list the whole table via socket (runtime counters, reply decoded), streamed: alone / while keys "
             "are added; as one reply, alone",
             "%s / %s s; %s s" % (f(s.get("socket_list_s")), f(s.get("socket_list_during_adds_s")),
                                  f(s.get("socket_list_one_reply_s")))),
            ("add one key via socket while that list runs (median, count)",
             "%s ms (%s adds)" % (f(s.get("add_one_during_list_median_ms"), "%.1f"), s.get("adds_during_list", "–"))),
            ("set 5,000 keys via socket (%d bytes)" % s["socket_set_5000_request_bytes"],
             f(s["socket_set_5000_s"]) + " s"),
            ("size of a full-table set request", "%.1f MB" % (s["full_table_request_bytes"] / 1e6))]
    if "nft_f_median_s" in s:
        rows += [("the kernel's own cost: `nft -f` of the same table (the agent's listing), another namespace",
                  f(s["nft_f_median_s"]) + " s"),
                 ("set of the whole table via socket (`echo: false`, as the single-table masq_* modules send it), "
                  "from empty (median) / as a multiple of `nft -f`",
                  "%s s / %sx" % (f(s["socket_set_median_s"]), f(s["socket_set_x_nft_f"], "%.2f"))),
                 ("daemon start / restart as a multiple of `nft -f`",
                  "%s / %sx" % (f(s["daemon_start_x_nft_f"], "%.2f"), f(s.get("daemon_restart_x_nft_f"), "%.2f"))),
                 ("agent RSS: peak during that set / after it",
                  "%s / %s MiB" % (f(s.get("socket_set_peak_rss_mib"), "%.0f"), f(s.get("rss_after_socket_set_mib"), "%.0f")))]
    return ("## 4. Control plane at %d keys\n\n%s\n\n" % (doc["method"]["keys"], _method(doc))
            + table(["measure", "value"], rows)
            + "\nProfile of the full apply: `%s`. Memory: the agent holds each PORTFW key once, as "
              "its canonical entry, and renders its nft objects on demand (docs/architecture.md, "
              "Performance).\n\n"
            % doc["method"]["profile"])


def ansible_section(doc):
    single, fleet = doc["single_gateway"], doc["fleet"]
    out = ["## 5. Ansible\n\n", _method(doc), "\n\n",
           table(["entries", "masq_portfw first s", "iptables loop first s", "speed-up",
                  "masq_portfw re-run s", "iptables loop re-run s", "speed-up"],
                 [(r["entries"], f(r["masq_portfw_first_s"], "%.1f"), f(r.get("iptables_first_s"), "%.1f"),
                   f(r.get("speedup_first"), "%.1fx"), f(r["masq_portfw_rerun_s"], "%.1f"),
                   f(r.get("iptables_rerun_s"), "%.1f"), f(r.get("speedup_rerun"), "%.1fx")) for r in single]),
           "\nFleet converge (one ansible-playbook run, forks 10, 20 PORTFW keys + 1 masquerade rule "
           "per gateway, masqd already running in each namespace):\n\n",
           table(["gateways", "first run s", "re-run s", "changed (first / re-run)", "s per gateway"],
                 [(r["gateways"], f(r["first_s"], "%.1f"), f(r["rerun_s"], "%.1f"),
                   "%s / %s" % (r["first_changed"], r["rerun_changed"]), f(r["per_gateway_first_s"])) for r in fleet])]
    ents = [r["entries"] for r in single]
    out.append("\n![ansible entries](%s)\n" % plot_lines(
        "ansible_vs_entries.png",
        [("masq_portfw (one task) first", ents, [r["masq_portfw_first_s"] for r in single]),
         ("masq_portfw re-run", ents, [r["masq_portfw_rerun_s"] for r in single]),
         ("iptables loop first", ents, [r.get("iptables_first_s") for r in single]),
         ("iptables loop re-run", ents, [r.get("iptables_rerun_s") for r in single])],
        "forwarding entries", "seconds", "Ansible wall time vs entries", logx=True, logy=True))
    out.append("![ansible fleet](%s)\n\n" % plot_lines(
        "ansible_vs_fleet.png", [("first run", [r["gateways"] for r in fleet], [r["first_s"] for r in fleet]),
                                 ("re-run", [r["gateways"] for r in fleet], [r["rerun_s"] for r in fleet])],
        "gateways", "seconds", "Fleet converge time vs fleet size"))
    return "".join(out)


def failover_section(doc):
    s = doc["summary"]
    rows = [(m, f(s[m]["failure_to_next_backend_ms"], "%.0f"), f(s[m]["command_ms"], "%.0f"),
             f(s[m]["failed_probes"], "%.0f")) for m in ("masqctl", "module")]
    return ("## 6. Failover latency (mfw pref 0, forced scheduling)\n\n%s\n\n" % _method(doc)
            + table(["forcing with", "failure → first answer from next backend, ms", "forcing command ms",
                     "failed probes (5 ms apart)"], rows)
            + "\nThe time to *detect* a failure belongs to whoever forces scheduling (a health check, "
              "`playbooks/failover.yml`); the figures start when the head's server is killed and "
              "scheduling is forced at once.\n\n"
            + "### AUTOFW control-port detection latency\n\n"
            + ("_Slot reserved: filled in by the AUTOFW detection work (time from the first packet "
               "to the control port to the first forwarded packet of the port range)._\n\n"
               if not s.get("autofw_detection") else "%s\n\n" % json.dumps(s["autofw_detection"])))


def health_section(doc):
    """bench/health.py: masqd's health checks and HAProxy's `check`, side by side."""
    s, m = doc["summary"], doc.get("method", {})
    rows = [(who, f(s[who]["failover_ms"], "%.0f"), f(s[who]["recovery_ms"], "%.0f"),
             f(s[who]["failed_probes"], "%.0f")) for who in ("masqd", "haproxy") if who in s]
    c = s.get("cost", {})
    keys = m.get("cost_keys", 1000)
    cost_rows = [("masqd, %s checked backends at 1 s" % keys, f(c.get("masqd_own_cpu_percent")),
                  f(c.get("masqd_cpu_percent"))),
                 ("masqd, same keys, no checks", "–", f(c.get("masqd_baseline_cpu_percent"))),
                 ("HAProxy, %s servers `check inter 1000`" % keys, f(c.get("haproxy_own_cpu_percent")),
                  f(c.get("haproxy_cpu_percent")))]
    cost_note = ("\nIn a veth lab the sender's system call runs the receiving namespace's whole stack, so "
                 "the checker is charged the backend's kernel work (its SYN handling, SYN-ACK and RST), "
                 "which on a real network runs on the backend's machine. *Own work*: the lab's receive "
                 "processing steered to the other core (RPS, as a NIC's interrupt would put it) and the "
                 "checker pinned to core 0; *as charged in the lab*: neither.\n")
    memory = ("\nMemory over the %s s soak: RSS %s → %s KiB (growth %s KiB, first third vs last third "
              "of the samples).\n\n" % (m.get("soak_s"), c.get("rss_kib_first"), c.get("rss_kib_last"),
                                        f(c.get("rss_growth_kib"), "%.0f")))
    return ("## Health checks (masqd vs HAProxy `check inter 100 fall 2 rise 2`)\n\n%s\n\n" % _method(doc)
            + table(["checker", "death → last new connection to it, ms", "back → first answer from it, ms",
                     "failed probes (5 ms apart)"], rows)
            + "\n" + table(["CPU, % of one core", "own work", "as charged in the lab"], cost_rows)
            + cost_note + memory)


def drift_section(doc):
    s = doc["summary"]
    rows = [(size, f(r["forwarding_back_ms"], "%.0f"), f(r["failed_probes"], "%.0f"),
             f(r["agent_detected_to_repaired_ms"], "%.0f"), f(r["flush_command_ms"], "%.0f"))
            for size, r in sorted(s.items(), key=lambda item: int(item[0]))]
    return ("## 7. Drift repair (`nft flush ruleset` by another program)\n\n%s\n\n" % _method(doc)
            + table(["PORTFW keys", "flush → forwarding back, ms", "failed probes (5 ms apart)",
                     "agent: transaction end → repaired, ms", "the flush command itself, ms"], rows)
            + "\nThe repair is one full re-sync: its cost grows with the table (the kernel's own load "
              "of the same table is the floor, see the control-plane section).\n\n")


def fleet_lab_section(doc):
    s, m, rows = doc["summary"], doc["method"], doc["gateways"]
    n = m["gateways"]
    out = ["## 7. Fleet lab: %d gateways converged by one `playbooks/site.yml` run\n\n" % n,
           "Each gateway is its own namespace with its own client and server (%d namespaces); the "
           "gateway role installs and starts masqd in every gateway (the whole product path) and "
           "applies its tables (%s); site.yml checks each gateway after the change. %s\n\n"
           % (m["namespaces"], m["tables_per_gateway"], _method(doc)),
           table(["measure", "value"], [
               ("first run (wall, ansible-playbook start-up included)", f(s["first_s"], "%.1f") + " s"),
               ("first run per gateway", f(s["per_gateway_first_s"]) + " s"),
               ("idempotent re-run (wall)", f(s["rerun_s"], "%.1f") + " s"),
               ("re-run per gateway", f(s["per_gateway_rerun_s"]) + " s"),
               ("changed tasks, first run / re-run (all gateways)",
                "%s / %s" % (s["first_changed"], s["rerun_changed"])),
               ("Ansible's floor (one ping per gateway, same run)", f(s["floor_s"]) + " s"),
               ("first run / re-run, as multiples of the floor",
                "%sx / %sx" % (f(s["first_x_floor"], "%.1f"), f(s["rerun_x_floor"], "%.1f"))),
               ("gateways whose probe passed", "%d / %d" % (s["probes_ok"], n)),
               ("lab up / identity servers started / probes (4 in parallel)",
                "%s / %s / %s s" % (f(s["lab_up_s"], "%.1f"), f(s["servers_start_s"], "%.1f"),
                                    f(s["probe_s"], "%.1f")))]),
           "\nPer gateway:\n\n",
           table(["gateway", "changed first / re-run", "probe", "answered by", "source seen by the server",
                  "source seen by the client (masquerade)", "probe s"],
                 [(r["gateway"], "%s / %s" % (r["first_changed"], r["rerun_changed"]), f(r["probe"]["ok"]),
                   ", ".join(r["probe"]["backends"]), ", ".join(r["probe"]["seen_sources"]) or "–",
                   r["probe"]["masquerade_seen_source"] or "–", f(r["probe"]["seconds"])) for r in rows]),
           "\nPer-gateway time is the run's wall time divided by the gateway count. A run's time "
           "is its number of module runs per gateway: the role checks the agent, its commands, "
           "the kernel settings and the agent's process in one `gateway_agent` run and applies "
           "the tables in one `masq_tables` run; site.yml's check adds `masq_info` and one "
           "`wait_for`; each of the three batches pays these rounds.\n\n"]
    grow = doc.get("growth")
    if grow:
        out.append("Growth, measured in the same run: %d gateways took %.1f s / %.1f s (first run / "
                   "re-run; floor %.2f s), %d gateways %.1f s / %.1f s (floor %.2f s): %.2fx and %.2fx the "
                   "time for %gx the gateways.\n\n"
                   % (grow["gateways"][0], grow["first_s"][0], grow["rerun_s"][0], grow["floor_s"][0],
                      grow["gateways"][1], grow["first_s"][1], grow["rerun_s"][1], grow["floor_s"][1],
                      grow["first_ratio"], grow["rerun_ratio"], grow["gateways"][1] / grow["gateways"][0]))
    return "".join(out)


def ha_section(doc):
    runs = doc["runs"]
    keys = [("tcp_continuing", "TCP flows continuing (of %d)" % doc["method"]["tcp_flows"]),
            ("tcp_reset", "TCP flows reset"), ("udp_lost", "UDP datagrams lost"),
            ("udp_lost_s", "UDP loss, seconds of stream"),
            ("failure_to_new_connection_s", "failure -> new connection works, s"),
            ("failure_to_backup_holds_vips_s", "failure -> backup holds the VIPs, s"),
            ("tcp_flows_kept_their_backend", "TCP flows on the same backend throughout")]
    rows = [(label, runs["conntrackd"].get(k), runs["no_conntrackd"].get(k)) for k, label in keys]
    rows.append(("new connections after the failover: round-robin alternation (1.0 = strict)",
                 runs["conntrackd"].get("schedule_after", {}).get("alternation"),
                 runs["no_conntrackd"].get("schedule_after", {}).get("alternation")))
    return ("## 8. HA pair: the master dies (keepalived VRRPv3 + conntrackd FTFW)\n\n%s\n\n" % _method(doc)
            + table(["", "with conntrackd", "keepalived alone"], rows)
            + "\nThe master loses all its links at once; `docs/ha.md` has the topology and every "
              "failure mode.\n\n")


def metrics_section(doc):
    rows = [(r["keys"], "–" if r.get("write_every_s") is None else "every %.0f s" % r["write_every_s"],
             f(r["scrape_cold_ms"], "%.0f") if not r.get("cold_error") else "not done in %s s" % doc["method"].get(
                 "reading_limit_s", "?"),
             f(r["reading_s"], "%.2f"), f(r["scrape_warm_ms"], "%.1f"),
             "%.1f MB / %d" % (r["exposition_bytes"] / 1e6, r["samples"]) if r["exposition_bytes"] else "–",
             "%s / %s" % (f(r["api_without_scrapes"]["status_p50_ms"], "%.1f"),
                          f(r["api_during_scrapes"]["status_p50_ms"], "%.1f")),
             "%s / %s" % (f(r["api_without_scrapes"]["status_p99_ms"], "%.1f"),
                          f(r["api_during_scrapes"]["status_p99_ms"], "%.1f")),
             "%s / %s" % (f(r["api_without_scrapes"]["write_p50_ms"], "%.1f"),
                          f(r["api_during_scrapes"]["write_p50_ms"], "%.1f")),
             "%.0f / %.0f / %.0f" % (r["rss_kib_before"] / 1024, r["rss_kib_after_reading"] / 1024,
                                     r["rss_kib_after"] / 1024))
            for r in doc["rows"]]
    return ("## 9. Prometheus metrics: a scrape's cost and the API meanwhile\n\n%s\n\n" % _method(doc)
            + table(["PORTFW keys", "writes", "first scrape ms", "reading s", "scrape within the cache ms",
                     "exposition / samples", "status p50 ms (no scrapes / during the reading)", "status p99",
                     "add+delete p50", "agent RSS MiB before / after the reading / end"], rows)
            + "\nThe API client runs on the socket while the first scrape makes its reading; "
              "docs/metrics.md explains the cache and why a reading does not finish under steady writes.\n\n")


def multi_backend_section(doc):
    rows = [("%s (nft %s)" % (r["where"], r["nft"]), "{:,}".format(r["keys"]),
             "%s / %s" % (f(r["add_ms"], "%.1f"), f(r["delete_ms"], "%.1f")),
             "%s / %s" % (f(r["single_add_ms"], "%.1f"), f(r["single_delete_ms"], "%.1f")))
            for r in doc["summary"]["rows"]]
    return ("## Multi-backend keys: one-key changes, this machine's libnftables vs Debian 13's\n\n%s\n\n"
            % _method(doc)
            + table(["agent on", "two-backend keys loaded", "add / delete one two-backend key, ms",
                     "add / delete one one-backend key, ms"], rows)
            + "\nThe same agent and requests; `debian13` runs it with `chroot` in an overlay of the cached "
              "Debian 13 root. PORTFW changes go to the kernel as masqd's own netlink batch, so neither "
              "libnftables is on their path any more (1.0.6 used to fill its cache with every chain of the "
              "namespace before each change). A two-backend add makes the kernel validate the table it "
              "goes to, walking every cascade chain there: the keys with several backends are spread over "
              "%d shard tables, so one add walks an eighth of them (docs/architecture.md, \"Multi-backend "
              "keys in shard tables\").\n\n" % doc["summary"].get("shards", 8)
            + _hooks_text(doc["summary"].get("hooks")))


def _hooks_text(hooks):
    """What the shard tables' prerouting hooks cost a new connection (multi_backend._hook_cost)."""
    if not hooks:
        return ""
    rate = hooks["conn_per_s"]
    return ("New connections/s through a one-backend key, ab from the client, alternated over %d rounds: "
            "%s with the shard tables' prerouting hooks, %s without them (%sx), %s routed to the same server "
            "(%sx with, %sx without).\n\n"
            % (hooks["rounds"], f(rate["with"], "%.0f"), f(rate["without"], "%.0f"), f(hooks["with_vs_without"], "%.3f"),
               f(rate["routing"], "%.0f"), f(hooks["with_vs_routing"], "%.3f"), f(hooks["without_vs_routing"], "%.3f")))


def million_section(doc):
    s = doc["summary"]
    keys = s["keys"]
    dp = s["dataplane"]
    rows = [("socket `set` from empty, %s MB request (`echo: false`)" % f(s["request_bytes"] / 1e6, "%.0f"),
             f(s["socket_set_s"], "%.1f") + " s"),
            ("`nft -f` of the same table (written by the benchmark), another namespace", f(s["nft_f_s"], "%.1f") + " s"),
            ("socket `set` as a multiple of `nft -f`", f(s["socket_set_x_nft_f"], "%.2f") + "x"),
            ("agent RSS: peak during the set / settled after it",
             "%s / %s MiB" % (f(s["set_peak_rss_mib"], "%.0f"), f(s["rss_after_set_mib"], "%.0f"))),
            ("full re-syncs the set fell back to (0: the PORTFW batch took it)", s.get("full_syncs_during_set")),
            ("restart with the keys stored and the table in place, until the socket answers / "
             "as a multiple of `nft -f`", "%s s / %sx" % (f(s["restart_s"], "%.1f"), f(s["restart_x_nft_f"], "%.2f"))),
            ("agent RSS: peak during that restart / after it",
             "%s / %s MiB" % (f(s["restart_peak_rss_mib"], "%.0f"), f(s["restart_rss_mib"], "%.0f")))]
    for n in sorted(dp, key=int):
        d = dp[n]
        rows.append(("%s keys: new conn/s through PORTFW / routed; Gbit/s through PORTFW / routed" % "{:,}".format(int(n)),
                     "%s / %s; %s / %s" % (f(d["masqd_conn"], "%.0f"), f(d["routing_conn"], "%.0f"),
                                           f(d["masqd_gbps"], "%.2f"), f(d["routing_gbps"], "%.2f"))))
    rows += [("new conn/s at %s vs 10 keys, normalized by the routed flow" % "{:,}".format(keys),
              f(s["conn_rate_%d_vs_10_normalized" % keys], "%.3f")),
             ("per-packet throughput at %s vs 10 keys, normalized by the routed flow" % "{:,}".format(keys),
              f(s["per_packet_%d_vs_10_normalized" % keys], "%.3f"))]
    return ("## One million PORTFW keys\n\n%s\n\n" % _method(doc)
            + table(["measure", "value"], rows)
            + "\nPORTFW changes go to the kernel as one nfnetlink batch (masqd/portfw_batch.py), "
              "and so do the keys of a restart's re-sync, after the rest of the table "
              "(docs/architecture.md, \"A re-sync goes in two steps\").\n\n")


def _method(doc):
    m = doc.get("method", {})
    # Sections come from separate runs: each says when it was measured.
    return "Method: " + ", ".join("%s=%s" % (k, v) for k, v in m.items() if k != "profile") + \
        (" (quick mode)" if doc.get("quick") else "") + "; wall %.0f s. Measured %s." % (
            doc.get("wall_s", 0), doc.get("machine", {}).get("date", "at an unrecorded date"))


def machine_section(docs):
    doc = next(iter(docs.values()))
    m = doc["machine"]
    v = m["versions"]
    return ("Machine: %s, %d CPUs (%s), kernel %s, Python %s. Date of the first result: %s.\n"
            "Versions: %s.\n\n" % ("this machine", m["cpus"], m["cpu_model"],
                                   m["kernel"], m["python"], m["date"],
                                   "; ".join("%s %s" % (k, val) for k, val in v.items() if val)))


def _sections():
    """(benchmark, its section) in the report's order."""
    return (("dataplane", dataplane_section), ("scale", scale_section), ("control", control_section),
            ("multi_backend", multi_backend_section), ("million", million_section), ("ansible", ansible_section),
            ("failover", failover_section),
            ("drift", drift_section), ("fleet_lab", fleet_lab_section), ("ha", ha_section),
            ("metrics", metrics_section), ("health", health_section))


def main():
    """Write bench/REPORT.md and the plots from whatever results exist."""
    docs = load()
    os.makedirs(PLOTS, exist_ok=True)
    parts = ["# Benchmark report\n\n",
             "Generated by `bench/report.py` from `bench/results/*.json`. Run: `scripts/bench.sh --quick` "
             "(or without `--quick` for the full suite). Every variant runs side by side in one run, "
             "interleaved and repeated; figures are medians, compared as ratios (the machine is shared and "
             "noisy). All traffic stays inside lab namespaces.\n\n"]
    if not docs:
        parts.append("No results yet.\n")
    else:
        parts.append(machine_section(docs))
        parts.append(targets_section(docs))
        sections = []
        for name, fn in _sections():
            sections.append(fn(docs[name]) if name in docs else "## %s\n\nNot run yet.\n\n" % name)
        # Numbered in the order they are shown, whatever number a section's own text had.
        parts += [re.sub(r"^## (?:[0-9–]+\. )?", "## %d. " % number, text, count=1)
                  for number, text in enumerate(sections, 1)]
    with open(os.path.join(BENCH, "REPORT.md"), "w") as fh:
        fh.write("".join(parts))
    print("wrote bench/REPORT.md")


if __name__ == "__main__":
    main()
