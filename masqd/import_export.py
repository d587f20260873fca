"""`masqctl import` and `masqctl export`: legacy scripts and the running agent's tables
as the gateway role's table variables (YAML).

    masqctl import [--skip-unknown] FILE|-     needs no agent
    masqctl export [--script]                  the agent's tables, one consistent read

Exit status: 0 done; 1 agent refused or not running (export); 2 usage error or a line
import cannot translate (its number and why on stderr).
"""

from __future__ import annotations

import sys

from masqd import legacy_import, yaml_out

IMPORT_USAGE = """\
Usage: masqctl import [--skip-unknown] FILE|-
       masqctl export [--script]

import   reads a shell script of ipmasqadm portfw|autofw|mfw and ipchains lines
         (-m MARK rules: marks, -j MASQ rules: masquerade; comments, blank lines and
         NAME=value / $NAME / ${NAME} variables allowed) and prints the gateway role's
         table variables (gateway_portfw, gateway_autofw, gateway_mfw, gateway_marks,
         gateway_masquerade) as YAML, each entry commented with its source lines.
         iptables-save and `nft list ruleset` output are read too (DNAT, MASQUERADE
         and MARK rules). Only the tables the input names are written. Host and service names are
         resolved as masqctl resolves them. A line it cannot translate: exit 2 with the
         line number and why; --skip-unknown comments such lines out instead.
export   prints the running agent's tables as the same YAML; with --script, as
         masqctl lines that rebuild them (`masqctl import` of that script gives the
         same YAML as `masqctl export`).
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
    as_script = False
    for token in argv:
        if token in ("-h", "--help"):
            out.write(IMPORT_USAGE)
            return EXIT_OK
        if token != "--script":
            err.write("masqctl export: unknown argument %s\n%s" % (token, IMPORT_USAGE))
            return EXIT_USAGE
        as_script = True
    envelope = client.request("get")
    tables = envelope["result"]["tables"]
    out.write(script(tables) if as_script else yaml_out.export_document(tables))
    return EXIT_OK


# -- export --script: masqctl lines in the seed's syntax ------------------------------

def _ports(ports) -> str:
    return ",".join(str(port) for port in ports)


def _criteria(entry) -> list:
    words = []
    if entry.get("protocol"):
        words += ["-p", entry["protocol"]]
    for field, flag in (("source", "-s"), ("destination", "-d")):
        if entry.get(field):
            words += [flag] + (["!"] if entry.get(field + "_invert") else []) + [entry[field]]
    for field, flag in (("source_ports", "--sport"), ("destination_ports", "--dport")):
        if entry.get(field):
            words += [flag, _ports(entry[field])]
    for field, flag in (("input_interface", "-i"), ("output_interface", "-o")):
        if entry.get(field):
            words += [flag, entry[field]]
    return words


def entry_lines(table: str, entry: dict) -> list:
    """masqctl lines that add `entry` (complete, as the agent returns it) to `table`."""
    e = legacy_import.canonical(table, entry)
    if table == "portfw":
        return ["masqctl portfw -a -P %s -L %s %d -R %s %d -p %d" % (
            e["protocol"], e["local_address"], e["local_port"], b["address"], b["port"], b["pref"])
            for b in e["backends"]]
    if table == "mfw":
        return ["masqctl mfw -A -m %d -r %s%s -p %d" % (
            e["mark"], b["address"], "" if b["port"] is None else " %d" % b["port"], b["pref"])
            for b in e["backends"]]
    if table == "autofw":
        if e["hidden_host"]:
            recipient = "-h %s" % e["hidden_host"]
        else:
            recipient = "-c %s %d" % (e["control_protocol"], e["control_port"])
            if e["keyed_by_peer"]:
                recipient += " --keyed-by-peer"
        return ["masqctl autofw -A -r %s %d %d %s -t %d" % (
            e["protocol"], e["low_port"], e["high_port"], recipient, e["timeout"])]
    if table == "marks":
        return [" ".join(["masqctl", "mark", "-A", "input", "--name", e["name"]] + _criteria(e)
                         + ["-m", str(e["mark"])])]
    extras = []
    if e["pool"]:
        extras += ["--pool", ",".join(e["pool"])]
    if e["pool_ports"]:
        extras += ["--pool-ports", _ports(e["pool_ports"])]
    if e["helpers"]:
        extras += ["--helper", ",".join(e["helpers"])]
    return [" ".join(["masqctl", "masq", "-A", "forward", "--name", e["name"]] + _criteria(e) + extras
                     + ["-j", "MASQ"])]


_FLUSH = {"portfw": "masqctl portfw -f", "autofw": "masqctl autofw -F", "mfw": "masqctl mfw -F",
          "marks": "masqctl mark -F", "masquerade": "masqctl masq -F"}


def script(tables: dict) -> str:
    lines = ["#!/bin/sh", "# masqctl export --script: the agent's tables as masqctl lines", "set -e"]
    for table, variable in legacy_import.TABLE_VARIABLES:
        lines += ["", "# %s" % variable, _FLUSH[table]]
        for entry in tables.get(table, []):
            lines += entry_lines(table, entry)
    return "\n".join(lines) + "\n"
