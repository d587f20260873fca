# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Client of the masqd agent: newline-delimited JSON over its Unix socket.

Standard library only: this runs on the gateway (Python 3.8+). The protocol is
docs/agent-api.md: one JSON object and a newline per request and per response.
"""

from __future__ import annotations

import json
import socket as _socket

DEFAULT_SOCKET = "/run/masqd/masqd.sock"
# Responses carry whole tables plus counters; bound them anyway.
MAX_RESPONSE = 512 * 1024 * 1024  # a 1,000,000-key `list` is ~190 MiB


class MasqdError(Exception):
    """The agent refused a request; `field`/`value` name what was wrong."""

    def __init__(self, message, field=None, value=None):
        super(MasqdError, self).__init__(message)
        self.message = message
        self.field = field
        self.value = value

    def __str__(self):
        if self.field is None:
            return self.message
        return "%s: %s (value: %s)" % (self.field, self.message, json.dumps(self.value))

    def to_dict(self):
        return {"field": self.field, "value": self.value, "message": self.message}


class MasqdNotRunning(MasqdError):
    """Nothing listens on the socket (or it does not exist)."""


class MasqdConnectionError(MasqdError):
    """The socket exists but talking to the agent failed (permissions, protocol)."""


class MasqdClient(object):
    """One connection to masqd; several requests may share it.

    >>> with MasqdClient("/run/masqd/masqd.sock") as agent:
    ...     rev = agent.request("get", table="portfw")["revision"]
    """

    def __init__(self, path=DEFAULT_SOCKET, timeout=30.0):
        self.path = path
        self.timeout = timeout
        self._sock = None
        self._buffer = bytearray()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def connect(self):
        if self._sock is not None:
            return
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise MasqdNotRunning(
                "masqd is not running at %s: apply the ipmasq.gateway.gateway role to install and start it"
                % self.path)
        except PermissionError:
            sock.close()
            raise MasqdConnectionError(
                "permission denied on the masqd socket %s: run the task as root (become: true)" % self.path)
        except OSError as exc:
            sock.close()
            raise MasqdConnectionError("cannot connect to masqd at %s: %s" % (self.path, exc))
        self._sock = sock

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = bytearray()

    def request(self, op, **arguments):
        """Send one request; return the whole response envelope (ok is true).

        Raises MasqdError with the agent's field/value/message when ok is false.
        """
        self.connect()
        message = dict(arguments, op=op)
        try:
            self._sock.sendall(json.dumps(message).encode("utf-8") + b"\n")
            line = self._read_line()
        except _socket.timeout:
            self.close()
            raise MasqdConnectionError("masqd at %s did not answer %r within %s s" % (self.path, op, self.timeout))
        except OSError as exc:
            self.close()
            raise MasqdConnectionError("lost the connection to masqd at %s: %s" % (self.path, exc))
        try:
            response = json.loads(line.decode("utf-8"))
        except ValueError:
            self.close()
            raise MasqdConnectionError("masqd at %s sent a malformed response: %r" % (self.path, line[:200]))
        if not isinstance(response, dict):
            raise MasqdConnectionError("masqd at %s sent a malformed response: %r" % (self.path, line[:200]))
        if not response.get("ok"):
            error = response.get("error") or {}
            if not isinstance(error, dict):
                error = {"message": str(error)}
            raise MasqdError(error.get("message") or "request refused", error.get("field"), error.get("value"))
        return response

    def _read_line(self):
        """The next line, read into a bytearray (a 100,000-key list is ~17 MB: joining
        bytes objects chunk by chunk would copy it hundreds of times)."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        while end < 0:
            scanned = len(buffer)
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise OSError("connection closed by the agent")
            buffer += chunk
            if len(buffer) > MAX_RESPONSE:
                raise OSError("response larger than %d bytes" % MAX_RESPONSE)
            end = buffer.find(b"\n", scanned)
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        return line
