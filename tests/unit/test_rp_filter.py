"""rp_filter warnings for source classifiers (pure logic; the lab proves the packets)."""

from masqd.rp_filter import not_strict, read_rp_filter, rp_filter_warnings

FRIEND = {"name": "friend", "mark": 1, "source": "203.0.113.0/24", "source_invert": False,
          "input_interface": None}
NEUTRAL = dict(FRIEND, name="neutral", mark=3, source_invert=True)


def test_effective_value_is_the_max_of_all_and_the_interface():
    assert not_strict({"all": 1, "eth0": 0, "eth1": 1}) == {}
    assert not_strict({"all": 1, "eth0": 2}) == {"eth0": 2}  # all=1 does not tighten a loose interface
    assert not_strict({"all": 0, "eth0": 1, "eth1": 0}) == {"eth1": 0}
    assert not_strict({"all": 2, "eth0": 1}) == {"eth0": 2}
    assert not_strict({"all": 0}) == {"all": 0}


def test_source_classifier_without_interface_warned_unless_strict():
    loose = rp_filter_warnings([FRIEND, NEUTRAL], {"all": 2, "eth0": 2, "eth2": 2})
    assert len(loose) == 1 and "friend" in loose[0] and "eth0 (loose)" in loose[0] and "eth2 (loose)" in loose[0]
    assert rp_filter_warnings([FRIEND], {"all": 1, "eth0": 0, "eth2": 1}) == []
    bound = dict(FRIEND, input_interface="eth2")
    assert rp_filter_warnings([bound], {"all": 0, "eth0": 0}) == []
    assert rp_filter_warnings([dict(FRIEND, source=None)], {"all": 0, "eth0": 0}) == []


def test_ipv6_source_classifier_always_needs_an_interface():
    v6 = dict(FRIEND, source="2001:db8:100::/64")
    warnings = rp_filter_warnings([v6], {"all": 1, "eth0": 1})
    assert len(warnings) == 1 and "IPv6 has no reverse-path filter" in warnings[0]


def test_read_rp_filter(tmp_path):
    for name, value in (("all", "1"), ("default", "2"), ("lo", "0"), ("eth0", "2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rp_filter").write_text(value + "\n")
    assert read_rp_filter(str(tmp_path)) == {"all": 1, "eth0": 2}
    assert read_rp_filter(str(tmp_path / "missing")) == {}
