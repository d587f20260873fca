"""The collection builds into a tarball that installs offline, holds what a user needs
and no development files, and whose lab modules run from the installed copy on a
Python that has only the harness's libraries (pyroute2, PyYAML, scapy)."""

import ast
import hashlib
import os
import re
import secrets
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GALAXY = str(Path(sys.executable).with_name("ansible-galaxy"))
PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
# The harness modules the lab modules import, shipped as plugins/module_utils/lab.
LAB_UTILS = REPO / "plugins" / "module_utils" / "lab"
# Harness files that are not for the modules: the CLI, the demo, the pytest plugin.
LAB_NOT_SHIPPED_AS_UTILS = {"cli.py", "demo.py", "pytest_plugin.py"}
TARGET_LIBRARIES = ("pyroute2", "PyYAML", "scapy")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(tarball path, member names, {symlink: target}) of one `ansible-galaxy collection build`."""
    out = tmp_path_factory.mktemp("build")
    subprocess.run([GALAXY, "collection", "build", "--output-path", str(out), str(REPO)],
                   check=True, capture_output=True, text=True)
    (tarball,) = out.glob("ipmasq-gateway-*.tar.gz")
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
    links = {m.name: m.linkname for m in members if m.issym()}
    return tarball, [m.name for m in members], links


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """The built tarball installed offline into a fresh collections path; returns that path."""
    tarball = built[0]
    inst = tmp_path_factory.mktemp("inst")
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(inst))
    subprocess.run([GALAXY, "collection", "install", "--offline", "-p", str(inst), str(tarball)],
                   check=True, capture_output=True, text=True, env=env)
    return inst


def test_tarball_holds_the_collection_and_its_legal_files(built):
    names = built[1]
    assert "galaxy.yml" not in names and "MANIFEST.json" in names
    for wanted in ("LICENSE", "README.md", "CHANGELOG.rst", "changelogs/changelog.yaml",
                   "meta/runtime.yml", "meta/execution-environment.yml", "bindep.txt",
                   "requirements.txt", "masqd/__init__.py", "masqd/daemon.py",
                   "ipmasq_lab/topologies/seed.yml", "plugins/action/lab_topology.py",
                   "plugins/module_utils/lab/topology.py", "roles/gateway/tasks/main.yml",
                   "playbooks/site.yml"):
        assert wanted in names, wanted
    with open(REPO / "LICENSE", encoding="utf-8") as f:
        license_text = f.read()
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    assert galaxy["license"] == ["GPL-3.0-or-later"]
    assert "GNU GENERAL PUBLIC LICENSE" in license_text and "Version 3, 29 June 2007" in license_text


def test_tarball_has_no_development_files(built):
    names = built[1]
    dev_tops = (".venv", ".git", ".ci", ".hypothesis", ".pytest_cache", "tests", "bench",
                "scripts", "molecule", "changelogs/fragments", "build", "dist")
    leaked = [n for n in names
              if n.split("/")[0] in dev_tops or n.startswith("changelogs/fragments")
              or "__pycache__" in n or n.endswith((".pyc", ".egg-info", ".tar.gz"))
              or n in ("requirements-dev.txt", "pyproject.toml", ".ansible-lint", ".gitignore",
                       "ipmasq_lab/pytest_plugin.py")]
    assert leaked == []


def test_no_placeholder_urls_in_metadata_or_docs():
    texts = [REPO / "galaxy.yml", REPO / "README.md", REPO / "CHANGELOG.rst"]
    texts += sorted((REPO / "docs").glob("*.md")) + sorted((REPO / "meta").glob("*.yml"))
    bad = [str(p) for p in texts if re.search(r"example\.(invalid|com|org|net)\b|\bTODO\b", p.read_text())]
    assert bad == []


def test_symlinks_stay_inside_the_tarball(built):
    names, links = built[1], built[2]
    assert links, "plugins/module_utils/lab ships the harness as links to ipmasq_lab/"
    for name, target in links.items():
        resolved = os.path.normpath(os.path.join(os.path.dirname(name), target))
        assert resolved in names, "%s -> %s is not in the tarball" % (name, target)


def _harness_imports(path):
    """Names of the harness modules `path` imports, relatively or as ipmasq_lab.X."""
    found, absolute = set(), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.update([node.module] if node.module else [a.name for a in node.names])
            elif node.module and node.module.split(".")[0] == "ipmasq_lab":
                absolute.append(node.module)
        elif isinstance(node, ast.Import):
            absolute += [a.name for a in node.names if a.name.split(".")[0] == "ipmasq_lab"]
    return found, absolute


def test_lab_harness_ships_whole_through_module_utils():
    """Every harness module the lab modules can reach is linked into module_utils/lab, and
    the harness imports itself relatively (an `ipmasq_lab.X` import fails in AnsiballZ)."""
    shipped = {p.name for p in LAB_UTILS.glob("*.py")}
    for p in LAB_UTILS.glob("*.py"):
        assert p.is_symlink() and p.resolve() == (REPO / "ipmasq_lab" / p.name).resolve(), p
    todo, seen = ["__init__"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found, absolute = _harness_imports(REPO / "ipmasq_lab" / (name + ".py"))
        assert absolute == [], "ipmasq_lab/%s.py imports %s absolutely: use a relative import" % (name, absolute)
        todo += sorted(found)
    for name in ("lab", "topology", "registry", "spec", "errors", "probes"):
        seen.add(name)
    missing = sorted(n + ".py" for n in seen if n + ".py" not in shipped)
    assert missing == [], "add links in plugins/module_utils/lab for %s" % missing
    for p in (REPO / "ipmasq_lab").glob("*.py"):
        absolute = _harness_imports(p)[1]
        assert absolute == [], "ipmasq_lab/%s imports %s absolutely" % (p.name, absolute)
        assert p.name in shipped or p.name in LAB_NOT_SHIPPED_AS_UTILS, \
            "ipmasq_lab/%s: link it into plugins/module_utils/lab or list it as not for the modules" % p.name


def test_offline_install(installed):
    root = installed / "ansible_collections" / "ipmasq" / "gateway"
    assert (root / "MANIFEST.json").is_file()
    assert (root / "meta" / "runtime.yml").is_file()
    assert (root / "plugins" / "module_utils" / "lab" / "spec.py").read_text() == \
        (REPO / "ipmasq_lab" / "spec.py").read_text()
    assert not (root / "tests").exists() and not (root / "bench").exists()


def _pins(path, names):
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m and m.group(1) in names:
            pins[m.group(1)] = m.group(2)
    assert sorted(pins) == sorted(names), "requirements.txt must pin %s" % (names,)
    return ["%s==%s" % kv for kv in sorted(pins.items())]


@pytest.fixture(scope="module")
def target_python():
    """A venv with only pyroute2, PyYAML and scapy (requirements.txt's pins), no pip and
    no access to this repo: the lab host's Python. Cached under .venv by its pins."""
    pins = _pins(REPO / "requirements.txt", TARGET_LIBRARIES)
    key = hashlib.sha256(("\n".join(pins) + sys.version).encode()).hexdigest()[:12]
    venv = REPO / ".venv" / ("lab-target-" + key)
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run(["python3", "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                        "--disable-pip-version-check"] + pins, check=True, capture_output=True)
        (venv / ".complete").write_text("\n".join(pins) + "\n")
    return str(python)


def _clean_env(installed, home):
    """No PYTHONPATH, no venv on PATH, only the installed collection."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "ANSIBLE_COLLECTIONS_PATH": str(installed), "ANSIBLE_HOME": str(home),
           "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_DEPRECATION_WARNINGS": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    return env


@pytest.mark.lab
def test_lab_modules_run_from_the_installed_tarball(installed, target_python, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    env = _clean_env(installed, tmp_path / "ansible-home")
    lone = subprocess.run([target_python, "-c", "import ipmasq_lab"], capture_output=True, env=env, cwd="/",
                          check=False)
    assert lone.returncode != 0, "the target Python must not see the repo's ipmasq_lab"
    prefix = "cb" + secrets.token_hex(3)
    playbook = tmp_path / "lab.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "lab modules from the installed collection", "hosts": "localhost",
        "gather_facts": False, "vars": {"ansible_python_interpreter": target_python},
        "tasks": [{"block": [
            {"name": "up", "ipmasq.gateway.lab_topology": {"spec": "seed", "prefix": prefix},
             "register": "up"},
            {"name": "serve", "ipmasq.gateway.lab_probe": {
                "prefix": prefix, "kind": "serve", "host": "web1", "port": 8080}},
            {"name": "connect", "ipmasq.gateway.lab_probe": {
                "prefix": prefix, "kind": "connect", "src": "gateway", "dst": "10.16.0.27",
                "port": 8080, "count": 2}, "register": "conn"},
            {"name": "check", "ansible.builtin.assert": {"that": [
                "up is changed", "up.namespaces | length >= 7",
                "conn.connections | map(attribute='backend') | list == ['web1', 'web1']"]}},
        ], "always": [
            {"name": "down", "ipmasq.gateway.lab_topology": {"prefix": prefix, "state": "absent"}},
        ]}],
    }]))
    try:
        run = subprocess.run([PLAYBOOK, "-i", "localhost,", "-c", "local", str(playbook)],
                             capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240,
                             check=False)
    finally:
        from ipmasq_lab import registry
        from ipmasq_lab.lab import Lab
        if registry.read(prefix) is not None:
            Lab.attach(prefix).down()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "ok=5" in run.stdout and "failed=0" in run.stdout, run.stdout[-3000:]
