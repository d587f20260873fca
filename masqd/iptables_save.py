"""`iptables-save` output -> the gateway role's table variables (the second source of
`masqctl import`).

The rules that map onto masqd's tables are rewritten as the masqctl line they stand
for and go through the same parser (ipmasqadm.parse) and the same in-memory tables
(legacy_import.Tables) as a script's lines:

    *nat  -A PREROUTING -d ADDR[/32] -p tcp|udp --dport PORT -j DNAT --to-destination A[:P]
          -> portfw -a -P tcp|udp -L ADDR PORT -R A P     (P defaults to PORT)
          several for one key, the `-m statistic --mode nth --every N --packet 0`
          round-robin idiom -> one key, those backends, pref 1 each
    *nat  -A PREROUTING -m mark --mark M -j DNAT --to-destination A[:P]
          -> mfw -A -m M -r A [P]
    *nat  -A POSTROUTING [criteria] -j MASQUERADE          -> masq -A [criteria]
    *mangle -A PREROUTING [criteria] -j MARK --set-mark M  -> mark [criteria] -m M

MARK does not end the chain, so the last matching rule's mark is the one a packet
keeps; masqd's marks are first-match: the mangle rules are imported in reverse order.
Everything else (other chains and tables, filter rules, SNAT, jumps to user chains)
cannot be translated and is reported with its line, like a script's line.
Standard library only (shared with module_utils through legacy_import).
"""

from __future__ import annotations
from typing import Any, Dict, List, Optional

from . import ipmasqadm, legacy_import

# What each option becomes in the masqctl mark/masq criteria ("!" before the option
# in iptables-save is "!" after it in ipchains syntax).
_CRITERIA = {"-s": "-s", "--source": "-s", "-d": "-d", "--destination": "-d", "-p": "-p", "--protocol": "-p",
             "--sport": "--sport", "--source-port": "--sport", "--dport": "--dport",
             "--destination-port": "--dport", "--sports": "--sport", "--dports": "--dport"}
_MATCHES_WITHOUT_MEANING = ("tcp", "udp", "icmp", "multiport", "comment")


def looks_like(text: str) -> bool:
    """iptables-save output starts (after comments) with a `*table` line."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line.startswith("*")
    return False


class _Rule:
    """One `-A CHAIN ...` line, read into its parts."""

    def __init__(self, words: Optional[list] = None):
        self.chain: Optional[str] = None
        self.target: Optional[str] = None
        self.target_options: Dict[str, Any] = {}
        self.criteria: List[Any] = []
        self.interface_in = self.interface_out = None
        self.mark = None
        self.statistic: Dict[str, Any] = {}
        self.comment = None
        if words is not None:
            self._read(words)

    def _read(self, words):
        index, negate = 0, False
        while index < len(words):
            word = words[index]
            value = words[index + 1] if index + 1 < len(words) else None
            if word == "!":
                negate = True
                index += 1
                continue
            if word in ("-A", "--append"):
                self.chain = value
            elif word in ("-j", "--jump"):
                self.target = value
            elif word in ("--to-destination", "--to", "--set-mark", "--set-xmark", "--to-source", "--to-ports"):
                self.target_options[word] = value
            elif word in ("-m", "--match"):
                if value not in _MATCHES_WITHOUT_MEANING + ("mark", "statistic"):
                    raise ValueError("-m %s: this match has no masqd equivalent" % value)
            elif word == "--mark":
                if negate:
                    raise ValueError("! --mark: an inverted mark match has no masqd equivalent")
                self.mark = value
            elif word in ("--mode", "--every", "--packet", "--probability"):
                self.statistic[word] = value
            elif word == "--comment":
                self.comment = value
            elif word in ("-i", "--in-interface", "-o", "--out-interface"):
                if negate:
                    raise ValueError("! %s: an inverted interface has no masqd equivalent" % word)
                if word in ("-i", "--in-interface"):
                    self.interface_in = value
                else:
                    self.interface_out = value
            elif word in _CRITERIA:
                flag = _CRITERIA[word]
                if negate and flag not in ("-s", "-d"):
                    raise ValueError("! %s: only addresses can be inverted in masqd" % word)
                self.criteria += [flag] + (["!"] if negate else []) + [value.replace(":", "-")
                                                                       if flag.endswith("port") else value]
            else:
                raise ValueError("%s: this option has no masqd equivalent" % word)
            negate = False
            index += 2
        if self.chain is None:
            raise ValueError("only -A CHAIN rules are read")

    def option(self, name: str) -> Optional[str]:
        return self.target_options.get(name)


def _key_of_criteria(criteria, flag):
    return criteria[criteria.index(flag) + 1] if flag in criteria else None


def _dnat_argv(rule: _Rule):
    """(masqctl argv, round-robin key or None) of a PREROUTING DNAT rule."""
    to = rule.option("--to-destination")
    if not to or "-" in to.split(":")[0]:
        raise ValueError("DNAT needs --to-destination ADDR[:PORT] (one address)")
    if to.startswith("["):
        address, _bracket, rest = to[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    else:
        address, _colon, port = to.partition(":")
    if port and "-" in port:
        raise ValueError("DNAT to a port range has no masqd equivalent")
    if rule.mark is not None:
        if rule.criteria or rule.interface_in:
            raise ValueError("a DNAT on a mark with further criteria has no masqd equivalent: "
                             "classify with a mangle MARK rule, then DNAT on the mark alone")
        mark = rule.mark.split("/")[0]
        return ["mfw", "-A", "-m", str(int(mark, 0)), "-r", address] + ([port] if port else []), None
    local = _key_of_criteria(rule.criteria, "-d")
    protocol = _key_of_criteria(rule.criteria, "-p")
    dport = _key_of_criteria(rule.criteria, "--dport")
    known = {"-d", "-p", "--dport"}
    if local is None or protocol is None or dport is None or "!" in rule.criteria:
        raise ValueError("PORTFW needs -d ADDR -p tcp|udp --dport PORT (a DNAT on other criteria "
                         "has no masqd equivalent)")
    if any(flag in rule.criteria for flag in _CRITERIA.values() if flag not in known) or rule.interface_in:
        raise ValueError("PORTFW matches the local address and port only; -s, --sport and -i have no equivalent")
    address_only, _slash, prefix = local.partition("/")
    if prefix and prefix not in ("32", "128"):
        raise ValueError("PORTFW's local address is one address, not %s" % local)
    if "," in dport or "-" in dport:
        raise ValueError("PORTFW forwards one port, not %s" % dport)
    argv = ["portfw", "-a", "-P", protocol, "-L", address_only, dport, "-R", address, port or dport]
    return argv, (protocol, address_only, dport)


def _criteria_argv(rule: _Rule, interface_flag: str, interface):
    return list(rule.criteria) + ([interface_flag, interface] if interface else [])


def _rule_argv(table: str, rule: _Rule):
    """(masqctl argv, round-robin key or None) for a rule of `table`."""
    if table == "nat" and rule.chain == "PREROUTING" and rule.target == "DNAT":
        return _dnat_argv(rule)
    if table == "nat" and rule.chain == "POSTROUTING" and rule.target == "MASQUERADE":
        if rule.interface_in or rule.mark is not None or rule.statistic or rule.target_options:
            raise ValueError("MASQUERADE with -i, a mark match, statistic or --to-ports has no masqd equivalent")
        argv = ["masq", "-A"] + _criteria_argv(rule, "-o", rule.interface_out) + ["-j", "MASQ"]
        return argv + (["--name", rule.comment] if rule.comment else []), None
    if table == "mangle" and rule.chain == "PREROUTING" and rule.target == "MARK":
        value = rule.option("--set-mark") or rule.option("--set-xmark")
        if value is None or rule.mark is not None or rule.statistic or rule.interface_out:
            raise ValueError("MARK needs --set-mark M (or --set-xmark M/0xffffffff) and no mark match")
        mark, _slash, mask = value.partition("/")
        if mask and int(mask, 0) != 0xFFFFFFFF:
            raise ValueError("MARK with a mask (%s) changes bits, masqd sets whole marks" % value)
        argv = ["mark", "-A"] + _criteria_argv(rule, "-i", rule.interface_in) + ["-m", str(int(mark, 0))]
        return argv + (["--name", rule.comment] if rule.comment else []), None
    raise ValueError("%s %s -j %s: no masqd table (DNAT in nat PREROUTING, MASQUERADE in nat "
                     "POSTROUTING and MARK in mangle PREROUTING are)" % (table, rule.chain, rule.target))


def translate(text: str, skip_unknown: bool = False, lookup=None) -> legacy_import.Result:
    return translate_rules(_saved_rules(text), skip_unknown, lookup)


def _saved_rules(text):
    """(source, table, _Rule or the ValueError why not) of each rule line."""
    table = None
    for number, line in legacy_import.logical_lines(text):
        if not line or line.startswith("#") or line == "COMMIT" or line.startswith(":"):
            continue  # comments, the end of a table, chain policies and counters
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        try:
            yield (number, line), table, _Rule(legacy_import.split(line, {}))
        except ValueError as exc:
            yield (number, line), table, exc


def translate_rules(rules, skip_unknown: bool = False, lookup=None) -> legacy_import.Result:
    """The tables `rules` ((source, table, _Rule or ValueError), in rule order) build.
    Shared by the iptables-save and the nft ruleset readers."""
    result = legacy_import.Result()
    tables = legacy_import.Tables(result)
    marks: List[Any] = []             # mangle MARK rules, applied last and in reverse (last match wins)
    round_robin: Dict[Any, list] = {}  # portfw key -> [(every, source)] of the nth idiom
    pending: List[Any] = []           # (argv, source) in order, marks aside

    def refuse(source, reason):
        if not skip_unknown:
            raise legacy_import.TranslateError(source[0], source[1], reason)
        result.skipped.append((source[0], source[1], reason))

    for source, table, rule in rules:
        try:
            if isinstance(rule, ValueError):
                raise rule
            if table not in ("nat", "mangle"):
                raise ValueError("*%s: only the nat and mangle tables have masqd equivalents" % table)
            argvs = _rule_argvs(table, rule)
            if len(argvs) > 1:  # nft's `dnat to numgen inc mod N map {...}`: one rule, N backends
                key = argvs[0][1]
                if key is not None and round_robin.get(key):
                    raise ValueError("a second DNAT for %s %s:%s is never reached" % key)
                round_robin[key] = [(None, source)]
                argvs = [(argv + ["-p", "1"], None) for argv, _key in argvs]
            for argv, key in argvs:
                if key is not None:
                    argv = _round_robin(round_robin, key, rule, argv, source)
                (marks if argv[0] == "mark" else pending).append((argv, source))
        except ValueError as exc:
            refuse(source, str(exc))
    for key, shares in round_robin.items():
        if shares and shares[-1][0] is not None:
            refuse(shares[-1][1], "the round-robin rules of %s %s:%s end without a rule that takes the rest" % key)
    for argv, source in pending + list(reversed(marks)):
        try:
            command = ipmasqadm.parse(argv, lookup)
            tables.apply(command.request, source)
        except ipmasqadm.UsageError as exc:
            refuse(source, "%s: %s" % (exc.module, exc.message))
        except ValueError as exc:
            refuse(source, str(exc))
    return result


def _rule_argvs(table, rule):
    """[(argv, key)]: one per DNAT target (nft's numgen map has several)."""
    targets = rule.option("--to-destination")
    if not isinstance(targets, list):
        return [_rule_argv(table, rule)]
    out = []
    for target in targets:
        single = _Rule()
        single.__dict__.update(rule.__dict__)
        single.target_options = {"--to-destination": target}
        out.append(_rule_argv(table, single))
    return out


def _round_robin(state, key, rule, argv, source):
    """The nth idiom: rule k of n has `--every n-k --packet 0`, the last none. Each
    backend then takes one connection in turn: pref 1."""
    shares = state.setdefault(key, [])
    every = rule.statistic.get("--every")
    if rule.statistic:
        if rule.statistic.get("--mode") != "nth" or rule.statistic.get("--packet", "0") != "0" or every is None:
            raise ValueError("only the round-robin idiom of -m statistic (--mode nth --every N --packet 0) "
                             "has a masqd equivalent")
        every = int(every)
        if shares and shares[-1][0] != every + 1:
            raise ValueError("--every %d after --every %s is not an even round robin" % (every, shares[-1][0]))
    elif shares and shares[-1][0] != 2:
        if shares[-1][0] is None:
            raise ValueError("a second DNAT for %s %s:%s is never reached (the first takes every connection)" % key)
        raise ValueError("the round robin of %s %s:%s ends too early" % key)
    shares.append((every, source))
    if rule.statistic or shares[:-1]:
        return argv + ["-p", "1"]
    return argv
