"""Spec validation of the lab harness: every refusal names the entry and its value."""

import copy

import pytest

from ipmasq_lab.errors import LabError, LabSpecError
from ipmasq_lab.spec import load, parse_yaml, shipped_topologies, validate

BASE = {
    "name": "small",
    "hosts": {
        "client": {
            "interfaces": {"eth0": {"addresses": ["198.51.100.10/24", "2001:db8:100::10/64"]}},
            "routes": [{"to": "default", "via": "198.51.100.1"},
                       {"to": "default", "via": "2001:db8:100::1"}],
        },
        "gw": {
            "interfaces": {
                "eth0": {"addresses": ["198.51.100.1/24", "2001:db8:100::1/64"]},
                "eth1": {"addresses": ["10.16.0.1/24", "fd00:16::1/64"]},
            },
            "sysctls": {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1},
        },
        "web": {
            "interfaces": {"eth0": {"addresses": ["10.16.0.27/24"]}},
            "routes": [{"to": "default", "via": "10.16.0.1"}],
        },
        "web2": {
            "interfaces": {"eth0": {"addresses": ["10.16.0.28/24"]}},
            "routes": [{"to": "198.51.100.0/24", "via": "10.16.0.1"}],
        },
    },
    "links": [["client:eth0", "gw:eth0"]],
    "bridges": {"inside": ["gw:eth1", "web:eth0", "web2:eth0"]},
}


def spec_with(change):
    spec = copy.deepcopy(BASE)
    change(spec)
    return spec


def refused(spec):
    with pytest.raises(LabSpecError) as info:
        validate(spec)
    return info.value


def test_base_spec_is_valid_and_normalized():
    spec = validate(BASE)
    assert spec["hosts"]["gw"]["sysctls"] == {"net.ipv4.ip_forward": "1",
                                              "net.ipv6.conf.all.forwarding": "1"}
    assert spec["hosts"]["client"]["routes"][1] == {
        "to": "default", "via": "2001:db8:100::1", "dev": None, "family": 6}
    assert spec["bridges"] == {"inside": ["gw:eth1", "web:eth0", "web2:eth0"]}
    # A normalized spec is itself a valid spec, unchanged by validation (attach relies on it).
    assert validate(spec) == spec


def test_seed_topology_matches_the_seed_figures():
    assert "seed" in shipped_topologies()
    spec = validate(load("seed"))
    hosts = spec["hosts"]
    assert set(hosts) == {"client", "gateway", "web1", "web2", "friendsrv", "neutralsrv",
                          "friend"}
    assert hosts["gateway"]["interfaces"]["eth0"]["addresses"] == [
        "198.51.100.1/24", "2001:db8:100::1/64"]
    assert hosts["gateway"]["interfaces"]["eth1"]["addresses"] == ["10.16.0.1/24",
                                                                   "fd00:16::1/64"]
    assert hosts["gateway"]["interfaces"]["eth2"]["addresses"][0] == "203.0.113.1/24"
    assert hosts["gateway"]["sysctls"]["net.ipv4.ip_forward"] == "1"
    assert hosts["web1"]["interfaces"]["eth0"]["addresses"][0] == "10.16.0.27/24"
    assert hosts["friendsrv"]["interfaces"]["eth0"]["addresses"][0] == "10.16.0.3/24"
    assert hosts["neutralsrv"]["interfaces"]["eth0"]["addresses"][0] == "10.16.0.46/24"
    assert hosts["friend"]["routes"][0]["via"] == "203.0.113.1"
    assert set(spec["bridges"]["inside"]) == {"gateway:eth1", "web1:eth0", "web2:eth0",
                                              "friendsrv:eth0", "neutralsrv:eth0"}


# -- addresses ------------------------------------------------------------------------

def test_uplink_address_refused_by_name():
    err = refused(spec_with(lambda s: s["hosts"]["client"]["interfaces"]["eth0"]
                            ["addresses"].__setitem__(1, "192.0.2.5/24")))
    assert err.path == "hosts.client.interfaces.eth0.addresses[1]"
    assert err.value == "192.0.2.5/24"
    assert str(err).startswith("hosts.client.interfaces.eth0.addresses[1]: 192.0.2.5/24")
    assert "uplink" in str(err)


def test_network_overlapping_the_uplink_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web"]["interfaces"]["eth0"]
                            .__setitem__("addresses", ["10.16.0.27/24", "192.0.0.9/8"])))
    assert err.path == "hosts.web.interfaces.eth0.addresses[1]" and err.value == "192.0.0.9/8"
    assert "192.0.2.0/24" in str(err)


@pytest.mark.parametrize("address", ["8.8.8.8/24", "172.16.0.1/16", "2001:db9::1/64",
                                     "fe80::1/64", "10.0.0.1/7", "127.0.0.2/8"])
def test_address_outside_lab_ranges_refused(address):
    err = refused(spec_with(lambda s: s["hosts"]["web"]["interfaces"]["eth0"]
                            .__setitem__("addresses", [address])))
    assert err.path == "hosts.web.interfaces.eth0.addresses[0]"
    assert err.value == address
    assert "%s is outside the lab ranges (198.51.100.0/24" % address in str(err)


@pytest.mark.parametrize("address,why", [("10.16.0.27", "prefix length"),
                                         ("10.16.0.300/24", "not an IPv4/IPv6"),
                                         ("10.16.0.0/24", "network or broadcast")])
def test_malformed_address_refused(address, why):
    err = refused(spec_with(lambda s: s["hosts"]["web"]["interfaces"]["eth0"]
                            .__setitem__("addresses", [address])))
    assert err.path == "hosts.web.interfaces.eth0.addresses[0]" and err.value == address
    assert why in str(err)


def test_duplicate_address_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web2"]["interfaces"]["eth0"]
                            .__setitem__("addresses", ["10.16.0.27/24"])))
    assert err.path == "hosts.web2.interfaces.eth0.addresses[0]"
    assert "already the address of web:eth0" in str(err)


# -- root namespace, names, unknown keys -------------------------------------------------

@pytest.mark.parametrize("name", ["root", "host", "init", "default"])
def test_host_named_like_the_root_namespace_refused(name):
    err = refused(spec_with(lambda s: s["hosts"].__setitem__(name, s["hosts"].pop("web2"))))
    assert err.path == "hosts.%s" % name and err.value == name
    assert "root namespace" in str(err)


def test_netns_key_refused():
    err = refused(spec_with(lambda s: s["hosts"]["client"].__setitem__("netns", "root")))
    assert err.path == "hosts.client.netns" and err.value == "root"
    assert "root namespace" in str(err)


def test_link_to_root_namespace_refused():
    err = refused(spec_with(lambda s: s["links"].append(["client:eth0", "root:eth0"])))
    assert err.path == "links[1][1]" and err.value == "root:eth0"
    assert "root namespace" in str(err)


def test_bridge_port_in_root_namespace_refused():
    err = refused(spec_with(lambda s: s["bridges"]["inside"].append("host:veth0")))
    assert err.path == "bridges.inside[3]" and err.value == "host:veth0"
    assert "root namespace" in str(err)


def test_switch_host_name_reserved():
    err = refused(spec_with(lambda s: s["hosts"].__setitem__("switch", s["hosts"].pop("web2"))))
    assert err.path == "hosts.switch" and "reserved" in str(err)


@pytest.mark.parametrize("mutate,path,key", [
    (lambda s: s.__setitem__("extra", 1), "extra", "extra"),
    (lambda s: s["hosts"]["gw"].__setitem__("interface", {}), "hosts.gw.interface",
     "interface"),
    (lambda s: s["hosts"]["gw"]["interfaces"]["eth0"].__setitem__("mtu", 9000),
     "hosts.gw.interfaces.eth0.mtu", "mtu"),
    (lambda s: s["hosts"]["client"]["routes"][0].__setitem__("gateway", "198.51.100.1"),
     "hosts.client.routes[0].gateway", "gateway"),
])
def test_unknown_keys_refused(mutate, path, key):
    err = refused(spec_with(mutate))
    assert err.path == path
    assert "unknown key %r" % key in str(err)


@pytest.mark.parametrize("name", ["eth0-with-a-long-name", "Eth0", "lo", "e.1", "0eth"])
def test_bad_interface_name_refused(name):
    err = refused(spec_with(lambda s: s["hosts"]["web"].__setitem__(
        "interfaces", {name: {"addresses": ["10.16.0.27/24"]}})))
    assert err.path == "hosts.web.interfaces.%s" % name and err.value == name


def test_duplicate_interface_name_in_yaml_refused():
    text = """
hosts:
  a:
    interfaces:
      eth0: {addresses: [10.1.0.1/24]}
      eth0: {addresses: [10.1.0.3/24]}
"""
    with pytest.raises(LabSpecError) as info:
        parse_yaml(text)
    assert info.value.path == "hosts.a.interfaces.eth0"
    assert info.value.value == "eth0"
    assert "duplicate key 'eth0' (line 6)" in str(info.value)


def test_interface_plugged_twice_refused():
    err = refused(spec_with(lambda s: s["bridges"]["inside"].append("client:eth0")))
    assert err.path == "bridges.inside[3]" and err.value == "client:eth0"
    assert "already plugged into links[0][0]" in str(err)


def test_unplugged_interface_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web"]["interfaces"].__setitem__(
        "eth1", {"addresses": ["10.17.0.1/24"]})))
    assert err.path == "hosts.web.interfaces.eth1"
    assert "not plugged into any link or bridge" in str(err)


# -- links and bridges ---------------------------------------------------------------

def test_link_to_unknown_host_refused():
    err = refused(spec_with(lambda s: s["links"].append(["web:eth0", "ghost:eth0"])))
    assert err.path == "links[1][1]" and err.value == "ghost:eth0"
    assert "unknown host 'ghost'" in str(err)


def test_link_to_unknown_interface_refused():
    err = refused(spec_with(lambda s: s["links"].__setitem__(0, ["client:eth0", "gw:eth7"])))
    assert err.path == "links[0][1]" and err.value == "gw:eth7"
    assert "host gw has no interface 'eth7'" in str(err)


def test_link_not_a_pair_refused():
    err = refused(spec_with(lambda s: s["links"].__setitem__(0, ["client:eth0"])))
    assert err.path == "links[0]" and err.value == ["client:eth0"]


def test_bridge_name_too_long_refused():
    err = refused(spec_with(lambda s: s["bridges"].__setitem__(
        "averylongbridge", s["bridges"].pop("inside"))))
    assert err.path == "bridges.averylongbridge" and err.value == "averylongbridge"


# -- routes ----------------------------------------------------------------------------

def test_route_gateway_outside_the_lab_refused():
    err = refused(spec_with(lambda s: s["hosts"]["client"]["routes"].__setitem__(
        0, {"to": "default", "via": "198.51.100.254"})))
    assert err.path == "hosts.client.routes[0].via" and err.value == "198.51.100.254"
    assert "not an address of any lab interface" in str(err)


def test_route_gateway_on_the_uplink_refused():
    err = refused(spec_with(lambda s: s["hosts"]["client"]["routes"].__setitem__(
        0, {"to": "default", "via": "192.0.2.1"})))
    assert err.path == "hosts.client.routes[0].via" and err.value == "192.0.2.1"


def test_route_to_outside_the_lab_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web"]["routes"].append(
        {"to": "192.0.2.0/24", "via": "10.16.0.1"})))
    assert err.path == "hosts.web.routes[1].to" and err.value == "192.0.2.0/24"
    assert "never points out of the lab" in str(err)


def test_route_gateway_not_on_link_refused():
    # 10.16.0.1 is a lab address, but not on a network of client's interfaces.
    err = refused(spec_with(lambda s: s["hosts"]["client"]["routes"].__setitem__(
        0, {"to": "default", "via": "10.16.0.1"})))
    assert err.path == "hosts.client.routes[0].via" and err.value == "10.16.0.1"
    assert "not on a network of client's interfaces" in str(err)


def test_route_gateway_on_another_segment_refused():
    def change(s):
        # Same subnet as the inside bridge, but a separate link: not reachable.
        s["hosts"]["lonely"] = {"interfaces": {"eth0": {"addresses": ["10.16.0.99/24"]}},
                                "routes": [{"to": "default", "via": "10.16.0.1"}]}
        s["hosts"]["peer"] = {"interfaces": {"eth0": {"addresses": ["10.16.0.98/24"]}}}
        s["links"].append(["lonely:eth0", "peer:eth0"])
    err = refused(spec_with(change))
    assert err.path == "hosts.lonely.routes[0].via" and err.value == "10.16.0.1"
    assert "not on the same link or bridge" in str(err)


def test_route_gateway_own_address_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web"]["routes"].__setitem__(
        0, {"to": "default", "via": "10.16.0.27"})))
    assert err.path == "hosts.web.routes[0].via" and "web's own address" in str(err)


def test_default_route_without_gateway_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web"]["routes"].__setitem__(
        0, {"to": "default", "dev": "eth0"})))
    assert err.path == "hosts.web.routes[0].to"
    assert "default route out of a device is refused" in str(err)


def test_duplicate_route_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web"]["routes"].append(
        {"to": "default", "via": "10.16.0.1"})))
    assert err.path == "hosts.web.routes[1]" and "already has a route to default" in str(err)


def test_route_family_mismatch_refused():
    err = refused(spec_with(lambda s: s["hosts"]["web2"]["routes"].__setitem__(
        0, {"to": "fd00:99::/64", "via": "10.16.0.1"})))
    assert err.path == "hosts.web2.routes[0].via" and err.value == "10.16.0.1"


# -- sysctls ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kernel.panic", "net.ipv4/../../kernel/panic", "net",
                                  "vm.swappiness", "net.ipv4..ip_forward"])
def test_bad_sysctl_name_refused(name):
    err = refused(spec_with(lambda s: s["hosts"]["gw"]["sysctls"].__setitem__(name, 1)))
    assert err.path == "hosts.gw.sysctls.%s" % name and err.value == name
    assert "not a network sysctl name" in str(err)


def test_sysctl_for_unknown_interface_refused():
    err = refused(spec_with(lambda s: s["hosts"]["gw"]["sysctls"].__setitem__(
        "net.ipv4.conf.eth9.rp_filter", 0)))
    assert err.path == "hosts.gw.sysctls.net.ipv4.conf.eth9.rp_filter"
    assert "names interface 'eth9'" in str(err)


def test_bad_sysctl_value_refused():
    err = refused(spec_with(lambda s: s["hosts"]["gw"]["sysctls"].__setitem__(
        "net.ipv4.ip_forward", "1\nkernel.panic=1")))
    assert err.path == "hosts.gw.sysctls.net.ipv4.ip_forward"
    assert err.value == "1\nkernel.panic=1"


# -- loading -------------------------------------------------------------------------------

def test_unknown_topology_name_refused():
    with pytest.raises(LabSpecError) as info:
        load("no-such-topology")
    assert info.value.value == "no-such-topology" and "seed" in str(info.value)


def test_spec_error_is_a_lab_error():
    assert issubclass(LabSpecError, LabError) and issubclass(LabSpecError, ValueError)


def test_no_hosts_refused():
    err = refused({"hosts": {}})
    assert err.path == "hosts"
