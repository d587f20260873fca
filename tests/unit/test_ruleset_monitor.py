"""The ruleset monitor's reading of foreign changes to masqd's tables (the main one and
the PORTFW shard tables, render.TABLES): pure message handling, no socket."""

from masqd import render
from masqd.nfnetlink import NFPROTO_INET
from masqd.watchers.ruleset import NFT_MSG_NEWGEN, NFTA_CHAIN_NAME, NFTA_TABLE, Message, RulesetMonitor

NEWTABLE, DELTABLE, DELCHAIN = 0, 2, 5


def batch(*changes):
    """The reports of one foreign batch of (message type, table, chain or None)."""
    reports = []
    monitor = RulesetMonitor(reports.append, lambda reason: None)
    for kind, table, chain in changes:
        attrs = {NFTA_TABLE: table.encode() + b"\0"}
        if chain:
            attrs[NFTA_CHAIN_NAME] = chain.encode() + b"\0"
        monitor.handle(Message(kind, 4242, NFPROTO_INET, attrs))
    monitor.handle(Message(NFT_MSG_NEWGEN, 4242, 0, {}))
    return reports


def test_a_shard_table_change_is_drift_and_only_the_main_table_going_is_a_table_deletion():
    (shard,) = batch((DELCHAIN, "masqd_portfw_5", "pf_0500000000000001"), (DELTABLE, "masqd_portfw_5", None))
    assert not shard.table_deleted and shard.change_count == 2
    assert shard.changes == ["delete chain pf_0500000000000001", "delete table inet masqd_portfw_5"]
    (main,) = batch(*[(DELTABLE, name, None) for name in render.TABLES])  # flush ruleset
    assert main.table_deleted and main.change_count == len(render.TABLES)
    assert main.summary().startswith("delete table inet masqd (9 objects)")


def test_other_tables_are_not_ours():
    assert batch((NEWTABLE, "masqd_portfw_x", None), (DELCHAIN, "masqd2", "c"), (DELTABLE, "other", None)) == []
