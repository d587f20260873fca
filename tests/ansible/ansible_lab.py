"""Helpers for the tests that run real Ansible (ansible, ansible-playbook) against
network namespaces through the ipmasq.gateway.netns connection."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable


def run(argv, timeout=30, check=True, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)


def write_inventory(path, hosts, **host_vars):
    """An INI inventory: every host uses the netns connection and the venv's python."""
    lines = ["[gateways]"]
    for host in hosts:
        lines.append(host)
    lines.append("[gateways:vars]")
    lines.append("ansible_connection=ipmasq.gateway.netns")
    lines.append("ansible_python_interpreter=%s" % PYTHON)
    for key, value in host_vars.items():
        lines.append("%s=%s" % (key, value))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def json_output(proc):
    """The json callback's document (stdout may carry warnings before it)."""
    text = proc.stdout
    start = text.find("{")
    assert start >= 0, "no JSON output:\nstdout:\n%s\nstderr:\n%s" % (proc.stdout, proc.stderr)
    return json.loads(text[start:])


def host_results(document, host):
    """Every task result of `host`, in play order, as (task name, result)."""
    out = []
    for play in document["plays"]:
        for task in play["tasks"]:
            if host in task["hosts"]:
                out.append((task["task"]["name"], task["hosts"][host]))
    return out
