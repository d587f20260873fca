"""Every plugin's documentation renders with ansible-doc, and EXAMPLES use FQCNs."""

import json
import os
import re

import pytest
import yaml

from ansible_lab import REPO, run

MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "plugins", "modules"))
                 if f.startswith("masq_") and f.endswith(".py"))


def test_the_resource_info_and_tables_modules_exist():
    assert MODULES == ["masq_autofw", "masq_info", "masq_mark", "masq_masquerade", "masq_mfw", "masq_portfw",
                       "masq_tables"]


@pytest.mark.parametrize("module", MODULES)
def test_module_doc_renders(module, ansible_env):
    name = "ipmasq.gateway." + module
    text = run(["ansible-doc", name], env=ansible_env, timeout=60)
    assert text.stderr == ""
    assert "EXAMPLES:" in text.stdout and "RETURN VALUES:" in text.stdout
    doc = json.loads(run(["ansible-doc", "--json", name], env=ansible_env, timeout=60).stdout)[name]
    options = doc["doc"]["options"]
    assert options["socket"]["default"] == "/run/masqd/masqd.sock"
    if module != "masq_info":
        # masq_tables (every table in one transaction) has no `parsed`: masqctl import is its way in.
        states = ["merged", "replaced", "overridden", "deleted", "gathered", "rendered"]
        assert options["state"]["choices"] == (states if module == "masq_tables" else states + ["parsed"])
        assert set(doc["return"]) >= {"before", "after", "commands", "revision"}
    # Every task in EXAMPLES names its module by FQCN.
    for task in yaml.safe_load(doc["examples"]):
        modules = [k for k in task if k not in ("name", "register", "module_defaults", "loop", "when")]
        assert len(modules) == 1 and modules[0].startswith(("ipmasq.gateway.", "ansible.builtin.")), task


def test_gateway_agent_doc_renders(ansible_env):
    name = "ipmasq.gateway.gateway_agent"
    text = run(["ansible-doc", name], env=ansible_env, timeout=60)
    assert text.stderr == ""
    doc = json.loads(run(["ansible-doc", "--json", name], env=ansible_env, timeout=60).stdout)[name]
    assert {"src", "dest", "links", "sysctls", "rp_filter", "daemon"} <= set(doc["doc"]["options"])
    assert {"changes", "agent_changed", "started", "sysctls_changed"} <= set(doc["return"])
    for task in yaml.safe_load(doc["examples"]):
        assert [k for k in task if k != "name"] == [name], task


def test_connection_doc_renders(ansible_env):
    text = run(["ansible-doc", "-t", "connection", "ipmasq.gateway.netns"], env=ansible_env, timeout=60)
    assert text.stderr == ""
    assert "ansible_netns_name" in text.stdout


def test_action_group_lists_every_masq_module():
    runtime = yaml.safe_load(open(os.path.join(REPO, "meta", "runtime.yml")))
    assert runtime["requires_ansible"] == ">=2.16.0"
    assert sorted(runtime["action_groups"]["masq"]) == MODULES


def test_docs_page_covers_every_module():
    page = open(os.path.join(REPO, "docs", "modules.md")).read()
    for module in MODULES + ["gateway_agent"]:
        assert re.search(r"ipmasq\.gateway\.%s\b" % module, page), module
