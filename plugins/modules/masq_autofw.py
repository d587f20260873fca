#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: masq_autofw
short_description: Manage AUTOFW auto-forwarding (ipmasqadm autofw) on a gateway
version_added: 0.1.0
description:
  - Manages the gateway's AUTOFW table, the auto-forwarding of C(ipmasqadm autofw)
    for protocols without a conntrack helper. Inbound packets to a port range are
    forwarded to one internal host.
  - The recipient is either a fixed hidden host (O(config[].hidden_host), the seed's C(-h))
    or the internal host last seen sending to a control protocol and port
    (O(config[].control_protocol) and O(config[].control_port), the seed's C(-c)), for
    O(config[].timeout) seconds.
  - As the seed warns, one internal client at a time can use an entry; the most recent
    control connection wins. With O(config[].keyed_by_peer), each external server
    has its own recipient, so several clients can stream from different servers at once.
  - The agent detects control connections from conntrack events and programs the
    recipient as a timed nftables map element that the kernel expires; further control
    connections (and state changes of the current one) refresh it. M(ipmasq.gateway.masq_info)
    lists the current recipient and its remaining time.
  - An entry's key is (O(config[].protocol), O(config[].low_port), O(config[].high_port)).
  - Programs the C(masqd) agent, which applies the table to nftables atomically.
author: ipmasq.gateway developers (@ipmasq)
options:
  config:
    description:
      - The AUTOFW entries, one per key.
    type: list
    elements: dict
    suboptions:
      protocol:
        description: Protocol of the forwarded port range.
        type: str
        choices: [tcp, udp]
      low_port:
        description: First port of the range, 1-65535.
        type: int
      high_port:
        description: Last port of the range, 1-65535, not below O(config[].low_port).
        type: int
      hidden_host:
        description:
          - The internal host that always receives the range.
          - Mutually exclusive with O(config[].control_protocol) and O(config[].control_port).
          - With O(state=merged), giving it switches an existing entry from control-port
            detection to this host.
        type: str
      control_protocol:
        description:
          - Protocol of the control connection whose internal sender receives the range.
          - Needs O(config[].control_port).
        type: str
        choices: [tcp, udp]
      control_port:
        description: Destination port of the control connection, 1-65535.
        type: int
      timeout:
        description:
          - Seconds a detected recipient keeps the range after the last control traffic
            (new control connection, or a state change of the current one); the agent's
            default is 15 (the seed's), 1-86400 is allowed (masqctl's C(-u) sets 3600).
          - Flows that already started keep going (conntrack carries them); the timeout
            bounds when new inbound flows are accepted.
        type: int
      keyed_by_peer:
        description:
          - With control-port detection, keep one recipient per external peer. Inbound
            data from server X on the range goes to the internal host that last opened
            the control connection to X. When two clients use the same server, the most
            recent wins, and the listing shows whom it replaced.
          - Needs O(config[].control_protocol) and O(config[].control_port). Default V(false).
        type: bool
extends_documentation_fragment:
  - ipmasq.gateway.agent
  - ipmasq.gateway.agent.resource_state
seealso:
  - module: ipmasq.gateway.masq_masquerade
  - module: ipmasq.gateway.masq_info
"""

EXAMPLES = r"""
- name: Forward RealAudio's UDP data ports to whoever opened the TCP control connection
  ipmasq.gateway.masq_autofw:
    config:
      - protocol: udp
        low_port: 6970
        high_port: 7170
        control_protocol: tcp
        control_port: 7070
        timeout: 60

- name: Several clients at once, each streaming from its own server (2 s window, for tests)
  ipmasq.gateway.masq_autofw:
    config:
      - protocol: udp
        low_port: 6970
        high_port: 7170
        control_protocol: tcp
        control_port: 7070
        keyed_by_peer: true
        timeout: 2

- name: Always forward a port range to one hidden host
  ipmasq.gateway.masq_autofw:
    config:
      - {protocol: tcp, low_port: 6000, high_port: 6010, hidden_host: 10.16.0.27}

- name: Remove every AUTOFW entry
  ipmasq.gateway.masq_autofw:
    state: deleted
"""

RETURN = r"""
before:
  description: The table before the task, complete entries in table order.
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - {protocol: udp, low_port: 6970, high_port: 7170, hidden_host: null,
       control_protocol: tcp, control_port: 7070, timeout: 15, keyed_by_peer: false}
after:
  description: The table after the task (in check mode, as it would be).
  returned: when the table was read (not with O(state=gathered), O(state=rendered) or O(state=parsed))
  type: list
  elements: dict
  sample:
    - {protocol: udp, low_port: 6970, high_port: 7170, hidden_host: null,
       control_protocol: tcp, control_port: 7070, timeout: 60, keyed_by_peer: false}
commands:
  description:
    - masqctl command lines summarising what changed; removed keys are deleted, new or
      changed keys (re)added. The agent applies the whole table in one transaction;
      the lines are for people to read.
  returned: always except with O(state=gathered)
  type: list
  elements: str
  sample:
    - autofw -D -r udp 6970 7170
    - autofw -A -r udp 6970 7170 -c tcp 7070 -t 60
revision:
  description: The agent's state revision after the task.
  returned: when the agent was asked
  type: int
  sample: 13
gathered:
  description: The autofw table as the agent holds it.
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
  sample: {field: "config[0].low_port", value: 0, message: port must be 1-65535}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import (
    REQUIRED_IF,
    resource_argument_spec,
    run_resource_module,
)

ENTRY_OPTIONS = {
    "protocol": {"type": "str", "choices": ["tcp", "udp"]},
    "low_port": {"type": "int"},
    "high_port": {"type": "int"},
    "hidden_host": {"type": "str"},
    "control_protocol": {"type": "str", "choices": ["tcp", "udp"]},
    "control_port": {"type": "int"},
    "timeout": {"type": "int"},
    "keyed_by_peer": {"type": "bool"},
}

# One recipient mode per entry: a hidden host, or a control protocol and port.
MUTUALLY_EXCLUSIVE = [["hidden_host", "control_protocol"], ["hidden_host", "control_port"],
                      ["hidden_host", "keyed_by_peer"]]
REQUIRED_TOGETHER = [["control_protocol", "control_port"]]


def main():
    module = AnsibleModule(
        argument_spec=resource_argument_spec(ENTRY_OPTIONS, MUTUALLY_EXCLUSIVE, REQUIRED_TOGETHER),
        required_if=REQUIRED_IF,
        supports_check_mode=True,
    )
    run_resource_module(module, "autofw")


if __name__ == "__main__":
    main()
