#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: masq_masquerade
short_description: Manage masquerading (source NAT to the outgoing address) on a gateway
version_added: 0.1.0
description:
  - Manages the gateway's C(masquerade) table, the seed's C(ipchains ... -j MASQ)
    rules. Connections that match a rule leave with the gateway's outgoing address.
  - Forwarded connections (M(ipmasq.gateway.masq_portfw), M(ipmasq.gateway.masq_mfw))
    need a masquerading rule for their replies when clients must see the gateway's address.
  - An entry's key is O(config[].name).
  - Programs the C(masqd) agent, which applies the table to nftables atomically.
author: ipmasq.gateway developers (@ipmasq)
options:
  config:
    description:
      - The masquerading rules.
    type: list
    elements: dict
    suboptions:
      name:
        description: The rule's name, its key.
        type: str
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
      output_interface:
        description: Match packets that leave by this interface; any when not set.
        type: str
      pool:
        description:
          - Source NAT to an address of this pool instead of the outgoing interface's
            address (the seed's "A Better Way to AUTOFW - NAT"). Each internal host gets
            the next free-running pool address when it starts talking and keeps it while
            it has traffic (an hour after its last packet; a restart of the agent
            reassigns).
          - The addresses must be local addresses of the gateway (configured on its
            external interface), all of one family, matching the rule's source or
            destination family; an address can be in one rule's pool only.
        type: list
        elements: str
      pool_ports:
        description:
          - Inbound connections to a pool address on these ports (each a port or a
            C(low-high) range) go to the internal host holding that address, with the
            rule's O(config[].protocol) (TCP and UDP when not set). Needs O(config[].pool).
        type: list
        elements: raw
      helpers:
        description:
          - Kernel conntrack helpers for the connections this rule matches, on each
            helper's standard port (or O(config[].destination_ports) when set), so
            protocols that open data connections (active FTP, IRC DCC, SIP, TFTP, ...)
            work through the masquerading gateway.
        type: list
        elements: str
        choices: [amanda, ftp, h323, irc, netbios-ns, pptp, sane, sip, snmp, tftp]
extends_documentation_fragment:
  - ipmasq.gateway.agent
  - ipmasq.gateway.agent.resource_state
seealso:
  - module: ipmasq.gateway.masq_portfw
"""

EXAMPLES = r"""
- name: Masquerade the web servers' replies (the seed's PORTFW example)
  ipmasq.gateway.masq_masquerade:
    config:
      - {name: web-27, protocol: tcp, source: 10.16.0.27/32, source_ports: [80]}
      - {name: web-28, protocol: tcp, source: 10.16.0.28/32, source_ports: [80]}

- name: Give each inside host its own external address, FTP helper on, inbound 5000-5010 back
  ipmasq.gateway.masq_masquerade:
    config:
      - name: inside-pool
        source: 10.16.0.0/24
        pool: [198.51.100.2, 198.51.100.3]
        pool_ports: ["5000-5010"]
        helpers: [ftp]

- name: Masquerade everything the inside network sends out of eth0
  ipmasq.gateway.masq_masquerade:
    config:
      - {name: inside, source: 10.16.0.0/16, output_interface: eth0}
    state: replaced
"""

RETURN = r"""
before:
  description: The table before the task, complete entries in table order.
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    []
after:
  description: The table after the task (in check mode, as it would be).
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - {name: web-27, source: 10.16.0.27/32, source_invert: false, destination: null,
       destination_invert: false, protocol: tcp, source_ports: [80], destination_ports: null,
       output_interface: null, pool: null, pool_ports: null, helpers: null}
commands:
  description:
    - masqctl command lines summarising what changed; removed keys are deleted, new or
      changed keys (re)added. The agent applies the whole table in one transaction;
      the lines are for people to read.
  returned: always except with O(state=gathered)
  type: list
  elements: str
  sample:
    - masq -A -p tcp -s 10.16.0.27/32 --sport 80 --name web-27 -j MASQ
revision:
  description: The agent's state revision after the task.
  returned: when the agent was asked
  type: int
  sample: 13
gathered:
  description: The masquerade table as the agent holds it.
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
  sample: {field: "config[0].source_ports[0]", value: 70000, message: port must be 1-65535}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import (
    REQUIRED_IF,
    resource_argument_spec,
    run_resource_module,
)

ENTRY_OPTIONS = {
    "name": {"type": "str"},
    "protocol": {"type": "str", "choices": ["tcp", "udp", "icmp", "icmpv6"]},
    "source": {"type": "str"},
    "source_invert": {"type": "bool"},
    "destination": {"type": "str"},
    "destination_invert": {"type": "bool"},
    "source_ports": {"type": "list", "elements": "raw"},
    "destination_ports": {"type": "list", "elements": "raw"},
    "output_interface": {"type": "str"},
    "pool": {"type": "list", "elements": "str"},
    "pool_ports": {"type": "list", "elements": "raw"},
    "helpers": {"type": "list", "elements": "str",
                "choices": ["amanda", "ftp", "h323", "irc", "netbios-ns", "pptp", "sane", "sip", "snmp", "tftp"]},
}


def main():
    module = AnsibleModule(
        argument_spec=resource_argument_spec(ENTRY_OPTIONS),
        required_if=REQUIRED_IF,
        supports_check_mode=True,
    )
    run_resource_module(module, "masquerade")


if __name__ == "__main__":
    main()
