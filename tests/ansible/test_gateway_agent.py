"""ipmasq.gateway.gateway_agent in a lab gateway's namespace, through the netns
connection: check and diff mode change nothing, a real run installs, sets and starts
everything in one task, the re-run changes nothing in one module run, and bad input
is refused naming the option and the value with nothing changed."""

import os
import shutil

import pytest
import yaml

from ansible_lab import PYTHON, REPO, host_results, json_output, run

pytestmark = pytest.mark.lab

LAB_INVENTORY = os.path.join(REPO, "inventory", "lab.yml")


@pytest.fixture
def gateway(seed_lab):
    seed_lab.set_sysctl("gateway", "net.ipv4.ip_forward", 0)
    seed_lab.set_sysctl("gateway", "net.ipv4.conf.eth0.rp_filter", 0)
    run_dir = "/run/ipmasq-lab/%s/gateway" % seed_lab.prefix
    yield seed_lab, run_dir
    seed_lab.down()  # kills the agent with every other process of the lab
    shutil.rmtree(os.path.dirname(run_dir), ignore_errors=True)


def task(run_dir, **overrides):
    args = {"src": "{{ lookup('ipmasq.gateway.agent_zipapp', interpreter=ansible_playbook_python) }}",
            "dest": run_dir + "/lib/masqd.pyz",
            "links": [run_dir + "/bin/masqd", run_dir + "/bin/masqctl"],
            "directories": [run_dir + "/bin"],
            "sysctls": {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "1"},
            "rp_filter": "1",
            "daemon": {"python": "{{ ansible_playbook_python }}", "command": run_dir + "/bin/masqd",
                       "args": ["--state-dir", run_dir + "/state", "--socket", run_dir + "/masqd.sock"],
                       "pidfile": run_dir + "/masqd.pid", "log": run_dir + "/masqd.log",
                       "socket": run_dir + "/masqd.sock"}}
    args.update(overrides)
    return [{"name": "gateway_agent", "hosts": "gateways", "gather_facts": False,
             "tasks": [{"name": "agent", "ipmasq.gateway.gateway_agent": args}]}]


def play(tmp_path, env, plays, prefix, *args):
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(plays, sort_keys=False))
    proc = run(["ansible-playbook", "-i", LAB_INVENTORY, "-e", "lab_prefix=" + prefix, str(path)] + list(args),
               env=dict(env, ANSIBLE_PIPELINING="true"), timeout=120, check=False)
    return proc, dict(host_results(json_output(proc), "gateway"))["agent"]


def test_check_diff_run_and_rerun(tmp_path, ansible_env, gateway):
    lab, run_dir = gateway
    proc, result = play(tmp_path, ansible_env, task(run_dir), lab.prefix, "--check", "--diff")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["changed"] and result["agent_changed"] and result["started"]
    assert "net.ipv4.ip_forward = 0" in result["diff"]["before"]
    assert "net.ipv4.ip_forward = 1" in result["diff"]["after"]
    assert result["sysctls_changed"]["net.ipv4.conf.eth0.rp_filter"] == "1"
    assert not os.path.exists(run_dir)
    assert lab.sysctl("gateway", "net.ipv4.ip_forward") == "0"

    proc, result = play(tmp_path, ansible_env, task(run_dir), lab.prefix)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["changed"] and result["started"]
    assert os.readlink(run_dir + "/bin/masqctl") == run_dir + "/lib/masqd.pyz"
    assert os.stat(run_dir + "/lib/masqd.pyz").st_mode & 0o777 == 0o755
    assert lab.sysctl("gateway", "net.ipv4.ip_forward") == "1"
    assert lab.sysctl("gateway", "net.ipv4.conf.eth0.rp_filter") == "1"
    assert os.path.exists(run_dir + "/masqd.sock")
    with open(run_dir + "/masqd.pid") as handle:
        pid = int(handle.read())
    assert os.readlink("/proc/%d/exe" % pid) == os.path.realpath(PYTHON)

    proc, result = play(tmp_path, ansible_env, task(run_dir), lab.prefix)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not result["changed"] and result["changes"] == [] and not result["started"]
    with open(run_dir + "/masqd.pid") as handle:
        assert int(handle.read()) == pid


@pytest.mark.parametrize("overrides, message", [
    ({"sysctls": {"net.ipv4.no_such_setting": "1"}}, "sysctls: net.ipv4.no_such_setting cannot be read: no such setting"),
    ({"sysctls": {"net/../../etc/hostname": "x"}}, "sysctls: 'net/../../etc/hostname' is not a setting's dotted name"),
    ({"rp_filter": "3"}, "rp_filter"),
    ({"directories": ["/etc/hostname"]}, "directories: /etc/hostname exists and is not a directory"),
    ({"links": ["/etc"]}, "links: /etc is a directory"),
    ({"src": "/nonexistent/masqd.pyz"}, "src: '/nonexistent/masqd.pyz' is not a file on the controller"),
])
def test_bad_input_names_the_option_and_changes_nothing(tmp_path, ansible_env, gateway, overrides, message):
    lab, run_dir = gateway
    proc, result = play(tmp_path, ansible_env, task(run_dir, **overrides), lab.prefix)
    assert proc.returncode != 0
    assert message in result["msg"], result["msg"]
    assert lab.sysctl("gateway", "net.ipv4.ip_forward") == "0"
    assert not os.path.exists(run_dir + "/masqd.sock")
