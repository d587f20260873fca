"""The agent's long-lived watchers: each runs in its own thread, reports what it sees
to the Service (the single writer of kernel and state), and offers one interface:

  start() -> bool   subscribe and run; True once running (before the agent says ready)
  stop()            end the thread (idempotent)
  stats() -> dict   what `status` reports under watchers.<name>
  running, name     attributes

  conntrack.AutofwWatcher   conntrack events -> AUTOFW control-port recipients
  ruleset.RulesetMonitor    nftables events (and a slow verification) -> drift repair
  health.HealthWatcher      backend probes (tcp, http, icmp) -> backends out of/into schedules
"""

from typing import Any, Dict, Protocol


class Watcher(Protocol):
    name: str
    running: bool

    def start(self) -> bool: ...

    def stop(self) -> None: ...

    def stats(self) -> Dict[str, Any]: ...
