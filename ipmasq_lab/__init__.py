"""ipmasq_lab: network-namespace labs that prove gateway behaviour with real packets.

    import ipmasq_lab
    with ipmasq_lab.lab("seed") as lab:          # a shipped topology, a path or a dict
        lab.run("client", ["ping", "-c", "1", "-W", "1", lab.address("web1")])

See docs/lab.md for the spec format, the CLI (ipmasq-lab), the pytest fixtures and
the Ansible module.
"""

from .errors import LabError, LabSpecError
from .lab import Lab, lab
from .spec import shipped_topologies, validate

__all__ = ["Lab", "LabError", "LabSpecError", "lab", "shipped_topologies", "validate"]
