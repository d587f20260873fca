"""`masqctl import` and `masqctl export`: legacy scripts and the running agent's tables
as the gateway role's table variables (YAML).

    masqctl import [--skip-unknown] FILE|-     needs no agent
    masqctl export                             the agent's tables, one consistent read

Exit status: 0 done; 1 agent refused or not running (export); 2 usage error or a line
import cannot translate (its number and why on stderr).
"""

from __future__ import annotations

import sys

from masqd import legacy_import, yaml_out

IMPORT_USAGE = """\
Usage: masqctl import [--skip-unknown] FILE|-
       masqctl export

import   reads a shell script of ipmasqadm portfw|autofw|mfw and ipchains lines
         (-m MARK rules: marks, -j MASQ rules: masquerade; comments, blank lines and
         NAME=value / $NAME / ${NAME} variables allowed) and prints the gateway role's
         table variables (gateway_portfw, gateway_autofw, gateway_mfw, gateway_marks,
         gateway_masquerade) as YAML, each entry commented with its source lines.
         Only the tables the script names are written. Host and service names are
         resolved as masqctl resolves them. A line it cannot translate: exit 2 with the
         line number and why; --skip-unknown comments such lines out instead.
export   prints the running agent's tables as the same YAML.
"""

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def run_import(argv, out=sys.stdout, err=sys.stderr, stdin=sys.stdin, lookup=None) -> int:
    skip_unknown = False
    paths = []
    for token in argv:
        if token == "--skip-unknown":
            skip_unknown = True
        elif token in ("-h", "--help"):
            out.write(IMPORT_USAGE)
            return EXIT_OK
        elif token.startswith("-") and token != "-":
            err.write("masqctl import: unknown option %s\n%s" % (token, IMPORT_USAGE))
            return EXIT_USAGE
        else:
            paths.append(token)
    if len(paths) != 1:
        err.write("masqctl import: give one FILE (or - for standard input)\n%s" % IMPORT_USAGE)
        return EXIT_USAGE
    path = paths[0]
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            text = stdin.read()
        else:
            with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                text = handle.read()
    except OSError as exc:
        err.write("masqctl import: %s: %s\n" % (name, exc.strerror or exc))
        return EXIT_USAGE
    try:
        result = legacy_import.translate(text, skip_unknown=skip_unknown, lookup=lookup)
    except legacy_import.TranslateError as exc:
        err.write("masqctl import: %s:%d: %s\n    %s\n" % (name, exc.line, exc.reason, exc.text))
        return EXIT_USAGE
    out.write(yaml_out.import_document(result))
    return EXIT_OK


def run_export(argv, client, out=sys.stdout, err=sys.stderr) -> int:
    """`client`: an open masqd.client.Client (errors are the caller's to report)."""
    if argv:
        if argv[0] in ("-h", "--help"):
            out.write(IMPORT_USAGE)
            return EXIT_OK
        err.write("masqctl export: takes no arguments\n%s" % IMPORT_USAGE)
        return EXIT_USAGE
    envelope = client.request("get")
    out.write(yaml_out.export_document(envelope["result"]["tables"], envelope.get("revision")))
    return EXIT_OK
