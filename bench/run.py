"""Runs the benchmark suite, writes bench/results/<name>.json, regenerates REPORT.md.

    python -m bench.run [--quick] [--only dataplane,scale,control,multi_backend,million,ansible,failover,drift,ha,metrics] [--report]

(scripts/bench.sh installs the tools first and calls this.)
"""

import argparse
import sys
import time
import traceback

from bench import common

BENCHMARKS = ("dataplane", "scale", "control", "multi_backend", "million", "ansible", "failover", "drift", "fleet_lab", "ha",
              "metrics", "health")


def _module(name):
    if name == "metrics":  # docs/metrics.md: scrape cost and API latency during scrapes
        from bench import metrics
        return metrics
    if name == "million":  # one million PORTFW keys: set vs nft -f, RSS, data plane vs 10 keys
        from bench import million
        return million
    if name == "health":  # docs/health.md: failover/recovery vs HAProxy, cost of 1,000 checks
        from bench import health
        return health
    from bench import ansible_bench, control, dataplane, drift, failover, fleet_lab, ha, multi_backend, scale
    return {"dataplane": dataplane, "scale": scale, "control": control, "multi_backend": multi_backend,
            "ansible": ansible_bench, "failover": failover, "drift": drift, "fleet_lab": fleet_lab,
            "ha": ha}[name]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (< 10 min)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--report", action="store_true", help="only regenerate bench/REPORT.md")
    args = parser.parse_args(argv)
    failed = []
    if not args.report:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        for name in names:
            if name not in BENCHMARKS:
                parser.error("unknown benchmark %r (known: %s)" % (name, ", ".join(BENCHMARKS)))
        t_all = time.monotonic()
        for name in names:
            common.log("=== %s%s", name, " (quick)" if args.quick else "")
            t0 = time.monotonic()
            try:
                data = _module(name).run(quick=args.quick)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                continue
            data["wall_s"] = time.monotonic() - t0
            common.write_result(name, args.quick, data)
        common.log("suite done in %.0f s", time.monotonic() - t_all)
    from bench import report
    report.main()
    if failed:
        common.log("failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
