#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: masq_tables
short_description: Apply several of a gateway's masqd tables at once, in one transaction
version_added: 0.1.0
description:
  - Sets the named tables of the C(masqd) agent (PORTFW, AUTOFW, mfw, marks,
    masquerading) in one request, which the agent applies as one atomic nftables
    transaction with one state revision; a table not given is left untouched.
  - A gateway's whole configuration in one task, where the single-table modules
    (M(ipmasq.gateway.masq_portfw), M(ipmasq.gateway.masq_autofw),
    M(ipmasq.gateway.masq_mfw), M(ipmasq.gateway.masq_mark),
    M(ipmasq.gateway.masq_masquerade)) take one task per table. Each option takes the
    entries of that module's O(ipmasq.gateway.masq_portfw#module:config) and means
    the same; O(state) applies to every table given.
  - The write is compare-and-set on the agent's revision; if another writer changes
    the agent in between, the tables are read again and the write is retried once.
author: ipmasq.gateway developers (@ipmasq)
options:
  portfw:
    description: PORTFW entries, as in M(ipmasq.gateway.masq_portfw)'s O(ipmasq.gateway.masq_portfw#module:config).
    type: list
    elements: dict
  autofw:
    description: AUTOFW entries, as in M(ipmasq.gateway.masq_autofw)'s O(ipmasq.gateway.masq_autofw#module:config).
    type: list
    elements: dict
  mfw:
    description: mfw entries, as in M(ipmasq.gateway.masq_mfw)'s O(ipmasq.gateway.masq_mfw#module:config).
    type: list
    elements: dict
  marks:
    description: Mark classifiers, as in M(ipmasq.gateway.masq_mark)'s O(ipmasq.gateway.masq_mark#module:config).
    type: list
    elements: dict
  masquerade:
    description: Masquerading rules, as in M(ipmasq.gateway.masq_masquerade)'s O(ipmasq.gateway.masq_masquerade#module:config).
    type: list
    elements: dict
  state:
    description:
      - V(overridden) makes each given table exactly its list (V([]) empties it).
      - V(merged) adds or updates the given keys, V(replaced) replaces the given keys
        whole, V(deleted) removes the given keys (an empty list removes every entry).
      - V(gathered) returns the tables the agent holds (the given ones, or all when
        none is given) and changes nothing.
      - V(rendered) returns the given tables with their defaults filled in, without
        asking the agent.
    type: str
    choices: [merged, replaced, overridden, deleted, gathered, rendered]
    default: overridden
extends_documentation_fragment:
  - ipmasq.gateway.agent
attributes:
  check_mode:
    support: full
    description:
      - Asks the agent for its plan (validated by the kernel's dry run) and applies nothing.
      - When the agent is not running yet (a fresh host in a check run of the gateway
        role), the tables are compared with empty ones and a warning says so.
  diff_mode:
    support: full
    description: One diff per changed table, in the masqctl listing style.
notes:
  - Bad input fails the task naming the table, entry and field (for example
    C(portfw[0].local_port)) and the value, and changes nothing on the gateway.
"""

EXAMPLES = r"""
- name: Make a gateway's forwarding exactly its inventory, in one transaction
  ipmasq.gateway.masq_tables:
    portfw:
      - protocol: tcp
        local_address: 198.51.100.1
        local_port: 80
        backends:
          - {address: 10.16.0.27, port: 80, pref: 15}
          - {address: 10.16.0.28, port: 80, pref: 5}
    masquerade:
      - name: inside
        source: 10.16.0.0/24
    state: overridden

- name: Apply only the tables the host defines (the gateway role's pattern)
  ipmasq.gateway.masq_tables:
    portfw: "{{ gateway_portfw | default(omit) }}"
    mfw: "{{ gateway_mfw | default(omit) }}"
    marks: "{{ gateway_marks | default(omit) }}"
    state: overridden

- name: Read every table
  ipmasq.gateway.masq_tables:
    state: gathered
  register: now
"""

RETURN = r"""
before:
  description: The given tables as the agent held them, by table name.
  returned: when the agent was asked to change something
  type: dict
  sample: {portfw: [], masquerade: []}
after:
  description: The given tables after the task (in check mode, as they would be).
  returned: when the agent was asked to change something
  type: dict
  sample:
    portfw:
      - protocol: tcp
        local_address: 198.51.100.1
        local_port: 80
        backends: [{address: 10.16.0.27, port: 80, pref: 10}]
changed_tables:
  description: The tables that changed (or would change).
  returned: when the agent was asked to change something
  type: list
  elements: str
  sample: [portfw]
commands:
  description: The masqctl commands that take the tables from before to after.
  returned: always except with O(state=gathered)
  type: list
  elements: str
  sample: [portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 10]
revision:
  description: The agent's state revision after the task.
  returned: when the agent was asked
  type: int
  sample: 7
gathered:
  description: The tables the agent holds, by table name.
  returned: with O(state=gathered)
  type: dict
rendered:
  description: The given tables with defaults filled in, by table name.
  returned: with O(state=rendered)
  type: dict
nft:
  description: The nftables text the agent would apply (from its plan).
  returned: in check mode when there is a change and the agent is running
  type: str
error:
  description: What the agent or the checks refused.
  returned: on failure
  type: dict
  sample: {field: "portfw[0].backends[0].port", value: 70000, message: port must be 1-65535}
"""

import re

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipmasq.gateway.plugins.module_utils.masqd_client import (
    MasqdClient,
    MasqdError,
    MasqdNotRunning,
)
from ansible_collections.ipmasq.gateway.plugins.module_utils.resource import (
    ConfigError,
    config_path,
    desired_table,
    normalize_table,
    table_commands,
    table_text,
)
from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import (
    agent_argument_spec,
    check_config,
    fail_error,
)

# In the agent's order: the order of a listing, of commands and of diffs.
TABLE_NAMES = ("marks", "mfw", "portfw", "autofw", "masquerade")
TABLE_FIELD = re.compile(r"^tables\.(\w+)(.*)$")


def _given(params):
    return dict((t, params[t]) for t in TABLE_NAMES if params.get(t) is not None)


def _checked(table, config):
    """Range checks of the single-table module, errors named `<table>[i]...`."""
    try:
        check_config(config)
    except ConfigError as error:
        raise ConfigError(_rename(table, error.field), error.value, error.message) from None


def _rename(table, field):
    return table + field[len("config"):] if field and field.startswith("config") else field


def _desired(state, given, current):
    out = {}
    for table, config in given.items():
        _checked(table, config)
        try:
            out[table] = desired_table(table, state, config, current.get(table, []))
        except ConfigError as error:
            raise ConfigError(_rename(table, error.field), error.value, error.message) from None
    return out


def _user_field(given, desired, agent_field):
    """The agent's `tables.portfw[2].port` as the `portfw[j].port` the user wrote."""
    m = TABLE_FIELD.match(agent_field or "")
    if not m or m.group(1) not in given:
        return agent_field
    table, rest = m.group(1), m.group(2)
    return _rename(table, config_path(table, given[table], desired[table], "entries" + rest))


class TablesModule(object):

    def __init__(self, module):
        self.module = module
        self.state = module.params["state"]
        self.given = _given(module.params)
        self.agent = MasqdClient(module.params["socket"])

    def run(self):
        try:
            if self.state == "rendered":
                rendered = _desired("rendered", self.given, {})
                self.module.exit_json(changed=False, rendered=rendered, commands=self._commands({}, rendered))
            if self.state != "gathered" and not self.given:
                self.module.fail_json(msg="name at least one table (%s) with state=%s"
                                      % (", ".join(TABLE_NAMES), self.state))
            try:
                with self.agent:
                    self._with_agent()
            except MasqdNotRunning as error:
                if not self.module.check_mode or self.state == "gathered":
                    raise
                self._not_running(error)
        except (ConfigError, MasqdError) as error:
            fail_error(self.module, error)

    def _read(self):
        response = self.agent.request("get")
        tables = response["result"]["tables"]
        return dict((t, normalize_table(t, tables.get(t, []))) for t in TABLE_NAMES), response.get("revision")

    def _with_agent(self):
        if self.state == "gathered":
            tables, revision = self._read()
            wanted = self.given or tables
            self.module.exit_json(changed=False, gathered=dict((t, tables[t]) for t in wanted), revision=revision)
        for attempt in (1, 2):
            current, revision = self._read()
            desired = _desired(self.state, self.given, current)
            before = dict((t, current[t]) for t in desired)
            result = {"before": before, "revision": revision}
            changed = [t for t in TABLE_NAMES if t in desired and desired[t] != before[t]]
            if not changed:
                self.module.exit_json(changed=False, after=before, changed_tables=[], commands=[], **result)
            sets = dict((t, desired[t]) for t in changed)
            if self.module.check_mode:
                plan = self._request("plan", result, desired, tables=sets)["result"]
                after = dict(before, **dict((t, normalize_table(t, e)) for t, e in plan["after"].items()))
                self._exit(before, after, result, nft=plan.get("nft"))
            try:
                response = self.agent.request("set", tables=sets, revision=revision)
            except MasqdError as error:
                if error.field == "revision" and attempt == 1:
                    continue  # another writer in between: re-read, recompute, retry once
                if error.field == "revision":
                    self.module.fail_json(msg="the agent's tables kept changing under this task (revision %s, "
                                              "then %s): another writer is active, run the task again"
                                              % (revision, error.value), error=error.to_dict(), **result)
                fail_error(self.module, error, result, _user_field(self.given, desired, error.field))
            result["revision"] = response.get("revision")
            after = dict(before, **dict((t, normalize_table(t, e)) for t, e in response["result"]["tables"].items()))
            self._exit(before, after, result)

    def _request(self, op, result, desired, **arguments):
        try:
            return self.agent.request(op, **arguments)
        except MasqdError as error:
            if isinstance(error, MasqdNotRunning):
                raise
            fail_error(self.module, error, result, _user_field(self.given, desired, error.field))

    def _not_running(self, error):
        """Check mode before the agent exists: what would change, against empty tables."""
        self.module.warn("masqd is not running (%s): the tables are compared with empty ones" % error.message)
        empty = dict((t, []) for t in self.given)
        desired = _desired(self.state, self.given, empty)
        self._exit(empty, desired, {"before": empty, "revision": None})

    def _commands(self, before, after):
        out = []
        for t in TABLE_NAMES:
            if t in after:
                out += table_commands(t, before.get(t, []), after[t])
        return out

    def _exit(self, before, after, result, **extra):
        changed = [t for t in TABLE_NAMES if t in after and after[t] != before.get(t, [])]
        result.update(extra)
        result.update(after=after, changed_tables=changed, commands=self._commands(before, after))
        if self.module._diff:
            result["diff"] = [{"before": table_text(t, before.get(t, [])), "after": table_text(t, after[t]),
                               "before_header": "%s (before)" % t, "after_header": "%s (after)" % t}
                              for t in changed]
        self.module.exit_json(changed=bool(changed), **result)


def main():
    argument_spec = dict((t, {"type": "list", "elements": "dict"}) for t in TABLE_NAMES)
    argument_spec["state"] = {"type": "str", "default": "overridden",
                              "choices": ["merged", "replaced", "overridden", "deleted", "gathered", "rendered"]}
    argument_spec.update(agent_argument_spec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    TablesModule(module).run()


if __name__ == "__main__":
    main()
