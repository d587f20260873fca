"""ipmasq-lab: bring namespace labs up and down from a shell or CI job.

    ipmasq-lab up SPEC [--prefix P] [--hold]   build a lab; prints its prefix, then
                                               host/namespace pairs
    ipmasq-lab down PREFIX | --all             tear down one lab / every recorded lab
    ipmasq-lab list                            recorded labs
    ipmasq-lab show PREFIX                     addresses per host, read from the kernel
    ipmasq-lab exec PREFIX HOST -- CMD...      run CMD inside HOST's namespace
    ipmasq-lab validate SPEC                   check a spec, build nothing
    ipmasq-lab demo                            seed lab + pings, then teardown
    ipmasq-lab ssh PREFIX HOST [-- CMD...]     SSH to a booted host (kind: debian)
    ipmasq-lab roots [RELEASE...]              build the cached Debian roots

Exit status: 0 done, 1 a lab operation failed, 2 a refused spec or bad usage.
"""

import argparse
import json
import os
import signal
import subprocess
import sys

from . import booted_host, booted_roots, demo, nsexec, registry, topology
from . import spec as spec_mod
from .errors import LabError, LabSpecError
from .lab import Lab, teardown_on_signals


def _print_lab(lab, as_json):
    if as_json:
        print(json.dumps(lab.describe(), indent=1))
        return
    print(lab.prefix)
    width = max(len(h) for h in lab.hosts)
    for host in lab.hosts:
        print("  %-*s  %s" % (width, host, lab.netns(host)))
    for host in booted_host.booted_hosts(lab.spec):
        info = lab.booted(host).describe()
        print("  %s: Debian %s, ssh root@%s from %s (ipmasq-lab ssh %s %s)"
              % (host, info["release"], info["ssh"]["address"], info["ssh"]["controller"],
                 lab.prefix, host))


def cmd_up(args):
    the_lab = Lab(args.spec, args.prefix)
    with teardown_on_signals():
        try:
            the_lab.up()
            _print_lab(the_lab, args.json)
            sys.stdout.flush()
            if args.hold:
                # Keep the lab for as long as this process lives; SIGINT/SIGTERM/SIGHUP
                # end the wait and tear it down.
                while True:
                    signal.pause()
        except BaseException:
            the_lab.down()
            raise
    return 0


def cmd_down(args):
    if args.all == (args.prefix is not None):
        print("ipmasq-lab down: give a PREFIX or --all", file=sys.stderr)
        return 2
    prefixes = registry.prefixes() if args.all else [registry.check_prefix(args.prefix)]
    for prefix in prefixes:
        if registry.read(prefix) is None:
            print("%s: no such lab (nothing to do)" % prefix)
            continue
        Lab.attach(prefix).down()
        print("%s: down" % prefix)
    return 0


def cmd_list(args):
    rows = []
    for prefix in registry.prefixes():
        record = registry.read(prefix) or {}
        namespaces = record.get("namespaces", [])
        missing = [ns for ns in namespaces if not topology.exists(ns)]
        state = record.get("state", "?")
        if missing:
            state += " (%d of %d namespaces missing)" % (len(missing), len(namespaces))
        spec = record.get("spec") or {}
        rows.append({"prefix": prefix, "name": spec.get("name", "?"), "state": state,
                     "hosts": len(spec.get("hosts", {})),
                     "created": record.get("created", "?")})
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print("no labs recorded in %s" % registry.RUN_DIR)
    else:
        print("%-12s %-12s %-6s %-25s %s" % ("PREFIX", "NAME", "HOSTS", "CREATED", "STATE"))
        for r in rows:
            print("%-12s %-12s %-6d %-25s %s"
                  % (r["prefix"], r["name"], r["hosts"], r["created"], r["state"]))
    return 0


def cmd_show(args):
    the_lab = Lab.attach(registry.check_prefix(args.prefix))
    shown = {}
    for host in the_lab.hosts:
        try:
            shown[host] = {"netns": the_lab.netns(host), "interfaces": the_lab.addresses(host)}
        except LabError as exc:
            shown[host] = {"netns": the_lab.netns(host), "error": str(exc)}
    if args.json:
        print(json.dumps({"prefix": the_lab.prefix, "hosts": shown}, indent=1))
        return 0
    print("lab %s (%s)" % (the_lab.prefix, the_lab.spec["name"]))
    for host, info in shown.items():
        print("  %s  [%s]" % (host, info["netns"]))
        if "error" in info:
            print("    %s" % info["error"])
        for ifname, addrs in sorted(info.get("interfaces", {}).items()):
            print("    %-8s %s" % (ifname, " ".join(addrs)))
    return 0


def cmd_exec(args):
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("ipmasq-lab exec: give a command after --", file=sys.stderr)
        return 2
    netns = Lab.attach(registry.check_prefix(args.prefix)).netns(args.host)
    fd = os.open(nsexec.netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)

    def join():  # like `ip netns exec`: same process group, so the terminal works
        if nsexec._libc.setns(fd, nsexec.CLONE_NEWNET) != 0:
            raise OSError("setns %s failed" % netns)

    try:
        proc = subprocess.Popen(argv, preexec_fn=join)
    finally:
        os.close(fd)
    # The terminal's Ctrl-C reaches the command too; this process just waits for it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_validate(args):
    spec = spec_mod.load_and_validate(args.spec)
    print("%s: ok (%d hosts, %d links, %d bridges)"
          % (spec["name"], len(spec["hosts"]), len(spec["links"]), len(spec["bridges"])))
    return 0


def cmd_ssh(args):
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    host = Lab.attach(registry.check_prefix(args.prefix)).booted(args.host)
    ssh = host.ssh_argv(" ".join(argv))
    if not argv:  # an interactive login
        ssh = [ssh[0], "-t"] + ssh[1:-1]
    fd = os.open(nsexec.netns_path(host.controller_netns), os.O_RDONLY | os.O_CLOEXEC)

    def join():  # stay in the terminal's process group, as cmd_exec does
        if nsexec._libc.setns(fd, nsexec.CLONE_NEWNET) != 0:
            raise OSError("setns %s failed" % host.controller_netns)

    try:
        proc = subprocess.Popen(ssh, preexec_fn=join)
    finally:
        os.close(fd)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_roots(args):
    return booted_roots.main(args.releases)


def cmd_demo(args):
    return demo.run()


def parser():
    p = argparse.ArgumentParser(prog="ipmasq-lab", description="Network-namespace labs "
                                "for ipmasq.gateway (see docs/lab.md).")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a lab and leave it up")
    up.add_argument("spec", help="spec file, or a shipped topology (%s)"
                    % ", ".join(spec_mod.shipped_topologies()))
    up.add_argument("--prefix", help="lab prefix (default: ml + 6 random hex digits)")
    up.add_argument("--hold", action="store_true",
                    help="stay in the foreground; tear the lab down on Ctrl-C/SIGTERM")
    up.add_argument("--json", action="store_true", help="print the lab as JSON")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="tear down a lab (or every recorded lab)")
    down.add_argument("prefix", nargs="?")
    down.add_argument("--all", action="store_true", help="every lab in the registry")
    down.set_defaults(func=cmd_down)
    ls = sub.add_parser("list", help="list recorded labs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="addresses per host, read from the kernel")
    show.add_argument("prefix")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    ex = sub.add_parser("exec", help="run a command in a host's namespace")
    ex.add_argument("prefix")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    ex.set_defaults(func=cmd_exec)
    val = sub.add_parser("validate", help="check a spec without building it")
    val.add_argument("spec")
    val.set_defaults(func=cmd_validate)
    dm = sub.add_parser("demo", help="seed lab, pings with forwarding on and off, teardown")
    dm.set_defaults(func=cmd_demo)
    sh = sub.add_parser("ssh", help="SSH to a booted host (kind: debian) of a lab")
    sh.add_argument("prefix")
    sh.add_argument("host")
    sh.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    sh.set_defaults(func=cmd_ssh)
    rt = sub.add_parser("roots", help="build (or refresh) the cached Debian roots")
    rt.add_argument("releases", nargs="*", metavar="RELEASE")
    rt.set_defaults(func=cmd_roots)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except LabSpecError as exc:
        print("ipmasq-lab: %s" % exc, file=sys.stderr)
        return 2
    except LabError as exc:
        print("ipmasq-lab: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
