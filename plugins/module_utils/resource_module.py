# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every masq_* resource module does: read the table, compute the desired one
(module_utils.resource), and write it with one compare-and-set `set`."""

from __future__ import annotations

import json

from ansible_collections.ipmasq.gateway.plugins.module_utils.masqd_client import (
    DEFAULT_SOCKET,
    MasqdClient,
    MasqdError,
    MasqdNotRunning,
)
from ansible_collections.ipmasq.gateway.plugins.module_utils.resource import (
    STATES,
    ConfigError,
    config_path,
    desired_table,
    normalize_table,
    table_commands,
    table_text,
    tables_equal,
)
from ansible_collections.ipmasq.gateway.plugins.module_utils import legacy_import

PORT_FIELDS = ("local_port", "port", "low_port", "high_port", "control_port")
MAX_MARK = 2 ** 32 - 1


def agent_argument_spec():
    return {"socket": {"type": "path", "default": DEFAULT_SOCKET}}


def resource_argument_spec(entry_options, entry_mutually_exclusive=None, entry_required_together=None):
    """argument_spec of a resource module whose `config` entries have `entry_options`."""
    config = {"type": "list", "elements": "dict", "options": entry_options}
    if entry_mutually_exclusive:
        config["mutually_exclusive"] = entry_mutually_exclusive
    if entry_required_together:
        config["required_together"] = entry_required_together
    spec = {"config": config, "state": {"type": "str", "choices": list(STATES), "default": "merged"},
            "running_config": {"type": "str"}}
    spec.update(agent_argument_spec())
    return spec


REQUIRED_IF = [
    ["state", "merged", ["config"]],
    ["state", "replaced", ["config"]],
    ["state", "overridden", ["config"]],
    ["state", "rendered", ["config"]],
    ["state", "parsed", ["running_config"]],
]


def _check_port(path, value):
    if value is not None and not 1 <= value <= 65535:
        raise ConfigError(path, value, "port must be 1-65535")


def _check_port_list(path, ports):
    for i, item in enumerate(ports or []):
        where = "%s[%d]" % (path, i)
        text = str(item).strip()
        bounds = text.split("-", 1)
        if not all(b.strip().isdigit() for b in bounds):
            raise ConfigError(where, item, "must be a port or a \"low-high\" range")
        numbers = [int(b) for b in bounds]
        if not all(1 <= n <= 65535 for n in numbers):
            raise ConfigError(where, item, "port must be 1-65535")
        if len(numbers) == 2 and numbers[0] > numbers[1]:
            raise ConfigError(where, item, "low port above high port")


def check_config(config):
    """Range checks argument_spec cannot express; the agent checks the rest."""
    for i, entry in enumerate(config or []):
        base = "config[%d]" % i
        for field in PORT_FIELDS:
            _check_port("%s.%s" % (base, field), entry.get(field))
        if entry.get("low_port") and entry.get("high_port") and entry["low_port"] > entry["high_port"]:
            raise ConfigError("%s.high_port" % base, entry["high_port"], "high_port is below low_port")
        if entry.get("mark") is not None and not 1 <= entry["mark"] <= MAX_MARK:
            raise ConfigError("%s.mark" % base, entry["mark"], "mark must be 1-%d" % MAX_MARK)
        if entry.get("timeout") is not None and entry["timeout"] < 1:
            raise ConfigError("%s.timeout" % base, entry["timeout"], "timeout must be at least 1 second")
        for field in ("source_ports", "destination_ports"):
            _check_port_list("%s.%s" % (base, field), entry.get(field))
        for j, backend in enumerate(entry.get("backends") or []):
            where = "%s.backends[%d]" % (base, j)
            _check_port(where + ".port", backend.get("port"))
            if backend.get("pref") is not None and backend["pref"] < 0:
                raise ConfigError(where + ".pref", backend["pref"], "pref must be 0 or more")


def fail_error(module, error, result=None, field=None):
    """Fail naming the field and the value; `error` is a MasqdError or ConfigError."""
    result = dict(result or {})
    field = field or error.field
    if isinstance(error, MasqdNotRunning) or field is None:
        msg = error.message
    else:
        msg = "%s: %s (value: %s)" % (field, error.message, _value_text(error.value))
    result["error"] = {"field": field, "value": error.value, "message": error.message}
    module.fail_json(msg=msg, **result)


def _value_text(value):
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _diff(table, before, after):
    return {"before": table_text(table, before), "after": table_text(table, after),
            "before_header": "%s (before)" % table, "after_header": "%s (after)" % table}


class ResourceModule(object):
    """Runs one resource module for one agent table."""

    def __init__(self, module, table):
        self.module = module
        self.table = table
        self.config = module.params.get("config") or []
        self.state = module.params["state"]
        self.agent = MasqdClient(module.params["socket"])

    def run(self):
        try:
            check_config(self.config)
            if self.state == "rendered":
                return self._rendered()
            if self.state == "parsed":
                return self._parsed()
            with self.agent:
                if self.state == "gathered":
                    response = self.agent.request("get", table=self.table)
                    self.module.exit_json(changed=False, gathered=response["result"]["entries"],
                                          revision=response.get("revision"))
                return self._apply()
        except ConfigError as error:
            fail_error(self.module, error)
        except MasqdNotRunning as error:
            if self.module.check_mode and self.state != "gathered":
                return self._without_agent(error)
            fail_error(self.module, error)
        except MasqdError as error:
            fail_error(self.module, error)

    def _read(self):
        response = self.agent.request("get", table=self.table)
        return normalize_table(self.table, response["result"]["entries"]), response.get("revision")

    def _apply(self):
        for attempt in (1, 2):
            before, revision = self._read()
            desired = desired_table(self.table, self.state, self.config, before)
            result = {"before": before, "revision": revision, "commands": []}
            if tables_equal(self.table, before, desired):
                result["after"] = before
                self.module.exit_json(changed=False, **result)
            if self.module.check_mode:
                plan = self._call("plan", desired, result, table=self.table, entries=desired)["result"]
                after = normalize_table(self.table, plan.get("after", desired))
                return self._exit(bool(plan.get("changed", True)), before, after, result, nft=plan.get("nft"))
            try:
                # echo=False: the table is read back below, so the agent need not send it too.
                response = self.agent.request("set", table=self.table, entries=desired, revision=revision,
                                              echo=False)
            except MasqdError as error:
                if error.field == "revision" and attempt == 1:
                    continue  # someone else wrote the table in between: re-read, recompute, retry once
                if error.field == "revision":
                    self.module.fail_json(
                        msg="the %s table kept changing under this task (revision %s, then %s): "
                            "another writer is active, run the task again" % (self.table, revision, error.value),
                        error=error.to_dict(), **result)
                fail_error(self.module, error, result, config_path(self.table, self.config, desired, error.field))
            after, revision = self._read()
            result["revision"] = revision
            return self._exit(bool(response.get("changed", True)), before, after, result)

    def _without_agent(self, error):
        """Check mode before the agent runs (a fresh host, after the role's --check):
        what would change in a table that does not exist yet, rather than a failure."""
        desired = desired_table(self.table, self.state, self.config, [])
        self.module.warn("%s; check mode reports the change against an empty %s table"
                         % (error.message, self.table))
        result = {"before": [], "revision": None, "commands": [], "agent_running": False}
        return self._exit(not tables_equal(self.table, [], desired), [], desired, result)

    def _call(self, op, desired, result, **arguments):
        try:
            return self.agent.request(op, **arguments)
        except MasqdError as error:
            if isinstance(error, MasqdNotRunning):
                raise
            fail_error(self.module, error, result, config_path(self.table, self.config, desired, error.field))

    def _exit(self, changed, before, after, result, **extra):
        result.update(extra)
        result["after"] = after
        result["commands"] = table_commands(self.table, before, after) if changed else []
        if self.module._diff:
            result["diff"] = _diff(self.table, before, after)
        self.module.exit_json(changed=changed, **result)

    def _rendered(self):
        """The table `config` describes, defaults filled in; never asks the agent (for the
        agent's own check, run state=overridden in check mode: its plan and nft text)."""
        rendered = desired_table(self.table, "rendered", self.config, [])
        self.module.exit_json(changed=False, rendered=rendered,
                              commands=table_commands(self.table, [], rendered))

    def _parsed(self):
        """`running_config` (a legacy ipmasqadm/ipchains script, as `masqctl import`
        reads it) as this module's table; never asks the agent."""
        try:
            result = legacy_import.translate(self.module.params["running_config"])
        except legacy_import.TranslateError as error:
            self.module.fail_json(
                msg="running_config line %d: %s: %s" % (error.line, error.reason, error.text),
                error={"field": "running_config", "value": error.line, "message": error.reason, "line": error.text})
        parsed = normalize_table(self.table, result.entries(self.table))
        self.module.exit_json(changed=False, parsed=parsed, commands=table_commands(self.table, [], parsed))


def run_resource_module(module, table):
    ResourceModule(module, table).run()
