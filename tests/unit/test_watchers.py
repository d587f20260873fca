"""AUTOFW control-port detection without a kernel: event parsing and filtering, the
Service's recipient elements on FakeNftables (set, refresh, replace, keyed, expiry),
and the new masquerade options (pool, helpers) from validation to rendering."""

import dataclasses
import importlib.util
import os

import pytest

from masqd import ipmasqadm, listing, model, render
from masqd.watchers.conntrack import AutofwWatcher, ConntrackEvent, is_control, parse_event
from masqd.model import ValidationError
from masqd.nft import FakeNftables
from masqd.service import AUTOFW_CONTROL_STATUS, Service


def _load_resource():
    """module_utils/resource.py is stdlib-only: load it from its file."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "plugins", "module_utils", "resource.py")
    spec = importlib.util.spec_from_file_location("masq_resource_logic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


resource = _load_resource()


class Attrs:
    """Just enough of a pyroute2 nlmsg: get_attr by name, [] for the header."""

    def __init__(self, attrs, header=None):
        self.attrs, self.header = attrs, header

    def get_attr(self, name):
        return self.attrs.get(name)

    def get(self, key, default=None):
        return {"header": self.header}.get(key, default) if self.header is not None else default

    def __getitem__(self, key):
        return self.header


def ct_msg(src, dst, dport, proto=6, flags=0x600, family="V4", msg_type=256):
    tuple_ip = Attrs({"CTA_IP_%s_SRC" % family: src, "CTA_IP_%s_DST" % family: dst})
    tuple_proto = Attrs({"CTA_PROTO_NUM": proto, "CTA_PROTO_SRC_PORT": 40000, "CTA_PROTO_DST_PORT": dport})
    orig = Attrs({"CTA_TUPLE_IP": tuple_ip, "CTA_TUPLE_PROTO": tuple_proto})
    return Attrs({"CTA_TUPLE_ORIG": orig}, header={"type": msg_type, "flags": flags})


def test_parse_event_new_update_and_ignored():
    assert parse_event(ct_msg("10.16.0.27", "198.51.100.10", 7070)) == ConntrackEvent(
        "new", "tcp", "10.16.0.27", "198.51.100.10", 40000, 7070)
    assert parse_event(ct_msg("10.16.0.27", "198.51.100.10", 7070, flags=0)).kind == "update"
    assert parse_event(ct_msg("fd00:16::27", "2001:db8:100::10", 53, proto=17, family="V6")).protocol == "udp"
    assert parse_event(ct_msg("10.16.0.27", "198.51.100.10", 0, proto=1)) is None      # ICMP
    assert parse_event(ct_msg("10.16.0.27", "198.51.100.10", 7070, msg_type=258)) is None  # destroy


def test_is_control_needs_port_and_a_connection_through_the_gateway():
    ports = {("tcp", 7070)}
    event = ConntrackEvent("new", "tcp", "10.16.0.27", "198.51.100.10", 1, 7070)
    assert is_control(event, ports, {"198.51.100.1"})
    assert not is_control(dataclasses.replace(event, destination_port=7071), ports, set())
    assert not is_control(dataclasses.replace(event, protocol="udp"), ports, set())
    assert not is_control(event, ports, {"10.16.0.27"})       # the gateway's own connection
    assert not is_control(event, ports, {"198.51.100.10"})    # a connection to the gateway


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def svc(tmp_path):
    clock = Clock()
    nft = FakeNftables()
    nft.clock = clock
    service = Service(str(tmp_path / "state"), nft=nft)
    service.clock = clock
    service.start()
    service.test_clock = clock
    return service


CONTROL = {"protocol": "udp", "low_port": 6970, "high_port": 7170, "control_protocol": "tcp",
           "control_port": 7070, "timeout": 15}


def ok(svc, **request):
    response = svc.handle(request)
    assert response["ok"], response
    return response["result"]


def listed(svc):
    (entry,) = ok(svc, op="list", table="autofw")["entries"]
    return entry


def test_control_traffic_sets_refreshes_and_expires_the_recipient(svc):
    ok(svc, op="add", table="autofw", entry=CONTROL)
    assert listed(svc)["status"] == AUTOFW_CONTROL_STATUS
    assert svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070) == [(("udp", 6970, 7170), "set")]
    entry = {"protocol": "udp", "low_port": 6970, "high_port": 7170}
    r_name, r_key = render.autofw_recipient_element(entry, 4)
    h_name, h_key = render.autofw_holder_element(entry, 4, "10.16.0.27")
    assert svc.nft.elements[r_name] == {r_key: "10.16.0.27"} and h_key in svc.nft.elements[h_name]
    entry = listed(svc)
    assert (entry["recipient"], entry["expires"], entry["status"]) == ("10.16.0.27", 15, "active")
    svc.test_clock.now += 10
    assert listed(svc)["expires"] == 5
    # update events change nothing (the kernel refreshes the holder's range per packet);
    # a new control connection of the recipient refreshes it
    assert svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070, "update") == []
    assert svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070)[0][1] == "refreshed"
    assert listed(svc)["expires"] == 15
    # another port, another protocol: nothing
    assert svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7071) == []
    assert svc.autofw_control_seen("udp", "10.16.0.27", "198.51.100.10", 7070) == []
    svc.test_clock.now += 16
    entry = listed(svc)
    assert entry["recipient"] is None and entry["recipients"] == [] and entry["status"] == AUTOFW_CONTROL_STATUS
    assert "10.16.0.27" not in svc.nft.dump()


def test_most_recent_wins_and_updates_of_the_loser_do_not_steal_back(svc):
    ok(svc, op="add", table="autofw", entry=CONTROL)
    svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070)
    assert svc.autofw_control_seen("tcp", "10.16.0.28", "198.51.100.10", 7070)[0][1] == "replaced"
    assert svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070, "update") == []
    entry = listed(svc)
    assert entry["recipient"] == "10.16.0.28"
    assert entry["recipients"][0]["replaced"]["address"] == "10.16.0.27"
    text = listing.format_autofw([entry], listing.Names(numeric=True))
    assert "10.16.0.28 (15s left), replaced 10.16.0.27 at " in text


def test_keyed_by_peer_keeps_one_recipient_per_server(svc):
    ok(svc, op="add", table="autofw", entry=dict(CONTROL, keyed_by_peer=True))
    svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070)
    svc.autofw_control_seen("tcp", "10.16.0.28", "203.0.113.10", 7070)
    r_name, _key = render.autofw_recipient_element(CONTROL, 4, "")
    assert svc.nft.elements[r_name] == {"198.51.100.10": "10.16.0.27", "203.0.113.10": "10.16.0.28"}
    entry = listed(svc)
    assert entry["recipient"] is None
    assert [(r["peer"], r["address"]) for r in entry["recipients"]] == [
        ("198.51.100.10", "10.16.0.27"), ("203.0.113.10", "10.16.0.28")]
    text = listing.format_autofw([entry], listing.Names(numeric=True))
    assert "ctl tcp/7070 by peer" in text and "203.0.113.10: 10.16.0.28 (15s left)" in text


def test_changing_or_deleting_the_entry_forgets_its_recipients(svc):
    ok(svc, op="add", table="autofw", entry=CONTROL)
    svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070)
    ok(svc, op="set", table="autofw", entries=[dict(CONTROL, timeout=60)])
    assert "10.16.0.27" not in svc.nft.dump() and listed(svc)["recipient"] is None
    svc.autofw_control_seen("tcp", "10.16.0.27", "198.51.100.10", 7070)
    ok(svc, op="delete", table="autofw", entry={"protocol": "udp", "low_port": 6970, "high_port": 7170})
    assert "10.16.0.27" not in svc.nft.dump()


def test_watcher_handles_only_control_connections_through_the_gateway(svc):
    ok(svc, op="add", table="autofw", entry=CONTROL)
    watcher = AutofwWatcher(svc, local_addresses=lambda: {"198.51.100.1", "10.16.0.1"})
    assert watcher.handle(ct_msg("10.16.0.1", "198.51.100.10", 7070)) == []      # the gateway's own
    assert watcher.handle(ct_msg("10.16.0.27", "198.51.100.10", 80)) == []       # not the control port
    assert watcher.handle(ct_msg("10.16.0.27", "198.51.100.10", 7070)) == [(("udp", 6970, 7170), "set")]
    stats = watcher.stats()
    assert (stats["events"], stats["control_events"], stats["detections"]) == (3, 1, 1)
    assert stats["detection_latency"]["count"] == 1


# -- model, render, masqctl and module logic of the new fields ------------------------------------

def test_new_fields_validated_with_field_and_value():
    e = model.normalize_entry("autofw", dict(CONTROL, keyed_by_peer=True))
    assert e["keyed_by_peer"] is True
    cases = [
        ("autofw", {"protocol": "udp", "low_port": 1, "high_port": 2, "hidden_host": "10.0.0.1",
                    "keyed_by_peer": True}, "entry.keyed_by_peer"),
        ("autofw", dict(CONTROL, keyed_by_peer="yes"), "entry.keyed_by_peer"),
        ("masquerade", {"name": "m", "pool": []}, "entry.pool"),
        ("masquerade", {"name": "m", "pool": ["198.51.100.2", "198.51.100.2"]}, "entry.pool[1]"),
        ("masquerade", {"name": "m", "pool": ["198.51.100.2", "fd00::2"]}, "entry.pool[1]"),
        ("masquerade", {"name": "m", "source": "fd00::/64", "pool": ["198.51.100.2"]}, "entry.pool"),
        ("masquerade", {"name": "m", "pool_ports": [5000]}, "entry.pool_ports"),
        ("masquerade", {"name": "m", "pool": ["198.51.100.2"], "pool_ports": [70000]}, "entry.pool_ports[0]"),
        ("masquerade", {"name": "m", "helpers": ["gopher"]}, "entry.helpers[0]"),
        ("masquerade", {"name": "m", "protocol": "udp", "helpers": ["ftp"]}, "entry.helpers[0]"),
    ]
    for table, raw, field in cases:
        with pytest.raises(ValidationError) as err:
            model.normalize_entry(table, raw)
        assert err.value.field == field, (raw, err.value)
    with pytest.raises(ValidationError) as err:
        model.normalize_table("masquerade", [{"name": "a", "pool": ["198.51.100.2"]},
                                             {"name": "b", "pool": ["198.51.100.2"]}])
    assert err.value.field == "entries[1].pool"


def test_pool_and_helpers_render():
    e = model.normalize_entry("masquerade", {"name": "inside", "source": "10.16.0.0/24",
                                             "pool": ["198.51.100.2", "198.51.100.3"], "pool_ports": [5000],
                                             "helpers": ["h323", "ftp"]})
    assert e["helpers"] == ["ftp", "h323"]
    frag = render.masquerade_fragment([e])
    out_map, in_map = render.pool_map_names(e)
    post = frag.chains["postrouting"].rules
    assert post == (
        "ip saddr 10.16.0.0/24 snat ip to ip saddr map @%s" % out_map,
        "ip saddr 10.16.0.0/24 snat ip to numgen inc mod 2 map { 0 : 198.51.100.2, 1 : 198.51.100.3 }")
    assert "update @%s { ct original ip saddr timeout 3600s : ip saddr }" % out_map in \
        frag.chains["pool_record"].rules[0]
    assert frag.chains["pool_prerouting"].rules == (
        "fib daddr type local meta l4proto { tcp, udp } th dport { 5000 } dnat ip to ip daddr map @%s" % in_map,)
    assert frag.chains["helpers"].rules == (
        'ip saddr 10.16.0.0/24 meta l4proto tcp th dport { 21 } ct state new ct helper set "helper_ftp_tcp"',
        'ip saddr 10.16.0.0/24 meta l4proto udp th dport { 1719 } ct state new ct helper set "helper_h323_udp"',
        'ip saddr 10.16.0.0/24 meta l4proto tcp th dport { 1720 } ct state new ct helper set "helper_h323_tcp"')
    assert frag.maps["helper_h323_tcp"] == render.MapDef(
        "helper_h323_tcp", "ct helper", 'type "Q.931" protocol tcp; l3proto inet;')
    # a plain rule renders as before: no pool or helper objects
    plain = render.masquerade_fragment([model.normalize_entry("masquerade", {"name": "p"})])
    assert plain.chains["postrouting"].rules == ("masquerade",) and not plain.maps


def test_service_applies_and_removes_pool_and_helpers(tmp_path):
    service = Service(str(tmp_path / "s"), nft=FakeNftables())
    service.start()
    rule = {"name": "inside", "source": "10.16.0.0/24", "pool": ["198.51.100.2"], "helpers": ["ftp"]}
    assert service.handle({"op": "add", "table": "masquerade", "entry": rule})["ok"]
    dump = service.nft.dump()
    assert "ct helper helper_ftp_tcp {" in dump and "chain pool_record {" in dump
    assert service.handle({"op": "flush", "table": "masquerade"})["ok"]
    dump = service.nft.dump()
    assert "helper_ftp" not in dump and "pool_" not in dump


def test_masqctl_options():
    request = ipmasqadm.parse("autofw -A -r udp 6970 7170 -c tcp 7070 --keyed-by-peer -t 2".split()).request
    assert request["entry"]["keyed_by_peer"] is True and request["entry"]["timeout"] == 2
    request = ipmasqadm.parse(["masq", "-A", "-s", "10.16.0.0/24", "--pool", "198.51.100.2,198.51.100.3",
                               "--pool-ports", "5000:5010", "--helper", "ftp,tftp", "--name", "x", "-j", "MASQ"]).request
    assert request["entry"] == {"source": "10.16.0.0/24", "pool": ["198.51.100.2", "198.51.100.3"],
                                "pool_ports": ["5000-5010"], "helpers": ["ftp", "tftp"], "name": "x"}


def test_module_logic_knows_the_new_fields():
    after = resource.desired_table("masquerade", "overridden",
                                   [{"name": "x", "pool": ["198.51.100.2"], "helpers": ["tftp", "ftp"]}], [])
    assert after[0]["helpers"] == ["ftp", "tftp"] and after[0]["pool_ports"] is None
    assert resource.table_commands("masquerade", [], after) == [
        "masq -A --pool 198.51.100.2 --helper ftp,tftp --name x -j MASQ"]
    auto = resource.desired_table("autofw", "merged", [dict(CONTROL, keyed_by_peer=True)], [])
    assert resource.table_commands("autofw", [], auto) == [
        "autofw -A -r udp 6970 7170 -c tcp 7070 --keyed-by-peer -t 15"]
    # switching to a hidden host drops keyed_by_peer with the control port
    hidden = resource.desired_table("autofw", "merged", [{"protocol": "udp", "low_port": 6970,
                                                         "high_port": 7170, "hidden_host": "10.16.0.27"}], auto)
    assert hidden[0]["keyed_by_peer"] is False and hidden[0]["control_port"] is None
