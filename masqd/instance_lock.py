"""One agent per state directory and one per network namespace.

Two agents on one state directory would each append to the journal from their own
view and lose acknowledged changes; two agents in one namespace would each replace
the other's `inet masqd` table. So the daemon takes, before it touches the kernel:

- an exclusive flock(2) on the state directory itself (no extra file to leave
  behind); the holder is found through /proc/locks;
- an abstract Unix socket named after the network namespace's inode. Abstract
  names live in the network namespace, so the name is unique per namespace, and the
  kernel drops it with the process (no stale lock after kill -9); the holder is found
  through /proc/net/unix and /proc/PID/fd.

Both are held for the life of the process. The message for a second agent names the
running one: its pid, state dir and socket (read from its command line).
"""

import errno
import fcntl
import os
import socket
from typing import List, Optional

NETNS_LOCK_PREFIX = "ipmasq.gateway/masqd/net:"


class AlreadyRunning(Exception):
    pass


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def describe(pid: Optional[int]) -> str:
    """'pid N, state dir D, socket S' of a running masqd, from its command line."""
    if pid is None:
        return "pid unknown"
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv = [a.decode("utf-8", "replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return "pid %d" % pid

    def option(name: str) -> Optional[str]:
        for i, arg in enumerate(argv):
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
        return None

    from masqd.client import default_socket_path
    from masqd.daemon import DEFAULT_STATE_DIR
    return "pid %d, state dir %s, socket %s" % (pid, option("--state-dir") or DEFAULT_STATE_DIR,
                                                option("--socket") or default_socket_path())


def flock_holder(path: str) -> Optional[int]:
    """The pid holding a flock on `path`, from /proc/locks."""
    st = os.stat(path)
    device = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    candidates: List[int] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" lines are waiters
            continue
        if fields[5] == device:
            return int(fields[4])
        if fields[5].rsplit(":", 1)[-1] == str(st.st_ino):
            candidates.append(int(fields[4]))
    return candidates[0] if len(candidates) == 1 else None


def abstract_socket_holder(name: str) -> Optional[int]:
    """The pid owning the abstract Unix socket `name` (in this namespace)."""
    inode = None
    try:
        with open("/proc/net/unix") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == "@" + name:
                    inode = fields[6]
                    break
    except OSError:
        return None
    if inode is None:
        return None
    target = "socket:[%s]" % inode
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir("/proc/%s/fd" % entry):
                if os.readlink("/proc/%s/fd/%s" % (entry, fd)) == target:
                    return int(entry)
        except OSError:
            continue
    return None


class InstanceLock:
    """The two locks of one agent; `state_dir` must exist (Store.ensure_dir)."""

    def __init__(self, state_dir: str, netns_name: Optional[str] = None):
        self.state_dir = state_dir
        self.netns_name = netns_name or "%s%d" % (NETNS_LOCK_PREFIX, netns_inode())
        self._dir_fd: Optional[int] = None
        self._netns_socket: Optional[socket.socket] = None

    def acquire_state_dir(self) -> None:
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning("state dir %s is in use by another masqd (%s); one agent per state dir"
                                 % (self.state_dir, describe(flock_holder(self.state_dir)))) from None
        self._dir_fd = fd

    def acquire_netns(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind("\0" + self.netns_name)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            raise AlreadyRunning("another masqd runs in this network namespace (%s); one agent per "
                                 "namespace, it owns the table inet masqd"
                                 % describe(abstract_socket_holder(self.netns_name))) from None
        self._netns_socket = sock

    def release(self) -> None:
        if self._netns_socket is not None:
            self._netns_socket.close()
            self._netns_socket = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
