"""Run programs inside a named network namespace, without the `ip` binary.

The child process joins the namespace with setns(2) between fork and exec, so the
parent (and its threads) never leave their own namespace.
"""

import ctypes
import os
import subprocess

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns):
    return os.path.join(NETNS_RUN_DIR, netns)


def _joiner(fd):
    def join():
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns: %s" % os.strerror(err))
        # Own process group, so teardown can signal the program and its children.
        os.setpgid(0, 0)
    return join


def popen(netns, argv, **kwargs):
    """Start `argv` inside `netns`; returns the subprocess.Popen."""
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return subprocess.Popen(argv, preexec_fn=_joiner(fd), **kwargs)
    finally:
        os.close(fd)


def run(netns, argv, timeout, check=False, **kwargs):
    """Run `argv` inside `netns` to completion, bounded by `timeout` seconds."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    proc = popen(netns, argv, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result
