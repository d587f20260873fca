#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: masq_info
short_description: Read the masqd agent's status, tables and counters on a gateway
version_added: 0.1.0
description:
  - Returns the C(masqd) agent's status and the listing of its tables with their
    runtime state, like the seed's C(/proc/net/ip_masq/*) files and C(ipmasqadm -l).
  - PORTFW and mfw backends carry C(pcnt) (connections left before the head moves
    to the back), C(pref) and C(connections) (the kernel's counter); AUTOFW entries
    carry their current recipient.
  - Never changes anything.
author: ipmasq.gateway developers (@ipmasq)
options:
  gather_subset:
    description:
      - What to read. V(all) reads the status and every table.
    type: list
    elements: str
    choices: [all, status, portfw, autofw, mfw, marks, masquerade]
    default: [all]
extends_documentation_fragment:
  - ipmasq.gateway.agent
attributes:
  check_mode:
    support: full
    description: Reads only, so it runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
  platform:
    support: full
    platforms: posix
    description: Runs on the gateway, next to the C(masqd) agent.
seealso:
  - module: ipmasq.gateway.masq_portfw
  - module: ipmasq.gateway.masq_mfw
"""

EXAMPLES = r"""
- name: Read everything
  ipmasq.gateway.masq_info:
  register: masq

- name: Show how many connections each web backend took
  ansible.builtin.debug:
    msg: "{{ item.address }}: {{ item.connections }} connections, pcnt {{ item.pcnt }}/{{ item.pref }}"
  loop: "{{ masq.portfw[0].backends }}"

- name: Read only the mfw table
  ipmasq.gateway.masq_info:
    gather_subset: [mfw]
  register: mfw
"""

RETURN = r"""
status:
  description:
    - The agent's status.
    - C(drift) says how often something else changed the agent's nftables table (a
      C(flush ruleset), a deleted rule) and the agent repaired it, with the last finding.
    - C(watchers) has each watcher's state (C(ruleset) repairs drift, C(autofw) detects
      AUTOFW control connections); C(warnings) lists configurations a spoofed source
      could pass (a source classifier without an input interface while rp_filter is
      not strict).
  returned: when V(status) or V(all) is in O(gather_subset)
  type: dict
  sample:
    version: 0.1.0
    revision: 13
    tables: {portfw: 1, autofw: 0, mfw: 2, marks: 2, masquerade: 2}
    socket: /run/masqd/masqd.sock
    state_file: /var/lib/masqd/state.json
    drift:
      count: 1
      failures: 0
      last:
        at: "2026-12-01T20:31:07Z"
        found: delete table inet masqd (41 objects) by nft (pid 4242)
        result: repaired
        repair_seconds: 0.004
        detected_to_repaired_seconds: 0.005
    watchers:
      ruleset: {running: true, events: 212, foreign_batches: 1, verifications: 3}
    warnings: []
portfw:
  description: PORTFW entries; each backend also has C(pcnt) and C(connections).
  returned: when V(portfw) or V(all) is in O(gather_subset)
  type: list
  elements: dict
  sample:
    - protocol: tcp
      local_address: 198.51.100.1
      local_port: 80
      backends:
        - {address: 10.16.0.27, port: 80, pref: 15, pcnt: 12, connections: 33}
        - {address: 10.16.0.28, port: 80, pref: 5, pcnt: 5, connections: 10}
autofw:
  description: AUTOFW entries with their current recipient.
  returned: when V(autofw) or V(all) is in O(gather_subset)
  type: list
  elements: dict
mfw:
  description: mfw entries; each backend also has C(pcnt) and C(connections).
  returned: when V(mfw) or V(all) is in O(gather_subset)
  type: list
  elements: dict
marks:
  description:
    - The mark rules, in matching order.
    - Each rule also has C(hits), the connections it classified (its kernel rule counter).
  returned: when V(marks) or V(all) is in O(gather_subset)
  type: list
  elements: dict
masquerade:
  description: The masquerading rules.
  returned: when V(masquerade) or V(all) is in O(gather_subset)
  type: list
  elements: dict
revision:
  description: The agent's state revision when the listing was taken.
  returned: always
  type: int
  sample: 13
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipmasq.gateway.plugins.module_utils.masqd_client import MasqdClient, MasqdError
from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import agent_argument_spec, fail_error

TABLE_NAMES = ("portfw", "autofw", "mfw", "marks", "masquerade")


def main():
    spec = agent_argument_spec()
    spec["gather_subset"] = {"type": "list", "elements": "str", "default": ["all"],
                             "choices": ["all", "status"] + list(TABLE_NAMES)}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    subset = set(module.params["gather_subset"])
    if "all" in subset:
        subset = set(("status",) + TABLE_NAMES)
    result = {"changed": False}
    try:
        with MasqdClient(module.params["socket"]) as agent:
            if "status" in subset:
                response = agent.request("status")
                result["status"] = response["result"]
                result["revision"] = response.get("revision", response["result"].get("revision"))
            for table in TABLE_NAMES:
                if table in subset:
                    response = agent.request("list", table=table)
                    result[table] = response["result"]["entries"]
                    result["revision"] = response.get("revision", result.get("revision"))
    except MasqdError as error:
        fail_error(module, error)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
