"""Validation: every kind of bad input is refused with its field path and value."""

import pytest

from masqd import model
from masqd.model import ValidationError

PORTFW = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
          "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15},
                       {"address": "10.16.0.28", "port": 80, "pref": 5}]}


def with_(base, path, value):
    """A deep copy of `base` with the field at `path` (list of keys) set/removed."""
    import copy
    out = copy.deepcopy(base)
    node = out
    for step in path[:-1]:
        node = node[step]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def test_portfw_canonical_defaults():
    entry = model.normalize_entry("portfw", {"protocol": "udp", "local_address": "2001:DB8::1",
                                             "local_port": 53, "backends": [{"address": "fd00::35", "port": 53}]})
    assert entry == {"protocol": "udp", "local_address": "2001:db8::1", "local_port": 53,
                     "backends": [{"address": "fd00::35", "port": 53, "pref": 10}]}


@pytest.mark.parametrize("path,value,field", [
    (["local_address"], "198.51.100.300", "entry.local_address"),
    (["local_address"], "010.0.0.1", "entry.local_address"),
    (["local_address"], 17, "entry.local_address"),
    (["local_address"], "::ffff:198.51.100.1", "entry.local_address"),
    (["local_address"], "224.0.0.1", "entry.local_address"),
    (["local_address"], "::", "entry.local_address"),
    (["local_port"], 0, "entry.local_port"),
    (["local_port"], 65536, "entry.local_port"),
    (["local_port"], "80", "entry.local_port"),
    (["local_port"], True, "entry.local_port"),
    (["protocol"], "icmp", "entry.protocol"),
    (["backends", 1, "port"], 70000, "entry.backends[1].port"),
    (["backends", 1, "port"], KeyError, "entry.backends[1].port"),
    (["backends", 0, "pref"], -1, "entry.backends[0].pref"),
    (["backends", 0, "pref"], 65536, "entry.backends[0].pref"),
    (["backends", 1, "address"], "fd00::28", "entry.backends[1].address"),
    (["backends", 1, "address"], "10.16.0.27", "entry.backends[1]"),
    (["backends", 1, "weight"], 3, "entry.backends[1].weight"),
    (["colour"], "red", "entry.colour"),
    (["local_port"], KeyError, "entry.local_port"),
])
def test_portfw_refused(path, value, field):
    raw = with_(PORTFW, path, value)
    if path == ["backends", 1, "address"] and value == "10.16.0.27":
        raw["backends"][1]["port"] = 80  # an exact duplicate of backends[0]
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("portfw", raw)
    assert err.value.field == field
    if value is not KeyError and field.endswith(path[-1]):
        assert err.value.value == value
    assert err.value.message


def test_too_many_backends():
    raw = dict(PORTFW, backends=[{"address": "10.16.1.%d" % i, "port": 80} for i in range(model.MAX_BACKENDS + 1)])
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("portfw", raw)
    assert err.value.field == "entry.backends"


def test_autofw_hidden_and_control():
    e = model.normalize_entry("autofw", {"protocol": "udp", "low_port": 6970, "high_port": 7170,
                                         "hidden_host": "10.16.0.27"})
    assert e["timeout"] == 15 and e["control_port"] is None
    e = model.normalize_entry("autofw", {"protocol": "udp", "low_port": 6970, "high_port": 7170,
                                         "control_protocol": "tcp", "control_port": 7070, "timeout": 60})
    assert e["hidden_host"] is None and e["timeout"] == 60


@pytest.mark.parametrize("raw,field", [
    ({"protocol": "udp", "low_port": 7170, "high_port": 6970, "hidden_host": "10.0.0.1"}, "entry.high_port"),
    ({"protocol": "udp", "low_port": 1, "high_port": 2}, "entry.hidden_host"),
    ({"protocol": "udp", "low_port": 1, "high_port": 2, "hidden_host": "10.0.0.1",
      "control_protocol": "tcp", "control_port": 1}, "entry.hidden_host"),
    ({"protocol": "udp", "low_port": 1, "high_port": 2, "control_protocol": "sctp", "control_port": 1},
     "entry.control_protocol"),
    ({"protocol": "udp", "low_port": 1, "high_port": 2, "hidden_host": "10.0.0.1", "timeout": 0}, "entry.timeout"),
])
def test_autofw_refused(raw, field):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("autofw", raw)
    assert err.value.field == field


def test_autofw_overlap_refused():
    entries = [{"protocol": "udp", "low_port": 1000, "high_port": 2000, "hidden_host": "10.0.0.1"},
               {"protocol": "tcp", "low_port": 1500, "high_port": 2500, "hidden_host": "10.0.0.1"},
               {"protocol": "udp", "low_port": 2000, "high_port": 2100, "hidden_host": "10.0.0.2"}]
    with pytest.raises(ValidationError) as err:
        model.normalize_table("autofw", entries)
    assert err.value.field == "entries[2]"


@pytest.mark.parametrize("mark", [0, 2 ** 32, -1, "1", None])
def test_mark_range(mark):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("mfw", {"mark": mark, "backends": [{"address": "10.0.0.1"}]})
    assert err.value.field == "entry.mark" and err.value.value == mark


def test_mfw_port_optional_and_mixed_family_refused():
    e = model.normalize_entry("mfw", {"mark": 2 ** 32 - 1, "backends": [{"address": "10.0.0.1", "pref": 0}]})
    assert e["backends"] == [{"address": "10.0.0.1", "port": None, "pref": 0}]
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("mfw", {"mark": 1, "backends": [{"address": "10.0.0.1"}, {"address": "fd00::1"}]})
    assert err.value.field == "entry.backends[1].address"


MARK = {"name": "friend", "mark": 1, "source": "203.0.113.0/24"}


@pytest.mark.parametrize("name", ["eth0", "wan.1", "br-lab", "ppp*", "x" * 15, "a@b"])
def test_interface_ok(name):
    assert model.normalize_entry("marks", dict(MARK, input_interface=name))["input_interface"] == name


@pytest.mark.parametrize("name", ["", "x" * 16, "eth 0", "eth/0", "eth:0", 'et"h', "et\\h", ".", "..",
                                  "eth\n", "é", "e*th", 5])
def test_interface_refused(name):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("marks", dict(MARK, input_interface=name))
    assert err.value.field == "entry.input_interface" and err.value.value == name


@pytest.mark.parametrize("changes,field", [
    ({"source": "203.0.113.1/24"}, "entry.source"),
    ({"source": "203.0.113.0/33"}, "entry.source"),
    ({"destination": "2001:db8::/32"}, "entry.destination"),
    ({"destination_invert": True}, "entry.destination_invert"),
    ({"source_invert": "yes"}, "entry.source_invert"),
    ({"protocol": "icmpv6"}, "entry.protocol"),
    ({"protocol": "gre"}, "entry.protocol"),
    ({"protocol": "icmp", "destination_ports": [80]}, "entry.destination_ports"),
    ({"protocol": "tcp", "destination_ports": ["90-80"]}, "entry.destination_ports[0]"),
    ({"protocol": "tcp", "destination_ports": [0]}, "entry.destination_ports[0]"),
    ({"protocol": "tcp", "destination_ports": []}, "entry.destination_ports"),
    ({"protocol": "tcp", "source_ports": ["80-"]}, "entry.source_ports[0]"),
    ({"name": "bad name"}, "entry.name"),
    ({"mark": 0}, "entry.mark"),
    ({"output_interface": "eth0"}, "entry.output_interface"),
])
def test_marks_refused(changes, field):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("marks", dict(MARK, **changes))
    assert err.value.field == field


def test_masquerade_canonical():
    e = model.normalize_entry("masquerade", {"name": "web", "source": "10.16.0.27/32", "protocol": "tcp",
                                             "source_ports": [80, "8000-8080"], "output_interface": "wan0"})
    assert e == {"name": "web", "source": "10.16.0.27/32", "source_invert": False, "destination": None,
                 "destination_invert": False, "protocol": "tcp", "source_ports": [80, "8000-8080"],
                 "destination_ports": None, "output_interface": "wan0", "pool": None, "pool_ports": None,
                 "helpers": None}


def test_table_duplicates_and_cap(monkeypatch):
    with pytest.raises(ValidationError) as err:
        model.normalize_table("portfw", [PORTFW, dict(PORTFW, backends=[{"address": "10.0.0.9", "port": 1}])])
    assert err.value.field == "entries[1]"
    monkeypatch.setitem(model.MAX_ENTRIES, "masquerade", 2)
    with pytest.raises(ValidationError) as err:
        model.normalize_table("masquerade", [{"name": "m%d" % i} for i in range(3)])
    assert err.value.field == "entries" and err.value.value == 3


def test_port_intervals_merge():
    assert model.port_intervals([81, "8000-8080", 80, "8050-9000", 82]) == [(80, 82), (8000, 9000)]


def test_error_to_dict():
    err = ValidationError("entries[0].backends[1].port", 70000, "port must be 1-65535")
    assert err.to_dict() == {"field": "entries[0].backends[1].port", "value": 70000,
                             "message": "port must be 1-65535"}


FAST_CASES = [
    {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
     "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15}, {"address": "10.16.0.28", "port": 80}]},
    {"protocol": "udp", "local_address": "2001:DB8::0:1", "local_port": 65535,
     "backends": [{"pref": 0, "port": 1, "address": "fd00::1"}]},
    # declined by the fast path, same answer or error from the full validator
    {"protocol": "udp", "local_address": "198.51.100.1", "local_port": 53, "backends": []},
    {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": True,
     "backends": [{"address": "10.16.0.27", "port": 80}]},
    {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
     "backends": [{"address": "10.16.0.27", "port": 80}, {"address": "10.16.0.27", "port": 80}]},
    {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
     "backends": [{"address": "fd00::1", "port": 80}]},
    {"protocol": ["tcp"], "local_address": "198.51.100.1", "local_port": 80, "backends": []},
    {"protocol": "tcp", "local_address": "::ffff:198.51.100.1", "local_port": 80,
     "backends": [{"address": "10.16.0.27", "port": 80}]},
    {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
     "backends": [{"address": "10.16.0.27", "port": 80, "weight": 1}]},
    {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80, "extra": 1,
     "backends": [{"address": "10.16.0.27", "port": 80}]},
]


@pytest.mark.parametrize("raw", FAST_CASES)
def test_portfw_fast_path_agrees_with_full_validator(raw, monkeypatch):
    def outcome():
        try:
            return model.normalize_table("portfw", [raw])
        except model.ValidationError as exc:
            return exc.to_dict()
    fast = outcome()
    monkeypatch.setattr(model, "_portfw_fast", lambda raw: None)
    assert fast == outcome()
    if isinstance(fast, dict) and "field" not in fast:
        (entry,) = fast.values()
        assert list(entry) == ["protocol", "local_address", "local_port", "backends"]
        assert entry["protocol"] is model._CANONICAL_PROTOCOL[entry["protocol"]]


# -- issue 10 item 4: values that would reach nft text ------------------------------------

V6_PORTFW = {"protocol": "tcp", "local_address": "2001:db8:100::1", "local_port": 80,
             "backends": [{"address": "fd00:16::27", "port": 80}]}


@pytest.mark.parametrize("path", [["local_address"], ["backends", 0, "address"]])
@pytest.mark.parametrize("value", ["2001:db8:100::1%x\nflush ruleset", "fe80::1%eth0", "2001:db8:100::1%1"])
def test_zone_ids_are_refused(path, value):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("portfw", with_(V6_PORTFW, path, value))
    assert err.value.value == value and "zone id" in err.value.message
    assert err.value.field == "entry." + ".".join(str(p) for p in path).replace("backends.0", "backends[0]")


@pytest.mark.parametrize("value,reason", [
    ("0.0.0.0", "unspecified"), ("255.255.255.255", "broadcast"), ("127.0.0.1", "loopback"),
    ("127.255.0.1", "loopback"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
    ("::", "unspecified"), ("::1", "loopback"), ("ff02::1", "multicast"), ("::ffff:10.16.0.27", "IPv4-mapped"),
])
@pytest.mark.parametrize("field", ["entry.local_address", "entry.hidden_host", "entry.pool[0]"])
def test_host_addresses_that_cannot_be_meant_are_refused_with_the_reason(value, reason, field):
    with pytest.raises(ValidationError) as err:
        model.address(value, field)
    assert (err.value.field, err.value.value) == (field, value) and reason in err.value.message


@pytest.mark.parametrize("key,value,reason", [
    ("source", "127.0.0.0/8", "loopback"), ("source", "224.0.0.0/4", "multicast"),
    ("destination", "240.0.0.0/4", "reserved"), ("source", "::ffff:0:0/96", "IPv4-mapped"),
    ("destination", "::1/128", "loopback"), ("source", "0.0.0.0/32", "unspecified"),
    ("source", "fe80::%eth0/64", "zone id"),
])
def test_networks_that_cannot_be_meant_are_refused(key, value, reason):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("marks", {"name": "m", "mark": 1, key: value})
    assert err.value.field == "entry." + key and reason in err.value.message


@pytest.mark.parametrize("key,value", [("source", "0.0.0.0/0"), ("destination", "::/0"),
                                       ("destination", "224.0.0.0/4"), ("source", "0.0.0.0/1"),
                                       ("source", "fe80::/10")])
def test_any_and_meaningful_networks_stay_accepted(key, value):
    assert model.normalize_entry("marks", {"name": "m", "mark": 1, key: value})[key] == value


def test_a_lone_star_interface_is_refused_a_prefix_wildcard_is_not():
    with pytest.raises(ValidationError) as err:
        model.interface("*", "entry.output_interface")
    assert err.value.field == "entry.output_interface" and "lone '*'" in err.value.message
    assert model.interface("eth*", "entry.output_interface") == "eth*"


@pytest.mark.parametrize("helpers,field", [(["ftp", ["ftp"]], "entry.helpers[1]"), ([{"a": 1}], "entry.helpers[0]"),
                                           ([1], "entry.helpers[0]"), ([None], "entry.helpers[0]")])
def test_helpers_of_the_wrong_type_are_refused(helpers, field):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("masquerade", {"name": "q", "helpers": helpers})
    assert err.value.field == field


@pytest.mark.parametrize("pool", [[["10.16.0.1"]], [{"address": "10.16.0.1"}], [1]])
def test_pool_items_of_the_wrong_type_are_refused(pool):
    with pytest.raises(ValidationError) as err:
        model.normalize_entry("masquerade", {"name": "q", "pool": pool})
    assert err.value.field == "entry.pool[0]"


@pytest.mark.parametrize("item", ["\u0668\u0661-\u0669\u0660", "\u00b2-3", "80-\u0669\u0660", "\uff18\uff10-90",
                                  "80-90\n", "\u0668\u0661", "\u00b2"])
def test_unicode_digits_in_port_ranges_are_refused(item):
    with pytest.raises(ValidationError) as err:
        model.port_list([item], "entry.destination_ports")
    assert (err.value.field, err.value.value) == ("entry.destination_ports[0]", item)
