"""masqd: the ipmasq.gateway agent. Runs in the foreground (systemd, a supervisor,
or a lab namespace), programs the namespace's nftables and serves the JSON API on a
Unix socket until SIGTERM/SIGINT.

One agent per network namespace: each has its own --state-dir and --socket, and
nothing else is shared.
"""

import argparse
import logging
import os
import signal
import sys
import threading

from masqd import sdnotify
from masqd.client import DEFAULT_SOCKET, SOCKET_ENV, default_socket_path
from masqd.server import Server, ServerError

DEFAULT_STATE_DIR = "/var/lib/masqd"
LOG_FORMAT = "%(asctime)s masqd[%(process)d] %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("masqd")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="masqd", description="ipmasq.gateway agent: PORTFW, AUTOFW, FWMARK and "
        "masquerading on nftables, driven over a Unix socket (see masqctl).")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="where the desired state is kept (default %(default)s)")
    parser.add_argument("--socket", default=None,
                        help="Unix socket to serve (default $%s or %s)" % (SOCKET_ENV, DEFAULT_SOCKET))
    parser.add_argument("--group", default=None,
                        help="group whose members may also use the socket (mode 0660)")
    parser.add_argument("--pidfile", default=None,
                        help="write the agent's pid here (for supervisors without systemd)")
    parser.add_argument("--no-autofw-watcher", action="store_true",
                        help="do not watch conntrack events (AUTOFW control-port entries "
                        "then never get a recipient)")
    parser.add_argument("--salvage-state", action="store_true",
                        help="damaged state files: keep a copy of them, load what is valid up "
                        "to the first damage, write a clean snapshot, report what was dropped "
                        "and exit (docs/state.md)")
    parser.add_argument("--no-drift-repair", action="store_true",
                        help="do not watch nftables events (a foreign flush of the ruleset "
                        "then stops forwarding until the agent restarts)")
    parser.add_argument("--verify-interval", type=float, default=60.0, metavar="SECONDS",
                        help="compare the kernel's table with the agent's every SECONDS as a "
                        "backstop to the events (0: never; default %(default)s)")
    parser.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (docs/metrics.md; "
                        "needs prometheus_client)")
    parser.add_argument("--metrics-textfile", default=None, metavar="PATH",
                        help="write the same metrics to PATH (atomically) for node_exporter's "
                        "textfile collector")
    parser.add_argument("--metrics-textfile-interval", type=float, default=15.0, metavar="SECONDS",
                        help="how often to write --metrics-textfile (default %(default)s)")
    parser.add_argument("--metrics-cache", type=float, default=5.0, metavar="SECONDS",
                        help="reuse a reading of the kernel's counters for SECONDS across scrapes "
                        "(default %(default)s)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="default %(default)s")
    return parser.parse_args(argv)


def write_pidfile(path):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as handle:
        handle.write("%d\n" % os.getpid())
    os.rename(tmp, path)


def remove_pidfile(path):
    try:
        with open(path) as handle:
            if handle.read().strip() != str(os.getpid()):
                return  # another process's pidfile now: leave it
        os.unlink(path)
    except (FileNotFoundError, ValueError):
        pass


def salvage_state(state_dir):
    """--salvage-state: see masqd.store.Store.salvage and docs/state.md."""
    from masqd.store import Store, StoreError
    try:
        report = Store(state_dir).salvage()
    except (StoreError, OSError) as exc:
        log.error("salvage failed: %s", exc)
        return 1
    if not report["damaged"]:
        log.info("salvage: the state in %s is intact (revision %s), nothing changed", state_dir, report["revision"])
        return 0
    for copy in report["copies"]:
        log.warning("salvage: damaged file kept as %s", copy)
    for item in report["dropped"]:
        log.warning("salvage: dropped %s", item)
    log.warning("salvage: clean snapshot written at revision %d (%s); start masqd again", report["revision"],
                ", ".join("%s %d" % kv for kv in report["entries"].items()))
    return 0


SWITCH_INTERVAL = 0.001  # seconds (sys.setswitchinterval; CPython's default is 0.005)


def _import_watchers():
    import masqd.watchers.conntrack  # noqa: F401 (imported for later use in main)
    import masqd.watchers.health  # noqa: F401
    import masqd.watchers.ruleset  # noqa: F401


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format=LOG_FORMAT)
    socket_path = args.socket or default_socket_path()
    # A thread waiting for the interpreter lock gets it after at most this long. The
    # API's threads take and give it back several times per request; while a long
    # read (a 100,000-key list or scrape) runs, the default 5 ms per hand-over made a
    # status take up to ~150 ms, 1 ms keeps it near 13 ms (bench/metrics.py).
    sys.setswitchinterval(SWITCH_INTERVAL)
    from masqd.nft import one_malloc_arena
    one_malloc_arena()  # before any other thread starts

    # Imported here so `masqd --help` works without libnftables.
    from masqd.service import Service

    # One agent per state dir and per network namespace (masqd.instance_lock), decided
    # before the kernel is touched; the locks live as long as the process.
    from masqd.instance_lock import AlreadyRunning, InstanceLock
    from masqd.store import Store, StoreError
    instance = InstanceLock(args.state_dir)
    if args.salvage_state:  # the state dir's lock only: no socket, no kernel
        try:
            Store(args.state_dir).ensure_dir()
            instance.acquire_state_dir()
        except (AlreadyRunning, StoreError, OSError) as exc:
            log.error("cannot salvage: %s", exc)
            return 1
        return salvage_state(args.state_dir)

    metrics_on = args.metrics_listen is not None or args.metrics_textfile is not None
    if metrics_on:  # a missing library or a bad address: refused before the kernel is touched
        from masqd.metrics import MetricsError, parse_listen, require_client
        try:
            require_client()
            if args.metrics_listen is not None:
                parse_listen(args.metrics_listen)
        except MetricsError as exc:
            log.error("cannot start: %s", exc)
            return 1

    server = None
    metrics = None
    try:
        server = Server(None, socket_path, group=args.group)
        # Take the socket before touching the kernel: a second agent on the same
        # socket must not reconcile the namespace under the first one.
        server.prepare()
        Store(args.state_dir).ensure_dir()
        instance.acquire_state_dir()
        instance.acquire_netns()
    except (ServerError, AlreadyRunning, StoreError, OSError) as exc:
        log.error("cannot start: %s", exc)
        if server is not None:
            server.close()
        return 1

    def stop(signum, _frame):
        log.info("%s received, shutting down", signal.Signals(signum).name)
        sdnotify.stopping()
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    # The watchers' modules (pyroute2, asyncio: ~0.1 s) load while the start's
    # libnftables transaction runs, which does not hold the interpreter lock.
    preload = threading.Thread(target=_import_watchers, name="masqd-preload", daemon=True)
    preload.start()
    service = None
    try:
        service = Service(args.state_dir)
        service.socket_path = server.socket_path
        service.start()
        preload.join()
        if not args.no_autofw_watcher:
            from masqd.watchers.conntrack import AutofwWatcher
            service.watcher = AutofwWatcher(service)
            if not service.watcher.start():
                log.error("autofw watcher not running: %s", service.watcher.error)
        if not args.no_drift_repair:
            from masqd.watchers.ruleset import RulesetMonitor
            monitor = RulesetMonitor(service.repair_drift, service.verify_kernel,
                                     verify_interval=args.verify_interval)
            service.watchers[monitor.name] = monitor
            if not monitor.start():
                log.error("drift repair not running: %s", monitor.error)
            elif hasattr(service.nft, "events_off"):
                service.nft.events_off = monitor.events_off
        from masqd.watchers.health import HealthWatcher  # idle without checked backends
        health = HealthWatcher(service)
        service.watchers[health.name] = health
        if not health.start():
            log.error("health checks not running: %s", health.error)
        server.service = service
        if metrics_on:
            from masqd.metrics import Metrics
            metrics = Metrics(service, args.metrics_listen, args.metrics_textfile,
                              args.metrics_textfile_interval, args.metrics_cache)
            server.service = metrics.service  # the Service with its writes counted
            metrics.start()
        server.listen()
        sdnotify.ready("serving %s" % server.socket_path)  # table programmed, socket up
        if args.pidfile:
            write_pidfile(args.pidfile)
        log.info("ready: state in %s, socket %s", args.state_dir, server.socket_path)
        server.serve_forever()
    except Exception as exc:  # startup failure: say why, leave no socket behind
        log.error("cannot start: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    finally:
        server.close()
        if metrics is not None:
            metrics.stop()
        if args.pidfile:
            remove_pidfile(args.pidfile)
        stopper = getattr(service, "stop", None)
        if callable(stopper):
            stopper()
    return 0


if __name__ == "__main__":
    sys.exit(main())
