"""`nft list ruleset` output -> the gateway role's table variables (a source of
`masqctl import`, next to scripts and iptables-save).

The chains are told apart by their hook and type, not their names: a `type nat hook
prerouting` chain holds DNAT rules (PORTFW, or mfw on `meta mark M`), a `type nat hook
postrouting` chain masquerade rules, a `type filter hook prerouting` chain `meta mark
set M` rules (marks). Each rule is read into the same parts as an iptables-save rule
and translated by iptables_save.translate_rules (the same masqctl lines, the same
parser). `dnat to numgen inc mod N map { 0 : A, 1 : B, ... }` is a round robin: one
key, those backends, pref 1 each. masqd's own tables (`inet masqd` and its PORTFW
shards, `inet masqd_portfw_N`) are skipped: its tables are what `masqctl export`
prints. Standard library only.
"""

from __future__ import annotations

import re

from . import iptables_save, legacy_import

_TABLE = re.compile(r"^table\s+(ip|ip6|inet)\s+(\S+)\s*\{$")
_CHAIN = re.compile(r"^chain\s+(\S+)\s*\{$")
_HOOK = re.compile(r"^type\s+(\w+)\s+hook\s+(\w+)\b")
_TOKEN = re.compile(r'"[^"]*"|\{[^}]*\}|\S+')
# (chain type, hook) -> the iptables table and chain whose rules it holds
_HOOKS = {("nat", "prerouting"): ("nat", "PREROUTING"), ("nat", "postrouting"): ("nat", "POSTROUTING"),
          ("filter", "prerouting"): ("mangle", "PREROUTING")}
_NUMGEN = re.compile(r"^\{\s*(.*?)\s*\}$")
_OWN_TABLE = re.compile(r"^masqd(_portfw_\d+)?$")


def looks_like(text: str) -> bool:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return bool(_TABLE.match(line))
    return False


def translate(text: str, skip_unknown: bool = False, lookup=None) -> legacy_import.Result:
    return iptables_save.translate_rules(_rules(text), skip_unknown, lookup)


def _strip(line):
    """The line without nft -a's `# handle N` and surrounding blanks."""
    return re.sub(r"\s+# handle \d+$", "", line.strip())


def _rules(text):
    """(source, iptables table, _Rule or the ValueError why not) of each rule line."""
    stack = []          # open blocks: "table", "skip" (inet masqd), "chain", "other"
    chain_kind = None   # (table, chain) of the open base chain, "regular" or "other"
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip(raw)
        if not line or line.startswith("#"):
            continue
        if line == "}":
            if stack:
                stack.pop()
            continue
        if not stack:
            match = _TABLE.match(line)
            if not match:
                yield (number, line), None, ValueError("expected `table FAMILY NAME {`")
                continue
            stack.append("skip" if match.group(1) == "inet" and _OWN_TABLE.match(match.group(2)) else "table")
            continue
        if stack[-1] != "chain" or "skip" in stack:
            if line.endswith("{"):
                is_chain = stack[-1] == "table" and _CHAIN.match(line)
                stack.append("chain" if is_chain else "other")
                chain_kind = "regular"
            continue
        hook = _HOOK.match(line)
        if hook:
            chain_kind = _HOOKS.get((hook.group(1), hook.group(2)), "other")
            continue
        source = (number, line)
        if chain_kind == "regular":
            yield source, None, ValueError("a rule in a regular chain (one without a hook) is only "
                                           "reached by a jump: not translated")
        elif chain_kind == "other":
            yield source, None, ValueError("a rule in a chain of this type and hook has no masqd table "
                                           "(nat prerouting, nat postrouting and filter prerouting do)")
        else:
            try:
                yield source, chain_kind[0], _rule(chain_kind[1], line)
            except ValueError as exc:
                yield source, chain_kind[0], exc


def _value(tokens, index, what):
    if index >= len(tokens):
        raise ValueError("%s needs a value" % what)
    value = tokens[index]
    if value.startswith("@") or value.startswith("$"):
        raise ValueError("%s %s: named sets and variables are not translated" % (what, value))
    if value.startswith("{"):
        return ",".join(part.strip() for part in value[1:-1].split(",") if part.strip())
    return value.strip('"')


def _rule(chain, line):
    tokens = _TOKEN.findall(line)
    rule = iptables_save._Rule()
    rule.chain = chain
    index = 0
    protocol = None
    while index < len(tokens):
        word = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if word in ("ip", "ip6") and following in ("saddr", "daddr"):
            negate = tokens[index + 2] == "!=" if index + 2 < len(tokens) else False
            value = _value(tokens, index + 2 + negate, "%s %s" % (word, following))
            rule.criteria += ["-s" if following == "saddr" else "-d"] + (["!"] if negate else []) + [value]
            index += 3 + negate
        elif word in ("tcp", "udp") and following in ("sport", "dport"):
            if index + 2 < len(tokens) and tokens[index + 2] == "!=":
                raise ValueError("%s %s !=: only addresses can be inverted in masqd" % (word, following))
            if protocol not in (None, word):
                raise ValueError("both tcp and udp in one rule")
            if protocol is None:
                rule.criteria += ["-p", word]
                protocol = word
            rule.criteria += ["--sport" if following == "sport" else "--dport",
                              _value(tokens, index + 2, "%s %s" % (word, following))]
            index += 3
        elif (word, following) in (("meta", "l4proto"), ("ip", "protocol"), ("ip6", "nexthdr")):
            value = _value(tokens, index + 2, "%s %s" % (word, following))
            if protocol not in (None, value):
                raise ValueError("both %s and %s in one rule" % (protocol, value))
            if protocol is None:
                rule.criteria += ["-p", value]
                protocol = value
            index += 3
        elif word in ("iifname", "oifname"):
            value = _value(tokens, index + 1, word)
            if value == "!=":
                raise ValueError("%s !=: an inverted interface has no masqd equivalent" % word)
            if word == "iifname":
                rule.interface_in = value
            else:
                rule.interface_out = value
            index += 2
        elif word in ("meta", "mark") and (word == "mark" or following == "mark"):
            at = index + (1 if word == "mark" else 2)
            if at < len(tokens) and tokens[at] == "set":
                rule.target = "MARK"
                rule.target_options["--set-mark"] = _value(tokens, at + 1, "mark set")
                index = at + 2
            else:
                if at < len(tokens) and tokens[at] == "!=":
                    raise ValueError("mark !=: an inverted mark match has no masqd equivalent")
                rule.mark = _value(tokens, at, "mark")
                index = at + 1
        elif word == "counter":
            index += 1
            while index + 1 < len(tokens) and tokens[index] in ("packets", "bytes"):
                index += 2
        elif word == "comment":
            rule.comment = _value(tokens, index + 1, "comment")
            index += 2
        elif word == "masquerade":
            rule.target = "MASQUERADE"
            index += 1
        elif word == "dnat":
            index += 1
            if index < len(tokens) and tokens[index] in ("ip", "ip6"):
                index += 1
            if index >= len(tokens) or tokens[index] != "to":
                raise ValueError("dnat needs `to ADDR[:PORT]`")
            rule.target = "DNAT"
            rest = tokens[index + 1:]
            if rest[:3] == ["numgen", "inc", "mod"] and len(rest) >= 6 and rest[4] == "map":
                rule.target_options["--to-destination"] = _numgen(int(rest[3]), rest[5])
                index += 7
            else:
                rule.target_options["--to-destination"] = _value(tokens, index + 1, "dnat to")
                index += 2
        else:
            raise ValueError("%s: no masqd equivalent" % word)
    if rule.target is None:
        raise ValueError("a rule without dnat, masquerade or mark set has no masqd table")
    return rule


def _numgen(modulus, mapping):
    """`{ 0 : A, 1 : B }` of `numgen inc mod N map` -> [A, B] in counter order."""
    match = _NUMGEN.match(mapping)
    if not match:
        raise ValueError("numgen map %s: expected { 0 : ADDR, 1 : ADDR, ... }" % mapping)
    targets = {}
    for part in match.group(1).split(","):
        number, _colon, target = part.partition(":")
        if not number.strip().isdigit() or not target.strip():
            raise ValueError("numgen map %s: expected { 0 : ADDR, 1 : ADDR, ... }" % mapping)
        targets[int(number)] = target.strip()
    if sorted(targets) != list(range(modulus)):
        raise ValueError("numgen inc mod %d map needs exactly the keys 0..%d" % (modulus, modulus - 1))
    return [targets[n] for n in range(modulus)]
