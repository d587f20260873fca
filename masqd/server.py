"""masqd's Unix socket server: newline-delimited JSON in, Service envelopes out.

One thread per connection; the Service serialises writes with its own lock. The
socket is 0600 (0660 with a group) in a 0700 (0750) directory, and every peer is
checked with SO_PEERCRED as well, so a loosened file mode does not open the agent.

Hostile clients: no regex ever runs over a request (backtracking holds the GIL and
froze every client); nesting is bounded by the JSON parser's own recursion limit and a
linear walk of what it built. A request must arrive whole within REQUEST_TIMEOUT once
its first byte came; a connection idle for IDLE_TIMEOUT is closed; when all
MAX_CONNECTIONS slots are taken the longest-idle connection makes room, and root keeps
ROOT_RESERVE further slots, so held-open connections never lock the operator out.
"""

import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time

from masqd.nft import TRIM_AFTER, trim_heap

log = logging.getLogger("masqd.server")

MAX_REQUEST = 256 << 20        # bytes, newline excluded: a 1,000,000-key `set` (~140-200 MiB) fits
MAX_DEPTH = 32                 # JSON nesting levels
MAX_CONNECTIONS = 64
MAX_DISCARD = 64 << 20         # an oversized request is skipped up to this much, then hung up
ROOT_RESERVE = 8               # connections beyond MAX_CONNECTIONS that only uid 0 may take
REQUEST_TIMEOUT = 10.0         # seconds: a started request must arrive whole within this
IDLE_TIMEOUT = 60.0            # seconds: a connection waiting for its next request is closed after this
RESPONSE_TIMEOUT = 30.0        # seconds: a client must read its response within this (it may be 200 MiB)
_CHUNK = 1 << 20


class ServerError(Exception):
    """The server cannot start (socket in use, path not a socket, ...)."""


def error_envelope(field, value, message):
    return {"ok": False, "error": {"field": field, "value": value, "message": message}}


def json_depth(value, limit=MAX_DEPTH):
    """Nesting depth of a parsed JSON value (a scalar is 0, `[]` is 1), counted level by
    level in linear time; stops counting at limit + 1."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level and depth <= limit:
        depth += 1
        below = []
        append = below.append
        for item in level:
            for child in (item.values() if isinstance(item, dict) else item):
                kind = type(child)  # json.loads makes plain dicts and lists only: no isinstance needed
                if kind is dict or kind is list:
                    append(child)
        level = below
    return depth


def parse_request(raw):
    """Bytes of one request line -> (request dict, None) or (None, error envelope).

    The parser bounds nesting itself (RecursionError near the interpreter's limit, in
    linear time); json_depth then applies MAX_DEPTH to what it built. A request with
    fewer brackets than MAX_DEPTH cannot be too deep and skips the walk."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, error_envelope("request", None, "request is not UTF-8: %s" % exc)
    too_deep = error_envelope("request", None, "JSON nested deeper than %d levels" % MAX_DEPTH)
    try:
        request = json.loads(text)
    except RecursionError:
        return None, too_deep
    except ValueError as exc:
        return None, error_envelope("request", text[:80], "malformed JSON: %s" % exc)
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and json_depth(request) > MAX_DEPTH:
        return None, too_deep
    if not isinstance(request, dict):
        return None, error_envelope("request", None, "a request is a JSON object, got %s" % type(request).__name__)
    return request, None


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def process_groups(pid):
    """Supplementary groups of a live process (what it really holds, not /etc/group)."""
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def resolve_group(group):
    """A group name or number -> gid; None stays None."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if str(group).isdigit():
            return int(group)
        raise ServerError("--group %r: no such group" % group)


class _Slot:
    """One served connection: its thread, since when it has been waiting for a request
    (None while a request is being read or answered) and whether it was evicted."""

    __slots__ = ("thread", "idle_since", "evicted")

    def __init__(self) -> None:
        self.thread: "threading.Thread | None" = None
        self.idle_since: "float | None" = time.monotonic()
        self.evicted = False


class Server:
    """Serves `service.handle` on a Unix socket at `socket_path`.

    prepare() takes the socket (refusing a live agent), listen() binds it,
    serve_forever() runs until shutdown() (callable from a signal handler).
    """

    def __init__(self, service, socket_path, group=None, idle_timeout=IDLE_TIMEOUT,
                 request_timeout=REQUEST_TIMEOUT):
        self.service = service
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.socket_path = os.path.abspath(socket_path)
        self.gid = resolve_group(group)
        self.group = group
        self._listener = None
        self._lock_fd = None
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._stopping = False
        self._closed = False
        self._conns = {}
        self._conns_lock = threading.Lock()

    # -- start -----------------------------------------------------------------------
    @property
    def lock_path(self):
        return self.socket_path + ".lock"

    def prepare(self):
        """Make the directory and take the socket path, before the Service touches the kernel."""
        directory = os.path.dirname(self.socket_path)
        self._prepare_directory(directory)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServerError("another masqd is already running on %s" % self.socket_path)
        try:
            self._remove_stale_socket()
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _prepare_directory(self, directory):
        mode = 0o750 if self.gid is not None else 0o700
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=mode, exist_ok=True)
            os.chmod(directory, mode)
            if self.gid is not None:
                os.chown(directory, -1, self.gid)
            return
        # Adjust an existing directory only when it is evidently ours (holds nothing
        # but this socket and its lock): never chmod /run or /tmp.
        info = os.stat(directory)
        ours = {os.path.basename(self.socket_path), os.path.basename(self.lock_path)}
        if (set(os.listdir(directory)) <= ours and not info.st_mode & stat.S_ISVTX
                and info.st_uid == os.geteuid()):
            if stat.S_IMODE(info.st_mode) != mode:
                os.chmod(directory, mode)
            if self.gid is not None and info.st_gid != self.gid:
                os.chown(directory, -1, self.gid)

    def _remove_stale_socket(self):
        try:
            info = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise ServerError("%s exists and is not a socket: refusing to replace it" % self.socket_path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(self.socket_path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s", self.socket_path)
            os.unlink(self.socket_path)
            return
        except OSError as exc:
            raise ServerError("cannot probe existing socket %s: %s" % (self.socket_path, exc))
        finally:
            probe.close()
        raise ServerError("another agent answers on %s: refusing to start" % self.socket_path)

    def listen(self):
        if self._lock_fd is None:
            self.prepare()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket never exists with a looser mode than wanted, not even briefly.
        old = os.umask(0o177)
        try:
            listener.bind(self.socket_path)
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(self.socket_path, -1, self.gid)
            os.chmod(self.socket_path, 0o660)
        listener.listen(16)
        listener.setblocking(False)
        self._listener = listener
        log.info("listening on %s (mode %s%s)", self.socket_path,
                 "0660" if self.gid is not None else "0600",
                 ", group %s" % self.group if self.gid is not None else "")

    # -- run -------------------------------------------------------------------------
    def serve_forever(self):
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _events in selector.select():
                    if key.fileobj is self._listener and not self._stopping:
                        self._accept()
        finally:
            selector.close()
            self.close()

    def shutdown(self):
        """Stop serving; safe from a signal handler or another thread."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _accept(self):
        try:
            conn, _peer = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        try:
            uid = peer_credentials(conn)[1]
        except OSError:
            conn.close()
            return
        slot = _Slot()
        slot.thread = threading.Thread(target=self._serve_connection, args=(conn, slot), daemon=True,
                                       name="masqd-conn")
        with self._conns_lock:
            admitted = self._make_room(uid)
            if admitted:
                self._conns[conn] = slot
        if not admitted:
            self._send(conn, error_envelope(None, None, "too many connections (%d)" % MAX_CONNECTIONS))
            conn.close()
            return
        slot.thread.start()

    def _make_room(self, uid):
        """Whether a new connection of `uid` may be served (call with _conns_lock held).
        When every slot is taken, the longest-idle connection is closed to make room;
        when none is idle, root still has ROOT_RESERVE slots."""
        live = [(slot.idle_since, conn) for conn, slot in self._conns.items() if not slot.evicted]
        if len(live) < MAX_CONNECTIONS:
            return True
        idle = [item for item in live if item[0] is not None]
        if idle:
            since, victim = min(idle, key=lambda item: item[0])
            self._conns[victim].evicted = True
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)  # its thread's recv returns EOF
            log.info("all %d connections taken: closed one idle for %.1fs", MAX_CONNECTIONS,
                     time.monotonic() - since)
            return True
        return uid == 0 and len(live) < MAX_CONNECTIONS + ROOT_RESERVE

    def close(self):
        """Release everything (listener, socket file, lock); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._lock_fd is not None:  # only the owner of the path removes the socket
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        with self._conns_lock:
            conns = dict(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for slot in conns.values():
            if slot.thread is not None and slot.thread.ident is not None:
                slot.thread.join(timeout=5)
        if self._lock_fd is not None:
            # The lock file stays: unlinking it would let two agents lock two inodes.
            os.close(self._lock_fd)
            self._lock_fd = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info("stopped; removed %s", self.socket_path)

    # -- one connection ----------------------------------------------------------------
    def authorise(self, pid, uid, gid):
        """None if the peer may use the agent, else the refusal message."""
        if uid == 0 or uid == os.geteuid():
            return None
        if self.gid is not None and (gid == self.gid or self.gid in process_groups(pid)):
            return None
        who = "members of group %s" % self.group if self.gid is not None else "no other user"
        return "uid %d may not use masqd: only root (and %s) may" % (uid, who)

    def _serve_connection(self, conn, slot):
        try:
            pid, uid, gid = peer_credentials(conn)
            refusal = self.authorise(pid, uid, gid)
            if refusal:
                log.warning("refused peer pid %d uid %d: %s", pid, uid, refusal)
                self._send(conn, error_envelope("peer", uid, refusal))
                # Let the peer finish writing its request before the hang-up, so it
                # reads the refusal instead of a broken pipe.
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(MAX_REQUEST)
                return
            pending = bytearray()
            while not self._stopping:
                raw = self._next_request(conn, slot, pending)
                if raw is None:
                    return
                if isinstance(raw, dict):  # a refusal of what was read (too large, too slow)
                    hang_up = raw.pop("hang_up", False)
                    if not self._send(conn, raw) or hang_up:
                        return
                    continue
                raw = raw.rstrip(b"\r")
                if not raw.strip():
                    continue
                large = len(raw) > TRIM_AFTER
                request, response = self.answer(raw)
                if request.get("stream") is True and response["ok"]:
                    sent = self._send_stream(conn, response)
                else:
                    sent = self._send(conn, response)
                if not sent:
                    return
                if large:
                    # The request's text and its parsed objects are freed by now; glibc
                    # keeps their memory in its heap (the agent's RSS) unless trimmed.
                    raw = None
                    trim_heap()
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                log.warning("connection error: %s", exc)
        finally:
            with self._conns_lock:
                self._conns.pop(conn, None)
            conn.close()

    def _next_request(self, conn, slot, pending):
        """The next request line (bytes, newline removed), read through `pending`.

        Returns an error envelope for a request over MAX_REQUEST (skipped up to
        MAX_DISCARD) or one not complete within request_timeout of its first byte
        (marked hang_up), and None to hang up silently: EOF, idle_timeout with nothing
        pending, or eviction to make room for a new connection."""
        scanned = discarded = 0
        started = time.monotonic() if pending else None
        if not pending:
            slot.idle_since = time.monotonic()
        while True:
            newline = pending.find(b"\n", scanned)
            if newline >= 0:
                line = bytes(pending[:newline])
                del pending[:newline + 1]
                if discarded or len(line) > MAX_REQUEST:
                    return error_envelope("request", None, "request larger than %d bytes" % MAX_REQUEST)
                return line
            if discarded or len(pending) > MAX_REQUEST:  # once over, every chunk is dropped as it comes
                discarded += len(pending)
                pending.clear()
                if discarded > MAX_REQUEST + MAX_DISCARD:
                    return None
            scanned = len(pending)
            now = time.monotonic()
            if started is None:
                left = slot.idle_since + self.idle_timeout - now
            else:
                left = started + self.request_timeout - now
            chunk = b""
            if left > 0:
                conn.settimeout(left)
                try:
                    chunk = conn.recv(_CHUNK)
                except socket.timeout:
                    left = 0
            if left <= 0:
                if started is None:
                    log.debug("closing a connection idle for %gs", self.idle_timeout)
                    return None
                log.warning("closing a connection whose request was not complete within %gs",
                            self.request_timeout)
                envelope = error_envelope("request", None, "request not complete within %g seconds of its "
                                          "first byte: closing the connection" % self.request_timeout)
                envelope["hang_up"] = True
                return envelope
            if not chunk:
                return None
            if started is None:
                with self._conns_lock:
                    if slot.evicted:
                        return None
                    slot.idle_since = None
                started = time.monotonic()
            pending += chunk

    def answer(self, raw):
        """(the request, {} if it did not parse; the response envelope) of one request
        line (never raises)."""
        request, error = parse_request(raw)
        if error:
            return {}, error
        try:
            response = self.service.handle(request, owned=True)  # parsed here, used by nobody else
        except Exception:  # the Service must not raise; a bug must not kill the agent
            log.exception("internal error handling op %r", request.get("op"))
            return request, error_envelope(None, None, "internal error in masqd (see its log)")
        if request.get("op") == "status" and response.get("ok") and isinstance(response.get("result"), dict):
            if not response["result"].get("socket"):
                response["result"]["socket"] = self.socket_path
        return request, response

    @classmethod
    def _send_stream(cls, conn, envelope):
        """A reply to `"stream": true`: the envelope once per part of its entries (the
        Service's EntryParts), each but the last with "more": true. The client decodes
        one part while the next is built and encoded (a 100,000-key list is ~17 MB)."""
        parts = iter(envelope["result"]["entries"])
        part = next(parts, [])
        while part is not None:
            following = next(parts, None)
            line = dict(envelope, result=dict(envelope["result"], entries=part))
            if following is not None:
                line["more"] = True
            if not cls._send(conn, line):
                return False
            part = following
        return True

    @staticmethod
    def _send(conn, envelope):
        """Send one envelope; False if the client is gone or does not read it in time."""
        try:
            conn.settimeout(RESPONSE_TIMEOUT)
            conn.sendall(json.dumps(envelope, separators=(",", ":")).encode() + b"\n")
            return True
        except OSError:
            return False
