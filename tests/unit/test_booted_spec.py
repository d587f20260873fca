"""Booted hosts in a lab spec (kind: debian): validation and root keys, pure logic."""

import copy

import pytest

from ipmasq_lab import booted_host, booted_roots, spec
from ipmasq_lab.errors import LabError, LabSpecError

SPEC = {
    "hosts": {
        "controller": {"interfaces": {"eth0": {"addresses": ["10.9.0.1/24"]}}},
        "gw": {"kind": "debian", "release": "trixie",
               "interfaces": {"eth0": {"addresses": ["10.9.0.2/24"]},
                              "eth1": {"addresses": ["198.51.100.1/24"]}}},
        "server": {"interfaces": {"eth0": {"addresses": ["198.51.100.10/24"]}}},
    },
    "links": [["controller:eth0", "gw:eth0"], ["gw:eth1", "server:eth0"]],
}


def with_gw(**changes):
    raw = copy.deepcopy(SPEC)
    raw["hosts"]["gw"].update(changes)
    return raw


def test_a_booted_host_is_normalized_with_its_controller_and_validates_to_itself():
    normalized = spec.validate(SPEC)
    gw = normalized["hosts"]["gw"]
    assert (gw["kind"], gw["release"], gw["controller"]) == ("debian", "trixie", "controller")
    assert "kind" not in normalized["hosts"]["server"]  # plain hosts keep their form
    assert spec.validate(normalized) == normalized
    assert booted_host.booted_hosts(normalized) == ["gw"]
    assert booted_host.ssh_address(normalized, "gw") == "10.9.0.2"


def test_the_release_defaults_to_bookworm():
    raw = with_gw()
    del raw["hosts"]["gw"]["release"]
    assert spec.validate(raw)["hosts"]["gw"]["release"] == "bookworm"


@pytest.mark.parametrize("changes, path, words", [
    ({"kind": "vm"}, "hosts.gw.kind", "not a host kind"),
    ({"release": "sid"}, "hosts.gw.release", "not a supported Debian release"),
    ({"controller": "nobody"}, "hosts.gw.controller", "candidates: controller, server"),
])
def test_bad_booted_host_fields_are_refused_naming_field_and_value(changes, path, words):
    with pytest.raises(LabSpecError) as info:
        spec.validate(with_gw(**changes))
    assert info.value.path == path
    assert info.value.value == list(changes.values())[0]
    assert words in str(info.value)


def test_release_on_a_plain_host_is_refused():
    raw = copy.deepcopy(SPEC)
    raw["hosts"]["server"]["release"] = "bookworm"
    with pytest.raises(LabSpecError, match="only for booted hosts") as info:
        spec.validate(raw)
    assert info.value.path == "hosts.server.release"


def test_a_booted_host_without_a_plain_neighbour_is_refused():
    raw = {"hosts": {"a": {"kind": "debian", "interfaces": {"eth0": {"addresses": ["10.9.0.2/24"]}}},
                     "b": {"kind": "debian", "interfaces": {"eth0": {"addresses": ["10.9.0.3/24"]}}}},
           "links": [["a:eth0", "b:eth0"]]}
    with pytest.raises(LabSpecError, match="needs a plain"):
        spec.validate(raw)


def test_the_root_key_changes_with_the_package_list_and_release():
    base = booted_roots.root_key("bookworm")
    assert booted_roots.root_key("bookworm") == base
    assert booted_roots.root_key("trixie") != base
    assert booted_roots.root_key("bookworm", booted_roots.PACKAGES + ("socat",)) != base


def test_a_machine_without_nspawn_or_debootstrap_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(booted_roots.shutil, "which", lambda name: None)
    with pytest.raises(LabError, match="need systemd-container and debootstrap on this "
                                       "machine: apt-get install systemd-container debootstrap"):
        booted_roots.require_tools()
