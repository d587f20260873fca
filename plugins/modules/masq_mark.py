#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: masq_mark
short_description: Manage the rules that put firewall marks on connections
version_added: 0.1.0
description:
  - Manages the gateway's C(marks) table, the classifier rules that the seed writes
    as C(ipchains -m MARK); M(ipmasq.gateway.masq_mfw) forwards marked connections.
  - Each rule matches a connection's first packet by source and destination (with
    negation), protocol, ports and input interface, and gives the connection its mark.
    Rules are ordered; the first that matches wins.
  - An entry's key is O(config[].name).
  - Programs the C(masqd) agent, which applies the table to nftables atomically.
author: ipmasq.gateway developers (@ipmasq)
options:
  config:
    description:
      - The mark rules, in matching order.
    type: list
    elements: dict
    suboptions:
      name:
        description: The rule's name, its key.
        type: str
      mark:
        description:
          - The firewall mark given to matching connections, 1-4294967295.
          - Required when the rule does not exist yet.
        type: int
      protocol:
        description: Match only this protocol; any when not set.
        type: str
        choices: [tcp, udp, icmp, icmpv6]
      source:
        description: Match this source address or CIDR network; any when not set.
        type: str
      source_invert:
        description: Match every source except O(config[].source) (the seed's C(-s !)).
        type: bool
      destination:
        description: Match this destination address or CIDR network; any when not set.
        type: str
      destination_invert:
        description: Match every destination except O(config[].destination).
        type: bool
      source_ports:
        description:
          - Match these source ports, each a port or a C(low-high) range (needs a
            O(config[].protocol) of V(tcp) or V(udp)).
        type: list
        elements: raw
      destination_ports:
        description:
          - Match these destination ports, each a port or a C(low-high) range (needs a
            O(config[].protocol) of V(tcp) or V(udp)).
        type: list
        elements: raw
      input_interface:
        description: Match packets that arrive on this interface; any when not set.
        type: str
extends_documentation_fragment:
  - ipmasq.gateway.agent
  - ipmasq.gateway.agent.resource_state
seealso:
  - module: ipmasq.gateway.masq_mfw
"""

EXAMPLES = r"""
- name: Mark the friend network 1 and everybody else 3 (the seed's FWMARK example)
  ipmasq.gateway.masq_mark:
    config:
      - {name: friend, mark: 1, source: 203.0.113.0/24}
      - {name: neutral, mark: 3, source: 203.0.113.0/24, source_invert: true}
    state: overridden

- name: Mark web traffic arriving on the outside interface
  ipmasq.gateway.masq_mark:
    config:
      - name: outside-web
        mark: 5
        protocol: tcp
        destination_ports: [80, 443, "8000-8080"]
        input_interface: eth0
"""

RETURN = r"""
before:
  description: The table before the task, complete entries in table order.
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - {name: friend, mark: 1, protocol: null, source: 203.0.113.0/24, source_invert: false,
       destination: null, destination_invert: false, source_ports: null, destination_ports: null,
       input_interface: null}
after:
  description: The table after the task (in check mode, as it would be).
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - {name: friend, mark: 1, protocol: null, source: 203.0.113.0/24, source_invert: false,
       destination: null, destination_invert: false, source_ports: null, destination_ports: null,
       input_interface: null}
    - {name: neutral, mark: 3, protocol: null, source: 203.0.113.0/24, source_invert: true,
       destination: null, destination_invert: false, source_ports: null, destination_ports: null,
       input_interface: null}
commands:
  description:
    - masqctl command lines summarising what changed; removed keys are deleted, new or
      changed keys (re)added. The agent applies the whole table in one transaction;
      the lines are for people to read.
  returned: always except with O(state=gathered)
  type: list
  elements: str
  sample:
    - mark -A -s ! 203.0.113.0/24 -m 3 --name neutral
revision:
  description: The agent's state revision after the task.
  returned: when the agent was asked
  type: int
  sample: 13
gathered:
  description: The marks table as the agent holds it.
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

from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import (
    REQUIRED_IF,
    resource_argument_spec,
    run_resource_module,
)

ENTRY_OPTIONS = {
    "name": {"type": "str"},
    "mark": {"type": "int"},
    "protocol": {"type": "str", "choices": ["tcp", "udp", "icmp", "icmpv6"]},
    "source": {"type": "str"},
    "source_invert": {"type": "bool"},
    "destination": {"type": "str"},
    "destination_invert": {"type": "bool"},
    "source_ports": {"type": "list", "elements": "raw"},
    "destination_ports": {"type": "list", "elements": "raw"},
    "input_interface": {"type": "str"},
}


def main():
    module = AnsibleModule(
        argument_spec=resource_argument_spec(ENTRY_OPTIONS),
        required_if=REQUIRED_IF,
        supports_check_mode=True,
    )
    run_resource_module(module, "marks")


if __name__ == "__main__":
    main()
