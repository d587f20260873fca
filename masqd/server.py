"""masqd's Unix socket server: newline-delimited JSON in, Service envelopes out.

One thread per connection; the Service serialises writes with its own lock. The
socket is 0600 (0660 with a group) in a 0700 (0750) directory, and every peer is
checked with SO_PEERCRED as well, so a loosened file mode does not open the agent.
"""

import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import re
import selectors
import socket
import stat
import struct
import threading

log = logging.getLogger("masqd.server")

MAX_REQUEST = 32 << 20         # bytes, newline excluded: a 200,000-key `set` (~28 MiB) fits
MAX_DEPTH = 32                 # JSON nesting levels
MAX_CONNECTIONS = 64
MAX_DISCARD = 64 << 20         # an oversized request is skipped up to this much, then hung up

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


class ServerError(Exception):
    """The server cannot start (socket in use, path not a socket, ...)."""


def error_envelope(field, value, message):
    return {"ok": False, "error": {"field": field, "value": value, "message": message}}


def json_depth(text):
    """Deepest nesting of arrays/objects in `text` (strings skipped)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot be deeper than the limit: skip the scan
    depth = deepest = 0
    for char in _BRACKETS.findall(_STRING.sub("", text)):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_request(raw):
    """Bytes of one request line -> (request dict, None) or (None, error envelope)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, error_envelope("request", None, "request is not UTF-8: %s" % exc)
    if json_depth(text) > MAX_DEPTH:
        return None, error_envelope("request", None, "JSON nested deeper than %d levels" % MAX_DEPTH)
    try:
        request = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, error_envelope("request", text[:80], "malformed JSON: %s" % exc)
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


class Server:
    """Serves `service.handle` on a Unix socket at `socket_path`.

    prepare() takes the socket (refusing a live agent), listen() binds it,
    serve_forever() runs until shutdown() (callable from a signal handler).
    """

    def __init__(self, service, socket_path, group=None):
        self.service = service
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
        with self._conns_lock:
            crowded = len(self._conns) >= MAX_CONNECTIONS
        if crowded:
            self._send(conn, error_envelope(None, None, "too many connections (%d)" % MAX_CONNECTIONS))
            conn.close()
            return
        thread = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                                  name="masqd-conn")
        with self._conns_lock:
            self._conns[conn] = thread
        thread.start()

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
        for thread in conns.values():
            thread.join(timeout=5)
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

    def _serve_connection(self, conn):
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
            reader = conn.makefile("rb")
            while not self._stopping:
                raw = reader.readline(MAX_REQUEST + 2)
                if not raw:
                    return
                if not raw.endswith(b"\n"):
                    if len(raw) <= MAX_REQUEST or not self._discard_line(reader):
                        return  # EOF in the middle of a request
                    self._send(conn, error_envelope(
                        "request", None, "request larger than %d bytes" % MAX_REQUEST))
                    continue
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue
                if len(raw) > MAX_REQUEST:
                    self._send(conn, error_envelope("request", None, "request larger than %d bytes" % MAX_REQUEST))
                    continue
                if not self._send(conn, self.answer(raw)):
                    return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                log.warning("connection error: %s", exc)
        finally:
            with self._conns_lock:
                self._conns.pop(conn, None)
            conn.close()

    @staticmethod
    def _discard_line(reader, bound=MAX_DISCARD):
        """Skip the rest of an oversized request so the client can read the refusal."""
        while bound > 0:
            chunk = reader.readline(1 << 20)
            if not chunk:
                return False
            if chunk.endswith(b"\n"):
                return True
            bound -= len(chunk)
        return False

    def answer(self, raw):
        """The response envelope for one request line (never raises)."""
        request, error = parse_request(raw)
        if error:
            return error
        try:
            response = self.service.handle(request)
        except Exception:  # the Service must not raise; a bug must not kill the agent
            log.exception("internal error handling op %r", request.get("op"))
            return error_envelope(None, None, "internal error in masqd (see its log)")
        if request.get("op") == "status" and response.get("ok") and isinstance(response.get("result"), dict):
            if not response["result"].get("socket"):
                response["result"]["socket"] = self.socket_path
        return response

    @staticmethod
    def _send(conn, envelope):
        try:
            conn.sendall(json.dumps(envelope, separators=(",", ":")).encode() + b"\n")
            return True
        except OSError:
            return False
