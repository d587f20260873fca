"""Helpers for running the gateway role over real SSH against booted Debian hosts."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
CALLBACKS = os.path.join(REPO, "tests", "ansible", "callback_plugins")

# The README's PORTFW example, in the hostgw lab's addresses (conftest.gateway_spec).
PORTFW = [{"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 8080,
           "backends": [{"address": "10.16.0.28", "port": 8080}]}]


def ansible_env(tmp_path):
    """The environment scripts/env.sh sets, with Ansible's writable dirs under tmp_path."""
    collections = tmp_path / "collections"
    (collections / "ansible_collections" / "ipmasq").mkdir(parents=True, exist_ok=True)
    link = collections / "ansible_collections" / "ipmasq" / "gateway"
    if not link.exists():
        link.symlink_to(REPO)
    home = tmp_path / "ansible-home"
    env = dict(os.environ)
    env.update({
        "PATH": VENV_BIN + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(home),
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_PIPELINING": "true",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_STDOUT_CALLBACK": "json_results",
        "ANSIBLE_CALLBACK_PLUGINS": CALLBACKS,
        "PYTHONDONTWRITEBYTECODE": "1",
        # OpenSSH's ControlPath is a Unix socket (at most 107 bytes): pytest's tmp_path
        # names are too long for it, which Ansible reports as "unreachable".
        "ANSIBLE_SSH_CONTROL_PATH_DIR": "/tmp/ipmasq-cp-%s" % hashlib.sha1(
            str(tmp_path).encode()).hexdigest()[:10],
    })
    env.pop("ANSIBLE_CONFIG", None)
    return env


def write_inventory(path, lab, host="gw"):
    """A YAML inventory: `host` in group gateways, reached over SSH (lab.booted)."""
    inventory = {"all": {"children": {"gateways": {"hosts": {
        host: lab.booted(host).ansible_vars()}}}}}
    path.write_text(yaml.safe_dump(inventory))
    return str(path)


def playbook(tmp_path, env, inventory, plays, *args, timeout=600):
    """Run `plays` (a list of dicts); returns (CompletedProcess, JSON document)."""
    path = tmp_path / ("play-%d.yml" % time.monotonic_ns())
    path.write_text(yaml.safe_dump(plays, sort_keys=False))
    proc = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), "-i", inventory,
                           str(path), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    text = proc.stdout
    start = text.find("{")
    assert start >= 0, "no JSON output:\n%s\n%s" % (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc, json.loads(text[start:])


def role_play(**role_vars):
    return [{"name": "gateway role", "hosts": "gateways", "gather_facts": False,
             "vars": role_vars, "roles": ["ipmasq.gateway.gateway"]}]


def changed_tasks(document, host="gw"):
    return [task["task"]["name"] for play in document["plays"] for task in play["tasks"]
            if task["hosts"].get(host, {}).get("changed")]


def failures(document, host="gw"):
    return [(task["task"]["name"], task["hosts"][host].get("msg"))
            for play in document["plays"] for task in play["tasks"]
            if task["hosts"].get(host, {}).get("failed")
            and not task["hosts"][host].get("ignore_errors")]


def task_result(document, name, host="gw"):
    for play in document["plays"]:
        for task in play["tasks"]:
            # Role tasks are named "<role> : <task>".
            if task["task"]["name"].split(" : ")[-1] == name and host in task["hosts"]:
                return task["hosts"][host]
    raise KeyError(name)


def unit_property(booted, prop, unit="masqd"):
    return booted.ssh("systemctl show -p %s --value %s" % (prop, unit), check=True).stdout.strip()


def wait_for(predicate, timeout, what, interval=0.2):
    """Poll `predicate` until it returns a true value, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %.0f s" % (what, timeout))
        time.sleep(interval)


def exposure(text):
    """The overall exposure level from `systemd-analyze security UNIT` output."""
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", text)
    assert match, text[-2000:]
    return float(match.group(1))
