"""Python client of masqd's Unix socket (newline-delimited JSON, docs/agent-api.md).

    from masqd.client import Client
    with Client() as agent:
        agent.request("add", table="portfw", entry={...})

`request` returns the response envelope of a successful call and raises MasqdError
(field, value, message) when the agent answers `ok: false`, AgentUnavailable when
nothing answers on the socket.
"""

import gc
import json
import os
import select
import socket

DEFAULT_SOCKET = "/run/masqd/masqd.sock"
SOCKET_ENV = "MASQD_SOCKET"
# The agent refuses larger requests; a response is never larger than the state.
MAX_MESSAGE = 1 << 20
MAX_RESPONSE = 512 << 20  # a 1,000,000-key `list` is ~190 MiB


def default_socket_path():
    """The socket path used when none is given: $MASQD_SOCKET, else the default."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class MasqdError(Exception):
    """The agent refused a request; `field` and `value` name the offending input."""

    def __init__(self, field, value, message):
        self.field = field
        self.value = value
        self.message = message
        super().__init__(self.__str__())

    @classmethod
    def from_envelope(cls, envelope):
        error = envelope.get("error") or {}
        return cls(error.get("field"), error.get("value"), error.get("message") or "request refused")

    def __str__(self):
        if self.field:
            return "%s=%s: %s" % (self.field, json.dumps(self.value), self.message)
        return self.message


class AgentUnavailable(Exception):
    """Nothing (or not masqd) answers on the socket."""


def _is_envelope(value):
    """{"ok": true, "result": {...}, ...} or {"ok": false, "error": {...}}: what callers index."""
    if not isinstance(value, dict) or not isinstance(value.get("ok"), bool):
        return False
    if value["ok"]:
        return isinstance(value.get("result"), dict)
    return isinstance(value.get("error"), dict)


class Client:
    """One connection to masqd, opened on first use and kept for further requests."""

    def __init__(self, socket_path=None, timeout=60.0):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._sock = None
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise AgentUnavailable(
                "masqd is not running at %s: start it (masqd --socket %s) or point "
                "--socket/%s at the running agent (%s)"
                % (self.socket_path, self.socket_path, SOCKET_ENV, exc.strerror)) from exc
        except PermissionError as exc:
            sock.close()
            raise AgentUnavailable(
                "permission denied on masqd's socket %s: only root or members of the "
                "agent's --group may use it" % self.socket_path) from exc
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            sock.close()
            raise AgentUnavailable("cannot connect to masqd at %r: %s" % (self.socket_path, exc)) from exc
        self._sock = sock
        self._reader = sock.makefile("rb")

    def _closed_by_agent(self):
        """The agent hung up an idle connection (its idle timeout, or to make room):
        nothing was sent on it since the last answer, so reconnecting is safe."""
        try:
            readable, _w, _x = select.select([self._sock], [], [], 0)
            return bool(readable) and self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def call(self, request):
        """Send one request dict, return the agent's envelope as is (ok or not)."""
        if self._sock is not None and self._closed_by_agent():
            self.close()
        if self._sock is None:
            self._connect()
        line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        try:
            self._sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent may have answered (a refusal) and hung up: read it
        except OSError as exc:
            self.close()
            raise AgentUnavailable("connection to masqd at %s failed: %s" % (self.socket_path, exc)) from exc
        # The collector paused while the reply is decoded: a 100,000-key list is as many
        # dicts, and each collection their allocation sets off traverses everything the
        # caller holds as well.
        enabled = gc.isenabled()
        gc.disable()
        try:
            envelope, received = self._read_envelope(MAX_RESPONSE)
            while envelope.get("more") is True:  # a streamed reply (`stream`): the parts' entries, in order
                part, size = self._read_envelope(MAX_RESPONSE - received)
                received += size
                if not all(e["ok"] and isinstance(e["result"].get("entries"), list) for e in (envelope, part)):
                    self.close()
                    raise AgentUnavailable("masqd at %s broke off a streamed reply" % self.socket_path)
                envelope["result"]["entries"].extend(part["result"]["entries"])
                envelope["more"] = part.get("more")
        finally:
            if enabled:
                gc.enable()
        envelope.pop("more", None)
        return envelope

    def _read_envelope(self, limit):
        """(one envelope, the bytes of its line)."""
        try:
            reply = self._reader.readline(limit + 1)
        except OSError as exc:
            self.close()
            raise AgentUnavailable("connection to masqd at %s failed: %s" % (self.socket_path, exc)) from exc
        if not reply.endswith(b"\n"):
            self.close()
            raise AgentUnavailable("masqd at %s closed the connection without an answer" % self.socket_path)
        try:
            envelope = json.loads(reply)
        except ValueError as exc:
            self.close()
            raise AgentUnavailable("masqd at %s sent malformed JSON: %s" % (self.socket_path, exc)) from exc
        if not _is_envelope(envelope):
            self.close()
            raise AgentUnavailable("masqd at %s sent an answer that is not a masqd envelope: %.80s"
                                   % (self.socket_path, reply.decode("utf-8", "replace").strip()))
        return envelope, len(reply)

    def request(self, op, **args):
        """Run `op` with `args`; returns the envelope, raises MasqdError on ok: false."""
        request = {"op": op}
        request.update(args)
        envelope = self.call(request)
        if not envelope["ok"]:
            raise MasqdError.from_envelope(envelope)
        return envelope
