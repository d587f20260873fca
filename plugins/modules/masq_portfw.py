#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: masq_portfw
short_description: Manage PORTFW port forwarding (ipmasqadm portfw) on a gateway
version_added: 0.1.0
description:
  - Manages the gateway's PORTFW table, the kernel port forwarding of C(ipmasqadm portfw);
    connections to a local address and port are forwarded to an ordered list of
    backends, keeping the client's source address.
  - An entry's key is (O(config[].protocol), O(config[].local_address), O(config[].local_port)).
    Each new connection goes to the head backend; the head's pcnt drops by one and
    at 0 it moves to the end of the list (its pcnt reset to its pref). Prefs 15 and 5
    give 15 consecutive connections to the first backend, then 5 to the second;
    pref 1 everywhere is round-robin.
  - The forwarded replies are not masqueraded by this table; add a masquerading rule
    with M(ipmasq.gateway.masq_masquerade) when clients must see the gateway's address.
  - Programs the C(masqd) agent, which applies the table to nftables atomically.
author: ipmasq.gateway developers (@ipmasq)
options:
  config:
    description:
      - The PORTFW entries, one per key.
    type: list
    elements: dict
    suboptions:
      protocol:
        description: Protocol of the forwarded connections.
        type: str
        choices: [tcp, udp]
      local_address:
        description: The gateway's address receiving the connections (IPv4 or IPv6).
        type: str
      local_port:
        description: The port being forwarded, 1-65535.
        type: int
      backends:
        description:
          - The ordered list of backends; the order is the scheduling order (head first).
          - With O(state=merged) a given list replaces the key's list whole.
          - Required when the key does not exist yet.
        type: list
        elements: dict
        suboptions:
          address:
            description: The backend's address (same family as O(config[].local_address)).
            type: str
            required: true
          port:
            description: The backend's port, 1-65535.
            type: int
            required: true
          pref:
            description:
              - Preference, the number of consecutive connections this backend takes
                before the next one becomes head. The agent's default is 10.
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
          - Accepted for symmetry with M(ipmasq.gateway.masq_mfw); PORTFW has no head to
            keep, so a recovered backend of a pref-0 list always takes over again.
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
            description: Its port.
            type: int
            required: true
      flush_on_down:
        description:
          - Delete the conntrack entries of connections to a backend that went down, so
            their clients reconnect to a live one at once.
        type: bool
extends_documentation_fragment:
  - ipmasq.gateway.agent
  - ipmasq.gateway.agent.resource_state
seealso:
  - module: ipmasq.gateway.masq_masquerade
  - module: ipmasq.gateway.masq_info
"""

EXAMPLES = r"""
- name: Forward the web port to two servers, .27 taking 15 connections for every 5 of .28
  ipmasq.gateway.masq_portfw:
    config:
      - protocol: tcp
        local_address: 198.51.100.1
        local_port: 80
        backends:
          - {address: 10.16.0.27, port: 80, pref: 15}
          - {address: 10.16.0.28, port: 80, pref: 5}
    state: overridden

- name: Round-robin DNS over UDP, leaving other forwards alone
  ipmasq.gateway.masq_portfw:
    config:
      - protocol: udp
        local_address: 198.51.100.1
        local_port: 53
        backends:
          - {address: 10.16.0.53, port: 53, pref: 1}
          - {address: 10.16.0.54, port: 53, pref: 1}

- name: Stop forwarding port 80 (every backend of the key)
  ipmasq.gateway.masq_portfw:
    config:
      - {protocol: tcp, local_address: 198.51.100.1, local_port: 80}
    state: deleted

- name: Read the table
  ipmasq.gateway.masq_portfw:
    state: gathered
  register: portfw

- name: The PORTFW table an old rc script sets up (no agent needed)
  ipmasq.gateway.masq_portfw:
    running_config: |
      EXTIP=198.51.100.1
      ipmasqadm portfw -f
      ipmasqadm portfw -a -P tcp -L $EXTIP 80 -R 10.16.0.27 80 -p 15
      ipmasqadm portfw -a -P tcp -L $EXTIP 80 -R 10.16.0.28 80 -p 5
    state: parsed
  register: legacy

- name: Talk to an agent on a non-default socket, for every masq_* task of the play
  module_defaults:
    group/ipmasq.gateway.masq:
      socket: /run/masqd-lab/masqd.sock
  ipmasq.gateway.masq_portfw:
    state: gathered
"""

RETURN = r"""
before:
  description: The table before the task, complete entries in table order.
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - protocol: tcp
      local_address: 198.51.100.1
      local_port: 80
      backends:
        - {address: 10.16.0.27, port: 80, pref: 15}
after:
  description: The table after the task (in check mode, as it would be).
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - protocol: tcp
      local_address: 198.51.100.1
      local_port: 80
      backends:
        - {address: 10.16.0.27, port: 80, pref: 15}
        - {address: 10.16.0.28, port: 80, pref: 5}
commands:
  description:
    - masqctl command lines (the seed's ipmasqadm syntax) summarising what changed;
      removed keys deleted, new or changed keys (re)added. The agent applies the whole
      table in one transaction; the lines are for people to read.
  returned: always except with O(state=gathered)
  type: list
  elements: str
  sample:
    - portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15
    - portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5
revision:
  description: The agent's state revision after the task.
  returned: when the agent was asked
  type: int
  sample: 13
gathered:
  description: The table as the agent holds it.
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
  description: What the agent or the checks refused.
  returned: on failure
  type: dict
  sample: {field: "config[0].backends[1].port", value: 70000, message: port must be 1-65535}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import (
    REQUIRED_IF,
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
    "port": {"type": "int", "required": True},
    "pref": {"type": "int"},
    "check": {"type": "dict", "options": CHECK_OPTIONS},
}

ENTRY_OPTIONS = {
    "protocol": {"type": "str", "choices": ["tcp", "udp"]},
    "local_address": {"type": "str"},
    "local_port": {"type": "int"},
    "backends": {"type": "list", "elements": "dict", "options": BACKEND_OPTIONS},
    "failback": {"type": "bool"},
    "all_down": {"type": "str", "choices": ["forward", "fallback", "reject"]},
    "fallback": {"type": "dict", "options": {"address": {"type": "str", "required": True},
                                             "port": {"type": "int", "required": True}}},
    "flush_on_down": {"type": "bool"},
}


def main():
    module = AnsibleModule(
        argument_spec=resource_argument_spec(ENTRY_OPTIONS),
        required_if=REQUIRED_IF,
        supports_check_mode=True,
    )
    run_resource_module(module, "portfw")


if __name__ == "__main__":
    main()
