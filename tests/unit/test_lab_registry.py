"""The lab registry: prefix reservation, atomic records, pid merging (files only)."""

import json
import os

import pytest

from ipmasq_lab import registry
from ipmasq_lab.errors import LabError


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "RUN_DIR", str(tmp_path / "ipmasq-lab"))
    return tmp_path / "ipmasq-lab"


def test_reserve_records_and_refuses_a_second_reservation(run_dir):
    registry.reserve("mlabc123", {"name": "x"}, ["mlabc123-a"])
    record = json.loads((run_dir / "mlabc123.json").read_text())
    assert record["namespaces"] == ["mlabc123-a"] and record["state"] == "building"
    assert record["owner_pid"] == os.getpid()
    with pytest.raises(LabError, match="already recorded"):
        registry.reserve("mlabc123", {"name": "y"}, [])
    assert registry.read("mlabc123")["spec"] == {"name": "x"}
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"


def test_update_merges_pids_and_leaves_no_temporary_files(run_dir):
    registry.reserve("mlabc123", {}, [])
    registry.update("mlabc123", pids=[30, 10])
    registry.update("mlabc123", pids=[20, 10], state="up")
    record = registry.read("mlabc123")
    assert record["pids"] == [10, 20, 30] and record["state"] == "up"
    assert sorted(os.listdir(run_dir)) == ["mlabc123.json"]


def test_remove_is_idempotent_and_list_shows_only_records(run_dir):
    registry.reserve("mlabc123", {}, [])
    registry.reserve("mldef456", {}, [])
    (run_dir / "not-a-lab.txt").write_text("")
    assert registry.prefixes() == ["mlabc123", "mldef456"]
    registry.remove("mlabc123")
    registry.remove("mlabc123")
    assert registry.prefixes() == ["mldef456"] and registry.read("mlabc123") is None
    with pytest.raises(LabError, match="no lab with prefix"):
        registry.update("mlabc123", state="up")


@pytest.mark.parametrize("prefix", ["", "a", "ML1234", "ml-12", "ml/../x", "m" * 13, 12])
def test_bad_prefix_refused(prefix):
    with pytest.raises(LabError, match="not a lab prefix"):
        registry.check_prefix(prefix)


def test_new_prefixes_are_valid_and_distinct():
    prefixes = {registry.new_prefix() for _attempt in range(50)}
    assert len(prefixes) > 45
    assert all(registry.check_prefix(p).startswith("ml") and len(p) == 8 for p in prefixes)
