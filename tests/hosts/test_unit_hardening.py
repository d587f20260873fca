"""The masqd unit the role renders, rated by `systemd-analyze security --offline=yes`
(this machine's systemd-analyze, no boot needed): at most 2.5 in every layout the
role's variables allow. That masqd works under it is test_role_on_debian's job."""

import os
import shutil
import subprocess

import pytest
import yaml

from hostlab import REPO, ansible_env, exposure

ROLE = os.path.join(REPO, "roles", "gateway")
LAYOUTS = {
    "defaults": {},
    "socket group": {"gateway_socket_group": "adm"},
    "own paths": {"gateway_state_dir": "/srv/masqd/state", "gateway_socket": "/srv/masqd/sock/masqd.sock"},
}


def render(tmp_path, **role_vars):
    unit = tmp_path / "masqd.service"
    play = [{"hosts": "localhost", "connection": "local", "gather_facts": False,
             "vars_files": [os.path.join(ROLE, "defaults", "main.yml"),
                            os.path.join(ROLE, "vars", "main.yml")],
             "tasks": [{"ansible.builtin.template": {
                 "src": os.path.join(ROLE, "templates", "masqd.service.j2"),
                 "dest": str(unit), "mode": "0644"}}]}]
    (tmp_path / "render.yml").write_text(yaml.safe_dump(play))
    # Extra vars: a play's vars would lose to the role's vars_files.
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(role_vars or {"gateway_socket_group": ""}))
    env = dict(ansible_env(tmp_path), ANSIBLE_STDOUT_CALLBACK="default")
    proc = subprocess.run(["ansible-playbook", "-e", "@%s" % (tmp_path / "vars.yml"),
                           str(tmp_path / "render.yml")], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return unit


@pytest.fixture(autouse=True)
def _analyzer():
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_rendered_unit_rates_at_most_2_5(tmp_path, layout):
    unit = render(tmp_path, **LAYOUTS[layout])
    text = unit.read_text()
    report = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert exposure(report.stdout) <= 2.5, report.stdout
    assert "Type=notify" in text and "After=nftables.service" in text
    caps = "CAP_NET_ADMIN CAP_CHOWN" if layout == "socket group" else "CAP_NET_ADMIN"
    assert "CapabilityBoundingSet=%s\n" % caps in text
    assert "AmbientCapabilities=%s\n" % caps in text
    if layout == "own paths":
        assert "ReadWritePaths=/srv/masqd/state /srv/masqd/sock\n" in text
        assert "StateDirectory" not in text and "RuntimeDirectory" not in text
    else:
        assert "StateDirectory=masqd\n" in text and "RuntimeDirectory=masqd\n" in text
