# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: netns
short_description: Run tasks inside a named Linux network namespace
description:
  - Runs every task of a host inside a named network namespace of the controller
    (the namespaces listed by C(ip netns list)), as the lab gateways of this
    collection are.
  - Commands are wrapped as C(ip netns exec NAMESPACE /bin/sh -c COMMAND), so the
    module sees the namespace's interfaces, addresses, routes, nftables ruleset and
    Unix sockets, while everything else (filesystem, users, processes, hostname) is
    the controller's own.
  - Builds on P(ansible.builtin.local#connection), so pipelining and become work the same way.
author: ipmasq.gateway developers (@ipmasq)
version_added: 0.1.0
options:
  netns:
    description:
      - Name of the network namespace to run in (a file under C(/run/netns)).
      - When not set, the host's address (C(ansible_host), which defaults to the
        inventory hostname) is used as the namespace name.
    type: str
    vars:
      - name: ansible_netns_name
    env:
      - name: ANSIBLE_NETNS_NAME
  host:
    description:
      - The host's address; used as the namespace name when O(netns) is not set.
    type: str
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
  ip_executable:
    description:
      - The C(ip) program (iproute2) used to enter the namespace, a name looked up
        in E(PATH) or an absolute path.
    type: str
    default: ip
    vars:
      - name: ansible_netns_ip_executable
  become_success_timeout:
    description:
      - Number of seconds to wait for become to succeed when enabled.
    type: int
    default: 10
    vars:
      - name: ansible_local_become_success_timeout
  become_strip_preamble:
    description:
      - Strip internal become output preceding command execution.
    type: bool
    default: true
    vars:
      - name: ansible_local_become_strip_preamble
extends_documentation_fragment:
  - connection_pipelining
notes:
  - The controller user runs the commands; C(ip netns exec) needs root (or become).
  - File transfers (P(ansible.builtin.copy#module), P(ansible.builtin.fetch#module))
    act on the controller's filesystem, which every namespace shares.
  - Every namespace reports the controller's hostname (the UTS namespace is shared).
  - Interpreter discovery may pick a different Python than the one you want; set
    C(ansible_python_interpreter).
"""

EXAMPLES = r"""
# inventory.yml: three lab gateways, each a network namespace named like the host
# all:
#   hosts:
#     lab1-gw: {}
#     lab2-gw: {ansible_host: a1b2-gw}
#     lab3-gw: {ansible_netns_name: c3d4-gw}
#   vars:
#     ansible_connection: ipmasq.gateway.netns
#     ansible_python_interpreter: /usr/bin/python3

- name: Show the namespace's own addresses
  hosts: all
  gather_facts: false
  tasks:
    - name: List addresses
      ansible.builtin.command: ip -j addr
      changed_when: false
"""

import shlex

from ansible.errors import AnsibleConnectionFailure
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.connection.local import Connection as LocalConnection
from ansible.utils.display import Display

display = Display()


class Connection(LocalConnection):
    """Local connection whose commands run inside a network namespace."""

    transport = 'ipmasq.gateway.netns'
    has_pipelining = True

    @property
    def netns(self) -> str:
        name = self.get_option('netns') or self.get_option('host')
        if not name or '/' in name or name in ('.', '..'):
            raise AnsibleConnectionFailure(
                "netns: invalid network namespace name %r (set ansible_netns_name or ansible_host)" % name)
        return name

    def _connect(self) -> LocalConnection:
        if not self._connected:
            display.vvv("ESTABLISH NETNS CONNECTION TO NAMESPACE %s" % self.netns, host=self.netns)
        return super()._connect()

    def exec_command(self, cmd, in_data=None, sudoable=True):
        # The action plugin has already wrapped `cmd` for become and pipelining;
        # entering the namespace is the outermost step, so become runs inside it.
        wrapped = '%s netns exec %s /bin/sh -c %s' % (
            shlex.quote(self.get_option('ip_executable')),
            shlex.quote(self.netns),
            shlex.quote(to_text(cmd, errors='surrogate_or_strict')),
        )
        return super().exec_command(wrapped, in_data=in_data, sudoable=sudoable)
