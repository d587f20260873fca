"""masqd: the ipmasq.gateway agent (PORTFW, AUTOFW, mfw, marks, masquerading on nftables)."""

__version__ = "0.1.0"
