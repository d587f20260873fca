# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The option every masq_* module shares: where the agent listens.
    DOCUMENTATION = r"""
options:
  socket:
    description:
      - Path of the Unix socket the C(masqd) agent listens on, on the gateway.
      - Set it once for all masq_* modules with
        C(module_defaults) and the action group C(group/ipmasq.gateway.masq).
    type: path
    default: /run/masqd/masqd.sock
notes:
  - The modules talk to the C(masqd) agent on the gateway, which must be running
    (the P(ipmasq.gateway.gateway#role) role installs and starts it). The socket is
    root-only, so run the tasks as root (or with O(ignore:become)).
  - Only the Python standard library is needed on the gateway (Python 3.8 or later).
"""

    # The `state` option of the resource modules (masq_portfw, masq_autofw, ...).
    RESOURCE_STATE = r"""
options:
  state:
    description:
      - What to do with O(config) and the table on the gateway.
      - V(merged) adds the keys of O(config) and updates the fields given for keys that
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
      - V(parsed) returns in RV(parsed) this module's table as the legacy script in
        O(running_config) leaves it (C(ipmasqadm) and C(ipchains) lines, read as
        C(masqctl import) reads them), every default filled in, without contacting
        the agent.
      - Entries keep their position in the table; new keys are appended in O(config) order.
      - The whole table is written in one compare-and-set C(set) (with the revision read
        before), so the change is atomic; if another writer changed the table in
        between, the module re-reads and retries once. A table that already matches is
        not written at all.
    type: str
    choices: [merged, replaced, overridden, deleted, gathered, rendered, parsed]
    default: merged
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
"""
