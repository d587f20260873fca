# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action side of ipmasq.gateway.lab_topology: a shipped topology name is read here.

The module runs from its AnsiballZ payload, which carries the harness's Python code but
no data files, so a name such as ``seed`` is resolved on the controller, from the
collection's ipmasq_lab/topologies, and handed to the module as the spec itself."""

from __future__ import annotations

import os
import re

import yaml

from ansible.plugins.action import ActionBase

TOPOLOGIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "ipmasq_lab", "topologies")
NAME_RE = re.compile(r"^[a-z0-9_-]+$")


def shipped_spec(name):
    """The shipped topology `name` as a dict, or None when there is none by that name."""
    path = os.path.join(TOPOLOGIES_DIR, name + ".yml")
    if not (NAME_RE.match(name) and os.path.isfile(path)):
        return None
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if isinstance(data, dict):
        data.setdefault("name", name)
    return data


class ActionModule(ActionBase):

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        spec = args.get("spec")
        if isinstance(spec, str):
            data = shipped_spec(spec)
            if data is not None:
                args["spec"] = data
        result.update(self._execute_module(module_name="ipmasq.gateway.lab_topology",
                                           module_args=args, task_vars=task_vars))
        return result
