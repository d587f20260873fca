#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: masq_mfw
short_description: Manage FWMARK forwarding (ipmasqadm mfw) on a gateway
version_added: 0.1.0
description:
  - Manages the gateway's mfw table, the firewall-mark forwarding of C(ipmasqadm mfw).
    Connections carrying mark O(config[].mark) (set by M(ipmasq.gateway.masq_mark)
    rules) go to the head backend of the mark's ordered list.
  - Scheduling is PORTFW's; each connection lowers the head's pcnt and at 0 the head
    moves to the back. A backend with pref 0 is never scheduled away; it stays head
    until scheduling is forced with O(schedule) (the seed's C(mfw -S)), which is the
    seed's failover recipe (every pref 0, force scheduling when the primary is down).
  - A backend without a port forwards every port of TCP and UDP, and ICMP, keeping
    the packet's destination port.
  - An entry's key is O(config[].mark).
  - Programs the C(masqd) agent, which applies the table to nftables atomically.
author: ipmasq.gateway developers (@ipmasq)
options:
  config:
    description:
      - The mfw entries, one per mark.
      - Mutually exclusive with O(schedule).
    type: list
    elements: dict
    suboptions:
      mark:
        description: The firewall mark, 1-4294967295.
        type: int
      backends:
        description:
          - The ordered list of backends; the order is the scheduling order (head first).
          - With O(state=merged) a given list replaces the mark's list whole.
          - Required when the mark has no entry yet.
        type: list
        elements: dict
        suboptions:
          address:
            description: The backend's address.
            type: str
            required: true
          port:
            description:
              - The backend's port, 1-65535. When not set, the packet's destination
                port is kept (all ports, all protocols).
            type: int
          pref:
            description:
              - Preference (consecutive connections before the next backend becomes
                head); V(0) means never scheduled away. The agent's default is 10.
            type: int
          check:
            description:
              - A health check of this backend, run by the agent (docs/health.md). A
                backend that fails O(config[].backends[].check.fall) checks in a row leaves
                the schedule; after O(config[].backends[].check.rise) successes it is back.
            type: dict
            suboptions:
              type:
                description: The kind of check; V(none) is no check.
                type: str
                required: true
                choices: [none, tcp, http, icmp]
              port:
                description:
                  - The port to check (tcp, http). Default the backend's port; required for
                    a backend without a port.
                type: int
              path:
                description: The path an http check requests (default V(/)).
                type: str
              status:
                description: The HTTP status codes that count as up (default 200-399).
                type: list
                elements: int
              interval:
                description: Seconds between checks (default 2).
                type: float
              timeout:
                description: Seconds a check may take (default the interval).
                type: float
              fall:
                description: Failures in a row that take the backend down (default 3).
                type: int
              rise:
                description: Successes in a row that bring it back (default 2).
                type: int
      failback:
        description:
          - For a pref-0 (failover) list whose serving backend went down (the next live one became head); with V(false) (the default) a
            recovering backend does not take over again from the one that replaced it.
        type: bool
      all_down:
        description:
          - What happens when every checked backend is down. V(forward) (default) keeps
            forwarding to all of them; V(fallback) sends everything to
            O(config[].fallback); V(reject) refuses connections (TCP reset, ICMP
            unreachable).
        type: str
        choices: [forward, fallback, reject]
      fallback:
        description: The backend used when every backend is down and O(config[].all_down=fallback).
        type: dict
        suboptions:
          address:
            description: Its address.
            type: str
            required: true
          port:
            description: Its port (default the packet's own port).
            type: int
      flush_on_down:
        description:
          - Delete the conntrack entries of connections to a backend that went down, so
            their clients reconnect to a live one at once.
        type: bool
  schedule:
    description:
      - Force scheduling of this mark's list (the seed's C(mfw -S -m MARK)); the head
        backend moves to the back and the next one takes the connections.
      - Always reports a change. In check mode nothing is written and RV(after) shows the
        predicted list.
      - Mutually exclusive with O(config) and O(state).
    type: int
  state:
    description:
      - What to do with O(config) and the table on the gateway.
      - V(merged) (used when neither O(state) nor O(schedule) is given) adds the keys of O(config) and updates the fields given for keys that
        exist; fields not given keep their value. A given C(backends) list replaces
        the key's list whole, in the given order (the order is the scheduling order),
        as resource modules do with ordered lists.
      - V(replaced) replaces the entries of the keys in O(config) whole; fields not
        given take their defaults. Other keys are left alone.
      - V(overridden) makes the table exactly O(config), in its order; every other
        entry is removed; an empty list empties the table.
      - V(deleted) removes the keys in O(config) (only the key fields are needed);
        without O(config) it removes every entry.
      - V(gathered) reads the table and returns it in RV(gathered); nothing changes.
      - V(rendered) returns in RV(rendered) the table O(config) describes, with every
        default filled in, without changing the gateway and without contacting the
        agent (only the option types and ranges are checked). To have the agent
        validate a table (the kernel's dry run, the nftables text in RV(nft)), run
        V(overridden) in check mode.
      - V(parsed) returns in RV(parsed) the mfw table as the legacy script in
        O(running_config) leaves it (C(ipmasqadm) and C(ipchains) lines, read as
        C(masqctl import) reads them), every default filled in, without contacting
        the agent.
      - Entries keep their position in the table; new keys are appended in O(config) order.
      - The whole table is written in one compare-and-set C(set) (with the revision read
        before), so the change is atomic; if another writer changed the table in
        between, the module re-reads and retries once. A table that already matches is
        not written at all.
      - Mutually exclusive with O(schedule).
    type: str
    choices: [merged, replaced, overridden, deleted, gathered, rendered, parsed]
  running_config:
    description:
      - With O(state=parsed), the text of a legacy rc script, for example
        C("{{ lookup('ansible.builtin.file', 'rc.firewall') }}").
      - C(ipmasqadm portfw|autofw|mfw) lines, C(ipchains ... -m MARK) (marks) and
        C(ipchains ... -j MASQ) (masquerade) lines, comments, blank lines and shell
        variables (C(NAME=value), C($NAME), C(${NAME})); the same text C(masqctl import)
        reads; C(iptables-save) and C(nft list ruleset) output are read too. Lines for
        other tables are read but not returned.
      - A line that cannot be translated fails the task with its line number and why.
    type: str
extends_documentation_fragment:
  - ipmasq.gateway.agent
attributes:
  check_mode:
    support: full
    description: Asks the agent for a C(plan) of the change; nothing is applied.
  diff_mode:
    support: full
    description: Shows the table before and after, one field per line.
  platform:
    support: full
    platforms: posix
    description: Runs on the gateway, next to the C(masqd) agent.
seealso:
  - module: ipmasq.gateway.masq_mark
  - module: ipmasq.gateway.masq_masquerade
"""

EXAMPLES = r"""
- name: Forward the friend mark and the neutral mark (the seed's FWMARK example)
  ipmasq.gateway.masq_mfw:
    config:
      - mark: 1
        backends:
          - {address: 10.17.0.3}
      - mark: 3
        backends:
          - {address: 10.15.0.46}
    state: overridden

- name: Failover pair, the primary stays head until scheduling is forced
  ipmasq.gateway.masq_mfw:
    config:
      - mark: 7
        backends:
          - {address: 10.16.0.10, port: 443, pref: 0}
          - {address: 10.16.0.11, port: 443, pref: 0}

- name: The primary is down, promote the next backend
  ipmasq.gateway.masq_mfw:
    schedule: 7
"""

RETURN = r"""
before:
  description:
    - The table before the task, complete entries in table order.
    - With O(schedule), each mark's backends are listed in scheduling order, starting at the
      current head (the agent keeps the head apart from the configured order).
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - mark: 7
      backends:
        - {address: 10.16.0.10, port: 443, pref: 0}
        - {address: 10.16.0.11, port: 443, pref: 0}
after:
  description: The table after the task (in check mode, as it would be).
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - mark: 7
      backends:
        - {address: 10.16.0.11, port: 443, pref: 0}
        - {address: 10.16.0.10, port: 443, pref: 0}
commands:
  description:
    - masqctl command lines summarising what changed; removed keys are deleted, new or
      changed keys (re)added. The agent applies the whole table in one transaction;
      the lines are for people to read.
  returned: always except with O(state=gathered)
  type: list
  elements: str
  sample:
    - mfw -S -m 7
revision:
  description: The agent's state revision after the task.
  returned: when the agent was asked
  type: int
  sample: 13
gathered:
  description: The mfw table as the agent holds it.
  returned: with O(state=gathered)
  type: list
  elements: dict
rendered:
  description: The table O(config) describes, defaults filled in.
  returned: with O(state=rendered)
  type: list
  elements: dict
parsed:
  description:
    - The table the legacy script in O(running_config) leaves, defaults filled in
      (the entries C(masqctl import) writes for this table).
  returned: with O(state=parsed)
  type: list
  elements: dict
nft:
  description: The nftables text the agent would apply (from its plan).
  returned: in check mode when there is a change
  type: str
error:
  description: What the agent or the checks refused, naming the field and the value.
  returned: on failure
  type: dict
  sample: {field: "config[0].mark", value: 0, message: mark must be 1-4294967295}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipmasq.gateway.plugins.module_utils.masqd_client import MasqdClient, MasqdError
from ansible_collections.ipmasq.gateway.plugins.module_utils.resource import (
    ConfigError,
    schedule_order,
    scheduled,
    table_text,
)
from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import (
    MAX_MARK,
    REQUIRED_IF,
    fail_error,
    resource_argument_spec,
    run_resource_module,
)

CHECK_OPTIONS = {
    "type": {"type": "str", "required": True, "choices": ["none", "tcp", "http", "icmp"]},
    "port": {"type": "int"},
    "path": {"type": "str"},
    "status": {"type": "list", "elements": "int"},
    "interval": {"type": "float"},
    "timeout": {"type": "float"},
    "fall": {"type": "int"},
    "rise": {"type": "int"},
}

BACKEND_OPTIONS = {
    "address": {"type": "str", "required": True},
    "port": {"type": "int"},
    "pref": {"type": "int"},
    "check": {"type": "dict", "options": CHECK_OPTIONS},
}

ENTRY_OPTIONS = {
    "mark": {"type": "int"},
    "backends": {"type": "list", "elements": "dict", "options": BACKEND_OPTIONS},
    "failback": {"type": "bool"},
    "all_down": {"type": "str", "choices": ["forward", "fallback", "reject"]},
    "fallback": {"type": "dict", "options": {"address": {"type": "str", "required": True}, "port": {"type": "int"}}},
    "flush_on_down": {"type": "bool"},
}


def argument_spec():
    spec = resource_argument_spec(ENTRY_OPTIONS)
    # No default state: a default would clash with schedule in mutually_exclusive.
    spec["state"]["default"] = None
    spec["schedule"] = {"type": "int"}
    return spec


def force_scheduling(module, mark):
    """`mfw -S`: the head backend of `mark` moves to the back. Always a change."""
    result = {"commands": ["mfw -S -m %d" % mark]}
    try:
        if not 1 <= mark <= MAX_MARK:
            raise ConfigError("schedule", mark, "mark must be 1-%d" % MAX_MARK)
        with MasqdClient(module.params["socket"]) as agent:
            response = agent.request("list", table="mfw")
            before = schedule_order(response["result"]["entries"])
            after = scheduled(before, mark)
            result.update(before=before, revision=response.get("revision"))
            if not module.check_mode:
                agent.request("schedule", mark=mark)
                response = agent.request("list", table="mfw")
                after = schedule_order(response["result"]["entries"])
                result["revision"] = response.get("revision")
    except (ConfigError, MasqdError) as error:
        fail_error(module, error, result)
    result["after"] = after
    if module._diff:
        result["diff"] = {"before": table_text("mfw", before), "after": table_text("mfw", after)}
    module.exit_json(changed=True, **result)


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        required_if=REQUIRED_IF[1:],  # merged: checked in run(), as schedule needs no config
        mutually_exclusive=[["schedule", "config"], ["schedule", "state"]],
        supports_check_mode=True,
    )
    if module.params["schedule"] is not None:
        force_scheduling(module, module.params["schedule"])
    if module.params["config"] is None and (module.params["state"] or "merged") == "merged":
        module.fail_json(msg="state is merged but all of the following are missing: config")
    if module.params["state"] is None:
        module.params["state"] = "merged"
    run_resource_module(module, "mfw")


if __name__ == "__main__":
    main()
