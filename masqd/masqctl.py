"""masqctl: command line of masqd, in the seed's ipmasqadm (and ipchains) syntax.

    masqctl [--socket PATH] [--json] portfw -a -P tcp -L extip 80 -R 10.16.0.27 80 -p 15
    masqctl mfw -I -m 3 -r 10.16.0.46/32
    masqctl mark -I input -s ! 203.0.113.0/24 -m 3
    masqctl masq -A -p tcp -s 10.16.0.27/32 80 -j MASQ
    masqctl status

Exit status: 0 done, 1 refused by the agent (or the agent is not running), 2 usage
error (the usage text is printed, as ipmasqadm did).
"""

import json
import sys

from masqd import import_export, ipmasqadm, listing
from masqd.client import AgentUnavailable, Client, MasqdError

USAGE = """\
Usage: masqctl [--socket PATH] [--json] MODULE [module-specific-options]
       masqctl MODULE -h
       masqctl status
       masqctl import [--skip-unknown] FILE|-   legacy script -> the role's table variables (YAML)
       masqctl export                           the agent's tables as the same YAML

Modules (the seed's ipmasqadm and ipchains syntax, only the program name differs):
    autofw   auto-forwarding            (ipmasqadm autofw)
    portfw   port forwarding            (ipmasqadm portfw)
    mfw      firewall-mark forwarding   (ipmasqadm mfw)
    mark     marking rules              (ipchains ... -m MARK)
    masq     masquerading rules         (ipchains ... -j MASQ)

--socket PATH   the agent's socket (default $MASQD_SOCKET or /run/masqd/masqd.sock)
--json          print the API's JSON instead of text
"""

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def split_global_options(argv):
    """Take --socket PATH / --socket=PATH / --json from anywhere in argv."""
    socket_path, as_json, rest = None, False, []
    items = iter(argv)
    for token in items:
        if token == "--json":
            as_json = True
        elif token == "--socket":
            socket_path = next(items, None)
            if socket_path is None:
                raise ipmasqadm.UsageError("masqctl", "--socket needs PATH")
        elif token.startswith("--socket="):
            socket_path = token.split("=", 1)[1]
        else:
            rest.append(token)
    return socket_path, as_json, rest


def _print_json(value, out):
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def run(argv, client_factory=Client, out=sys.stdout, err=sys.stderr, names=None):
    """Run one masqctl command line (argv without the program name); returns the exit status."""
    try:
        socket_path, as_json, argv = split_global_options(argv)
    except ipmasqadm.UsageError as exc:
        err.write("masqctl: %s\n%s" % (exc.message, USAGE))
        return EXIT_USAGE
    if not argv or argv[0] in ("-h", "--help", "help"):
        (out if argv else err).write(USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    module = argv[0]
    if module == "import":  # needs no agent
        return import_export.run_import(argv[1:], out=out, err=err)
    if module == "export":
        try:
            with client_factory(socket_path) as client:
                return import_export.run_export(argv[1:], client, out=out, err=err)
        except (MasqdError, AgentUnavailable) as exc:
            err.write("masqctl export: %s\n" % exc)
            return EXIT_REFUSED
    try:
        if module == "status":
            if len(argv) > 1:
                raise ipmasqadm.UsageError("masqctl", "status takes no arguments")
            command = None
        else:
            command = ipmasqadm.parse(argv)
    except ipmasqadm.UsageError as exc:
        if exc.module in ipmasqadm.USAGES:
            err.write("masqctl %s: %s\n%s" % (exc.module, exc.message, exc.usage))
        else:
            err.write("masqctl: %s\n%s" % (exc.message, USAGE))
        return EXIT_USAGE
    if command is not None and command.help:
        out.write(command.help)
        return EXIT_OK

    try:
        with client_factory(socket_path) as client:
            if command is None:
                envelope = client.request("status")
                if as_json:
                    _print_json(envelope["result"], out)
                else:
                    out.write(listing.format_status(envelope["result"]))
                return EXIT_OK
            if command.verbose:
                out.write(command.verbose + "\n")
            if command.listing:
                result = client.request("list", table=command.listing, stream=True)["result"]
                if as_json:
                    _print_json(result, out)
                else:
                    shown = names or listing.Names(numeric=command.numeric)
                    out.write(listing.format_table(command.listing, result.get("entries", []), shown))
                return EXIT_OK
            request = command.request
            if command.needs_table:
                current = client.request("get", table=command.needs_table)
                request = command.finish(current["result"].get("entries", []), current.get("revision"))
            envelope = client.request(**request)
            if as_json:
                _print_json(envelope, out)
            return EXIT_OK
    except ipmasqadm.StateError as exc:
        err.write("masqctl %s: %s\n" % (module, exc))
        return EXIT_REFUSED
    except MasqdError as exc:
        err.write("masqctl %s: %s\n" % (module, exc))
        return EXIT_REFUSED
    except AgentUnavailable as exc:
        err.write("masqctl: %s\n" % exc)
        return EXIT_REFUSED


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `masqctl portfw -l | head`
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # pylint: disable=broad-except  # one line, never a traceback
        sys.stderr.write("masqctl: unexpected error: %s: %s\n" % (type(exc).__name__, exc))
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
