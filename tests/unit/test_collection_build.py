"""The collection builds into a tarball that installs offline, without dev artefacts."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GALAXY = str(Path(sys.executable).with_name("ansible-galaxy"))


def test_build_and_offline_install(tmp_path):
    subprocess.run([GALAXY, "collection", "build", "--output-path", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, text=True)
    (tarball,) = tmp_path.glob("ipmasq-gateway-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    assert "galaxy.yml" not in names and "MANIFEST.json" in names
    assert "masqd/__init__.py" in names, "the agent ships with the collection"
    leaked = [n for n in names if n.startswith((".venv", ".git/", ".ci")) or "__pycache__" in n]
    assert leaked == []

    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "inst"))
    subprocess.run([GALAXY, "collection", "install", "--offline", "-p", str(tmp_path / "inst"),
                    str(tarball)], check=True, capture_output=True, text=True, env=env)
    installed = tmp_path / "inst" / "ansible_collections" / "ipmasq" / "gateway"
    assert (installed / "MANIFEST.json").is_file()
    assert (installed / "meta" / "runtime.yml").is_file()
