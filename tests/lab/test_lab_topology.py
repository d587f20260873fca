"""The lab harness against the real kernel: build, reach, tear down on every exit path."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from pyroute2 import IPRoute, netns as pr_netns

import ipmasq_lab
from ipmasq_lab import nsexec, registry
from ipmasq_lab.errors import LabError, LabSpecError
from ipmasq_lab.lab import Lab

pytestmark = pytest.mark.lab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(REPO, ".venv", "bin")

# Two hosts on a link and two more behind a bridge: the smallest lab with every part.
PAIR = {
    "name": "pair",
    "hosts": {
        "a": {"interfaces": {"eth0": {"addresses": ["10.1.0.1/24", "fd00:1::1/64"]},
                             "eth1": {"addresses": ["10.2.0.1/24"]}},
              "sysctls": {"net.ipv4.ip_forward": 1}},
        "b": {"interfaces": {"eth0": {"addresses": ["10.1.0.2/24", "fd00:1::2/64"]}},
              "routes": [{"to": "10.2.0.0/24", "via": "10.1.0.1"}]},
        "c": {"interfaces": {"eth0": {"addresses": ["10.2.0.3/24"]}},
              "routes": [{"to": "default", "via": "10.2.0.1"}]},
    },
    "links": [["a:eth0", "b:eth0"]],
    "bridges": {"br": ["a:eth1", "c:eth0"]},
}


def ping(lab, src, dst_host, family=4):
    argv = ["ping", "-%d" % family, "-n", "-c", "1", "-W", "1",
            lab.address(dst_host, family)]
    return lab.run(src, argv, timeout=5).returncode == 0


def namespaces_of(prefix):
    return [n for n in pr_netns.listnetns() if n.startswith(prefix + "-")]


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_gone(pid, timeout=3.0):
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def assert_nothing_left(prefix, pids=()):
    assert namespaces_of(prefix) == []
    assert registry.read(prefix) is None
    assert not os.path.exists(os.path.join(registry.RUN_DIR, prefix + ".json"))
    for pid in pids:
        assert wait_gone(pid), "process %d of lab %s still alive" % (pid, prefix)


def root_links():
    with IPRoute() as ipr:
        return sorted(link.get("ifname") for link in ipr.get_links())


# -- the reference lab ------------------------------------------------------------------

def test_seed_lab_comes_up_as_specified(seed_lab):
    spec = seed_lab.spec
    assert seed_lab.hosts == list(spec["hosts"])
    for host in seed_lab.hosts:
        ns = seed_lab.netns(host)
        assert ns == "%s-%s" % (seed_lab.prefix, host)
        with IPRoute(netns=ns, flags=0) as ipr:
            links = {l.get("ifname"): l for l in ipr.get_links()}
            assert links["lo"]["flags"] & 1, "lo is down in %s" % ns
            want = {ifname: sorted(iface["addresses"])
                    for ifname, iface in spec["hosts"][host]["interfaces"].items()}
            got = {}
            for msg in ipr.get_addr():
                if msg["scope"] == 0:
                    name = [n for n, l in links.items() if l["index"] == msg["index"]][0]
                    got.setdefault(name, []).append(
                        "%s/%d" % (msg.get("IFA_ADDRESS"), msg["prefixlen"]))
                    # IPv6 usable at once: no address left tentative (DAD off).
                    assert not msg.get("IFA_FLAGS", msg["flags"]) & 0x40
            assert {k: sorted(v) for k, v in got.items()} == want
            for ifname in want:
                assert links[ifname]["flags"] & 1, "%s down in %s" % (ifname, ns)
    assert seed_lab.sysctl("gateway", "net.ipv4.ip_forward") == "1"
    assert seed_lab.sysctl("gateway", "net.ipv6.conf.all.forwarding") == "1"
    assert seed_lab.sysctl("client", "net.ipv4.ip_forward") == "0"
    # The bridge lives in the lab's switch namespace, not in the root namespace.
    with IPRoute(netns=seed_lab.prefix + "-switch", flags=0) as ipr:
        assert ipr.link_lookup(ifname="inside")
    assert seed_lab.address("web1") == "10.16.0.27"
    assert seed_lab.address("web1", 6) == "fd00:16::27"
    assert seed_lab.address("gateway", 4, "eth2") == "203.0.113.1"


def test_client_reaches_web1_only_while_the_gateway_forwards(seed_lab):
    assert ping(seed_lab, "client", "web1", 4)
    assert ping(seed_lab, "client", "web1", 6)
    seed_lab.set_sysctl("gateway", "net.ipv4.ip_forward", 0)
    seed_lab.set_sysctl("gateway", "net.ipv6.conf.all.forwarding", 0)
    assert not ping(seed_lab, "client", "web1", 4)
    assert not ping(seed_lab, "client", "web1", 6)
    # The gateway itself still reaches both sides: only forwarding was switched off.
    assert ping(seed_lab, "gateway", "web1") and ping(seed_lab, "gateway", "client")


def test_lab_is_built_fast_and_touches_no_root_interface():
    before = root_links()
    start = time.monotonic()
    with ipmasq_lab.lab("seed") as lab:
        elapsed = time.monotonic() - start
        assert root_links() == before
        prefix = lab.prefix
    assert elapsed < 2.0, "seed lab took %.2f s" % elapsed
    assert root_links() == before
    assert_nothing_left(prefix)


# -- teardown on every exit path ---------------------------------------------------------

def test_signal_handlers_installed_while_up_and_restored_after():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with ipmasq_lab.lab(PAIR):
        assert all(signal.getsignal(sig) != h for sig, h in before.items())
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_teardown_after_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with ipmasq_lab.lab(PAIR) as lab:
            prefix = lab.prefix
            tracked = lab.spawn("b", ["sleep", "60"])
            # Not tracked by the lab: found by its namespace, as lib.sh does.
            stray = nsexec.popen(lab.netns("c"), ["sleep", "60"])
            assert len(namespaces_of(prefix)) == 4
            raise RuntimeError("boom")
    stray.wait(timeout=3)
    assert_nothing_left(prefix, [tracked.pid, stray.pid])


def test_lab_factory_tears_down_after_a_failing_test(pytester):
    pytester.makeconftest('pytest_plugins = ["ipmasq_lab.pytest_plugin"]')
    pytester.makepyfile(test_inner="""
        def test_fails(lab_factory):
            lab = lab_factory("seed")
            proc = lab.spawn("web1", ["sleep", "60"])
            print("LAB", lab.prefix, proc.pid)
            raise AssertionError("body failed")
        """)
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(failed=1)
    words = " ".join(result.outlines).split()
    prefix, pid = words[words.index("LAB") + 1:words.index("LAB") + 3]
    assert_nothing_left(prefix, [int(pid)])


SIGNALLED = textwrap.dedent("""
    import sys, time
    import ipmasq_lab
    from ipmasq_lab import nsexec
    with ipmasq_lab.lab(%r) as lab:
        proc = lab.spawn("b", ["sleep", "60"])
        stray = nsexec.popen(lab.netns("c"), ["sleep", "60"])
        print(lab.prefix, proc.pid, stray.pid, flush=True)
        time.sleep(30)
    """)


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 128 + signal.SIGTERM),
                                        (signal.SIGINT, -signal.SIGINT),
                                        (signal.SIGHUP, 128 + signal.SIGHUP)])
def test_signal_to_a_lab_process_leaves_nothing(sig, status):
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED % (PAIR,)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        prefix, *pids = proc.stdout.readline().split()
        assert len(namespaces_of(prefix)) == 4
        proc.send_signal(sig)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, proc.stderr.read()
    assert_nothing_left(prefix, [int(p) for p in pids])


def test_failure_midway_through_up_tears_down_what_was_built():
    spec = dict(PAIR, hosts=dict(PAIR["hosts"]))
    # Valid to the validator and present in the kernel, but the kernel refuses the
    # value: the lab fails after namespaces and links exist.
    spec["hosts"]["c"] = dict(spec["hosts"]["c"], sysctls={"net.ipv4.ip_forward": "yes"})
    lab = Lab(spec)
    try:
        with pytest.raises(LabError, match="net.ipv4.ip_forward=yes"):
            lab.up()
        assert_nothing_left(lab.prefix)
    finally:
        lab.down()  # idempotent after a failed up (and cleans up if up succeeded)
    assert_nothing_left(lab.prefix)


def test_down_is_idempotent_and_attach_finds_the_lab():
    lab = Lab(PAIR).up()
    try:
        attached = Lab.attach(lab.prefix)
        assert attached.spec == lab.spec and attached.hosts == ["a", "b", "c"]
        assert attached.netns("b") == lab.netns("b")
        proc = attached.spawn("c", ["sleep", "60"])
        assert proc.pid in registry.read(lab.prefix)["pids"]
        assert ping(attached, "b", "c")  # b -> a (forwards) -> bridge -> c
    finally:
        lab.down()
    assert_nothing_left(lab.prefix, [proc.pid])
    lab.down()
    attached.down()
    with pytest.raises(LabError, match="no lab with prefix"):
        Lab.attach(lab.prefix)


# -- isolation and refusal -----------------------------------------------------------------

def test_two_labs_at_once_do_not_collide(lab_factory):
    first, second = lab_factory(PAIR), lab_factory(PAIR)
    assert first.prefix != second.prefix
    assert set(first.namespaces).isdisjoint(second.namespaces)
    assert ping(first, "b", "c") and ping(second, "b", "c")
    first.down()
    assert namespaces_of(first.prefix) == []
    assert len(namespaces_of(second.prefix)) == 4 and ping(second, "b", "c")


def test_explicit_prefix_in_use_refused(lab_factory):
    lab = lab_factory(PAIR)
    with pytest.raises(LabError, match="already up"):
        Lab(PAIR, prefix=lab.prefix).up()
    assert ping(lab, "b", "c")


@pytest.mark.parametrize("change,path", [
    (lambda h: h["c"]["routes"].append({"to": "default", "via": "192.0.2.1"}),
     "hosts.c.routes[1].via"),
    (lambda h: h["b"].__setitem__("sysctls", {"net.ipv4.no_such_sysctl": 1}),
     "hosts.b.sysctls.net.ipv4.no_such_sysctl"),
])
def test_bad_spec_is_refused_with_nothing_created(change, path):
    hosts = json.loads(json.dumps(PAIR["hosts"]))
    change(hosts)
    prefix = registry.new_prefix()
    with pytest.raises(LabSpecError) as info:
        Lab(dict(PAIR, hosts=hosts), prefix=prefix).up()
    assert info.value.path == path
    assert_nothing_left(prefix)


# -- CLI -------------------------------------------------------------------------------------

def cli(*args, **kwargs):
    return subprocess.run([os.path.join(VENV_BIN, "ipmasq-lab"), *args], text=True,
                          capture_output=True, timeout=30, check=False, **kwargs)


def test_cli_up_show_exec_down(tmp_path):
    spec_file = tmp_path / "pair.yml"
    spec_file.write_text(yaml.safe_dump(PAIR))
    up = cli("up", str(spec_file))
    assert up.returncode == 0, up.stderr
    prefix = up.stdout.split()[0]
    try:
        assert "%s-b" % prefix in up.stdout
        assert prefix in cli("list").stdout
        shown = json.loads(cli("show", prefix, "--json").stdout)
        assert shown["hosts"]["c"]["interfaces"] == {"eth0": ["10.2.0.3/24"]}
        ran = cli("exec", prefix, "b", "--", "ping", "-c", "1", "-W", "1", "10.2.0.3")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert cli("exec", prefix, "b", "--", "false").returncode == 1
    finally:
        down = cli("down", prefix)
    assert down.returncode == 0 and "down" in down.stdout
    assert_nothing_left(prefix)
    again = cli("down", prefix)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_cli_refuses_a_bad_spec(tmp_path):
    spec_file = tmp_path / "bad.yml"
    bad = json.loads(json.dumps(PAIR))
    bad["hosts"]["b"]["interfaces"]["eth0"]["addresses"][0] = "192.0.2.5/24"
    spec_file.write_text(yaml.safe_dump(bad))
    prefix = registry.new_prefix()
    result = cli("up", str(spec_file), "--prefix", prefix)
    assert result.returncode == 2
    assert "hosts.b.interfaces.eth0.addresses[0]: 192.0.2.5/24" in result.stderr
    assert_nothing_left(prefix)


def test_cli_up_hold_torn_down_by_sigterm():
    proc = subprocess.Popen([os.path.join(VENV_BIN, "ipmasq-lab"), "up", "seed", "--hold"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        prefix = proc.stdout.readline().strip()
        assert len(namespaces_of(prefix)) == 8
        sleeper = Lab.attach(prefix).spawn("web1", ["sleep", "60"])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
    sleeper.wait(timeout=3)
    assert_nothing_left(prefix, [sleeper.pid])


def test_cli_demo():
    result = cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok") == 4 and "torn down" in result.stdout


# -- Ansible ---------------------------------------------------------------------------------

def ansible(args):
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["ANSIBLE_COLLECTIONS_PATH"] = os.path.join(REPO, ".venv", "collections")
    env["ANSIBLE_PYTHON_INTERPRETER"] = os.path.join(VENV_BIN, "python")
    env["ANSIBLE_HOME"] = os.path.join(REPO, ".venv", "ansible-home")
    env["ANSIBLE_LOCAL_TEMP"] = os.path.join(env["ANSIBLE_HOME"], "tmp")
    check = ["--check"] if args.pop("_check", False) else []
    result = subprocess.run(
        [os.path.join(VENV_BIN, "ansible"), "localhost", "--one-line", "-m",
         "ipmasq.gateway.lab_topology", "-a", json.dumps(args)] + check,
        env=env, text=True, capture_output=True, timeout=60, check=False)
    # One line per host: "localhost | CHANGED => {...module result...}"
    line = [l for l in result.stdout.splitlines() if l.startswith("localhost | ")]
    assert line, result.stdout + result.stderr
    status, result = line[0][len("localhost | "):].split(" => ", 1)
    result = json.loads(result)
    result["status"] = status
    return result


def test_ansible_module_brings_a_lab_up_and_down():
    prefix = registry.new_prefix()
    try:
        first = ansible({"spec": PAIR, "prefix": prefix})
        assert first["changed"] is True, first
        assert first["prefix"] == prefix
        assert first["hosts"]["c"]["netns"] == prefix + "-c"
        assert first["hosts"]["c"]["interfaces"] == {"eth0": ["10.2.0.3/24"]}
        assert len(namespaces_of(prefix)) == 4
        assert ping(Lab.attach(prefix), "b", "c")
        again = ansible({"spec": PAIR, "prefix": prefix})
        assert again["changed"] is False and again["namespaces"] == first["namespaces"]
        check = ansible({"prefix": prefix, "state": "absent", "_check": True})
        assert check["changed"] is True and len(namespaces_of(prefix)) == 4
        gone = ansible({"prefix": prefix, "state": "absent"})
        assert gone["changed"] is True
        assert_nothing_left(prefix)
        assert ansible({"prefix": prefix, "state": "absent"})["changed"] is False
    finally:
        if registry.read(prefix):
            Lab.attach(prefix).down()


def test_ansible_module_refuses_a_bad_spec():
    bad = json.loads(json.dumps(PAIR))
    bad["links"].append(["a:eth0", "root:eth0"])
    prefix = registry.new_prefix()
    result = ansible({"spec": bad, "prefix": prefix})
    assert result["status"] == "FAILED!"
    assert "links[1][1]" in result["msg"] and "root namespace" in result["msg"]
    assert namespaces_of(prefix) == [] and registry.read(prefix) is None
