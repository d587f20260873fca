# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action side of ipmasq.gateway.gateway_agent: the agent file is sent only when needed.

The module is run once with the SHA-1 of the controller's file; only when the gateway's
copy differs (the module answers ``agent_file_needed`` and has changed nothing) is the
file transferred and the module run again with it. An unchanged gateway costs one
module run, where copy + file + command tasks cost one each."""

from __future__ import annotations

import os

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.utils.hashing import checksum

MODULE = "ipmasq.gateway.gateway_agent"


class ActionModule(ActionBase):

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        source = args.get("src")
        if not isinstance(source, str) or not os.path.isfile(source):
            raise AnsibleActionFail("src: %r is not a file on the controller" % (source,))
        args["checksum"] = checksum(source)
        args.pop("agent_file", None)
        outcome = self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
        if outcome.get("agent_file_needed") and not outcome.get("failed"):
            self._make_tmp_path()
            try:
                remote = self._connection._shell.join_path(self._connection._shell.tmpdir, "masqd.pyz")
                self._transfer_file(source, remote)
                self._fixup_perms2((self._connection._shell.tmpdir, remote))
                args["agent_file"] = remote
                outcome = self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
            finally:
                self._remove_tmp_path(self._connection._shell.tmpdir)
        result.update(outcome)
        return result
