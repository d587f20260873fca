"""The resource-module state logic (plugins/module_utils/resource.py): pure functions,
given a current table and a config, the whole table the gateway should hold."""

import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _collection_root(tmp_root):
    """A directory where `ansible_collections.ipmasq.gateway` is this repository."""
    venv_root = os.path.join(REPO, ".venv", "collections")
    link = os.path.join(venv_root, "ansible_collections", "ipmasq", "gateway")
    if os.path.realpath(link) == os.path.realpath(REPO):
        return venv_root
    os.makedirs(os.path.join(tmp_root, "ansible_collections", "ipmasq"), exist_ok=True)
    os.symlink(REPO, os.path.join(tmp_root, "ansible_collections", "ipmasq", "gateway"))
    return tmp_root


sys.path.insert(0, _collection_root(os.path.join(os.environ.get("TMPDIR", "/tmp"), "ipmasq-unit-%d" % os.getpid())))

from ansible_collections.ipmasq.gateway.plugins.module_utils import resource as r  # noqa: E402
from ansible_collections.ipmasq.gateway.plugins.module_utils.resource_module import check_config  # noqa: E402


def backend(address, port, pref=10):
    return {"address": address, "port": port, "pref": pref}


def portfw(local_port, *backends, address="198.51.100.1", protocol="tcp"):
    return {"protocol": protocol, "local_address": address, "local_port": local_port, "backends": list(backends)}


SEED = portfw(80, backend("10.16.0.27", 80, 15), backend("10.16.0.28", 80, 5))
DNS = portfw(53, backend("10.16.0.53", 53, 1), protocol="udp")


def as_module_config(entry):
    """What argument_spec hands the module: every option present, None when not given."""
    out = {"protocol": None, "local_address": None, "local_port": None, "backends": None}
    out.update(entry)
    if out["backends"] is not None:
        out["backends"] = [dict({"address": None, "port": None, "pref": None}, **b) for b in out["backends"]]
    return out


# ------------------------------------------------------------------ merged

def test_merged_appends_new_keys_and_keeps_others():
    after = r.desired_table("portfw", "merged", [as_module_config(SEED)], [DNS])
    assert after == [DNS, SEED]


def test_merged_replaces_the_backends_list_whole_in_the_given_order():
    given = as_module_config(portfw(80, {"address": "10.16.0.29", "port": 8080}))
    after = r.desired_table("portfw", "merged", [given], [SEED, DNS])
    assert after == [portfw(80, backend("10.16.0.29", 8080, 10)), DNS]


def test_merged_keeps_fields_not_given():
    current = [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": None,
                "control_protocol": "tcp", "control_port": 7070, "timeout": 60, "keyed_by_peer": False}]
    given = {"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": None,
             "control_protocol": None, "control_port": 7071, "timeout": None}
    after = r.desired_table("autofw", "merged", [given], current)
    assert after == [dict(current[0], control_port=7071)]


def test_merged_switching_autofw_to_a_hidden_host_drops_the_control_port():
    current = [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": None,
                "control_protocol": "tcp", "control_port": 7070, "timeout": 60, "keyed_by_peer": False}]
    given = {"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27"}
    after = r.desired_table("autofw", "merged", [given], current)
    assert after == [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27",
                      "control_protocol": None, "control_port": None, "timeout": 60, "keyed_by_peer": False}]


def test_merged_new_key_without_backends_names_the_field():
    with pytest.raises(r.ConfigError) as caught:
        r.desired_table("portfw", "merged", [as_module_config(DNS), as_module_config(portfw(80))], [])
    assert caught.value.field == "config[1].backends"
    assert "config[1].backends" in str(caught.value)


def test_merged_new_autofw_needs_a_recipient():
    with pytest.raises(r.ConfigError, match=r"config\[0\].*hidden_host or control_protocol"):
        r.desired_table("autofw", "merged", [{"protocol": "tcp", "low_port": 1, "high_port": 2}], [])


def test_merged_matches_keys_by_canonical_address():
    current = [portfw(80, backend("2001:db8::27", 80), address="2001:db8::1")]
    given = as_module_config(portfw(80, {"address": "2001:DB8:0::27", "port": 81}, address="2001:DB8:0:0::0001"))
    after = r.desired_table("portfw", "merged", [given], current)
    assert after == [portfw(80, backend("2001:db8::27", 81), address="2001:db8::1")]


def test_merged_with_the_current_values_is_no_change():
    current = [SEED, DNS]
    given = [as_module_config(portfw(80, {"address": "10.16.0.27", "port": 80, "pref": 15},
                                     {"address": "10.16.0.28", "port": 80, "pref": 5}))]
    assert r.tables_equal("portfw", current, r.desired_table("portfw", "merged", given, current))


def test_default_pref_compares_equal_to_the_agents_complete_entry():
    given = [as_module_config(portfw(53, {"address": "10.16.0.53", "port": 53}, protocol="udp"))]
    current = [portfw(53, backend("10.16.0.53", 53, 10), protocol="udp")]
    assert r.tables_equal("portfw", current, r.desired_table("portfw", "merged", given, current))


def test_marks_keep_their_matching_order():
    friend = {"name": "friend", "mark": 1, "source": "203.0.113.0/24"}
    neutral = {"name": "neutral", "mark": 3, "source": "203.0.113.0/24", "source_invert": True}
    current = r.desired_table("marks", "overridden", [friend, neutral], [])
    after = r.desired_table("marks", "merged", [{"name": "friend", "mark": 2}], current)
    assert [(e["name"], e["mark"]) for e in after] == [("friend", 2), ("neutral", 3)]
    assert after[1]["source_invert"] is True and after[0]["destination_invert"] is False


# ------------------------------------------------------------------ replaced / overridden / deleted

def test_replaced_resets_fields_not_given_and_keeps_other_keys_in_place():
    current = r.desired_table("marks", "overridden", [
        {"name": "a", "mark": 1, "protocol": "tcp", "destination_ports": [80]},
        {"name": "b", "mark": 2}], [])
    after = r.desired_table("marks", "replaced", [{"name": "a", "mark": 5}], current)
    assert after[0] == r.complete("marks", {"name": "a", "mark": 5})
    assert after[0]["protocol"] is None and after[0]["destination_ports"] is None
    assert after[1] == current[1]


def test_replaced_needs_the_whole_entry():
    with pytest.raises(r.ConfigError) as caught:
        r.desired_table("portfw", "replaced", [as_module_config(portfw(80))], [SEED])
    assert caught.value.field == "config[0].backends"


def test_overridden_is_exactly_config_in_its_order():
    assert r.desired_table("portfw", "overridden", [as_module_config(DNS), as_module_config(SEED)],
                           [SEED, portfw(22, backend("10.16.0.22", 22))]) == [DNS, SEED]
    assert r.desired_table("portfw", "overridden", [], [SEED, DNS]) == []


def test_deleted_removes_only_the_given_keys():
    key_only = {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80, "backends": None}
    assert r.desired_table("portfw", "deleted", [key_only], [SEED, DNS]) == [DNS]
    assert r.desired_table("portfw", "deleted", [key_only], [DNS]) == [DNS]


def test_deleted_without_config_removes_everything():
    assert r.desired_table("portfw", "deleted", [], [SEED, DNS]) == []
    assert r.desired_table("portfw", "deleted", None, [SEED, DNS]) == []


def test_a_missing_key_field_is_named():
    with pytest.raises(r.ConfigError) as caught:
        r.desired_table("portfw", "deleted", [{"protocol": "tcp", "local_address": "198.51.100.1"}], [SEED])
    assert caught.value.field == "config[0].local_port"


def test_a_duplicate_key_is_refused():
    with pytest.raises(r.ConfigError, match=r"duplicate portfw key, also given in config\[0\]") as caught:
        r.desired_table("portfw", "overridden", [as_module_config(SEED), as_module_config(SEED)], [])
    assert caught.value.field == "config[1]"


def test_gathered_does_not_compute_a_table():
    with pytest.raises(ValueError):
        r.desired_table("portfw", "gathered", [], [])


# ------------------------------------------------------------------ helpers

def test_agent_field_paths_are_translated_to_config_paths():
    desired = [DNS, SEED]
    config = [as_module_config(SEED)]
    assert r.config_path("portfw", config, desired, "entries[1].backends[0].address") == "config[0].backends[0].address"
    # An entry that did not come from config keeps the agent's path.
    assert r.config_path("portfw", config, desired, "entries[0].local_port") == "entries[0].local_port"
    assert r.config_path("portfw", config, desired, "revision") == "revision"


def test_forced_scheduling_moves_the_head_to_the_back():
    table = [{"mark": 1, "backends": [backend("10.16.0.10", None, 0), backend("10.16.0.11", None, 0)]},
             {"mark": 3, "backends": [backend("10.15.0.46", None)]}]
    after = r.scheduled(table, 1)
    assert [b["address"] for b in after[0]["backends"]] == ["10.16.0.11", "10.16.0.10"]
    assert after[1] == table[1]
    with pytest.raises(r.ConfigError, match="no mfw entry"):
        r.scheduled(table, 9)


def test_commands_for_the_seed_example():
    assert r.table_commands("portfw", [], [SEED]) == [
        "portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15",
        "portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.28 80 -p 5",
    ]


def test_commands_delete_removed_keys_and_readd_changed_ones():
    changed = portfw(80, backend("10.16.0.27", 80, 1))
    assert r.table_commands("portfw", [SEED, DNS], [changed]) == [
        "portfw -d -P udp -L 198.51.100.1 53",
        "portfw -d -P tcp -L 198.51.100.1 80",
        "portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 1",
    ]
    assert r.table_commands("portfw", [SEED, DNS], [SEED, DNS]) == []


def test_commands_of_the_other_tables():
    marks = r.desired_table("marks", "overridden", [
        {"name": "neutral", "mark": 3, "source": "203.0.113.0/24", "source_invert": True}], [])
    assert r.table_commands("marks", [], marks) == ["mark -A -s ! 203.0.113.0/24 -m 3 --name neutral"]
    masq = r.desired_table("masquerade", "overridden", [
        {"name": "web-27", "protocol": "tcp", "source": "10.16.0.27/32", "source_ports": [80, "1000-2000"]}], [])
    assert r.table_commands("masquerade", masq, []) == ["masq -D --name web-27"]
    assert r.table_commands("masquerade", [], masq) == [
        "masq -A -p tcp -s 10.16.0.27/32 --sport 80,1000-2000 --name web-27 -j MASQ"]
    mfw = [{"mark": 1, "backends": [{"address": "10.17.0.3"}]}]
    assert r.table_commands("mfw", [], mfw) == ["mfw -A -m 1 -r 10.17.0.3 -p 10"]
    autofw = [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "control_protocol": "tcp", "control_port": 7070}]
    assert r.table_commands("autofw", [], autofw) == ["autofw -A -r udp 6970 7170 -c tcp 7070 -t 15"]


def test_table_text_is_one_field_per_line():
    text = r.table_text("portfw", [SEED])
    assert text.splitlines() == [
        "- protocol: tcp",
        "  local_address: 198.51.100.1",
        "  local_port: 80",
        "  backends:",
        "  - {address: 10.16.0.27, port: 80, pref: 15}",
        "  - {address: 10.16.0.28, port: 80, pref: 5}",
    ]
    assert r.table_text("portfw", []) == "[]\n"


@pytest.mark.parametrize("config, field, value", [
    ([{"local_port": 70000}], "config[0].local_port", 70000),
    ([{"backends": [{"port": 80}, {"port": 0}]}], "config[0].backends[1].port", 0),
    ([{}, {"backends": [{"pref": -1}]}], "config[1].backends[0].pref", -1),
    ([{"low_port": 7170, "high_port": 6970}], "config[0].high_port", 6970),
    ([{"mark": 0}], "config[0].mark", 0),
    ([{"mark": 2 ** 32}], "config[0].mark", 2 ** 32),
    ([{"timeout": 0}], "config[0].timeout", 0),
    ([{"destination_ports": [80, "1000-70000"]}], "config[0].destination_ports[1]", "1000-70000"),
    ([{"source_ports": ["x"]}], "config[0].source_ports[0]", "x"),
    ([{"source_ports": ["20-10"]}], "config[0].source_ports[0]", "20-10"),
])
def test_range_checks_name_the_field_and_the_value(config, field, value):
    with pytest.raises(r.ConfigError) as caught:
        check_config(config)
    assert (caught.value.field, caught.value.value) == (field, value)


def test_range_checks_pass_good_values():
    check_config([{"local_port": 1, "backends": [{"port": 65535, "pref": 0}], "mark": 2 ** 32 - 1,
                   "destination_ports": [80, "1000-2000", "443"], "low_port": 5, "high_port": 5}])


# ------------------------------------------------------------------ properties

addresses = st.sampled_from(["10.16.0.%d" % i for i in range(1, 6)])
entries = st.builds(
    lambda proto, port, bks: {"protocol": proto, "local_address": "198.51.100.1", "local_port": port,
                              "backends": bks},
    st.sampled_from(["tcp", "udp"]), st.integers(1, 4),
    st.lists(st.builds(backend, addresses, st.integers(1, 3), st.integers(0, 20)), min_size=1, max_size=3))


def unique(table):
    seen, out = set(), []
    for e in table:
        if r.entry_key("portfw", e) not in seen:
            seen.add(r.entry_key("portfw", e))
            out.append(e)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(entries, max_size=5).map(unique), st.lists(entries, max_size=4).map(unique),
       st.sampled_from(["merged", "replaced", "overridden", "deleted"]))
def test_every_state_is_idempotent(current, config, state):
    once = r.desired_table("portfw", state, config, current)
    assert r.desired_table("portfw", state, config, once) == once


@settings(max_examples=200, deadline=None)
@given(st.lists(entries, max_size=5).map(unique), st.lists(entries, max_size=4).map(unique))
def test_merged_holds_config_and_keeps_every_other_key(current, config):
    after = r.desired_table("portfw", "merged", config, current)
    for entry in config:
        assert r.complete("portfw", entry) in after
    config_keys = set(r.entry_key("portfw", e) for e in config)
    assert [e for e in after if r.entry_key("portfw", e) not in config_keys] == \
        [r.complete("portfw", e) for e in current if r.entry_key("portfw", e) not in config_keys]
    deleted = r.desired_table("portfw", "deleted", config, after)
    assert not config_keys & set(r.entry_key("portfw", e) for e in deleted)
