"""sd_notify(3) without libsystemd: one datagram to the socket in $NOTIFY_SOCKET.

With `Type=notify` systemd counts the service as started only when it sends READY=1:
masqd sends it once its table is programmed and its socket accepts requests, so units
ordered after it, and `systemctl start`, see a working agent. STOPPING=1 tells systemd
a shutdown has begun. Without $NOTIFY_SOCKET (no systemd) nothing is sent.
"""

import logging
import os
import socket

log = logging.getLogger("masqd.sdnotify")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=...") to systemd; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is not a Unix socket path: not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1\nSTATUS=%s\nMAINPID=%d" % (status, os.getpid()))


def stopping() -> bool:
    return notify("STOPPING=1")
