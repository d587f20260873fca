# Test-only stdout callback: the run as one JSON document (the shape of
# ansible.posix.json, which ansible-core does not ship), so tests read results
# instead of scraping text.
from __future__ import annotations

DOCUMENTATION = """
name: json_results
type: stdout
short_description: Every task result as one JSON document (tests only)
description:
  - Prints one JSON document with the plays, their tasks and every host result.
"""

import json

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "json_results"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plays = []

    def v2_playbook_on_play_start(self, play):
        self.plays.append({"play": {"name": play.get_name()}, "tasks": []})

    def _task_start(self, task):
        if not self.plays:
            self.plays.append({"play": {"name": "adhoc"}, "tasks": []})
        self.plays[-1]["tasks"].append({"task": {"name": task.get_name()}, "hosts": {}})

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task_start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._task_start(task)

    def _record(self, result, **flags):
        if not self.plays or not self.plays[-1]["tasks"]:
            self._task_start(result._task)
        data = dict(self._convert(result._result), **flags)
        self.plays[-1]["tasks"][-1]["hosts"][result._host.get_name()] = data

    @staticmethod
    def _convert(value):
        return json.loads(json.dumps(value, default=str))

    def v2_runner_on_ok(self, result):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=True)

    def v2_runner_on_unreachable(self, result):
        self._record(result, unreachable=True)

    def v2_runner_on_skipped(self, result):
        self._record(result, skipped=True)

    def v2_playbook_on_stats(self, stats):
        summary = dict((h, stats.summarize(h)) for h in sorted(stats.processed))
        self._display.display(json.dumps({"plays": self.plays, "stats": summary}, indent=2, sort_keys=True))
