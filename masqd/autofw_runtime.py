"""AUTOFW control-port detection at run time: who receives each range now.

The conntrack watcher (masqd.watchers.conntrack) reports each new control connection
through the gateway; the Service (holding its lock) calls `seen`, which writes the
sender as the entry's recipient into the entry's own timed map, and as its holder into
the holder set: both with the entry's timeout, both refreshed by the kernel on every
later control packet of the holder (render.autofw_refresh_rules), so an active
control connection keeps its range and one idle for the timeout lets it expire — the
2.2 code's timer, without an event reaching Python. The most recent new control
connection wins (per external peer with keyed_by_peer); the loser stops being the
holder, so its packets no longer refresh anything.

Records here are what the agent knows (since when, whom it replaced); the kernel's
elements are the truth for whether a recipient is still there and for how long.
"""

import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from masqd import render
from masqd.nft import NftError

log = logging.getLogger("masqd.autofw")

WAITING = "waiting: no control traffic seen"
NO_WATCHER = "inactive: control-port watcher not running"

Key = Tuple[str, int, int]
Record = Dict[str, Any]


class AutofwRecipients:
    def __init__(self, nft: Callable[[], Any], clock: Callable[[], float] = time.monotonic) -> None:
        self._nft = nft  # the Service's kernel backend, once it has one
        self.clock = clock
        self.live: Dict[Key, Dict[Optional[str], Record]] = {}  # key -> {peer or None: record}

    def snapshot(self) -> "AutofwRecipients":
        """A copy for readers off the service lock (records are replaced, not mutated)."""
        view = AutofwRecipients(self._nft, self.clock)
        view.live = {key: dict(records) for key, records in self.live.items()}
        return view

    # --- detection ------------------------------------------------------------------

    def seen(self, entries: Dict[Key, Dict[str, Any]], protocol: str, source: str, destination: str,
             port: int, kind: str = "new") -> List[Tuple[Key, str]]:
        """A control connection from `source` to `destination`:`port` was created
        (`kind` "new"): every matching entry gets `source` as recipient. Returns
        [(entry key, "set" | "replaced" | "refreshed")]. Updates ("update") of existing
        connections change nothing: the kernel refreshes the holder's range itself."""
        if kind != "new":
            return []
        done = []
        for key, entry in entries.items():
            if entry["control_protocol"] == protocol and entry["control_port"] == port:
                action = self._program(key, entry, source, destination)
                if action:
                    done.append((key, action))
        return done

    def _program(self, key: Key, entry: Dict[str, Any], source: str, destination: str) -> Optional[str]:
        family = 6 if ":" in source else 4
        peer = destination if entry["keyed_by_peer"] else None
        live = self.live.setdefault(key, {})
        current = live.get(peer)
        ops: List[render.Op] = []
        if current is not None and current["address"] == source:
            action = "refreshed"
        else:
            action = "replaced" if current is not None else "set"
            others = [current] if current is not None else []
            if peer is None:  # one client at a time (the seed's limit)
                others = list(live.values())
                live.clear()
            for other in others:
                ops += remove_ops(entry, other)
        ops += add_ops(entry, family, peer, source, entry["timeout"], entry["timeout"])
        try:
            self._nft().apply(render.Transaction(ops))
        except NftError as exc:
            log.warning("autofw %s: cannot program recipient %s: %s", key_text(key), source, exc)
            return None
        wall = time.time()
        record: Record = {"address": source, "family": family, "peer": peer, "refreshed": self.clock(),
                          "since": wall, "replaced": None}
        if current is not None and action == "refreshed":
            record.update(since=current["since"], replaced=current["replaced"])
        elif current is not None:
            record["replaced"] = {"address": current["address"], "at": iso(wall)}
        live[peer] = record
        if action != "refreshed":
            log.info("autofw %s: recipient %s%s%s", key_text(key), source,
                     " for peer %s" % peer if peer else "",
                     " (replaced %s)" % current["address"] if current is not None else "")
        return action

    def forget(self, old_entries: Dict[Key, Dict[str, Any]], keys: Iterable[Key]) -> None:
        """Drop the detected recipients of changed or deleted entries (`old_entries`:
        the table before the change), from the kernel and from the records."""
        for key in keys:
            live = self.live.pop(key, None)
            entry = old_entries.get(key)
            if not live or entry is None or entry["hidden_host"] is not None:
                continue
            ops: List[render.Op] = []
            for record in live.values():
                ops += remove_ops(entry, record)
            try:
                self._nft().apply(render.Transaction(ops))
            except NftError as exc:  # a deleted entry's maps are gone already: nothing to remove
                log.debug("autofw %s: recipients not removed: %s", key_text(key), exc)

    # --- carrying recipients over a full re-sync -------------------------------------

    def carried(self, entries: Dict[Key, Dict[str, Any]], kernel: Any) -> List[render.Op]:
        """Ops that re-create the recipients and holders the kernel held (`kernel`, a
        KernelTable read before the re-sync) with their remaining time; when the table
        was gone, those the agent knows of, with a whole timeout (the kernel's refreshes
        since are not known: an active client keeps its range, an idle one gets at most
        one timeout more). Also rebuilds the records to match."""
        ops: List[render.Op] = []
        now = self.clock()
        live: Dict[Key, Dict[Optional[str], Record]] = {}
        for key, entry in entries.items():
            if entry["hidden_host"] is not None:
                continue
            known = self.live.get(key, {})
            for family in (4, 6):
                r_name, _k = render.autofw_recipient_element(entry, family)
                h_name, _k = render.autofw_holder_element(entry, family, "")
                if kernel is not None:
                    recipients = kernel.timed.get(r_name, {})
                    holders = kernel.timed.get(h_name, {})
                    for elem, (address, timeout, expires) in recipients.items():
                        peer = elem if entry["keyed_by_peer"] else None
                        _n, holder = render.autofw_holder_element(entry, family, address or "", peer)
                        if not address or not expires or holder not in holders:
                            continue
                        ops += add_ops(entry, family, peer, address, timeout or entry["timeout"], expires)
                        old = known.get(peer) or {}
                        live.setdefault(key, {})[peer] = {
                            "address": address, "family": family, "peer": peer,
                            "refreshed": now - ((timeout or entry["timeout"]) - expires),
                            "since": old.get("since", time.time()), "replaced": old.get("replaced")}
                else:
                    for peer, record in known.items():
                        if record["family"] == family:
                            ops += add_ops(entry, family, peer, record["address"], entry["timeout"], entry["timeout"])
                            live.setdefault(key, {})[peer] = dict(record, refreshed=now)
        self.live = live
        return ops

    # --- the listing -----------------------------------------------------------------

    @staticmethod
    def map_names(entries: Dict[Key, Dict[str, Any]]) -> List[str]:
        return [render.autofw_recipient_element(e, family)[0]
                for e in entries.values() if e["hidden_host"] is None for family in (4, 6)]

    def runtime(self, key: Key, entry: Dict[str, Any], kernel: Dict[str, Dict[str, Any]],
                watcher_running: Optional[bool]) -> Dict[str, Any]:
        """The entry with recipient, expires, recipients and status (docs/agent-api.md)."""
        entry = dict(entry, recipient=entry["hidden_host"], expires=None, recipients=[])
        if entry["hidden_host"]:
            entry["status"] = "active"
            return entry
        live = self.live.get(key, {})
        for peer, record in sorted(live.items(), key=lambda item: item[0] or ""):
            name, elem = render.autofw_recipient_element(entry, record["family"], peer)
            seen = kernel.get(name, {}).get(elem)
            if seen is None or seen["value"] != record["address"]:
                continue  # expired (the kernel's job) or gone
            entry["recipients"].append({
                "peer": peer, "address": record["address"], "expires": seen["expires"],
                "since": iso(record["since"]), "replaced": record["replaced"]})
        if entry["recipients"] and not entry["keyed_by_peer"]:
            entry["recipient"] = entry["recipients"][0]["address"]
            entry["expires"] = entry["recipients"][0]["expires"]
        if entry["recipients"]:
            entry["status"] = "active"
        elif watcher_running is False:
            entry["status"] = NO_WATCHER
        else:
            entry["status"] = WAITING
        return entry


def add_ops(entry: Dict[str, Any], family: int, peer: Optional[str], address: str,
            timeout: int, expires: int) -> List[render.Op]:
    """Write `address` as recipient and holder. `expires` as well as `timeout`:
    re-adding an existing element updates its expiry only when told so (kernel 6.x)."""
    r_name, r_key = render.autofw_recipient_element(entry, family, peer)
    h_name, h_key = render.autofw_holder_element(entry, family, address, peer)
    timing = "timeout %ds expires %ds" % (timeout, max(1, expires))
    return [render.Op("add", "element", r_name, [("%s %s" % (r_key, timing), address)]),
            render.Op("add", "element", h_name, [("%s %s" % (h_key, timing), None)])]


def remove_ops(entry: Dict[str, Any], record: Record) -> List[render.Op]:
    """Delete a recipient and its holder, which may have expired meanwhile: add each
    (same value: a no-op or a re-creation), then delete it, in one transaction."""
    r_name, r_key = render.autofw_recipient_element(entry, record["family"], record["peer"])
    h_name, h_key = render.autofw_holder_element(entry, record["family"], record["address"], record["peer"])
    return [render.Op("add", "element", r_name, [("%s timeout 1s" % r_key, record["address"])]),
            render.Op("delete", "element", r_name, [r_key]),
            render.Op("add", "element", h_name, [("%s timeout 1s" % h_key, None)]),
            render.Op("delete", "element", h_name, [h_key])]


def key_text(key: Key) -> str:
    return "%s %d-%d" % key


def iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
