"""In-process control-plane timing of masqd.service.Service; must run inside a lab
namespace (it programs that namespace's nftables):

    ip netns exec NS python -m bench.control_worker STATE_DIR KEYS REPEATS ONE_OPS PROFILE_OUT

Prints one JSON object. The full-table apply is timed from the request's JSON text
(parsing included, as the daemon would) to the committed state; the daemon itself
refuses requests over 1 MiB, so a 100,000-key table cannot travel over the socket in
one `set` today (see the report).
"""

import cProfile
import io
import json
import pstats
import statistics
import sys
import time

from bench.scale import portfw_entries
from masqd.service import Service


def main(state_dir, keys, repeats, one_ops, profile_out):
    svc = Service(state_dir)
    svc.start()
    entries = portfw_entries(keys)
    text = json.dumps({"op": "set", "table": "portfw", "entries": entries})
    out = {"keys": keys, "request_bytes": len(text), "set_s": [], "flush_s": []}

    def full_set():
        reply = svc.handle(json.loads(text))
        if not reply["ok"]:
            raise SystemExit("set refused: %s" % reply)

    for i in range(repeats):
        t0 = time.perf_counter()
        full_set()
        out["set_s"].append(time.perf_counter() - t0)
        if i < repeats - 1:
            t0 = time.perf_counter()
            svc.handle({"op": "flush", "table": "portfw"})
            out["flush_s"].append(time.perf_counter() - t0)
    # Profile one more apply from empty (after the timed ones, so timing is unprofiled).
    svc.handle({"op": "flush", "table": "portfw"})
    prof = cProfile.Profile()
    prof.enable()
    full_set()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    with open(profile_out, "w") as f:
        f.write("cProfile of Service.handle(set portfw, %d keys) from empty, in the lab gateway namespace\n\n" % keys)
        f.write(buf.getvalue())

    # One key added and removed while `keys` are loaded.
    add, delete = [], []
    for i in range(one_ops):
        entry = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 30000 + i,
                 "backends": [{"address": "10.16.0.10", "port": 80}]}
        t0 = time.perf_counter()
        r = svc.handle({"op": "add", "table": "portfw", "entry": entry})
        add.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        key = {k: entry[k] for k in ("protocol", "local_address", "local_port")}
        r2 = svc.handle({"op": "delete", "table": "portfw", "entry": key})
        delete.append(time.perf_counter() - t1)
        if not (r["ok"] and r2["ok"]):
            raise SystemExit("add/delete refused: %s %s" % (r, r2))
    out["add_one_s"] = add
    out["delete_one_s"] = delete
    out["set_median_s"] = statistics.median(out["set_s"])
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
